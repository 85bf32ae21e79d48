"""Engine: the components of a streaming generator and the calls users make (generate, stream, save / load).

Layout on disk (diffusers conventions, the same sub-folders as a Wan2.1 diffusers repository):

    engine_config.json     EngineConfig (sampler settings)
    transformer/           CausalWanTransformer3DModel (config.json + diffusion_pytorch_model.safetensors)
    vae/                   AutoencoderKLWan
    text_encoder/          UMT5EncoderModel          (optional: prompt_embeds= can be given instead)
    tokenizer/             tokenizer files           (optional)
    fast_decoder/          FastVideoDecoder          (optional: TAEHV-style streaming decoder, decoder="fast")
    README.md              model card (optional)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from .models.causal_wan import CausalWanTransformer3DModel
from .models.fast_decoder import FastVideoDecoder
from .models.precision import bf16_matmul_is_native, float32_compute
from .models.text import encode_prompts
from .models.vae_kernels import fast_wan_vae
from .sampling.block_sampler import Conditioning, iter_blocks, num_renoise
from .sampling.codec import (StreamingDecoder, StreamingFastDecoder, num_video_frames, spatial_compression,
                             temporal_compression)
from .sampling.noise import SamplerNoise
from .sampling.schedule import FewStepSchedule
from .models.kv_cache import POSITION_MODES
from .prompts import prompt_validator
from .io import atomic_directory, cast_module, load_model_weights, quiet_loaders, to_uint8
from .video import write_mp4

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}  # float64: for gradient checks against finite differences
OUTPUT_TYPES = ("np", "pt", "latent")
DECODERS = ("vae", "fast")  # the full Wan VAE decoder, or the optional fast streaming decoder (fast_decoder/)


@dataclass
class EngineConfig:
    """Sampler settings of a generator (saved as engine_config.json).

    guidance_scale uses the standard convention uncond + w * (cond - uncond); 1.0 = off (distilled models).
    local_attn_frames: latent frames one block attends to, its own included (None = the whole stream);
    sink_frames: first frames kept in the window forever (LongLive's frame sink).
    rope_positions: "window" (positions re-indexed within the attention window: unbounded streams; the default)
    or "absolute" (every frame keeps its absolute position, sinks included, as Self-Forcing's and LongLive's
    local_attn_size + sink_size: their outputs; a stream ends at Wan's 1024-frame RoPE table). The two agree
    until the window first evicts a frame. See engine/models/kv_cache.py.
    """

    denoising_steps: list[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])
    warp_denoising_steps: bool = True
    shift: float = 5.0
    num_train_timesteps: int = 1000
    num_frame_per_block: int = 3
    context_t: float = 0.0
    local_attn_frames: int | None = None
    sink_frames: int = 0
    rope_positions: str = "window"
    guidance_scale: float = 1.0
    negative_prompt: str = ""
    text_max_length: int = 512
    height: int = 480
    width: int = 832
    num_frames: int = 81
    fps: int = 16
    prompt_grammar: str | None = None  # a grammar of engine/prompts.py's registry ("shapes": engine.data.parse_prompt)

    @classmethod
    def from_dict(cls, d: dict) -> "EngineConfig":
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"unknown engine settings {unknown}; valid: {', '.join(sorted(valid))}")
        return cls(**d)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """ValueError naming the setting and its accepted range."""
        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        if not is_int(self.num_frame_per_block) or self.num_frame_per_block < 1:
            raise ValueError(f"num_frame_per_block must be an int >= 1, got {self.num_frame_per_block!r}")
        if self.rope_positions not in POSITION_MODES:
            raise ValueError(f"unknown rope_positions {self.rope_positions!r}; accepted: "
                             f"{', '.join(map(repr, POSITION_MODES))}")
        if not is_int(self.sink_frames) or self.sink_frames < 0:
            raise ValueError(f"sink_frames must be an int >= 0, got {self.sink_frames!r}")
        k, s, w = self.num_frame_per_block, self.sink_frames, self.local_attn_frames
        if w is None:
            if s:
                raise ValueError(f"sink_frames={s} needs a rolling window: set local_attn_frames >= {s + 2 * k}")
        elif not is_int(w) or w < s + 2 * k:
            raise ValueError(f"local_attn_frames={w!r} cannot hold the sink frames and two blocks: it must be an int "
                             f">= sink_frames + 2 * num_frame_per_block = {s + 2 * k} (or None: the whole stream)")

    def schedule(self) -> FewStepSchedule:
        return FewStepSchedule.from_denoising_steps(self.denoising_steps, shift=self.shift,
                                                    warp=self.warp_denoising_steps, context_t=self.context_t,
                                                    num_train_timesteps=self.num_train_timesteps)


@dataclass
class Video:
    """A generated video. frames: uint8 (T, H, W, 3) for output_type="np", float (T, H, W, 3) in [0, 1] for "pt"."""

    frames: np.ndarray | torch.Tensor | None
    latents: torch.Tensor
    noise: SamplerNoise
    fps: int
    timings: dict = field(default_factory=dict)

    def uint8(self) -> np.ndarray:
        f = self.frames
        if isinstance(f, torch.Tensor):
            return to_uint8(f)
        return f

    def save(self, path) -> str:
        """H.264 mp4 through PyAV, written atomically."""
        if self.frames is None:
            raise ValueError("this video holds latents only (output_type='latent'); nothing to save as mp4")
        return write_mp4(path, self.uint8(), self.fps)


@dataclass
class StreamChunk:
    """One block's decoded frames, as soon as they exist."""

    block: int
    num_blocks: int
    frames: np.ndarray | torch.Tensor  # (T_b, H, W, 3)
    latents: torch.Tensor  # (B, C, F_b, h, w)
    seconds_generate: float
    seconds_decode: float
    elapsed: float  # since the call started
    prompt: str | None = None  # the prompt in force for this block (live streams)


def _resolve_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}; accepted: 'cpu', 'cuda', 'cuda:N', 'mps'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} is not available: CUDA is not present on this machine; use 'cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist; {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} is not available on this machine; use 'cpu'")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {device!r}; accepted: 'cpu', 'cuda', 'cuda:N', 'mps'")
    return dev


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype}; accepted: {', '.join(DTYPES)}")
    return dtype


def check_fast_decoder(fast_decoder: FastVideoDecoder, vae: AutoencoderKLWan) -> None:
    """ValueError unless the fast decoder reads the VAE's latents and gives its frame geometry."""
    if not isinstance(fast_decoder, FastVideoDecoder):
        raise ValueError(f"fast_decoder must be a FastVideoDecoder, got {type(fast_decoder).__name__}")
    got = (fast_decoder.config.latent_channels, fast_decoder.temporal_compression, fast_decoder.spatial_compression)
    want = (vae.config.z_dim, temporal_compression(vae), spatial_compression(vae))
    if got != want:
        raise ValueError(f"the fast decoder does not fit the VAE: (latent channels, time, space compression) "
                         f"{got} vs the VAE's {want}")


class Engine:
    """A streaming few-step generator: transformer + VAE (+ text encoder, tokenizer, fast decoder) + sampler
    settings. decoder: "vae" (the full VAE decoder) or "fast" (fast_decoder); generate / stream / live take their
    own decoder= too."""

    def __init__(self, transformer: CausalWanTransformer3DModel, vae: AutoencoderKLWan, text_encoder=None,
                 tokenizer=None, *, fast_decoder: FastVideoDecoder | None = None, decoder: str = "vae", **settings):
        if not isinstance(transformer, CausalWanTransformer3DModel):
            raise ValueError(f"transformer must be a CausalWanTransformer3DModel, got {type(transformer).__name__}")
        self.transformer = transformer.eval()
        self.vae = fast_wan_vae(vae.eval())  # faster CPU kernels for small Wan VAEs, same numbers (vae_kernels.py)
        self.text_encoder = text_encoder.eval() if text_encoder is not None else None
        self.tokenizer = tokenizer
        if fast_decoder is not None:
            check_fast_decoder(fast_decoder, vae)
        # channels-last weights: the layout its forward computes in (2-7x faster convolutions on a CPU)
        self.fast_decoder = fast_decoder.eval().channels_last() if fast_decoder is not None else None
        self.config = EngineConfig.from_dict(settings)
        self.model_card: str | None = None
        self.source: str | None = None
        self.schedule = self.config.schedule()
        prompt_validator(self.config.prompt_grammar)  # a grammar the registry knows (engine/prompts.py)
        schedule = getattr(transformer.config, "noise_schedule", "flow")
        if schedule != "flow":
            raise ValueError(f"this transformer uses the {schedule!r} DDPM schedule; the few-step flow sampler needs "
                             f"'flow' (sample it with engine.sampling.ddpm.ddim_sample)")
        if transformer.config.in_channels != vae.config.z_dim:
            raise ValueError(f"transformer in_channels {transformer.config.in_channels} != VAE z_dim "
                             f"{vae.config.z_dim}")
        self.decoder = self._check_decoder(decoder)

    def _check_decoder(self, decoder: str) -> str:
        """The decoder name if this engine can decode with it; a ValueError naming what it has otherwise."""
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; accepted: {', '.join(map(repr, DECODERS))}")
        if decoder == "fast" and self.fast_decoder is None:
            has = ", ".join(f"{n}/" for n, c in self.components().items() if c is not None)
            where = f"the checkpoint {self.source}" if getattr(self, "source", None) else "this engine"
            raise ValueError(f"decoder='fast' needs a fast decoder, but {where} has none (it has {has}); use "
                             f"decoder='vae', train one with `python -m engine train fast-decoder`, or convert TAEHV "
                             f"weights with `python -m engine convert taehv` (checkpoints/README.md)")
        return decoder

    def streaming_decoder(self, decoder: str | None = None):
        """A fresh streaming decoder for one stream: `decoder` ("vae" | "fast"; None = this engine's default)."""
        if self._check_decoder(decoder or self.decoder) == "fast":
            return StreamingFastDecoder(self.fast_decoder)
        return StreamingDecoder(self.vae)

    # -- devices and persistence ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def to(self, device=None, dtype=None) -> "Engine":
        """Move every component; dtype applies to the transformer and text encoder (the VAE stays float32 on CPU)."""
        dev = _resolve_device(device) if device is not None else self.device
        dt = _resolve_dtype(dtype) if dtype is not None else self.dtype
        if dev.type == "cuda" and dt == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ValueError(f"{torch.cuda.get_device_name(dev)} cannot run bfloat16; accepted on this device: "
                             "float32, float16")
        cast_module(self.transformer, dev, dt)
        if dev.type == "cpu" and dt in (torch.bfloat16, torch.float16) and not bf16_matmul_is_native("cpu"):
            # no bf16 / fp16 matmul hardware (AVX2 only): emulated products are ~5x slower than float32, so the
            # weights stay half precision (memory) and the products run in float32 (benchmarks/RESULTS.md)
            float32_compute(self.transformer)
        for codec in (self.vae, self.fast_decoder):
            if codec is not None:
                cast_module(codec, dev, dt if dev.type != "cpu" or dt == torch.float64 else torch.float32)
        if self.text_encoder is not None:  # half precision for the (large) encoder on GPUs only
            self.text_encoder.to(dev, dt if dev.type == "cuda" else torch.float32)
        return self

    def components(self) -> dict:
        return {"transformer": self.transformer, "vae": self.vae, "text_encoder": self.text_encoder,
                "tokenizer": self.tokenizer, "fast_decoder": self.fast_decoder}

    def save_pretrained(self, path, extra_files: dict[str, str] | None = None) -> Path:
        """Write the engine directory atomically (safetensors weights, JSON configs; extra_files: name -> text
        written beside them, e.g. training.json)."""
        def write(tmp: Path):
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
            with quiet_loaders():
                for name, comp in self.components().items():
                    if comp is not None:
                        comp.save_pretrained(tmp / name)
            (tmp / "engine_config.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=2))
            if self.model_card:
                (tmp / "README.md").write_text(self.model_card)
        return atomic_directory(path, write)

    @classmethod
    def from_pretrained(cls, path, *, device="cpu", dtype="float32", decoder: str = "vae", **overrides) -> "Engine":
        """Load an engine directory; its fast_decoder/ too when it has one (decoder="fast" needs it)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {path} does not exist (see checkpoints/README.md)")
        for sub in ("transformer", "vae"):
            if not (path / sub).is_dir():
                raise FileNotFoundError(f"{path} is not an engine directory: missing {sub}/ "
                                        f"(expected engine_config.json, transformer/, vae/, [text_encoder/, tokenizer/])")
        dev, dt = _resolve_device(device), _resolve_dtype(dtype)
        from .models.quantized_wan import transformer_class_for

        config = CausalWanTransformer3DModel.load_config(path / "transformer")
        transformer = transformer_class_for(config).from_config(config)
        load_model_weights(transformer, path / "transformer")
        with quiet_loaders():
            vae = AutoencoderKLWan.from_pretrained(path / "vae")
        text_encoder = tokenizer = None
        if (path / "text_encoder").is_dir():
            from transformers import AutoTokenizer, UMT5EncoderModel

            with quiet_loaders():
                text_encoder = UMT5EncoderModel.from_pretrained(path / "text_encoder")
                tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        fast_decoder = None
        if (path / "fast_decoder").is_dir():
            fast_decoder = FastVideoDecoder.from_config(FastVideoDecoder.load_config(path / "fast_decoder"))
            load_model_weights(fast_decoder, path / "fast_decoder")
        settings = json.loads((path / "engine_config.json").read_text()) if (path / "engine_config.json").is_file() else {}
        settings.update(overrides)
        eng = cls(transformer, vae, text_encoder, tokenizer, fast_decoder=fast_decoder, **settings)
        eng.source = str(path)
        eng.decoder = eng._check_decoder(decoder)
        if (path / "README.md").is_file():
            eng.model_card = (path / "README.md").read_text()
        return eng.to(dev, dt)

    # -- inputs ---------------------------------------------------------------------------------------------
    def valid_num_frames(self, up_to: int = 200) -> list[int]:
        k, tc = self.config.num_frame_per_block, temporal_compression(self.vae)
        return [1 + tc * (n * k - 1) for n in range(1, up_to // (tc * k) + 2)]

    def latent_frames(self, num_frames: int) -> int:
        """Video frames -> latent frames; error unless they make whole blocks."""
        k, tc = self.config.num_frame_per_block, temporal_compression(self.vae)
        if not isinstance(num_frames, (int, np.integer)) or isinstance(num_frames, bool) or num_frames <= 0:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}; accepted: "
                             f"{', '.join(map(str, self.valid_num_frames(100)))}, ...")
        n = (num_frames - 1) / tc + 1
        if n != int(n) or int(n) % k:
            raise ValueError(f"num_frames={num_frames} is not reachable by whole blocks of {k} latent frames "
                             f"(1 + {tc} (N - 1) frames for N latent frames, N a multiple of {k}); accepted: "
                             f"{', '.join(map(str, self.valid_num_frames(max(100, num_frames + 30))))}, ...")
        return int(n)

    def latent_shape(self, num_frames: int, height: int | None = None, width: int | None = None) -> tuple:
        h, w = height or self.config.height, width or self.config.width
        s = spatial_compression(self.vae) * self.transformer.config.patch_size[1]
        if h % s or w % s or h <= 0 or w <= 0:
            raise ValueError(f"height and width must be positive multiples of {s}, got {h}x{w}")
        sc = spatial_compression(self.vae)
        return (1, self.transformer.config.in_channels, self.latent_frames(num_frames), h // sc, w // sc)

    def make_noise(self, num_frames: int | None = None, seed: int = 0, *, mode: str = "independent",
                   height: int | None = None, width: int | None = None) -> SamplerNoise:
        shape = self.latent_shape(num_frames or self.config.num_frames, height, width)
        dtype = torch.float64 if self.dtype == torch.float64 else torch.float32  # sampler arithmetic precision
        return SamplerNoise.from_seed(seed, shape, num_renoise(self.schedule), mode=mode, device=self.device,
                                      dtype=dtype)

    def encode_prompt(self, prompt: str | list[str]) -> torch.Tensor:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this engine has no text encoder; pass prompt_embeds= instead of a prompt")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        check = prompt_validator(self.config.prompt_grammar)  # the checkpoint's grammar, if it names one
        if check is not None:
            for p in prompts:
                check(p)
        emb = encode_prompts(self.text_encoder, self.tokenizer, prompts, max_length=self.config.text_max_length,
                             device=self.device)
        return emb.to(self.dtype)

    def conditioning(self, prompt=None, prompt_embeds=None, negative_prompt_embeds=None) -> Conditioning:
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt and prompt_embeds")
        text_dim = self.transformer.config.text_dim
        if prompt_embeds is not None:
            if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != text_dim:
                raise ValueError(f"prompt_embeds must be (B, L, {text_dim}), got {tuple(prompt_embeds.shape)}")
            cond = prompt_embeds.to(self.device, self.dtype)
        else:
            cond = self.encode_prompt(prompt)
        uncond = None
        if self.config.guidance_scale != 1.0:
            uncond = negative_prompt_embeds
            if uncond is None:
                uncond = (self.encode_prompt(self.config.negative_prompt) if self.text_encoder is not None
                          and self.config.negative_prompt else torch.zeros_like(cond))
            uncond = uncond.to(self.device, self.dtype).expand_as(cond)
        return Conditioning(cond, uncond, self.config.guidance_scale)

    def _caches(self, cond: Conditioning, shape, differentiable: bool):
        """(cond cache, uncond cache or None) for latents of `shape` (B, C, F, H, W); F only matters without a
        window (then the cache holds the whole video but its last block)."""
        c = self.config
        n_latent = shape[2]
        if c.local_attn_frames is None:
            max_frames = max(n_latent - c.num_frame_per_block, c.num_frame_per_block)
        else:
            max_frames = c.local_attn_frames - c.num_frame_per_block
        h, w = shape[3:]

        def make():
            return self.transformer.make_cache(h, w, max_frames=max_frames, sink_frames=c.sink_frames,
                                               differentiable=differentiable, positions=c.rope_positions)
        return (make(), make() if cond.uses_cfg else None)

    def with_settings(self, **settings) -> "Engine":
        """A shallow copy (sharing the modules) that samples with these EngineConfig settings; self is untouched."""
        if not settings:
            return self
        config = EngineConfig.from_dict({**dataclasses.asdict(self.config), **settings})
        eng = copy.copy(self)
        eng.config, eng.schedule = config, config.schedule()
        return eng

    # -- generation -----------------------------------------------------------------------------------------
    def stream(self, prompt: str | None = None, *, prompt_embeds=None, negative_prompt_embeds=None,
               num_frames: int | None = None, seed: int = 0, noise: SamplerNoise | None = None,
               output_type: str = "np", height: int | None = None, width: int | None = None,
               detach_cache: bool = False, decode: bool = True, decoder: str | None = None) -> Iterator[StreamChunk]:
        """Yield each block's frames as soon as they are decoded (by `decoder`: "vae" | "fast", None = the
        engine's own, `self.decoder`).

        Differentiable when the noise requires grad (then the KV cache runs without in-place writes).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; accepted: {', '.join(OUTPUT_TYPES)}")
        t_start = time.perf_counter()
        if noise is None:
            noise = self.make_noise(num_frames, seed, height=height, width=width)
        else:
            if num_frames is not None and self.latent_frames(num_frames) != noise.shape[2]:
                raise ValueError(f"noise has {noise.shape[2]} latent frames but num_frames={num_frames} needs "
                                 f"{self.latent_frames(num_frames)}")
            if noise.shape[2] % self.config.num_frame_per_block:
                raise ValueError(f"noise has {noise.shape[2]} latent frames, not whole blocks of "
                                 f"{self.config.num_frame_per_block}")
            noise = noise.to(self.device)
        cond = self.conditioning(prompt, prompt_embeds, negative_prompt_embeds)
        if cond.cond.shape[0] != noise.shape[0]:
            raise ValueError(f"{cond.cond.shape[0]} prompts for a noise batch of {noise.shape[0]}")
        grad = torch.is_grad_enabled() and (noise.z0.requires_grad or any(s.requires_grad for s in noise.step_noise))
        table = self.transformer.rope.max_seq_len
        if self.config.rope_positions == "absolute" and noise.shape[2] > table:
            raise ValueError(f"rope_positions='absolute' covers {table} latent frames (Wan's RoPE table); "
                             f"{noise.shape[2]} were asked for: use rope_positions='window' for longer videos")
        caches = self._caches(cond, noise.shape, differentiable=grad)
        decoder = self.streaming_decoder(decoder) if decode and output_type != "latent" else None
        with torch.set_grad_enabled(grad):
            blocks = iter_blocks(self.transformer, cond, noise, self.schedule, caches,
                                 num_frame_per_block=self.config.num_frame_per_block, detach_cache=detach_cache)
            for info in blocks:
                t0 = time.perf_counter()
                frames = None
                if decoder is not None:
                    video = decoder.decode(info["x0"])  # (B, 3, T, H, W) in [-1, 1]
                    video = video if video.dtype == torch.float64 else video.float()
                    frames = (video[0].permute(1, 2, 3, 0) + 1) / 2  # (T, H, W, 3) in [0, 1]
                    if output_type == "np":
                        frames = to_uint8(frames)
                yield StreamChunk(info["block"], info["num_blocks"], frames, info["x0"], info["seconds"],
                                  time.perf_counter() - t0, time.perf_counter() - t_start)

    def generate(self, prompt: str | None = None, *, prompt_embeds=None, negative_prompt_embeds=None,
                 num_frames: int | None = None, seed: int = 0, noise: SamplerNoise | None = None,
                 output_type: str = "np", height: int | None = None, width: int | None = None,
                 detach_cache: bool = False, callback: Callable[[StreamChunk], None] | None = None,
                 decoder: str | None = None) -> Video:
        """Generate a whole video: the concatenation of `stream` for the same arguments."""
        if noise is None:
            noise = self.make_noise(num_frames, seed, height=height, width=width)
        t0 = time.perf_counter()
        chunks = []
        for chunk in self.stream(prompt, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                 num_frames=num_frames, noise=noise, output_type=output_type,
                                 detach_cache=detach_cache, decoder=decoder):
            chunks.append(chunk)
            if callback is not None:
                callback(chunk)
        latents = torch.cat([c.latents for c in chunks], dim=2)
        frames = None
        if output_type == "np":
            frames = np.concatenate([c.frames for c in chunks])
        elif output_type == "pt":
            frames = torch.cat([c.frames for c in chunks])
        total = time.perf_counter() - t0
        n = num_video_frames(self.vae, latents.shape[2])
        timings = {"seconds": total, "first_block_seconds": chunks[0].elapsed, "fps": n / total,
                   "num_frames": n, "num_blocks": len(chunks), "decoder": decoder or self.decoder}
        return Video(frames, latents, noise, self.config.fps, timings)

    def live(self, prompt: str | None = None, *, seed: int = 0, timeline=None, **settings):
        """An open-ended LiveStream (engine/live.py). settings: EngineConfig fields (local_attn_frames,
        sink_frames, rope_positions, denoising_steps, ...) and LiveStream options (recache, lookahead_blocks,
        pace, max_blocks, max_seconds, lock, record, decode, decoder ("vae" | "fast"; default: the engine's),
        height, width, on_frames).

        Without a window in the settings or the engine's config, the live default (`live_default_window`: the
        model's training clip in latent frames, its first block as the sink) is used: a live stream never takes the
        unbounded, drifting path.
        """
        from .live import LiveStream, live_default_window

        fields = {f.name for f in dataclasses.fields(EngineConfig)}
        config = {k: settings.pop(k) for k in list(settings) if k in fields}
        if "local_attn_frames" in config and config["local_attn_frames"] is None:
            raise ValueError("a live stream needs a rolling window: local_attn_frames must be an int, not None")
        if config.get("local_attn_frames", self.config.local_attn_frames) is None:
            window, sink = live_default_window(self.config, temporal_compression(self.vae))
            config.setdefault("local_attn_frames", window)
            config.setdefault("sink_frames", sink)
        return LiveStream(self.with_settings(**config), prompt, seed=seed, timeline=timeline, **settings)

    def replay(self, seed: int, timeline, num_blocks: int, *, output_type: str = "np", **settings) -> Video:
        """Regenerate num_blocks blocks of a live stream from its seed and timeline [(block, prompt), ...]
        (settings as for `live`, e.g. those saved in its JSON); the same frames, bit for bit."""
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        from .live import check_timeline

        timeline = check_timeline(timeline, num_blocks=num_blocks)
        settings = {"pace": False, "record": False, **settings, "max_blocks": num_blocks}
        if output_type not in ("np", "latent"):
            raise ValueError(f"replay output_type must be 'np' or 'latent', got {output_type!r}")
        if output_type == "latent":
            settings["decode"] = False
        t0 = time.perf_counter()
        with self.live(timeline=timeline, seed=seed, **settings) as live:
            chunks = list(live)
        latents = torch.cat([c.latents for c in chunks], dim=2)
        frames = np.concatenate([c.frames for c in chunks]) if output_type == "np" else None
        total = time.perf_counter() - t0
        n = num_video_frames(self.vae, latents.shape[2])
        return Video(frames, latents, None, self.config.fps, {"seconds": total, "fps": n / total, "num_frames": n,
                                                               "num_blocks": len(chunks)})

    def attack(self, prompt: str | None = None, **kwargs):
        """Optimise the sampler noise against an objective; see engine.attack.optimize.attack."""
        from .attack.optimize import attack

        return attack(self, prompt, **kwargs)
