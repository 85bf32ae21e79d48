"""The Self-Forcing rollout: the generator samples a video with its own KV cache, exactly as at inference,
and keeps gradient only where the distillation loss needs it (Huang et al. 2025, "Self Forcing", Alg. 1).

Per block b of `num_frame_per_block` latent frames, with few-step timesteps t_0 > t_1 > ... > t_{K-1} and a
random exit step e_b (shared by all processes, so every replica runs the same number of network calls):

    x = z0[b]                                                        sigma = 1
    for i < e_b:  (no gradient)   x0 = x - s_i v(x, t_i);  x = (1 - s_{i+1}) x0 + s_{i+1} step[i][b]
    exit step:    (gradient)      x0_b = x - s_e v(x, t_e)              <- the block's output
    context:      (no gradient)   v(x0_b noised to context_t, context_t)  written to the KV cache

so the graph of one rollout holds one network call per block. It is the inference loop itself
(`block_sampler.block_loop` with the step rule, noise layout and context pass of `iter_blocks`), given exit steps
and grad="exit": training sees the same cache contents, timesteps and noise as inference by construction. A block that exits at
step e stops at an intermediate sample of the few-step chain: its x0 prediction from t_e is what the generator
would produce if it stopped there; the distribution-matching loss is applied to it.

The prompt's cross-attention K/V (cached once per prompt at inference) are recomputed inside each exit step's
graph: the same numbers, but the text path (text embedder, cross-attention K/V projections) receives the
gradient of its effect on the exit step, and every parameter takes part in every backward pass (which DDP needs).

Options: the same exit step for all blocks (`same_step_across_blocks`), the last step only, no gradient for
the first block (`grad_first_block=False`: its frames are masked out of the loss), and the context noise
(`schedule.context_t`). The denoised-timestep range [t_{e+1} (0 after the last step), t_e] is recorded per
block (Self-Forcing's denoised_timestep_to / _from); the DMD loss can draw its timesteps inside it.

Long-horizon distillation (docs/training.md, "Long-horizon DMD"): `window_start` makes the blocks before it history
(no gradient, not returned) and the result the window from there to the last block; with a rolling-window cache
this is the live stream's situation past the clip. A timeline cond (B, F, L, D) switches prompts at block
boundaries exactly as the live stream does (`engine.sampling.recache.switch_prompt`: new cross-attention K/V and,
with `recache`, LongLive's KV re-cache of the window under the new prompt), one implementation for both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.models.kv_cache import KVCache
from engine.sampling.block_sampler import Conditioning, FlowStep, block_loop, flow_context, flow_denoiser, noise_blocks
from engine.sampling.noise import SamplerNoise
from engine.sampling.recache import ContextRecord, switch_prompt
from engine.sampling.schedule import FewStepSchedule


@dataclass
class RolloutResult:
    x0: torch.Tensor  # (B, C, F, H, W) float32, the window's frames; gradient only through each block's exit step
    exit_steps: list[int]  # one per block of the window
    grad_frames: torch.Tensor  # (F,) bool: frames whose x0 carries gradient
    block_ranges: list[tuple[float, float]]  # per block (timestep_to, timestep_from) of its exit step
    window_start: int = 0  # a long rollout: the block of the whole rollout at which x0 (the window) starts
    history: torch.Tensor | None = None  # (B, C, F_h, H, W) x0 of up to history_blocks blocks before the window

    @property
    def timestep_range(self) -> tuple[float, float]:
        """(to, from): the union of the denoised-timestep ranges of the blocks with gradient."""
        ranges = [r for r, g in zip(self.block_ranges, self._block_grad()) if g] or self.block_ranges
        return min(r[0] for r in ranges), max(r[1] for r in ranges)

    def _block_grad(self) -> list[bool]:
        n = len(self.exit_steps)
        fpb = self.grad_frames.numel() // n
        return [bool(self.grad_frames[b * fpb]) for b in range(n)]


def draw_exit_steps(num_blocks: int, num_steps: int, generator: torch.Generator, *,
                    same_step_across_blocks: bool, last_step_only: bool = False) -> list[int]:
    """Exit step per block, uniform over the few-step list. Give every process the same generator seed.

    same_step_across_blocks has no default: every caller says which policy it trains with (RolloutConfig's
    default is False, an exit step per block; Self-Forcing's configs and the shapes recipe use True)."""
    if last_step_only:
        return [num_steps - 1] * num_blocks
    n = 1 if same_step_across_blocks else num_blocks
    steps = torch.randint(0, num_steps, (n,), generator=generator).tolist()
    return steps * num_blocks if same_step_across_blocks else steps


def self_forcing_rollout(
    model: Callable,
    cond: torch.Tensor,
    noise: SamplerNoise,
    schedule: FewStepSchedule,
    make_cache: Callable[[], KVCache],
    *,
    num_frame_per_block: int,
    exit_steps: list[int],
    grad: bool = True,
    grad_first_block: bool = True,
    dtype: torch.dtype | None = None,
    window_start: int = 0,
    recache: bool = True,
    history_blocks: int = 0,
) -> RolloutResult:
    """Roll the generator out over all blocks of `noise` (see the module docstring): the inference loop
    (`block_sampler.block_loop` with the same step rule, noise and context) with exit steps and gradient only there.

    model: the causal transformer (possibly wrapped by DDP / FSDP), called as model(x, t (B, Fb), cond,
        kv_cache=..., update_cache=...). cond: prompt embeddings (B, L, D), or a timeline (B, F, L, D) with one
        prompt per rolled-out latent frame, constant within each block: at a block whose prompt differs from the
        block before (for any batch item) the prompt switches as in the live stream (`recache.switch_prompt`).
        noise: z0 (B, C, F, H, W) and the re-noising / context noises of `schedule` (`block_sampler.num_renoise`).
        make_cache: a fresh KV cache for this rollout; use a differentiable one when grad=True. grad=False: a plain
        sample (critic updates).
    window_start: the first block of the window the result holds (a long rollout: the blocks before it are
        history, run without gradient and not returned; the rollout ends with the window's last block).
    recache: at a switch, re-cache the window's KV under the new prompt (LongLive; the live default) or only
        change the cross-attention prompt.
    history_blocks: also return (detached, as `history`) the x0 of up to this many blocks before the window.
    """
    k = num_frame_per_block
    if noise.shape[2] % k:
        raise ValueError(f"{noise.shape[2]} latent frames are not whole blocks of {k}")
    num_blocks = noise.shape[2] // k
    K = len(schedule)
    if len(exit_steps) != num_blocks or not all(0 <= e < K for e in exit_steps):
        raise ValueError(f"need one exit step in [0, {K}) per block ({num_blocks}), got {exit_steps}")
    if not 0 <= window_start < num_blocks:
        raise ValueError(f"window_start must be a block in [0, {num_blocks}), got {window_start}")
    if dtype is None:
        dtype = next(model.parameters()).dtype
    grad_blocks = [grad and b >= window_start and (grad_first_block or b > 0) for b in range(num_blocks)]
    cond = cond.to(noise.z0.device, dtype)
    prompts = block_prompts(cond, noise.shape[2], k)  # per block (B, L, D), or None: one prompt throughout
    cache = make_cache()
    text = {"denoise": flow_denoiser(model, Conditioning(cond if prompts is None else prompts[0]), cache, dtype=dtype,
                                     text_grad=True)}
    context = flow_context(schedule, detach=True)
    before_block = None
    if prompts is not None:  # a timeline: switches as the live stream makes them
        record = ContextRecord.of(cache)
        live_context = context

        def context(b, x0, steps):
            ctx, t = live_context(b, x0, steps)
            record.add(b * k, ctx)
            return ctx, t

        def before_block(b):
            if b == 0:
                return
            items = (prompts[b] != prompts[b - 1]).flatten(1).any(1)  # (B,) the items whose prompt switches here
            if not items.any():
                return
            text["denoise"] = flow_denoiser(model, Conditioning(prompts[b]), cache, dtype=dtype, text_grad=True)
            switch_prompt(model, prompts[b], schedule, cache, record, k, recache_window=recache,
                          items=None if items.all() else items, dtype=dtype)

    blocks = list(block_loop(lambda x, t, update: text["denoise"](x, t, update), FlowStep(schedule),
                        noise_blocks(noise, k, float32=True), num_blocks=num_blocks, exit_steps=exit_steps,
                        grad="exit", grad_blocks=grad_blocks, context=context, before_block=before_block))
    x0 = torch.cat([info["x0"] for info in blocks if info["block"] >= window_start], dim=2)  # (B, C, F_window, H, W)
    ts = schedule.timesteps
    exits = list(exit_steps[window_start:])
    ranges = [(ts[e + 1] if e + 1 < K else 0.0, ts[e]) for e in exits]
    grad_frames = torch.tensor([g for g in grad_blocks[window_start:] for _ in range(k)])
    hist = [info["x0"].detach() for info in blocks if window_start - history_blocks <= info["block"] < window_start]
    return RolloutResult(x0, exits, grad_frames, ranges, window_start, torch.cat(hist, 2) if hist else None)


def block_prompts(cond: torch.Tensor, num_frames: int, num_frame_per_block: int) -> list[torch.Tensor] | None:
    """The prompt of each block (B, L, D) of a timeline cond (B, F, L, D); None for one prompt (B, L, D).
    ValueError when the timeline does not cover the frames or switches inside a block."""
    if cond.ndim == 3:
        return None
    k = num_frame_per_block
    if cond.ndim != 4 or cond.shape[1] != num_frames:
        raise ValueError(f"cond must be (B, L, D) or a timeline (B, F, L, D) over the rollout's {num_frames} latent "
                         f"frames, got {tuple(cond.shape)}")
    blocks = cond.unflatten(1, (num_frames // k, k))  # (B, n, k, L, D)
    if not torch.equal(blocks, blocks[:, :, :1].expand_as(blocks)):
        raise ValueError(f"a timeline's prompts may switch at block boundaries only (blocks of {k} latent frames)")
    return list(blocks[:, :, 0].unbind(1))
