"""The block loop of the Self-Forcing family: the one loop behind inference, the Self-Forcing rollout, DDIM
sampling and the ODE regression (DESIGN.md, "One training system"), so that training sees what inference does
by construction.

A function of (denoiser, step rule, block inputs, ...), k-diffusion style: no hidden step counters, one yield per
block, differentiable end to end when its inputs require grad and the cache is in its differentiable mode.
Per block b, with exit step e_b (default: the last step):

    x = input[b]                                               # sigma = 1 (or the state at e_b: teacher forcing)
    for i in 0 .. e_b:
        out = denoiser(x, t_i)                                 # flow: x0 = x - sigma_i v; DDIM: the eps step
        x0, x = rule(x, out, i, noise[b])                      # flow: x = (1 - sigma_{i+1}) x0 + sigma_{i+1} step[i][b]
    denoiser(context(x0), t_ctx, update_cache=True)            # the block fills the KV cache (not after the last)
    yield x0

What the four users change: the step rule (`FlowStep` / `ddpm.DDIMStep`), the exit step per block
(`exit_steps`), where a block's input sits (`start`), which calls carry gradient (`grad`, `grad_blocks`) and what
the context pass writes (`context`). `iter_blocks` / `sample` (inference), `denoise_block` / `context_pass` (the
live stream's split of one block), `training.rollout.self_forcing_rollout`, `ddpm.iter_ddim_blocks` and
`training.ode.ode_regression` are thin settings of `block_loop`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

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


# -- the loop -----------------------------------------------------------------------------------------------

class StepRule(Protocol):
    """How a block moves from step i to step i + 1 (`FlowStep`, `ddpm.DDIMStep`)."""

    def __len__(self) -> int: ...  # the number of steps

    def timestep(self, i): ...  # the network's timestep at step i (a float, or (B,) for per-sample steps)

    def __call__(self, x: torch.Tensor, out: torch.Tensor, i, noise: list[torch.Tensor],
                 exit: bool) -> tuple[torch.Tensor, torch.Tensor | None]: ...  # -> (x0, x at step i + 1 unless exit)


def block_loop(
    denoise: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor],
    rule: StepRule,
    inputs: Callable[[int], tuple[torch.Tensor, list[torch.Tensor]]],
    *,
    num_blocks: int,
    exit_steps: Sequence | None = None,
    start: str = "noise",
    grad: str = "all",
    grad_blocks: Sequence[bool] | None = None,
    context: Callable[[int, torch.Tensor, list[torch.Tensor]], tuple[torch.Tensor, float]] | None = None,
    before_block: Callable[[int], None] | None = None,
) -> Iterator[dict]:
    """Yield {"block", "num_blocks", "start", "stop", "x0" (B, C, Fb, H, W), "exit", "seconds"} per block.

    denoise(x, t, update_cache): the network with its prompt and KV cache(s) bound (`flow_denoiser`); x
        (B, C, Fb, H, W), t (B, Fb). Called once per step and once per context pass, in stream order.
    rule: the step rule: `len(rule)` steps, `rule.timestep(i)` and `rule(x, out, i, noise, exit) -> (x0, next x)`
        (`FlowStep`: flow matching with re-noising, the few-step generator; `ddpm.DDIMStep`: DDIM on eps).
    inputs(b) -> (x, noise): block b's input (B, C, Fb, H, W), in the dtype of the sampler arithmetic, and the
        noises its rule and context consume (the step noises). Called once per block, in order.
    exit_steps: per block, the step at which it stops: its x0 there is the block's output and its context (the
        Self-Forcing rollout's random exits). None: every block runs all steps (inference, DDIM). With
        start="exit" an entry may be a (B,) tensor of per-sample steps.
    start: "noise": x is the block at step 0 (sigma = 1) and walks to its exit step; "exit": x is already the state
        at the exit step (a point of a teacher's ODE trajectory) and takes that one step (the ODE regression).
    grad: "all": every call records gradient as the caller's autograd mode says (attacks back-propagate through
        all steps and the cache; DDIM; the ODE regression); "exit": only exit steps do, the steps before them and
        the context passes run without (the Self-Forcing rollout: one network call per block in the graph).
    grad_blocks: with grad="exit", per block whether its exit step records gradient (default: every block).
    context(b, x0, noise) -> (input, t): what block b writes into the KV cache for the blocks after it, at timestep
        t (the generated block re-noised to context_t: `flow_context`; DDIM's clean sample at 0; the teacher's x0
        for the ODE regression). Not called after the last block. None: no context pass (a live stream defers it).
    before_block(b): called before block b's input is taken, after block b - 1's context pass: where a prompt
        switch takes effect (the rollout on a timeline switches its prompt and re-caches there, as the live stream).
    """
    if grad not in ("all", "exit"):
        raise ValueError(f"grad must be 'all' or 'exit', got {grad!r}")
    if start not in ("noise", "exit"):
        raise ValueError(f"start must be 'noise' or 'exit', got {start!r}")
    for name, per_block in (("exit_steps", exit_steps), ("grad_blocks", grad_blocks)):
        if per_block is not None and len(per_block) != num_blocks:
            raise ValueError(f"{name} needs one entry per block ({num_blocks}), got {len(per_block)}")
    for b in range(num_blocks):
        t0 = time.perf_counter()
        if before_block is not None:
            before_block(b)
        x, noise = inputs(b)
        B, n = x.shape[0], x.shape[2]
        e = len(rule) - 1 if exit_steps is None else exit_steps[b]
        for i in [e] if start == "exit" else range(e + 1):
            at_exit = start == "exit" or i == e
            # grad="exit": the graph holds one network call per block, its input a constant of the earlier steps
            record = grad == "all" or (at_exit and (grad_blocks is None or grad_blocks[b]))
            with torch.set_grad_enabled(record and torch.is_grad_enabled()):
                out = denoise(x, _t_frames(rule.timestep(i), B, n, x.device), False)
                x0, x = rule(x, out, i, noise, at_exit)
        if context is not None and b + 1 < num_blocks:
            with torch.set_grad_enabled(grad == "all" and torch.is_grad_enabled()):
                ctx, t_ctx = context(b, x0, noise)
                denoise(ctx, _t_frames(t_ctx, B, ctx.shape[2], ctx.device), True)
        yield {"block": b, "num_blocks": num_blocks, "start": b * n, "stop": (b + 1) * n, "x0": x0, "exit": e,
               "seconds": time.perf_counter() - t0}


def _t_frames(t, B: int, n: int, device) -> torch.Tensor:
    """(B, n) per-frame timesteps: all t, or t[s] for every frame of sample s when t is a (B,) tensor."""
    if torch.is_tensor(t):
        return t[:, None].expand(B, n).float()  # (B,) -> (B, n)
    return torch.full((B, n), float(t), device=device, dtype=torch.float32)


# -- flow matching: the few-step generator -------------------------------------------------------------------

@dataclass(frozen=True)
class FlowStep:
    """The few-step rule of DESIGN.md: x0 = x - sigma_i v, then (not at the exit) x = (1 - sigma_{i+1}) x0 +
    sigma_{i+1} step[i], with the block's step noise step[i]. A (B,) tensor i gives per-sample steps."""

    schedule: FewStepSchedule

    def __len__(self) -> int:
        return len(self.schedule)

    def timestep(self, i):
        return torch.tensor(self.schedule.timesteps)[i] if torch.is_tensor(i) else self.schedule.timesteps[i]

    def __call__(self, x, v, i, steps: list[torch.Tensor], exit: bool):
        sigmas = self.schedule.sigmas
        x0 = flow_to_x0(x, v, torch.tensor(sigmas)[i] if torch.is_tensor(i) else sigmas[i])
        return x0, None if exit else add_noise(x0, steps[i], sigmas[i + 1])


def _flow(model, x, t_frames, cond: Conditioning, caches, update: bool, dtype=None) -> torch.Tensor:
    """Network flow prediction for x (B, C, F, H, W) at per-frame timesteps (B, F), with optional CFG."""
    dtype = model.dtype if dtype is None else dtype
    x_in = x.to(dtype)
    v = model(x_in, t_frames, cond.cond.to(dtype), kv_cache=caches[0], update_cache=update).sample
    if not cond.uses_cfg:
        return v
    vu = model(x_in, t_frames, cond.uncond.to(dtype), kv_cache=caches[1], update_cache=update).sample
    return vu.float() + cond.guidance_scale * (v.float() - vu.float())


def flow_denoiser(model, cond: Conditioning, caches, *, dtype: torch.dtype | None = None, text_grad: bool = False):
    """The flow network as `block_loop` calls it: (x, t (B, Fb), update_cache) -> v, with classifier-free guidance.

    caches: one KVCache, or (cond_cache, uncond_cache) for guidance. dtype: the network's (default model.dtype; a
    model wrapped by DDP / FSDP has none). text_grad: a call that records gradient recomputes the prompt's
    cross-attention K/V (the same numbers) so that the text path receives the gradient of its effect and every
    parameter takes part in the backward pass, which DDP needs (the rollout).
    """
    caches = (caches, None) if not isinstance(caches, (tuple, list)) else tuple(caches)
    if cond.uses_cfg and caches[1] is None:
        raise ValueError("classifier-free guidance needs a second KV cache for the negative prompt")

    def denoise(x, t, update):
        if text_grad and torch.is_grad_enabled():
            for cache in caches:
                if cache is not None:
                    cache.cross = [None] * len(cache.cross)
        return _flow(model, x, t, cond, caches, update, dtype)
    return denoise


def context_input(x0: torch.Tensor, steps: list[torch.Tensor], schedule: FewStepSchedule) -> torch.Tensor:
    """What the context pass feeds the network: the clean block, re-noised to context_t if that is > 0 (with the
    block's last step-noise tensor)."""
    return add_noise(x0, steps[-1], schedule.context_sigma) if schedule.context_t > 0 else x0


def flow_context(schedule: FewStepSchedule, *, detach: bool = False):
    """`block_loop`'s context for the few-step generator, the same at inference and in the rollout: the block's x0
    (detached: no gradient path from later blocks through the cache) re-noised to context_t."""
    return lambda b, x0, steps: (context_input(x0.detach() if detach else x0, steps, schedule), schedule.context_t)


def num_renoise(schedule: FewStepSchedule) -> int:
    """Step-noise tensors a schedule consumes: one per re-noising, plus one for context noise if context_t > 0."""
    return len(schedule) - 1 + int(schedule.context_t > 0)


def noise_blocks(noise: SamplerNoise, num_frame_per_block: int, float32: bool = False):
    """`block_loop`'s inputs from a SamplerNoise: block b's z0 (float32, or float64 if it is; float32 alone with
    float32=True) and its step noises."""
    def inputs(b):
        x, steps = noise.block(b * num_frame_per_block, (b + 1) * num_frame_per_block)
        return (x.float() if float32 or x.dtype != torch.float64 else x), steps
    return inputs


def check_blocks(noise: SamplerNoise, schedule: FewStepSchedule, num_frame_per_block: int) -> int:
    """The number of blocks of `noise`; ValueError if its frames are not whole blocks or its step noises do not
    fit the schedule."""
    n_frames = noise.shape[2]
    if n_frames % num_frame_per_block:
        raise ValueError(f"{n_frames} latent frames are not whole blocks of {num_frame_per_block}")
    need = num_renoise(schedule)
    if noise.num_renoise != need:
        raise ValueError(f"noise has {noise.num_renoise} step noises, the schedule needs {need}")
    return n_frames // num_frame_per_block


# -- inference ------------------------------------------------------------------------------------------------

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
    """Inference: `block_loop` with every step of every block, gradient wherever autograd is on (attacks).
    Yields {"block", "num_blocks", "start", "stop", "x0" (B, C, Fb, H, W), "exit", "seconds"} per block.

    caches: one KVCache, or (cond_cache, uncond_cache) for classifier-free guidance. detach_cache=True cuts the
    gradient paths from later blocks through the cache to earlier noise (faster attacks).
    """
    denoise = flow_denoiser(model, cond, caches)
    num_blocks = check_blocks(noise, schedule, num_frame_per_block)
    yield from block_loop(denoise, FlowStep(schedule), noise_blocks(noise, num_frame_per_block),
                          num_blocks=num_blocks, context=flow_context(schedule, detach=detach_cache))


def denoise_block(model, cond: Conditioning, x: torch.Tensor, steps: list[torch.Tensor],
                  schedule: FewStepSchedule, caches) -> torch.Tensor:
    """The few steps of one block: x (B, C, Fb, H, W) at sigma = 1 and its step noises -> x0 (float32 / 64). A live
    stream's block, whose context pass (`context_pass`) waits for a possible prompt switch."""
    x = x.float() if x.dtype != torch.float64 else x
    info = next(block_loop(flow_denoiser(model, cond, caches), FlowStep(schedule), lambda b: (x, steps), num_blocks=1))
    return info["x0"]


def context_pass(model, cond: Conditioning, x0: torch.Tensor, steps: list[torch.Tensor], schedule: FewStepSchedule,
                 caches, *, ctx: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Write a generated block into the KV cache(s) as context for the following blocks; returns its input.

    ctx: the context input itself (a re-cache replays stored inputs); default `context_input(x0, steps, ...)`.
    dtype: the network's (default model.dtype; a wrapped model has none).
    """
    ctx = context_input(x0, steps, schedule) if ctx is None else ctx
    flow_denoiser(model, cond, caches, dtype=dtype)(ctx, _t_frames(schedule.context_t, ctx.shape[0], ctx.shape[2], ctx.device),
                                       True)
    return ctx


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
