"""Training losses: flow matching (teacher), critic denoising, DMD, SiD / FGM, ODE regression.

Conventions (see `engine/sampling/schedule.py`): flow matching as Wan,

    x_t = (1 - s) x + s eps,   the network predicts the flow v = eps - x,   x0 = x_t - s v,

with model timesteps t = s * T (T = `schedule.num_train_timesteps`). Training timesteps are drawn with
`FlowSchedule.sample_timesteps` (uniform, shifted, clamped to [min_frac T, max_frac T]); noise is drawn on
the CPU from the caller's `torch.Generator` and then moved, so a seed gives the same loss on any device.

Score functions. The distillation losses see the two networks as x0-predictors

    f(x_t, t) -> x0_pred        x_t (B, ...) in float32 (float64 if x is float64), t (B,) float32 model timesteps

The trainer builds them: `as_x0_fn(flow_net, schedule)` turns a raw flow predictor into one, `cfg(cond, uncond,
w)` applies classifier-free guidance in the standard form `uncond + w * (cond - uncond)` (affine with weights
summing to one, so guiding the flow or the x0 prediction is the same thing).

Every loss is a small callable class returning `(loss, logs)`: `loss` a float32 (float64 for float64 inputs)
scalar, reduced by the MEAN over all elements (batch included); `logs` a dict of Python floats.

Papers:
- DMD: Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation" (CVPR), and DMD2: Yin et
  al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis" (NeurIPS).
- SiD: Zhou et al. 2024, "Score identity Distillation: Exponentially Fast Distillation of Pretrained Diffusion
  Models for One-Step Generation" (ICML).
- FGM: Huang et al. 2024, "Flow Generator Matching".
- GAN term: DMD2 (above), Sec. 4.3, with the non-saturating loss of Goodfellow et al. 2014, "Generative
  Adversarial Nets" (Sec. 3); Self-Forcing's `model/gan.py` applies it to video.
- Self-Forcing: Huang et al. 2025, "Self Forcing: Bridging the Train-Test Gap in Autoregressive Video
  Diffusion" -- applies DMD / SiD to the generator's own KV-cached rollout (see `rollout.py`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from engine.sampling.schedule import FlowSchedule, add_noise, flow_to_x0, x0_to_eps

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B, ...), t (B,)) -> (B, ...)

__all__ = [
    "ScoreFn",
    "as_x0_fn",
    "cfg",
    "DMDLoss",
    "SiDLoss",
    "CriticLoss",
    "FlowMatchingLoss",
    "ODERegressionLoss",
    "GANGeneratorLoss",
    "GANCriticLoss",
    "GENERATOR_LOSSES",
    "make_generator_loss",
]


# ----------------------------------------------------------------------------------------------------------
# Helpers the trainer uses to build score functions.


def as_x0_fn(flow_fn: ScoreFn, schedule: FlowSchedule) -> ScoreFn:
    """Wrap a raw flow predictor `v = flow_fn(x_t, t)` into an x0-predictor `x_t - s v`."""

    def x0_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return flow_to_x0(x_t, flow_fn(x_t, t), schedule.sigma_of(t.to(x_t.dtype)))

    return x0_fn


def cfg(cond_fn: ScoreFn, uncond_fn: ScoreFn, scale: float) -> ScoreFn:
    """Classifier-free guidance, standard convention: `uncond + scale * (cond - uncond)`.

    `scale = 1` is the conditional model. Self-Forcing's configs write `cond + g * (cond - uncond)`; their
    `g` is `scale - 1` here (g = 3.0 -> scale = 4.0).
    """
    if not math.isfinite(scale):
        raise ValueError(f"guidance scale must be finite, got {scale!r}")

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        u = uncond_fn(x_t, t)
        return u + scale * (cond_fn(x_t, t) - u)

    return guided


# ----------------------------------------------------------------------------------------------------------
# Shared pieces.


def _check_fracs(min_frac: float, max_frac: float) -> None:
    if not (0 <= min_frac < max_frac <= 1):
        raise ValueError(f"need 0 <= min_frac < max_frac <= 1, got min_frac={min_frac}, max_frac={max_frac}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _draw(schedule: FlowSchedule, x: torch.Tensor, generator, t, eps, min_frac, max_frac):
    """Timesteps t (B,) and noise eps (x.shape) -- drawn on the CPU from `generator`, or checked if given."""
    if x.ndim < 2:
        raise ValueError(f"x must be batched, (B, ...) with at least one non-batch dim, got {tuple(x.shape)}")
    B = x.shape[0]
    if t is None:
        t = schedule.sample_timesteps(B, generator=generator, min_frac=min_frac, max_frac=max_frac)
    elif t.shape[0] != B:
        raise ValueError(f"t has batch {t.shape[0]}, x has batch {B}")
    t = t.to(x.device, torch.float32)
    if eps is None:
        eps = torch.randn(x.shape, generator=generator, dtype=_compute_dtype(x))
    elif eps.shape != x.shape:
        raise ValueError(f"eps of shape {tuple(eps.shape)} does not match x of shape {tuple(x.shape)}")
    eps = eps.to(x.device, _compute_dtype(x))
    return t, eps


def _sigma(schedule: FlowSchedule, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """sigma = t / T, computed in the compute dtype of `like` (float64 stays exact for float64 inputs)."""
    return schedule.sigma_of(t.to(like.dtype))


def _check_pred(name: str, pred: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # A silently broadcast prediction would give a wrong, finite loss: refuse it.
    if pred.shape != x.shape:
        raise ValueError(f"{name} returned shape {tuple(pred.shape)}, expected {tuple(x.shape)}")
    return pred.to(_compute_dtype(x))


def _per_sample_abs_mean(d: torch.Tensor) -> torch.Tensor:
    """mean |d| over the non-batch dims, shaped (B, 1, ..., 1) for broadcasting."""
    return d.abs().flatten(1).mean(1).view(-1, *([1] * (d.ndim - 1)))


# ----------------------------------------------------------------------------------------------------------
# Generator losses.


class DMDLoss:
    """Distribution Matching Distillation (Yin et al. 2024, DMD; Yin et al. 2024, DMD2), as in Self-Forcing.

    The reverse-KL gradient in sample space is `E_t,eps[w_t (s_fake(x_t) - s_real(x_t))]`. With
    x_t = (1 - s) x + s eps, the score is `-(x_t - (1 - s) f(x_t)) / s^2`, so `s_fake - s_real` is
    `(1 - s) / s^2 (f_f - f_r)`: it points along `f_f - f_r` in x0 terms. DMD normalises per sample:

        grad = nan_to_num((f_f - f_r) / w),   w = mean_{non-batch}|x - f_r| + eps_norm     (float32 or higher)
        loss = 0.5 * mean((x - sg(x - grad))^2)                        (MEAN over all B * ... elements)

    so `d loss / d x = grad / x.numel()` exactly, and gradient descent moves x towards the teacher. Both
    networks run under `no_grad`: DMD needs no backward through them (cheap), and their parameters never
    receive gradient from this loss. The critic f_f is trained in alternation with `CriticLoss`.

    Call: `loss, logs = dmd(x, real_fn, fake_fn, generator=g)`; `t` (B,) and `eps` (x.shape) may be given
    instead of drawn. logs: dmd_loss, dmd_grad_norm (L2 norm of `grad` over the whole batch), dmd_grad_abs_mean
    (the figure Self-Forcing logs), dmd_normalizer_mean, t_mean.
    """

    def __init__(self, schedule: FlowSchedule, min_frac: float = 0.02, max_frac: float = 0.98,
                 eps_norm: float = 1e-6):
        _check_fracs(min_frac, max_frac)
        if not (math.isfinite(eps_norm) and eps_norm > 0):
            raise ValueError(f"eps_norm must be a finite number > 0, got {eps_norm!r}")
        self.schedule, self.min_frac, self.max_frac, self.eps_norm = schedule, min_frac, max_frac, eps_norm

    def direction(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, real_fn: ScoreFn,
                  fake_fn: ScoreFn) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised DMD direction `grad` (x.shape, compute dtype) and the normaliser w (B, 1, ...)."""
        with torch.no_grad():
            xc = x.detach().to(_compute_dtype(x))
            x_t = add_noise(xc, eps, _sigma(self.schedule, t, xc))  # (B, ...)
            f_r = _check_pred("real_fn", real_fn(x_t, t), x)
            f_f = _check_pred("fake_fn", fake_fn(x_t, t), x)
            w = _per_sample_abs_mean(xc - f_r) + self.eps_norm  # (B, 1, ...)
            grad = torch.nan_to_num((f_f - f_r) / w)
        return grad, w

    def __call__(self, x: torch.Tensor, real_fn: ScoreFn, fake_fn: ScoreFn, generator=None, *,
                 t: torch.Tensor | None = None, eps: torch.Tensor | None = None):
        t, eps = _draw(self.schedule, x, generator, t, eps, self.min_frac, self.max_frac)
        grad, w = self.direction(x, t, eps, real_fn, fake_fn)
        xc = x.to(grad.dtype)
        target = (xc - grad).detach()
        loss = 0.5 * (xc - target).square().mean()
        logs = {
            "dmd_loss": loss.item(),
            "dmd_grad_norm": grad.norm().item(),
            "dmd_grad_abs_mean": grad.abs().mean().item(),
            "dmd_normalizer_mean": w.mean().item(),
            "t_mean": t.mean().item(),
        }
        return loss, logs


class SiDLoss:
    """Score identity Distillation (Zhou et al. 2024, SiD) and Flow Generator Matching (Huang et al. 2024, FGM),
    in x0 terms:

        loss = mean[(f_r - f_f) * ((f_r - x) - alpha * (f_r - f_f)) / w]       (MEAN over all B * ... elements)

    with f_r = real_fn(x_t, t), f_f = fake_fn(x_t, t), x_t = (1 - s) x + s eps, and `w = mean|x - f_r|`
    per sample (float32 or higher, detached, + eps_norm; `normalize=False` uses w = 1).

    Why: in eps terms (eps_pred = (x_t - (1 - s) f) / s) the Fisher divergence is
    L1 = ||eps_r - eps_f||^2 and SiD's identity term is L2 = <eps_r - eps_f, eps_r - eps>; pointwise
    L2 - alpha L1 = (1 - s)^2 / s^2 * (f_r - f_f) . ((f_r - x) - alpha (f_r - f_f)), so this is
    `L2 - alpha L1` with the weight s^2 / ((1 - s)^2 w). `alpha = 0.5` is FGM (`2 L2(sg) - L1(sg)`, halved),
    whose gradient equals the gradient of L1 with the critic's dependence on the generator -- in expectation,
    at the optimal critic, for weights depending on t only. `alpha = 1` drops the gradient through the
    sampling distribution (the F+ form); SiD's experiments favour alpha of 1 to 1.2 and collapse near 1.5.

    Unlike DMD, the gradient reaches x through BOTH networks (x_t -> f_r, f_f), which costs their backward
    passes and activation memory. The networks' parameters must not learn from this loss: the trainer
    freezes them (`requires_grad_(False)`) or only steps the generator's optimizer and zeroes the others'
    gradients before their own step. This class does not care which.

    Call: `loss, logs = sid(x, real_fn, fake_fn, generator=g)`; `t`, `eps` may be given. logs: sid_loss,
    sid_diff_abs_mean (mean |f_r - f_f|), sid_normalizer_mean, t_mean.
    """

    def __init__(self, schedule: FlowSchedule, alpha: float = 1.0, min_frac: float = 0.02,
                 max_frac: float = 0.98, eps_norm: float = 1e-6, normalize: bool = True):
        try:
            alpha = float(alpha)
        except (TypeError, ValueError):
            raise ValueError(f"alpha must be a finite number (FGM 0.5, SiD 1.0-1.2), got {alpha!r}") from None
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number (FGM 0.5, SiD 1.0-1.2), got {alpha!r}")
        _check_fracs(min_frac, max_frac)
        if not (math.isfinite(eps_norm) and eps_norm > 0):
            raise ValueError(f"eps_norm must be a finite number > 0, got {eps_norm!r}")
        self.schedule, self.alpha = schedule, alpha
        self.min_frac, self.max_frac, self.eps_norm, self.normalize = min_frac, max_frac, eps_norm, normalize

    def __call__(self, x: torch.Tensor, real_fn: ScoreFn, fake_fn: ScoreFn, generator=None, *,
                 t: torch.Tensor | None = None, eps: torch.Tensor | None = None):
        t, eps = _draw(self.schedule, x, generator, t, eps, self.min_frac, self.max_frac)
        xc = x.to(eps.dtype)
        x_t = add_noise(xc, eps, _sigma(self.schedule, t, xc))  # (B, ...), differentiable in x
        f_r = _check_pred("real_fn", real_fn(x_t, t), x)
        f_f = _check_pred("fake_fn", fake_fn(x_t, t), x)
        if self.normalize:
            w = _per_sample_abs_mean(xc - f_r).detach() + self.eps_norm  # (B, 1, ...)
        else:
            w = torch.ones((), dtype=xc.dtype, device=xc.device)
        diff = f_r - f_f
        loss = (diff * ((f_r - xc) - self.alpha * diff) / w).mean()
        logs = {
            "sid_loss": loss.item(),
            "sid_diff_abs_mean": diff.detach().abs().mean().item(),
            "sid_normalizer_mean": w.mean().item(),
            "t_mean": t.mean().item(),
        }
        return loss, logs


# ----------------------------------------------------------------------------------------------------------
# Denoising losses: the critic (fake score) and the teacher.


class CriticLoss:
    """Denoising loss of the critic (fake score) on generator samples (DMD / DMD2, Self-Forcing).

        x_t = (1 - s) x + s eps,  pred = flow_fn(x_t, t)   (raw flow output of the network)
        target "flow": mean((pred - (eps - x))^2)
        target "eps" : mean((x_t + (1 - s) pred - eps)^2)     (pred converted to eps via x0)
        target "x0"  : mean((x_t - s pred - x)^2)              (pred converted to x0)

    MEAN over all elements. `x` is detached here: the critic step never reaches the generator.
    Call: `loss, logs = critic_loss(x, flow_fn, generator=g)`; `t`, `eps` may be given.
    logs: {prefix}_loss, t_mean.
    """

    TARGETS = ("flow", "eps", "x0")
    _prefix = "critic"

    def __init__(self, schedule: FlowSchedule, target: str = "flow", min_frac: float = 0.02,
                 max_frac: float = 0.98):
        if target not in self.TARGETS:
            raise ValueError(f"unknown target {target!r}; accepted values: {', '.join(self.TARGETS)}")
        _check_fracs(min_frac, max_frac)
        self.schedule, self.target, self.min_frac, self.max_frac = schedule, target, min_frac, max_frac

    def __call__(self, x: torch.Tensor, flow_fn: ScoreFn, generator=None, *, t: torch.Tensor | None = None,
                 eps: torch.Tensor | None = None):
        t, eps = _draw(self.schedule, x, generator, t, eps, self.min_frac, self.max_frac)
        x = x.detach().to(eps.dtype)
        sigma = _sigma(self.schedule, t, x)
        x_t = add_noise(x, eps, sigma)  # (B, ...)
        pred = _check_pred("flow_fn", flow_fn(x_t, t), x)
        if self.target == "flow":
            err = pred - (eps - x)
        elif self.target == "eps":
            err = x0_to_eps(x_t, flow_to_x0(x_t, pred, sigma), sigma) - eps
        else:  # "x0"
            err = flow_to_x0(x_t, pred, sigma) - x
        loss = err.square().mean()
        return loss, {f"{self._prefix}_loss": loss.item(), "t_mean": t.mean().item()}


class FlowMatchingLoss(CriticLoss):
    """The teacher's flow-matching loss (Lipman et al. 2023; rectified flow, Liu et al. 2023; as Wan):
    `mean((v_pred(x_t, t) - (eps - x))^2)` on data x, MEAN over all elements.

    Timesteps cover the whole range by default (min_frac 0, max_frac 1): the teacher is queried at t = T by
    samplers and anywhere in [0.02 T, 0.98 T] by the distillation losses. logs: fm_loss, t_mean.
    """

    _prefix = "fm"

    def __init__(self, schedule: FlowSchedule, min_frac: float = 0.0, max_frac: float = 1.0):
        super().__init__(schedule, target="flow", min_frac=min_frac, max_frac=max_frac)


class ODERegressionLoss:
    """ODE-trajectory regression of the causal initialisation (Self-Forcing / CausVid, after Yin et al. 2024):
    `mean((x0_pred - x0_target)^2)` between the generator's x0 prediction from a point of the teacher's ODE
    trajectory and that trajectory's final x0. MEAN over all elements; the target is detached.
    Call: `loss, logs = ode(x0_pred, x0_target)`. logs: ode_loss.
    """

    def __call__(self, x0_pred: torch.Tensor, x0_target: torch.Tensor):
        if x0_pred.shape != x0_target.shape:
            raise ValueError(f"x0_pred {tuple(x0_pred.shape)} and x0_target {tuple(x0_target.shape)} differ")
        dtype = _compute_dtype(x0_pred)
        loss = (x0_pred.to(dtype) - x0_target.detach().to(dtype)).square().mean()
        return loss, {"ode_loss": loss.item()}


# ----------------------------------------------------------------------------------------------------------
# DMD2's GAN term: a classifier D (a head on the critic's features) on noised clips.

LogitFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B, ...), t (B,)) -> logits (B,)


def _logits(logit_fn: LogitFn, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out = logit_fn(x_t, t)
    if out.shape != (x_t.shape[0],):
        raise ValueError(f"logit_fn returned shape {tuple(out.shape)}, expected ({x_t.shape[0]},)")
    return out.float()


class GANGeneratorLoss:
    """The generator's GAN term of DMD2 (Yin et al. 2024, Sec. 4.3): the non-saturating loss (Goodfellow et al.
    2014, Sec. 3) of the classifier D on noised generator samples,

        x_t = (1 - s) x + s eps,     loss = mean_B softplus(-D(x_t, t)) = -mean_B log sigmoid(D(x_t, t)),

    so descending it raises D's "real" logit of the samples. The gradient reaches x through D (the critic's
    features and the head); their parameters must not learn from it (the trainer freezes them). t and eps are
    drawn as the other losses draw them, or given. logs: gan_g_loss, gan_fake_logit (mean), t_mean.
    """

    def __init__(self, schedule: FlowSchedule, min_frac: float = 0.02, max_frac: float = 0.98):
        _check_fracs(min_frac, max_frac)
        self.schedule, self.min_frac, self.max_frac = schedule, min_frac, max_frac

    def __call__(self, x: torch.Tensor, logit_fn: LogitFn, generator=None, *, t: torch.Tensor | None = None,
                 eps: torch.Tensor | None = None):
        t, eps = _draw(self.schedule, x, generator, t, eps, self.min_frac, self.max_frac)
        xc = x.to(eps.dtype)
        logit = _logits(logit_fn, add_noise(xc, eps, _sigma(self.schedule, t, xc)), t)  # (B,)
        loss = torch.nn.functional.softplus(-logit).mean()
        return loss, {"gan_g_loss": loss.item(), "gan_fake_logit": logit.detach().mean().item(),
                      "t_mean": t.mean().item()}


class GANCriticLoss:
    """The classifier's loss of DMD2's GAN term (Yin et al. 2024, Sec. 4.3; the discriminator loss of Goodfellow
    et al. 2014, Eq. 1, in softplus form): real clips against generator samples, both noised to the same t,

        loss = mean_B softplus(-D(real_t, t)) + mean_B softplus(D(fake_t, t)),

    with real_t, fake_t = (1 - s) x + s eps for one eps shared by the pair (only the clip differs). Both clips
    are detached: this step trains D (the head and the critic's features under it), never the generator. One
    call of `logit_fn` on the (2B, ...) batch [fake; real]. logs: gan_d_loss, gan_real_logit, gan_fake_logit
    (means), gan_accuracy (fraction of the 2B clips on the right side of 0), t_mean.
    """

    def __init__(self, schedule: FlowSchedule, min_frac: float = 0.02, max_frac: float = 0.98):
        _check_fracs(min_frac, max_frac)
        self.schedule, self.min_frac, self.max_frac = schedule, min_frac, max_frac

    def __call__(self, real: torch.Tensor, fake: torch.Tensor, logit_fn: LogitFn, generator=None, *,
                 t: torch.Tensor | None = None, eps: torch.Tensor | None = None):
        if real.shape != fake.shape:
            raise ValueError(f"real clips {tuple(real.shape)} and generator samples {tuple(fake.shape)} differ in "
                             f"shape")
        t, eps = _draw(self.schedule, fake, generator, t, eps, self.min_frac, self.max_frac)
        sigma = _sigma(self.schedule, t, eps)
        both = torch.cat([fake.detach().to(eps.dtype), real.detach().to(eps.dtype)])  # (2B, ...)
        x_t = add_noise(both, torch.cat([eps, eps]), torch.cat([sigma, sigma]))
        fake_logit, real_logit = _logits(logit_fn, x_t, torch.cat([t, t])).chunk(2)  # (B,) each
        F = torch.nn.functional
        loss = F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean()
        right = torch.cat([real_logit > 0, fake_logit < 0]).float().mean()
        return loss, {"gan_d_loss": loss.item(), "gan_real_logit": real_logit.detach().mean().item(),
                      "gan_fake_logit": fake_logit.detach().mean().item(), "gan_accuracy": right.item(),
                      "t_mean": t.mean().item()}


# ----------------------------------------------------------------------------------------------------------

GENERATOR_LOSSES = ("dmd", "sid", "fgm")


def make_generator_loss(name: str, schedule: FlowSchedule, **kw):
    """"dmd" -> DMDLoss(schedule, **kw); "sid" -> SiDLoss(schedule, **kw) (alpha defaults to 1.0);
    "fgm" -> SiDLoss(schedule, alpha=0.5, **kw) (passing another alpha is an error)."""
    key = name.lower() if isinstance(name, str) else name
    if key == "dmd":
        return DMDLoss(schedule, **kw)
    if key == "sid":
        return SiDLoss(schedule, **kw)
    if key == "fgm":
        alpha = kw.pop("alpha", 0.5)
        if alpha != 0.5:
            raise ValueError(f"'fgm' is SiD with alpha = 0.5, got alpha={alpha!r}; use 'sid' for other values")
        return SiDLoss(schedule, alpha=0.5, **kw)
    raise ValueError(f"unknown generator loss {name!r}; accepted values: {', '.join(GENERATOR_LOSSES)}")
