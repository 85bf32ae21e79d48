"""Input and output helpers shared by the engine, the trainer, the attack lab and the converters: atomic
directory writes (engine.atomic), safetensors weight loading with named key errors, dtype casting that keeps diffusers'
float32-only modules, quiet library loaders, frames to uint8. No import of the rest of the engine."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_directory  # the directory form of engine.atomic, re-exported here

__all__ = ["atomic_directory", "cast_module", "check_state_dict", "load_model_weights", "quiet_loaders", "to_uint8"]


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    return (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


@contextlib.contextmanager
def quiet_loaders():
    """Silence the progress bars and notices of diffusers / transformers loaders."""
    import diffusers.utils.logging as dl
    import transformers.utils.logging as tl

    dv, tv = dl.get_verbosity(), tl.get_verbosity()
    dl.set_verbosity_error(), tl.set_verbosity_error()
    tl.disable_progress_bar(), dl.disable_progress_bar()
    try:
        yield
    finally:
        dl.set_verbosity(dv), tl.set_verbosity(tv)
        tl.enable_progress_bar(), dl.enable_progress_bar()


def cast_module(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """model.to(device, dtype), keeping the modules diffusers marks as float32-only in float32."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    torch.nn.Module.to(model, device, dtype)
    if dtype in (torch.float16, torch.bfloat16):
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if any(k in name.split(".") for k in keep) and p.is_floating_point():
                p.data = p.data.float()


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load safetensors weights (single file or sharded) into model; missing / unexpected keys are an error."""
    from safetensors.torch import load_file

    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    single = folder / "diffusion_pytorch_model.safetensors"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for f in files:
            state.update(load_file(folder / f))
    elif single.is_file():
        state = load_file(single)
    else:
        raise FileNotFoundError(f"no diffusion_pytorch_model.safetensors in {folder}")
    check_state_dict(model, state, str(folder))
    model.load_state_dict(state, strict=True)


def check_state_dict(model: torch.nn.Module, state: dict, where: str) -> None:
    """ValueError naming missing and unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def cut(xs):
            return ", ".join(xs[:10]) + (f" ... ({len(xs)} in all)" if len(xs) > 10 else "")
        raise ValueError(f"weights in {where} do not fit the model: missing keys [{cut(missing)}]; "
                         f"unexpected keys [{cut(unexpected)}]; shape mismatches [{cut(shapes)}]")
