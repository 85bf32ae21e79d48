"""Perturbation budgets for noise attacks: projections, PGD steps, the chi-shell regulariser, Gaussianity.

An attack changes the sampler noise (``z0`` and the step noises, each (B, C, F, H, W)) away from the seeded
initial noise ``z_init``. A ``Budget`` says how far it may go and how to stay a plausible Gaussian draw.

Conventions (one rule everywhere in this file):

- Dim 0 is the batch. Norms, L2 radii and renormalisation are **per sample**: ``d`` is the number of elements
  of one sample, ``C * F * H * W`` for a noise of shape (B, C, F, H, W). A tensor with fewer than 2 dims is one
  sample. Each noise tensor (``z0``, every step noise) is budgeted on its own.
- ``eps`` is in units of the noise's standard deviation, whatever the kind:
  ``linf``: ``|z - z_init| <= eps`` elementwise; ``l2``: ``||z - z_init||_2 <= eps * sqrt(d)`` per sample,
  i.e. the root-mean-square change is at most ``eps``. So ``eps = 0.1`` is "10% of the noise" in both.
- Everything that changes a tensor returns a new, detached tensor; the ``*_`` variants write into a leaf
  in place (``with torch.no_grad()``), which is what an optimisation loop does after ``optimizer.step()``.

Papers: projected gradient descent with sign steps and random start, Madry et al. 2018, "Towards Deep Learning
Models Resistant to Adversarial Attacks"; the chi-shell norm regulariser, Eyring et al. 2024, "ReNO: Enhancing
One-step Text-to-Image Models through Reward-based Noise Optimization".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

KINDS = ("l2", "linf", "none")


def _flat(z: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, d); a tensor with fewer than 2 dims is one sample -> (1, d)."""
    return z.reshape(1, -1) if z.ndim < 2 else z.reshape(z.shape[0], -1)


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) per-sample value -> broadcastable against ``like`` (B, ...)."""
    return v.reshape(-1, *([1] * (like.ndim - 1))) if like.ndim >= 2 else v


def sample_norms(z: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm (B,), accumulated in float64 (sums of 1e7 squares lose digits in float32)."""
    return _flat(z).pow(2).sum(1, dtype=torch.float64).sqrt()


def renormalize(z: torch.Tensor) -> torch.Tensor:
    """Rescale each sample so that ``||z|| = sqrt(d)``, the norm a standard Gaussian has on average (RMS 1)."""
    z = z.detach()
    d = _flat(z).shape[1]
    scale = math.sqrt(d) / sample_norms(z).clamp_min(1e-30)
    return z * _per_sample(scale, z).to(z.dtype)


def chi_shell_nll(z: torch.Tensor) -> torch.Tensor:
    """Per-sample negative log-likelihood (B,) of ``r = ||z||`` under the chi distribution with d degrees of freedom.

    If ``z ~ N(0, I_d)``, ``r`` is chi-distributed: ``log p(r) = (d - 1) log r - r^2 / 2 + const``; its mode is at
    ``r = sqrt(d - 1)`` and almost all mass lies in a thin shell of width O(1) around it (ReNO, Eyring et al. 2024).
    We return ``-log p(r)`` shifted by a constant so that it is 0 at the mode: with ``m = d - 1`` and
    ``t = r^2 / m - 1``,

        nll = m / 2 * (t - log(1 + t))  >= 0,      d nll / d r = r - m / r.

    Written this way (float64, ``log1p``) it stays accurate for d ~ 1e5..1e7 where the raw terms are ~1e7 and
    cancel. Not divided by d: the value grows like ``d * t^2 / 4``, so pick ``chi_weight`` accordingly
    (near the shell, ``||z|| = sqrt(m) (1 + delta)`` gives ``nll ~= m delta^2``).
    """
    flat = _flat(z)
    m = flat.shape[1] - 1
    if m < 1:
        raise ValueError(f"the chi-shell regulariser needs d >= 2 elements per sample, got d = {m + 1}")
    r2 = flat.pow(2).sum(1, dtype=torch.float64)  # (B,)
    t = r2 / m - 1
    nll = 0.5 * m * (t - torch.log1p(t))
    return nll.to(z.dtype) if z.is_floating_point() else nll


@dataclass
class Budget:
    """How far an attack may move a noise tensor from its initial value, and how it stays Gaussian-looking.

    kind: ``"l2"`` (per-sample ball of radius ``eps * sqrt(d)``), ``"linf"`` (elementwise box of half-width
        ``eps``) or ``"none"`` (no constraint; ``eps`` is optional and only the default scale of ``random_start``).
    eps: a finite float > 0, in noise standard deviations (see the module docstring); required unless ``"none"``.
    chi_weight: weight >= 0 of the ReNO chi-shell regulariser (``regularizer``); 0 switches it off.
    renormalize: after every projection, rescale each sample to ``||z|| = sqrt(d)``. This is applied last and
        wins over the ball: a renormalised point can lie slightly outside it (by about the norm change the
        attack caused, which for small eps is tiny since ``||z_init|| ~= sqrt(d)`` already).
    """

    kind: str = "none"
    eps: float | None = None
    chi_weight: float = 0.0
    renormalize: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown budget kind {self.kind!r}; accepted kinds: {', '.join(map(repr, KINDS))}")
        if self.eps is None:
            if self.kind != "none":
                raise ValueError(f"budget kind {self.kind!r} needs eps, a finite float > 0 (got None)")
        elif isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) \
                or not math.isfinite(self.eps) or self.eps <= 0:
            raise ValueError(f"eps must be a finite float in (0, inf), got {self.eps!r}")
        if isinstance(self.chi_weight, bool) or not isinstance(self.chi_weight, (int, float)) \
                or not math.isfinite(self.chi_weight) or self.chi_weight < 0:
            raise ValueError(f"chi_weight must be a finite float in [0, inf), got {self.chi_weight!r}")
        self.eps = None if self.eps is None else float(self.eps)
        self.chi_weight = float(self.chi_weight)
        self.renormalize = bool(self.renormalize)

    # -- projections --------------------------------------------------------------------------------------

    @torch.no_grad()
    def project(self, z: torch.Tensor, z_init: torch.Tensor) -> torch.Tensor:
        """Euclidean projection of ``z`` onto the budget around ``z_init`` (then renormalisation if enabled).

        Points already inside are returned bit-for-bit unchanged (before renormalisation). Returns a new tensor.
        """
        if z.shape != z_init.shape:
            raise ValueError(f"z has shape {tuple(z.shape)} but z_init has shape {tuple(z_init.shape)}")
        z, z_init = z.detach(), z_init.detach().to(z)
        if self.kind == "linf":
            out = torch.minimum(torch.maximum(z, z_init - self.eps), z_init + self.eps)
        elif self.kind == "l2":
            delta = z - z_init
            radius = self.eps * math.sqrt(_flat(z).shape[1])
            norm = sample_norms(delta)  # (B,)
            scale = (radius / norm.clamp_min(1e-30)).clamp(max=1.0)
            inside = _per_sample(norm <= radius, z)
            out = torch.where(inside, z, z_init + delta * _per_sample(scale, z).to(z.dtype))
        else:
            out = z.clone()
        return renormalize(out) if self.renormalize else out

    @torch.no_grad()
    def project_(self, z: torch.Tensor, z_init: torch.Tensor) -> torch.Tensor:
        """In-place ``project`` for a leaf that requires grad; returns ``z``."""
        z.copy_(self.project(z, z_init))
        return z

    # -- steps --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def pgd_step(self, z: torch.Tensor, grad: torch.Tensor | None, lr: float,
                 z_init: torch.Tensor | None = None, direction: str | None = None) -> torch.Tensor:
        """One projected steepest-descent step on a loss to *minimise* (Madry et al. 2018).

        direction: ``"sign"`` moves every element by ``lr * sign(grad)`` (steepest descent under L-inf, the
            classic PGD step); ``"l2"`` moves each sample along ``grad / ||grad||`` by ``lr * sqrt(d)`` (steepest
            descent under L2, ``lr`` in the same RMS units as ``eps``). Default: ``"l2"`` for an L2 budget, else
            ``"sign"``.
        z_init: if given, the result is projected onto the budget (and renormalised if enabled).

        Use ``objective.loss(value)`` as the loss, so ascent on a maximised objective needs no sign flip here.
        """
        if grad is None:
            raise ValueError("pgd_step needs a gradient; got None (did the loss reach this tensor?)")
        if grad.shape != z.shape:
            raise ValueError(f"grad has shape {tuple(grad.shape)} but z has shape {tuple(z.shape)}")
        direction = direction or ("l2" if self.kind == "l2" else "sign")
        z, grad = z.detach(), grad.detach().to(z)
        if direction == "sign":
            step = grad.sign()
        elif direction == "l2":
            gnorm = sample_norms(grad).clamp_min(1e-30)
            step = grad * _per_sample(math.sqrt(_flat(z).shape[1]) / gnorm, z).to(z.dtype)
        else:
            raise ValueError(f"unknown step direction {direction!r}; accepted: 'sign', 'l2'")
        out = z - lr * step
        return out if z_init is None else self.project(out, z_init)

    @torch.no_grad()
    def random_start(self, z_init: torch.Tensor, generator: torch.Generator | None = None,
                     scale: float | None = None) -> torch.Tensor:
        """A random point of the budget around ``z_init`` (Madry et al. 2018's random start).

        Untargeted objectives (distance to the baseline) have exactly zero gradient at ``z_init``; start here
        instead. ``linf``: uniform in the box; ``l2`` and ``none``: uniform in the per-sample ball of radius
        ``scale * sqrt(d)``. ``scale`` defaults to ``eps``. Drawn on the CPU from ``generator``, then moved.
        """
        scale = self.eps if scale is None else scale
        if scale is None:
            raise ValueError("random_start needs a scale: the budget has no eps, pass scale=...")
        shape, d = z_init.shape, _flat(z_init).shape[1]
        if self.kind == "linf":
            delta = (torch.rand(shape, generator=generator) * 2 - 1) * scale
        else:
            g = torch.randn(shape, generator=generator)
            n = g.shape[0] if g.ndim >= 2 else 1
            # uniform in a d-ball: direction uniform on the sphere, radius ~ R * U^(1/d)
            radius = scale * math.sqrt(d) * torch.rand(n, generator=generator, dtype=torch.float64) ** (1.0 / d)
            delta = g * _per_sample(radius / sample_norms(g).clamp_min(1e-30), g).to(g.dtype)
        return self.project(z_init.detach() + delta.to(z_init), z_init)

    # -- regulariser --------------------------------------------------------------------------------------

    def regularizer(self, z: torch.Tensor) -> torch.Tensor:
        """``chi_weight * mean over samples of chi_shell_nll(z)``: keeps ``||z||`` near ``sqrt(d - 1)`` (ReNO).

        A differentiable scalar to add to the loss; an exact 0 (no graph) when ``chi_weight == 0``.
        """
        if self.chi_weight == 0:
            return torch.zeros((), dtype=z.dtype, device=z.device)
        return self.chi_weight * chi_shell_nll(z).mean()


@torch.no_grad()
def gaussianity(z: torch.Tensor, max_samples: int = 100_000, seed: int = 0) -> dict:
    """How plausible ``z`` is as a draw of N(0, I), treating all its elements as one sample of size ``d = numel``.

    Returns floats: ``mean``, ``std`` (of the elements), ``norm`` (``||z||`` over the whole tensor), ``sqrt_d``,
    ``norm_ratio = norm / sqrt_d`` (1 for a typical draw; it is the RMS), and the Kolmogorov-Smirnov statistic
    ``ks`` and p-value ``ks_pvalue`` of the elements against the standard normal CDF (``scipy.stats.kstest``).
    KS is exact over all elements when ``numel <= max_samples``, else over ``max_samples`` elements drawn without
    replacement by ``numpy.random.default_rng(seed)`` (same tensor, same answer). For per-sample figures pass
    ``z[i]``. KS sees only the marginal: elements that are individually Gaussian but correlated pass it.
    """
    from scipy import stats

    x = z.detach().reshape(-1).cpu()
    n = x.numel()
    if n < 2:
        raise ValueError(f"gaussianity needs at least 2 elements, got {n}")
    x64 = x.double()
    norm = float(x64.pow(2).sum().sqrt())
    if n > max_samples:
        idx = np.random.default_rng(seed).choice(n, size=max_samples, replace=False)
        xs = x64[torch.from_numpy(idx)].numpy()
    else:
        xs = x64.numpy()
    ks = stats.kstest(xs, "norm")
    return dict(
        mean=float(x64.mean()),
        std=float(x64.std()),
        norm=norm,
        sqrt_d=math.sqrt(n),
        norm_ratio=norm / math.sqrt(n),
        ks=float(ks.statistic),
        ks_pvalue=float(ks.pvalue),
    )
