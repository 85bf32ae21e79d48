"""DDPM beta schedules and DDIM sampling, through diffusers' DDPMScheduler / DDIMScheduler.

The alternative to flow matching (`schedule.py`) for models whose config says `noise_schedule: linear | cosine`
(see `engine/models/quantized_wan.py`):

    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps        a_t = alphas_cumprod[t], integer t in [0, T - 1]
    the network predicts eps ("epsilon" prediction, DDPM / diffusers' default)

Beta schedules: "linear" (Ho et al. 2020, betas linear from beta_start to beta_end) and "cosine" (Nichol &
Dhariwal 2021, diffusers' "squaredcos_cap_v2"). Training timesteps are uniform integers in [min_step, max_step]
(the original system: 20 / 980 of 1000). Sampling is DDIM (Song et al. 2021, eq. 12; eta = 0 deterministic,
eta = 1 DDPM-like), either over a whole clip or block by block with a KV cache: `DDIMStep` is a step rule of the
few-step generator's own block loop (`block_sampler.block_loop`).

A fresh DDIMScheduler is made for every call, so no step counter survives between calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from .block_sampler import block_loop

BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # our names -> diffusers' beta_schedule


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or (B, F) per-sample / per-frame coefficients -> broadcastable to like (B, C, F, H, W)."""
    if v.ndim == 1:
        return v.view(-1, *([1] * (like.ndim - 1)))
    if v.ndim == 2 and like.ndim == 5:
        return v[:, None, :, None, None]
    raise ValueError(f"timesteps of shape {tuple(v.shape)} do not broadcast to {tuple(like.shape)}")


@dataclass(frozen=True)
class DDPMSchedule:
    """A DDPM noise schedule (diffusers' tables) with a training timestep range.

    beta_schedule: "linear" | "cosine". min_step, max_step: the inclusive range of training timesteps.
    """

    beta_schedule: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    min_step: int = 20
    max_step: int = 980

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta schedule {self.beta_schedule!r}; accepted: {', '.join(BETA_SCHEDULES)} "
                             f"(flow matching is engine.sampling.schedule.FlowSchedule)")
        if not (isinstance(self.num_train_timesteps, int) and self.num_train_timesteps > 1):
            raise ValueError(f"num_train_timesteps must be an int > 1, got {self.num_train_timesteps!r}")
        if not (0 < self.beta_start < self.beta_end < 1):
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if not (0 <= self.min_step < self.max_step <= self.num_train_timesteps - 1):
            raise ValueError(f"need 0 <= min_step < max_step <= {self.num_train_timesteps - 1}, got "
                             f"min_step={self.min_step}, max_step={self.max_step}")

    @property
    def name(self) -> str:
        return self.beta_schedule

    def _kwargs(self) -> dict:
        return dict(num_train_timesteps=self.num_train_timesteps, beta_schedule=BETA_SCHEDULES[self.beta_schedule],
                    beta_start=self.beta_start, beta_end=self.beta_end, prediction_type="epsilon",
                    clip_sample=False)

    def ddpm_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler(**self._kwargs())

    def ddim_scheduler(self) -> DDIMScheduler:
        """A DDIM scheduler on the same betas ("trailing" spacing: the first step starts at t = T - 1)."""
        return DDIMScheduler(**self._kwargs(), timestep_spacing="trailing", set_alpha_to_one=True)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) float64."""
        return self.ddpm_scheduler().alphas_cumprod.to(torch.float64)

    # -- training -------------------------------------------------------------------------------------------
    def sample_timesteps(self, batch_size: int, *, generator: torch.Generator | None = None,
                         device=None) -> torch.Tensor:
        """Uniform integer timesteps in [min_step, max_step], (B,) long, drawn on the CPU."""
        t = torch.randint(self.min_step, self.max_step + 1, (batch_size,), generator=generator)
        return t.to(device or "cpu")

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(a_t), sqrt(1 - a_t)) broadcastable to `like`, in like's dtype (float32 at least)."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        idx = t.detach().round().long().clamp(0, self.num_train_timesteps - 1).cpu()
        ab = self.alphas_cumprod[idx]
        return (_bcast(ab.sqrt(), like).to(like.device, dtype), _bcast((1 - ab).sqrt(), like).to(like.device, dtype))

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps; t (B,) or per frame (B, F)."""
        a, b = self.coefficients(t, x0)
        return a * x0.to(a.dtype) + b * eps.to(a.dtype)

    def eps_to_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = self.coefficients(t, x_t)
        return (x_t.to(a.dtype) - b * eps.to(a.dtype)) / a

    def x0_to_eps(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = self.coefficients(t, x_t)
        return (x_t.to(a.dtype) - a * x0.to(a.dtype)) / b


def schedule_from_name(name: str, **kw):
    """"flow" -> FlowSchedule; "linear" / "cosine" -> DDPMSchedule. Unknown names: ValueError."""
    if name == "flow":
        from .schedule import FlowSchedule

        return FlowSchedule(**kw)
    if name in BETA_SCHEDULES:
        return DDPMSchedule(name, **kw)
    raise ValueError(f"unknown schedule {name!r}; accepted: flow, {', '.join(BETA_SCHEDULES)}")


class DDIMStep:
    """DDIM (Song et al. 2021, eq. 12) as a step rule of `block_sampler.block_loop`, through diffusers'
    DDIMScheduler: the network predicts eps at integer timestep t_i; x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t),
    x_{i+1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s noise, s = eta * (DDPM posterior std).

    The scheduler keeps no step counter (its `step` reads the timestep it is given), and the noise of eta > 0 comes
    from the caller's generator. A block's output is the sample after its last step (at alpha_prev = 1 when T is a
    multiple of the step count, where it is the x0 prediction itself).
    """

    def __init__(self, schedule: DDPMSchedule, num_inference_steps: int, *, eta: float = 0.0,
                 generator: torch.Generator | None = None):
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.scheduler = schedule.ddim_scheduler()
        self.scheduler.set_timesteps(num_inference_steps)
        self.timesteps = [int(t) for t in self.scheduler.timesteps]
        self.eta, self.generator = eta, generator

    def __len__(self) -> int:
        return len(self.timesteps)

    def timestep(self, i: int) -> float:
        return float(self.timesteps[i])

    def __call__(self, x, eps, i: int, noise, exit: bool):
        out = self.scheduler.step(eps.float(), self.timesteps[i], x, eta=self.eta, generator=self.generator)
        return (out.prev_sample if i + 1 == len(self) else out.pred_original_sample), out.prev_sample


def iter_ddim_blocks(model, cond: torch.Tensor, z: torch.Tensor, schedule: DDPMSchedule, num_inference_steps: int,
                     *, num_frame_per_block: int, cache=None, eta: float = 0.0,
                     generator: torch.Generator | None = None) -> Iterator[dict]:
    """Block-autoregressive DDIM: `block_sampler.block_loop` with the DDIM step rule; each block of latent frames
    is denoised by a full DDIM run while attending to the earlier (clean) blocks through `cache`; the clean block
    then fills the cache at t = 0.

    model: an eps-predicting causal transformer; cond (B, Lc, text_dim); z (B, C, F, H, W) initial noise.
    cache: a KVCache sized for the clip (None: one is made). Yields {"block", "num_blocks", "start", "stop",
    "x0", "exit", "seconds"} per block, like `block_sampler.iter_blocks`.
    """
    rule = DDIMStep(schedule, num_inference_steps, eta=eta, generator=generator)
    k = num_frame_per_block
    _, _, n_frames, H, W = z.shape
    if n_frames % k:
        raise ValueError(f"{n_frames} latent frames are not whole blocks of {k}")
    if cache is None:
        cache = model.make_cache(H, W, max_frames=max(n_frames - k, k))
    dtype = model.dtype
    cond = cond.to(z.device, dtype)

    def denoise(x, t, update):  # (B, C, Fb, H, W), (B, Fb) -> eps
        return model(x.to(dtype), t, cond, kv_cache=cache, update_cache=update).sample

    yield from block_loop(denoise, rule, lambda b: (z[:, :, b * k:(b + 1) * k].float(), []),
                          num_blocks=n_frames // k, context=lambda b, x0, noise: (x0, 0.0))


def ddim_sample(model, cond: torch.Tensor, z: torch.Tensor, schedule: DDPMSchedule, num_inference_steps: int = 50, *,
                num_frame_per_block: int | None = None, eta: float = 0.0, generator: torch.Generator | None = None,
                callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """DDIM sampling of latents (B, C, F, H, W). num_frame_per_block=None: the whole clip as one block."""
    out = []
    for info in iter_ddim_blocks(model, cond, z, schedule, num_inference_steps,
                                 num_frame_per_block=num_frame_per_block or z.shape[2], eta=eta,
                                 generator=generator):
        if callback is not None:
            callback(info)
        out.append(info["x0"])
    return torch.cat(out, dim=2)
