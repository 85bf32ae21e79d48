"""Flow-matching conventions, written once.

Wan / Self-Forcing flow matching:

    x_t = (1 - sigma) * x0 + sigma * eps        sigma in [0, 1], model timestep t = sigma * T (T = 1000)
    v   = eps - x0                              what the transformer predicts ("flow")
    x0  = x_t - sigma * v

Timestep shift: sigma' = shift * sigma / (1 + (shift - 1) * sigma). The few-step list of Self-Forcing is
"warped" through it: with shift 5, [1000, 750, 500, 250] -> [1000, 937.5, 833.33, 625].

Sampler arithmetic happens in float32 or higher (`COMPUTE_DTYPE` promotion), the network in its own dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _compute(x: torch.Tensor) -> torch.Tensor:
    """Promote to at least float32 for sampler arithmetic (float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def shift_sigma(sigma, shift: float):
    """sigma' = shift * sigma / (1 + (shift - 1) * sigma); works on floats and tensors."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def _bcast(sigma, like: torch.Tensor) -> torch.Tensor:
    """sigma as a float, a (B,) tensor or a (B, F) per-frame tensor -> broadcastable to like (B, C, F, H, W)."""
    if not torch.is_tensor(sigma):
        return torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    sigma = sigma.to(like.device, like.dtype)
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim == 1:  # (B,)
        return sigma.view(-1, *([1] * (like.ndim - 1)))
    if sigma.ndim == 2 and like.ndim == 5:  # (B, F) per frame
        return sigma[:, None, :, None, None]
    raise ValueError(f"sigma of shape {tuple(sigma.shape)} does not broadcast to {tuple(like.shape)}")


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma eps, computed in float32 or higher."""
    x0, eps = _compute(x0), _compute(eps)
    s = _bcast(sigma, x0)
    return (1 - s) * x0 + s * eps


def flow_to_x0(x_t: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """x0 = x_t - sigma * v."""
    x_t = _compute(x_t)
    return x_t - _bcast(sigma, x_t) * _compute(v).to(x_t.dtype)


def x0_to_flow(x_t: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    """v = (x_t - x0) / sigma (undefined at sigma = 0)."""
    x_t = _compute(x_t)
    return (x_t - _compute(x0).to(x_t.dtype)) / _bcast(sigma, x_t)


def x0_to_eps(x_t: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    """eps = (x_t - (1 - sigma) x0) / sigma."""
    x_t = _compute(x_t)
    s = _bcast(sigma, x_t)
    return (x_t - (1 - s) * _compute(x0).to(x_t.dtype)) / s


@dataclass(frozen=True)
class FlowSchedule:
    """The flow-matching schedule of a Wan-family model.

    `num_train_timesteps` is T (model timesteps run from 0 to T); `shift` warps sigmas towards noise.
    """

    num_train_timesteps: int = 1000
    shift: float = 5.0

    def __post_init__(self):
        if not (isinstance(self.num_train_timesteps, int) and self.num_train_timesteps > 0):
            raise ValueError(f"num_train_timesteps must be a positive int, got {self.num_train_timesteps!r}")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {self.shift!r}")

    def sigma_of(self, t):
        """Model timestep -> sigma (t / T)."""
        return t / self.num_train_timesteps

    def timestep_of(self, sigma):
        """sigma -> model timestep (sigma * T)."""
        return sigma * self.num_train_timesteps

    def warp(self, timesteps) -> list[float]:
        """Self-Forcing's warped few-step list: t -> T * shift_sigma(t / T)."""
        T = self.num_train_timesteps
        out = []
        for t in timesteps:
            t = float(t)
            if not (0 <= t <= T):
                raise ValueError(f"timesteps must lie in [0, {T}], got {t}")
            out.append(T * shift_sigma(t / T, self.shift))
        return out

    def euler_timesteps(self, num_steps: int) -> list[float]:
        """num_steps + 1 shifted timesteps from T down to 0, for ODE sampling (teacher, Euler)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        T = self.num_train_timesteps
        return [T * shift_sigma(1 - i / num_steps, self.shift) for i in range(num_steps + 1)]

    def sample_timesteps(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        min_frac: float = 0.02,
        max_frac: float = 0.98,
        device=None,
    ) -> torch.Tensor:
        """Training timesteps: uniform u, shifted, clamped to [min_frac T, max_frac T]. Shape (B,), float32."""
        if not (0 <= min_frac < max_frac <= 1):
            raise ValueError(f"need 0 <= min_frac < max_frac <= 1, got {min_frac}, {max_frac}")
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        sigma = shift_sigma(u, self.shift).clamp(min_frac, max_frac)
        return (sigma * self.num_train_timesteps).float().to(device or "cpu")


@dataclass(frozen=True)
class FewStepSchedule:
    """The few-step list of a distilled generator (model timesteps, descending) and the context timestep."""

    timesteps: tuple[float, ...] = (1000.0, 937.5, 833.3333333333334, 625.0)
    context_t: float = 0.0
    num_train_timesteps: int = 1000

    @classmethod
    def from_denoising_steps(cls, steps, *, shift: float = 5.0, warp: bool = True, context_t: float = 0.0,
                             num_train_timesteps: int = 1000) -> "FewStepSchedule":
        steps = [float(s) for s in steps]
        if not steps:
            raise ValueError("denoising steps must not be empty")
        if any(b >= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"denoising steps must be strictly decreasing, got {steps}")
        flow = FlowSchedule(num_train_timesteps, shift)
        ts = flow.warp(steps) if warp else steps
        if not (0 <= context_t < num_train_timesteps):
            raise ValueError(f"context_t must lie in [0, {num_train_timesteps}), got {context_t}")
        return cls(tuple(ts), float(context_t), num_train_timesteps)

    @property
    def sigmas(self) -> list[float]:
        return [t / self.num_train_timesteps for t in self.timesteps]

    @property
    def context_sigma(self) -> float:
        return self.context_t / self.num_train_timesteps

    def __len__(self) -> int:
        return len(self.timesteps)
