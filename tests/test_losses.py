"""Tests of engine/training/losses.py: gradients (exact, finite differences, the FGM identity) and a
distribution-level check against an analytic Gaussian-mixture teacher. CPU, seeded, well under a minute."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from engine.sampling.schedule import FlowSchedule
from engine.training.losses import (
    CriticLoss,
    DMDLoss,
    FlowMatchingLoss,
    ODERegressionLoss,
    SiDLoss,
    as_x0_fn,
    cfg,
    make_generator_loss,
)

SCHED = FlowSchedule(num_train_timesteps=1000, shift=5.0)
T = SCHED.num_train_timesteps


def _sigma(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return (t.to(like.dtype) / T).view(-1, *([1] * (like.ndim - 1)))


def smooth_x0_fn(seed: int, D: int, dtype=torch.float64):
    """A fixed, smooth, nonlinear x0-predictor of x_t (B, ..., D) and t -- differentiable in x_t."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=g, dtype=dtype) / math.sqrt(D)
    Bm = torch.randn(D, D, generator=g, dtype=dtype) / math.sqrt(D)

    def f(x_t, t):
        s = _sigma(t, x_t)
        return torch.tanh(x_t @ A) + (1 - s) * (x_t @ Bm)

    return f


# ----------------------------------------------------------------------------------------------------------
# 2-D Gaussian mixture teacher: E[x0 | x_t] in closed form.


class GMM:
    """p(x0) = sum_k pi_k N(mu_k, Sigma_k) in 2-D. Under x_t = (1 - s) x0 + s eps:
    x_t | k ~ N((1 - s) mu_k, C_k), C_k = (1 - s)^2 Sigma_k + s^2 I, and by Gaussian conditioning
    E[x0 | x_t, k] = mu_k + (1 - s) Sigma_k C_k^-1 (x_t - (1 - s) mu_k); E[x0 | x_t] mixes them with the
    posterior responsibilities of the components."""

    def __init__(self, weights, means, covs):
        self.logw = torch.as_tensor(weights, dtype=torch.float64).log()  # (K,)
        self.mu = torch.as_tensor(means, dtype=torch.float64)  # (K, 2)
        self.cov = torch.as_tensor(covs, dtype=torch.float64)  # (K, 2, 2)

    def x0(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xd = x_t.double()
        s = (t.double() / T).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        a = 1 - s
        C = a**2 * self.cov + s**2 * torch.eye(2, dtype=torch.float64)  # (B, K, 2, 2)
        diff = xd[:, None, :] - a[..., 0] * self.mu  # (B, K, 2)
        sol = torch.linalg.solve(C, diff.unsqueeze(-1)).squeeze(-1)  # (B, K, 2): C^-1 diff
        logp = self.logw - 0.5 * (diff * sol).sum(-1) - 0.5 * torch.logdet(C)  # (B, K)
        r = logp.softmax(-1)  # (B, K)
        m = self.mu + a[..., 0] * (self.cov @ sol.unsqueeze(-1)).squeeze(-1)  # (B, K, 2)
        return (r.unsqueeze(-1) * m).sum(1).to(x_t.dtype)  # (B, 2)

    def sample(self, n: int, generator) -> torch.Tensor:
        k = torch.multinomial(self.logw.exp(), n, replacement=True, generator=generator)
        L = torch.linalg.cholesky(self.cov)[k]  # (n, 2, 2)
        z = torch.randn(n, 2, 1, generator=generator, dtype=torch.float64)
        return self.mu[k] + (L @ z).squeeze(-1)

    def moments(self):
        w = self.logw.exp()[:, None]
        mean = (w * self.mu).sum(0)
        second = (w * (self.cov.diagonal(dim1=-2, dim2=-1) + self.mu**2)).sum(0)
        return mean, (second - mean**2).sqrt()


def test_gmm_teacher_matches_tweedie():
    """Our closed form against Tweedie's formula on torch.distributions' log-density:
    E[x0 | x_t] = (x_t + s^2 grad log p_t(x_t)) / (1 - s)."""
    gmm = GMM([0.3, 0.7], [[-1.0, 0.5], [1.5, -0.5]], [[[0.3, 0.1], [0.1, 0.5]], [[0.6, -0.2], [-0.2, 0.4]]])
    g = torch.Generator().manual_seed(0)
    B = 64
    t = SCHED.sample_timesteps(B, generator=g).double()
    s = (t / T)[:, None]
    x_t = ((1 - s) * gmm.sample(B, g) + s * torch.randn(B, 2, generator=g, dtype=torch.float64)).requires_grad_()
    comp = torch.distributions.MultivariateNormal(
        (1 - s)[:, None] * gmm.mu, (1 - s)[:, None, None] ** 2 * gmm.cov + s[:, None, None] ** 2 * torch.eye(2,
                                                                                           dtype=torch.float64))
    logp = torch.logsumexp(gmm.logw + comp.log_prob(x_t[:, None]), dim=1)  # (B,)
    (score,) = torch.autograd.grad(logp.sum(), x_t)
    tweedie = (x_t + s**2 * score) / (1 - s)
    torch.testing.assert_close(gmm.x0(x_t.detach(), t), tweedie.detach(), rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------
# 1. Finite gradients.


class TinyNet(nn.Module):
    """Per-element network (x_t, t) -> x_t-shaped output, any input shape."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(1 + 0.1 * torch.randn(1, generator=g))
        self.b = nn.Parameter(0.5 * torch.randn(1, generator=g))
        self.c = nn.Parameter(0.5 * torch.randn(1, generator=g))

    def forward(self, x_t, t):
        s = _sigma(t, x_t)
        return self.a * x_t + self.b * torch.tanh(x_t) + self.c * s


def _tiny_setup(seed=0):
    torch.manual_seed(seed)
    gen = nn.Linear(4, 2 * 3 * 2 * 2)  # z (B, 4) -> x (B, C=2, F=3, H=2, W=2)
    real, fake = TinyNet(1), TinyNet(2)
    z = torch.randn(3, 4)
    return gen, real, fake, z


@pytest.mark.parametrize("name", ["dmd", "sid", "fgm"])
def test_generator_losses_finite_gradients(name):
    gen, real, fake, z = _tiny_setup()
    for p in [*real.parameters(), *fake.parameters()]:  # the trainer freezes both networks
        p.requires_grad_(False)
    x = gen(z).view(3, 2, 3, 2, 2)
    loss_fn = make_generator_loss(name, SCHED)
    loss, logs = loss_fn(x, as_x0_fn(real, SCHED), as_x0_fn(fake, SCHED), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(math.isfinite(v) for v in logs.values()) and "t_mean" in logs
    for p in gen.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_dmd_does_not_backprop_into_networks():
    gen, real, fake, z = _tiny_setup()
    x = gen(z).view(3, 2, 3, 2, 2)
    loss, _ = DMDLoss(SCHED)(x, as_x0_fn(real, SCHED), as_x0_fn(fake, SCHED), generator=torch.Generator())
    loss.backward()
    assert all(p.grad is None for p in [*real.parameters(), *fake.parameters()])


@pytest.mark.parametrize("target", ["flow", "eps", "x0"])
def test_critic_and_teacher_losses_finite_gradients(target):
    gen, _, critic, z = _tiny_setup()
    x = gen(z).view(3, 2, 3, 2, 2)
    for loss_fn in [CriticLoss(SCHED, target=target), FlowMatchingLoss(SCHED)]:
        critic.zero_grad()
        loss, logs = loss_fn(x, critic, generator=torch.Generator().manual_seed(1))
        loss.backward()
        assert torch.isfinite(loss) and all(math.isfinite(v) for v in logs.values())
        for p in critic.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()
    assert all(p.grad is None for p in gen.parameters())  # x is detached inside


def test_critic_targets_agree_for_exact_prediction():
    """A critic that returns the true flow eps - x has zero loss under every target."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, dtype=torch.float64, generator=g)
    eps = torch.randn(4, 5, dtype=torch.float64, generator=g)
    t = SCHED.sample_timesteps(4, generator=g)
    for target in ["flow", "eps", "x0"]:
        loss, _ = CriticLoss(SCHED, target=target)(x, lambda x_t, t_: eps - x, t=t, eps=eps)
        assert loss.item() < 1e-20


def test_ode_regression_loss():
    pred = torch.randn(2, 3, 4, requires_grad=True)
    target = torch.randn(2, 3, 4)
    loss, logs = ODERegressionLoss()(pred, target)
    loss.backward()
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean())
    torch.testing.assert_close(pred.grad, 2 * (pred - target).detach() / pred.numel())
    assert logs["ode_loss"] == pytest.approx(loss.item())


def test_bfloat16_input():
    gen, real, fake, z = _tiny_setup()
    x = gen(z).view(3, 2, 3, 2, 2).bfloat16().detach().requires_grad_()
    loss, _ = DMDLoss(SCHED)(x, as_x0_fn(real, SCHED), as_x0_fn(fake, SCHED), generator=torch.Generator())
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


def test_cfg_and_as_x0_fn():
    g = torch.Generator().manual_seed(4)
    x_t = torch.randn(3, 6, generator=g, dtype=torch.float64)
    t = SCHED.sample_timesteps(3, generator=g)
    cond, uncond = smooth_x0_fn(5, 6), smooth_x0_fn(6, 6)
    torch.testing.assert_close(cfg(cond, uncond, 1.0)(x_t, t), cond(x_t, t))
    torch.testing.assert_close(cfg(cond, uncond, 4.0)(x_t, t), uncond(x_t, t) + 4 * (cond(x_t, t) - uncond(x_t, t)))
    # guidance is affine with weights summing to 1: guiding flows then converting == converting then guiding
    s = _sigma(t, x_t)
    v_c, v_u = (lambda x, t_: (x - cond(x, t_)) / s), (lambda x, t_: (x - uncond(x, t_)) / s)
    torch.testing.assert_close(as_x0_fn(cfg(v_c, v_u, 3.0), SCHED)(x_t, t), cfg(cond, uncond, 3.0)(x_t, t))


# ----------------------------------------------------------------------------------------------------------
# 2. DMD: the stop-gradient construction gives d loss / d x = grad / numel exactly.


def test_dmd_gradient_is_normalised_direction():
    g = torch.Generator().manual_seed(0)
    B, D = 4, 6
    x = torch.randn(B, 3, D, generator=g, dtype=torch.float64, requires_grad=True)
    t = SCHED.sample_timesteps(B, generator=g)
    eps = torch.randn(B, 3, D, generator=g, dtype=torch.float64)
    real, fake = smooth_x0_fn(1, D), smooth_x0_fn(2, D)

    loss, logs = DMDLoss(SCHED)(x, real, fake, t=t, eps=eps)
    loss.backward()

    # the direction, written out independently
    s = _sigma(t, x)
    x_t = (1 - s) * x.detach() + s * eps
    f_r, f_f = real(x_t, t), fake(x_t, t)
    w = (x.detach() - f_r).abs().mean(dim=(1, 2), keepdim=True) + 1e-6  # (B, 1, 1)
    grad = (f_f - f_r) / w
    torch.testing.assert_close(x.grad, grad / x.numel(), rtol=1e-12, atol=1e-15)
    assert loss.item() == pytest.approx(0.5 * grad.square().mean().item(), rel=1e-12)
    assert logs["dmd_grad_norm"] == pytest.approx(grad.norm().item(), rel=1e-12)
    assert logs["t_mean"] == pytest.approx(t.mean().item())


def test_draw_is_seeded():
    x = torch.randn(3, 2, 5)
    real, fake = smooth_x0_fn(1, 5, torch.float32), smooth_x0_fn(2, 5, torch.float32)
    a = DMDLoss(SCHED)(x, real, fake, generator=torch.Generator().manual_seed(7))
    b = DMDLoss(SCHED)(x, real, fake, generator=torch.Generator().manual_seed(7))
    assert a[0].item() == b[0].item() and a[1] == b[1]


# ----------------------------------------------------------------------------------------------------------
# 3. SiD / FGM gradients.


def _sid_inputs(seed=0, B=3, D=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 2, D, generator=g, dtype=torch.float64, requires_grad=True)
    t = SCHED.sample_timesteps(B, generator=g)
    eps = torch.randn(B, 2, D, generator=g, dtype=torch.float64)
    return x, t, eps, smooth_x0_fn(seed + 1, D), smooth_x0_fn(seed + 2, D)


def test_sid_alpha_half_is_fgm_form_pointwise():
    """SiD(alpha=0.5) == 0.5 * (2 L2 - L1), with L1 = ||eps_r - eps_f||^2, L2 = <eps_r - eps_f, eps_r - eps>
    written in eps space. This is an algebraic identity for every (x, t, eps) -- values and gradients match
    exactly. (That the gradient of 2 L2(sg) - L1(sg) equals the gradient of the Fisher divergence L1 holds
    only in expectation, at the optimal critic: see test_fgm_gradient_equals_fisher_gradient_in_expectation.)"""
    x, t, eps, real, fake = _sid_inputs()
    loss, _ = SiDLoss(SCHED, alpha=0.5)(x, real, fake, t=t, eps=eps)
    (g_sid,) = torch.autograd.grad(loss, x)

    s = _sigma(t, x)
    x_t = (1 - s) * x + s * eps
    f_r, f_f = real(x_t, t), fake(x_t, t)
    eps_r, eps_f = (x_t - (1 - s) * f_r) / s, (x_t - (1 - s) * f_f) / s
    w = (x - f_r).abs().mean(dim=(1, 2), keepdim=True).detach() + 1e-6
    weight = s**2 / ((1 - s) ** 2 * w)  # converts eps-space terms to SiD's x0-space weighting
    L1 = (eps_r - eps_f).square()
    L2 = (eps_r - eps_f) * (eps_r - eps)
    fgm = (weight * (2 * L2 - L1)).mean()
    (g_fgm,) = torch.autograd.grad(fgm, x)

    torch.testing.assert_close(loss, 0.5 * fgm, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_sid, 0.5 * g_fgm, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.2])
def test_sid_gradient_finite_differences(alpha):
    """Central finite differences in float64 (gradcheck). With normalize=True the normaliser w is detached
    on purpose, which finite differences cannot see; so check normalize=False, then that normalize=True is
    that same gradient scaled by 1/w per sample."""
    x, t, eps, real, fake = _sid_inputs(seed=10)
    raw = SiDLoss(SCHED, alpha=alpha, normalize=False)
    assert torch.autograd.gradcheck(lambda x_: raw(x_, real, fake, t=t, eps=eps)[0], (x,), eps=1e-6, atol=1e-8)

    B = x.shape[0]
    s = _sigma(t, x)
    with torch.no_grad():
        w = (x - real((1 - s) * x + s * eps, t)).abs().mean(dim=(1, 2), keepdim=True) + 1e-6
    for b in range(B):  # per-sample losses are independent: scale each sample's gradient by its own 1/w
        sl = slice(b, b + 1)
        (g_raw,) = torch.autograd.grad(raw(x[sl], real, fake, t=t[sl], eps=eps[sl])[0], x)
        (g_norm,) = torch.autograd.grad(SiDLoss(SCHED, alpha=alpha)(x[sl], real, fake, t=t[sl], eps=eps[sl])[0], x)
        torch.testing.assert_close(g_norm, g_raw / w[b], rtol=1e-10, atol=1e-14)


def test_fgm_gradient_equals_fisher_gradient_in_expectation():
    """FGM's theorem, checked by Monte Carlo on Gaussians where the optimal critic is analytic: for a generator
    x = m + a * z and the critic that is exactly optimal for it (so it depends on (m, a)), the gradient of the
    Fisher divergence L1 = E ||eps_r - eps_f||^2 through everything equals the gradient of SiD(alpha = 0.5)
    with the critic's (m, a) frozen, times 2 (1 - s)^2 / s^2. Equality holds in expectation only (identity
    E <f(x_t), eps_opt(x_t)> = E <f(x_t), eps>), so compare with a Monte-Carlo tolerance; alpha = 1 does not
    match, showing the test can tell them apart. normalize=False: a weight depending on x would break the
    identity."""
    g = torch.Generator().manual_seed(0)
    N, t_val = 200_000, 500.0
    s = t_val / T
    mu_r, sd_r = torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor([0.5, 1.5], dtype=torch.float64)

    def gauss_x0(mu, var):  # E[x0 | x_t] for x0 ~ N(mu, diag var)
        return lambda x_t, t: mu + (1 - s) * var / ((1 - s) ** 2 * var + s**2) * (x_t - (1 - s) * mu)

    theta = torch.tensor([0.3, -0.2, math.log(0.8), math.log(1.3)], dtype=torch.float64, requires_grad=True)
    z = torch.randn(N, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(N, 2, generator=g, dtype=torch.float64)
    t = torch.full((N,), t_val)
    real = gauss_x0(mu_r, sd_r**2)

    def x_and_params():
        m, a = theta[:2], theta[2:].exp()
        return m + a * z, m, a

    # gradient of the Fisher divergence, the critic's dependence on theta included
    x, m, a = x_and_params()
    x_t = (1 - s) * x + s * eps
    L1 = ((1 - s) ** 2 / s**2 * (real(x_t, t) - gauss_x0(m, a**2)(x_t, t)).square()).mean()
    (g_true,) = torch.autograd.grad(L1, theta)

    grads = {}
    for alpha in [0.5, 1.0]:
        x, m, a = x_and_params()
        fake = gauss_x0(m.detach(), a.detach() ** 2)  # critic frozen at the optimum for the current theta
        loss, _ = SiDLoss(SCHED, alpha=alpha, normalize=False)(x, real, fake, t=t, eps=eps)
        (gr,) = torch.autograd.grad(loss, theta)
        grads[alpha] = 2 * (1 - s) ** 2 / s**2 * gr

    tol = 0.02 * g_true.norm()  # measured: |error| / |g_true| = 7e-4 at alpha 0.5, 0.23 at alpha 1
    assert (grads[0.5] - g_true).norm() < tol, (grads[0.5], g_true)
    assert (grads[1.0] - g_true).norm() > 5 * tol, (grads[1.0], g_true)


# ----------------------------------------------------------------------------------------------------------
# 4. Distribution level: the generator learns an analytic teacher.


# Shift 1 for the 2-D toy: shift is a resolution-dependent choice (video latents want timesteps pushed towards
# noise); in 2-D, near s = 1 the signal f_f - f_r is tiny next to the critic's error, and shift 5 puts most
# timesteps there, which makes the converged std depend on the critic's error (measured: 5-25 % off).
TOY_SCHED = FlowSchedule(num_train_timesteps=1000, shift=1.0)

# A single anisotropic Gaussian N((1.0, -0.5), diag(0.5^2, 1.5^2)), written as a GMM: the reverse-KL optimum of
# an affine generator is then the teacher itself, so moment matching is the right check.
TEACHER = GMM([1.0], [[1.0, -0.5]], [[[0.25, 0.0], [0.0, 2.25]]])
MEAN_TOL, STD_REL_TOL = 0.15, 0.20


class Critic(nn.Module):
    """Small MLP (x_t (B, 2), t (B,)) -> flow (B, 2)."""

    def __init__(self, width=64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 2))

    def forward(self, x_t, t):
        return self.net(torch.cat([x_t, (t / T)[:, None].to(x_t.dtype)], dim=1))


def _train(loss_name, teacher: GMM, *, sign=1.0, steps=300, critic_steps=4, batch=256, seed=0, lr=1e-2,
           schedule=TOY_SCHED):
    """Alternate critic / generator steps (200 critic warm-up steps first). An affine generator
    x = b + z A^T starts at N(0, I); Adam, generator lr annealed linearly to lr / 10. Returns mean, std (2,)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    gen = nn.Linear(2, 2)
    with torch.no_grad():
        gen.weight.copy_(torch.eye(2))
        gen.bias.zero_()
    critic = Critic()
    opt_g = torch.optim.Adam(gen.parameters(), lr=lr)
    opt_c = torch.optim.Adam(critic.parameters(), lr=2e-3)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda i: 1 - 0.9 * i / steps)  # less jitter at the end
    critic_loss = CriticLoss(schedule, target="flow")
    gen_loss = make_generator_loss(loss_name, schedule)
    real_fn, fake_fn = teacher.x0, as_x0_fn(critic, schedule)

    def critic_step():
        x = gen(torch.randn(batch, 2, generator=g)).detach()
        loss, _ = critic_loss(x, critic, generator=g)
        opt_c.zero_grad()
        loss.backward()
        opt_c.step()

    for _ in range(200):  # warm up the critic on the initial generator
        critic_step()
    for _ in range(steps):
        for _ in range(critic_steps):
            critic_step()
        critic.requires_grad_(False)  # the generator step must not train the critic (SiD backprops through it)
        loss, _ = gen_loss(gen(torch.randn(batch, 2, generator=g)), real_fn, fake_fn, generator=g)
        opt_g.zero_grad()
        (sign * loss).backward()
        opt_g.step()
        sched_g.step()
        critic.requires_grad_(True)
    with torch.no_grad():
        x = gen(torch.randn(8192, 2, generator=g)).double()
    return x.mean(0), x.std(0)


def _w2(mean, std, t_mean, t_std):  # W2 distance between diagonal Gaussians
    return ((mean - t_mean).square().sum() + (std - t_std).square().sum()).sqrt().item()


@pytest.mark.parametrize("loss_name", ["dmd", "sid", "fgm"])
def test_generator_matches_teacher_distribution(loss_name):
    t_mean, t_std = TEACHER.moments()
    mean, std = _train(loss_name, TEACHER)
    assert (mean - t_mean).abs().max() < MEAN_TOL, (mean, t_mean)
    assert ((std - t_std).abs() / t_std).max() < STD_REL_TOL, (std, t_std)


def test_wrong_sign_dmd_moves_away():
    """The same loop stepping on -loss (gradient negated exactly) drives the generator away from the teacher."""
    t_mean, t_std = TEACHER.moments()
    w2_start = _w2(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), t_mean, t_std)
    mean, std = _train("dmd", TEACHER, sign=-1.0, steps=100)
    assert _w2(mean, std, t_mean, t_std) > 1.25 * w2_start  # measured: 1.32 -> 2.06


# ----------------------------------------------------------------------------------------------------------
# 5. Bad input.


def test_bad_inputs():
    with pytest.raises(ValueError, match="dmd, sid, fgm"):
        make_generator_loss("sdd", SCHED)
    for bad in [float("nan"), float("inf"), -float("inf"), "abc"]:
        with pytest.raises(ValueError, match="alpha"):
            SiDLoss(SCHED, alpha=bad)
        with pytest.raises(ValueError, match="alpha"):
            make_generator_loss("sid", SCHED, alpha=bad)
    with pytest.raises(ValueError, match="alpha"):
        make_generator_loss("fgm", SCHED, alpha=1.0)
    assert make_generator_loss("FGM", SCHED).alpha == 0.5
    with pytest.raises(ValueError, match="flow, eps, x0"):
        CriticLoss(SCHED, target="v")
    with pytest.raises(ValueError, match="min_frac"):
        DMDLoss(SCHED, min_frac=0.5, max_frac=0.4)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="real_fn returned shape"):
        DMDLoss(SCHED)(x, lambda x_t, t: x_t[:, :1], lambda x_t, t: x_t)
    with pytest.raises(ValueError, match="batched"):
        SiDLoss(SCHED)(torch.randn(4), lambda x_t, t: x_t, lambda x_t, t: x_t)
    with pytest.raises(ValueError, match="eps of shape"):
        CriticLoss(SCHED)(x, lambda x_t, t: x_t, eps=torch.randn(2, 4))
    with pytest.raises(ValueError, match="differ"):
        ODERegressionLoss()(torch.randn(2, 3), torch.randn(3, 2))
