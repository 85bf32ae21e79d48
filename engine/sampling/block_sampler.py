"""The few-step, block-autoregressive sampler of the Self-Forcing family.

A function of (model, conditioning, noise, schedule, cache), k-diffusion style: no hidden step counters, a
callback per block, differentiable end to end when the noise requires grad and the cache is in its
differentiable mode. Per block b of `num_frame_per_block` latent frames:

    x = z0[b]                                                  # sigma = 1
    for i, t in enumerate(timesteps):
        x0 = x - sigma_i * model(x, t, cond, cache)            # flow -> x0
        if not last: x = (1 - sigma_{i+1}) * x0 + sigma_{i+1} * step[i][b]
    model(x0 noised to context_t, context_t, cond, cache, update_cache=True)   # clean block fills the cache
    yield x0
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .noise import SamplerNoise
from .schedule import FewStepSchedule, add_noise, flow_to_x0


@dataclass
class Conditioning:
    """Prompt embeddings (B, Lc, text_dim) and, for classifier-free guidance, the negative ones.

    guidance_scale w uses the standard convention uncond + w * (cond - uncond); w = 1 means no guidance
    (one network call per step). Self-Forcing's configs write cond + g * (cond - uncond): g = w - 1.
    """

    cond: torch.Tensor
    uncond: torch.Tensor | None = None
    guidance_scale: float = 1.0

    @property
    def uses_cfg(self) -> bool:
        return self.uncond is not None and self.guidance_scale != 1.0


def _flow(model, x, t_frames, cond: Conditioning, caches, update: bool) -> torch.Tensor:
    """Network flow prediction for x (B, C, F, H, W) at per-frame timesteps (B, F), with optional CFG."""
    x_in = x.to(model.dtype)
    v = model(x_in, t_frames, cond.cond.to(model.dtype), kv_cache=caches[0], update_cache=update).sample
    if not cond.uses_cfg:
        return v
    vu = model(x_in, t_frames, cond.uncond.to(model.dtype), kv_cache=caches[1], update_cache=update).sample
    return vu.float() + cond.guidance_scale * (v.float() - vu.float())


def num_renoise(schedule: FewStepSchedule) -> int:
    """Step-noise tensors a schedule consumes: one per re-noising, plus one for context noise if context_t > 0."""
    return len(schedule) - 1 + int(schedule.context_t > 0)


def iter_blocks(
    model,
    cond: Conditioning,
    noise: SamplerNoise,
    schedule: FewStepSchedule,
    caches,
    *,
    num_frame_per_block: int,
    detach_cache: bool = False,
) -> Iterator[dict]:
    """Yield one dict per block: {"block", "num_blocks", "start", "stop", "x0" (B, C, Fb, H, W), "seconds"}.

    caches: one KVCache, or (cond_cache, uncond_cache) for classifier-free guidance. detach_cache=True cuts the
    gradient paths from later blocks through the cache to earlier noise (faster attacks).
    """
    caches = (caches, None) if not isinstance(caches, (tuple, list)) else tuple(caches)
    if cond.uses_cfg and caches[1] is None:
        raise ValueError("classifier-free guidance needs a second KV cache for the negative prompt")
    B, _, n_frames, _, _ = noise.shape
    if n_frames % num_frame_per_block:
        raise ValueError(f"{n_frames} latent frames are not whole blocks of {num_frame_per_block}")
    need = num_renoise(schedule)
    if noise.num_renoise != need:
        raise ValueError(f"noise has {noise.num_renoise} step noises, the schedule needs {need}")
    num_blocks = n_frames // num_frame_per_block

    for b in range(num_blocks):
        t0 = time.perf_counter()
        start, stop = b * num_frame_per_block, (b + 1) * num_frame_per_block
        x, steps = noise.block(start, stop)
        x0 = denoise_block(model, cond, x, steps, schedule, caches)
        if b + 1 < num_blocks:
            context_pass(model, cond, x0.detach() if detach_cache else x0, steps, schedule, caches)
        yield {"block": b, "num_blocks": num_blocks, "start": start, "stop": stop, "x0": x0,
               "seconds": time.perf_counter() - t0}


def denoise_block(model, cond: Conditioning, x: torch.Tensor, steps: list[torch.Tensor],
                  schedule: FewStepSchedule, caches) -> torch.Tensor:
    """The few steps of one block: x (B, C, Fb, H, W) at sigma = 1 and its step noises -> x0 (float32 / 64)."""
    x = x.float() if x.dtype != torch.float64 else x
    B, n = x.shape[0], x.shape[2]
    sigmas = schedule.sigmas
    x0 = x
    for i, t in enumerate(schedule.timesteps):
        v = _flow(model, x, _t_frames(t, B, n, x.device), cond, caches, update=False)
        x0 = flow_to_x0(x, v, sigmas[i])
        if i + 1 < len(sigmas):
            x = add_noise(x0, steps[i], sigmas[i + 1])
    return x0


def context_input(x0: torch.Tensor, steps: list[torch.Tensor], schedule: FewStepSchedule) -> torch.Tensor:
    """What the context pass feeds the network: the clean block, re-noised to context_t if that is > 0 (with the
    block's last step-noise tensor)."""
    return add_noise(x0, steps[-1], schedule.context_sigma) if schedule.context_t > 0 else x0


def context_pass(model, cond: Conditioning, x0: torch.Tensor, steps: list[torch.Tensor], schedule: FewStepSchedule,
                 caches, *, ctx: torch.Tensor | None = None) -> torch.Tensor:
    """Write a generated block into the KV cache(s) as context for the following blocks; returns its input.

    ctx: the context input itself (a re-cache replays stored inputs); default `context_input(x0, steps, ...)`.
    """
    ctx = context_input(x0, steps, schedule) if ctx is None else ctx
    _flow(model, ctx, _t_frames(schedule.context_t, ctx.shape[0], ctx.shape[2], ctx.device), cond, caches,
          update=True)
    return ctx


def _t_frames(t, B: int, n: int, device) -> torch.Tensor:
    """(B, n) per-frame timesteps, all t."""
    return torch.full((B, n), float(t), device=device, dtype=torch.float32)


def sample(model, cond, noise, schedule, caches, *, num_frame_per_block: int,
           callback: Callable[[dict], None] | None = None, detach_cache: bool = False) -> torch.Tensor:
    """Run all blocks; return the latents (B, C, F, H, W). callback(info) after each block."""
    out = []
    for info in iter_blocks(model, cond, noise, schedule, caches, num_frame_per_block=num_frame_per_block,
                            detach_cache=detach_cache):
        if callback is not None:
            callback(info)
        out.append(info["x0"])
    return torch.cat(out, dim=2)
