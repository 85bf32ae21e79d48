"""A streaming engine for few-step, block-autoregressive video generators (the Self-Forcing family).

    import engine
    video = engine.generate("a red circle moving left", num_frames=33, seed=0)   # the shipped default model
    video.save("out.mp4")

    eng = engine.Engine.from_pretrained("checkpoints/shapes-sf")
    for chunk in eng.stream("a blue square moving up", num_frames=33):
        show(chunk.frames)                                              # uint8 (T, H, W, 3) per block
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from .pipeline import Engine, EngineConfig, StreamChunk, Video
from .sampling.block_sampler import Conditioning
from .sampling.noise import SamplerNoise
from .sampling.schedule import FewStepSchedule, FlowSchedule

__all__ = ["Engine", "EngineConfig", "SamplerNoise", "StreamChunk", "Video", "Conditioning", "FewStepSchedule",
           "FlowSchedule", "generate", "default_checkpoint", "load_default"]

DEFAULT_CHECKPOINT_NAME = "shapes-sf"
REPO_ROOT = Path(__file__).resolve().parent.parent


def default_checkpoint() -> Path:
    """The shipped default model: $ENGINE_CHECKPOINT, else checkpoints/shapes-sf next to the package."""
    return Path(os.environ.get("ENGINE_CHECKPOINT", REPO_ROOT / "checkpoints" / DEFAULT_CHECKPOINT_NAME))


@functools.lru_cache(maxsize=2)
def _load(path: str, device: str, dtype: str) -> Engine:
    return Engine.from_pretrained(path, device=device, dtype=dtype)


def load_default(device: str = "cpu", dtype: str = "float32") -> Engine:
    path = default_checkpoint()
    if not path.is_dir():
        raise FileNotFoundError(
            f"the default checkpoint {path} is missing. Get it with the repository (checkpoints/ ships it), "
            f"train it with the recipe in configs/README.md, or convert real weights as described in "
            f"checkpoints/README.md and pass the directory to Engine.from_pretrained (or set ENGINE_CHECKPOINT)")
    return _load(str(path), device, dtype)


def generate(prompt: str | None = None, *, device: str = "cpu", dtype: str = "float32", **kwargs) -> Video:
    """Generate with the default checkpoint (loaded once per process). See Engine.generate for the arguments."""
    return load_default(device, dtype).generate(prompt, **kwargs)
