"""Budgets, metrics and objectives of the noise-attack lab: checked against independent computations."""

import math

import numpy as np
import pytest
import torch

from engine.attack.budget import Budget, chi_shell_nll, gaussianity, renormalize, sample_norms
from engine.attack.metrics import mse, psnr, ssim
from engine.attack.objectives import CallableObjective, Targeted, Untargeted, make_objective


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------- budget


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="l1", eps=0.1), "accepted kinds: 'l2', 'linf', 'none'"),
    (dict(kind="l2", eps=0.0), r"\(0, inf\)"),
    (dict(kind="linf", eps=-1.0), r"\(0, inf\)"),
    (dict(kind="linf", eps=float("nan")), r"\(0, inf\)"),
    (dict(kind="l2", eps=float("inf")), r"\(0, inf\)"),
    (dict(kind="l2", eps=None), "needs eps"),
    (dict(kind="none", chi_weight=-0.1), r"\[0, inf\)"),
])
def test_bad_budgets(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Budget(**kwargs)


def test_l2_projection_per_sample():
    eps = 0.1
    z_init = torch.randn(3, 4, 2, 5, 5, generator=gen(0))
    d = z_init[0].numel()
    direction = torch.randn(z_init.shape, generator=gen(1))
    direction /= sample_norms(direction).float().view(-1, 1, 1, 1, 1)
    # sample 0 far outside, sample 1 inside, sample 2 exactly at half the radius
    dist = torch.tensor([5.0, 0.3, 0.5]) * eps * math.sqrt(d)
    z = z_init + direction * dist.view(-1, 1, 1, 1, 1)
    out = Budget("l2", eps).project(z, z_init)
    norms = sample_norms(out - z_init)
    assert norms[0].item() == pytest.approx(eps * math.sqrt(d), rel=1e-5)  # on the boundary
    assert torch.equal(out[1:], z[1:])  # inside: untouched, bit for bit
    # projection keeps the direction of the offset
    cos = torch.nn.functional.cosine_similarity((out - z_init)[0].flatten(), direction[0].flatten(), dim=0)
    assert cos.item() == pytest.approx(1.0, abs=1e-5)
    assert not out.requires_grad


def test_linf_projection_and_pgd_step():
    eps, lr = 0.05, 0.02
    z_init = torch.randn(2, 3, 4, 4, generator=gen(0))
    z = z_init + 0.2 * torch.randn(z_init.shape, generator=gen(1))
    b = Budget("linf", eps)
    out = b.project(z, z_init)
    delta = out - z_init
    assert delta.abs().max().item() <= eps + 1e-6
    inside = (z - z_init).abs() <= eps
    assert torch.equal(out[inside], z[inside])  # inside elements untouched
    outside = ~inside
    assert torch.allclose(delta[outside].abs(), torch.full_like(delta[outside], eps), atol=1e-6)
    assert torch.equal(delta[outside].sign(), (z - z_init)[outside].sign())

    grad = torch.randn(z_init.shape, generator=gen(2))
    grad[0, 0, 0, 0] = 0.0
    step = b.pgd_step(z_init, grad, lr)  # no z_init: plain step
    assert torch.allclose(step - z_init, -lr * grad.sign())
    assert step[0, 0, 0, 0] == z_init[0, 0, 0, 0]
    # repeated steps stay in the box
    zk = z_init.clone()
    for _ in range(5):
        zk = b.pgd_step(zk, grad, lr, z_init=z_init)
    assert (zk - z_init).abs().max().item() <= eps + 1e-6
    with pytest.raises(ValueError, match="gradient"):
        b.pgd_step(z_init, None, lr)


def test_l2_pgd_step_and_random_start():
    z_init = torch.randn(2, 3, 8, 8, generator=gen(0))
    d = z_init[0].numel()
    b = Budget("l2", 0.1)
    grad = torch.randn(z_init.shape, generator=gen(1))
    step = b.pgd_step(z_init, grad, 0.01)
    assert torch.allclose(sample_norms(step - z_init).float(), torch.full((2,), 0.01 * math.sqrt(d)), rtol=1e-5)
    # the step is along -grad
    cos = torch.nn.functional.cosine_similarity((step - z_init).flatten(1), -grad.flatten(1), dim=1)
    assert torch.allclose(cos, torch.ones(2), atol=1e-5)
    for kind in ("l2", "linf"):
        bb = Budget(kind, 0.1)
        z = bb.random_start(z_init, gen(3))
        assert torch.equal(bb.project(z, z_init), z)  # a point of the budget
        assert not torch.equal(z, z_init)
        assert torch.equal(z, bb.random_start(z_init, gen(3)))  # seeded


def test_renormalize_gives_sqrt_d():
    z = 3.0 * torch.randn(4, 2, 3, 8, 8, generator=gen(0))
    d = z[0].numel()
    out = renormalize(z)
    assert torch.allclose(sample_norms(out), torch.full((4,), math.sqrt(d), dtype=torch.float64), rtol=1e-6)
    b = Budget("l2", 0.5, renormalize=True)
    far = z + 10
    assert torch.allclose(sample_norms(b.project(far, z)), torch.full((4,), math.sqrt(d), dtype=torch.float64),
                          rtol=1e-6)


def test_chi_regularizer_minimiser_and_gradient():
    d = 4096
    u = torch.randn(1, d, generator=gen(0), dtype=torch.float64)
    u /= u.norm()  # unit direction
    b = Budget(chi_weight=1.0)
    # analytic mode of the chi(d) density: r* = sqrt(d - 1); scan r around it
    radii = torch.linspace(math.sqrt(d - 1) - 3, math.sqrt(d - 1) + 3, 6001, dtype=torch.float64)
    values = torch.stack([b.regularizer(r * u) for r in radii])
    assert radii[values.argmin()].item() == pytest.approx(math.sqrt(d - 1), abs=2e-3)
    assert values.min().item() == pytest.approx(0.0, abs=1e-6)
    # matches -( (d-1) log r - r^2/2 ) up to a constant
    raw = -((d - 1) * torch.log(radii) - radii ** 2 / 2)
    assert torch.allclose(values - values[0], raw - raw[0], atol=1e-6)

    def grad_at(r):
        z = (r * u).clone().requires_grad_(True)
        b.regularizer(z).backward()
        return z.grad

    # gradient descent moves ||z|| toward sqrt(d - 1): radial component sign, and d nll / dr = r - (d-1)/r
    for r in (0.5 * math.sqrt(d), 2.0 * math.sqrt(d)):
        g = grad_at(r)
        radial = (g * u).sum().item()
        assert radial == pytest.approx(r - (d - 1) / r, rel=1e-6)
        new_r = (r * u - 0.1 * g).norm().item()
        assert abs(new_r - math.sqrt(d - 1)) < abs(r - math.sqrt(d - 1))
    # ~flat near the mode
    assert grad_at(math.sqrt(d - 1)).norm().item() < 1e-8
    assert grad_at(math.sqrt(d - 1) * (1 + 1e-4)).norm().item() < 0.02
    # weight 0 -> exactly 0; per-sample mean over the batch
    assert Budget().regularizer(torch.randn(2, 10)).item() == 0.0
    z2 = torch.randn(2, d, generator=gen(1))
    assert torch.allclose(Budget(chi_weight=0.5).regularizer(z2), 0.5 * chi_shell_nll(z2).mean())


def test_chi_regularizer_large_d_float32():
    z = torch.randn(1, 10_000_000, generator=gen(0)).requires_grad_(True)
    reg = Budget(chi_weight=1.0).regularizer(z)
    reg.backward()
    assert torch.isfinite(reg) and torch.isfinite(z.grad).all()
    # near the shell nll ~= m * delta^2 with ||z|| = sqrt(m) (1 + delta): O(1), not O(d)
    m = z.numel() - 1
    delta = sample_norms(z.detach()).item() / math.sqrt(m) - 1
    assert reg.item() == pytest.approx(m * delta ** 2, rel=1e-2, abs=1e-3)


def test_gaussianity():
    g = gaussianity(torch.randn(2, 4, 3, 32, 32, generator=gen(0)))
    assert set(g) == {"mean", "std", "norm", "sqrt_d", "norm_ratio", "ks", "ks_pvalue"}
    assert g["ks"] < 0.02 and g["ks_pvalue"] > 1e-3
    assert g["norm_ratio"] == pytest.approx(1.0, abs=0.02)
    assert g["sqrt_d"] == pytest.approx(math.sqrt(2 * 4 * 3 * 32 * 32))
    big = torch.randn(300_000, generator=gen(1))
    assert gaussianity(big) == gaussianity(big)  # subsampled with a fixed seed
    for bad in (torch.rand(20_000, generator=gen(2)),  # uniform on [0, 1]
                (torch.rand(20_000, generator=gen(3)) * 2 - 1) * math.sqrt(3),  # uniform with unit variance
                2.0 * torch.randn(20_000, generator=gen(4))):  # scaled Gaussian
        s = gaussianity(bad)
        assert s["ks"] > 0.04 and s["ks_pvalue"] < 1e-6
    assert gaussianity(2.0 * torch.randn(20_000, generator=gen(4)))["norm_ratio"] == pytest.approx(2.0, abs=0.05)


# --------------------------------------------------------------------------------------------------- metrics


def ssim_reference(a, b, data_range=1.0, win=11, sigma=1.5, k1=0.01, k2=0.03):
    """Direct per-window SSIM in numpy (Wang et al. 2004), one loop over window positions."""
    x = np.arange(win) - (win - 1) / 2
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    T, H, W, C = a.shape
    frames = []
    for t in range(T):
        vals = []
        for c in range(C):
            for i in range(H - win + 1):
                for j in range(W - win + 1):
                    pa, pb = a[t, i:i + win, j:j + win, c], b[t, i:i + win, j:j + win, c]
                    ma, mb = (w * pa).sum(), (w * pb).sum()
                    va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                    cov = (w * (pa - ma) * (pb - mb)).sum()
                    vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
        frames.append(np.mean(vals))
    return np.array(frames)


def test_mse_psnr():
    a = torch.rand(3, 8, 8, 3, generator=gen(0))
    b = a + 0.1  # mse exactly 0.01 (up to float32 rounding)
    assert mse(a, b).item() == pytest.approx(0.01, rel=1e-4)
    assert psnr(a, b).item() == pytest.approx(20.0, abs=1e-3)
    assert psnr(a, b, data_range=255.0).item() == pytest.approx(20 + 20 * math.log10(255), abs=1e-3)
    assert math.isinf(psnr(a, a).item())
    c = a.clone()
    c[1] += 0.2
    assert torch.allclose(mse(a, c, per_frame=True), torch.tensor([0.0, 0.04, 0.0]), atol=1e-6)
    assert mse(a, c).item() == pytest.approx(0.04 / 3, rel=1e-4)
    with pytest.raises(ValueError, match=r"\(3, 8, 8, 3\) vs \(2, 8, 8, 3\)"):
        mse(a, a[:2])


def test_ssim_identities_and_reference():
    a = torch.rand(2, 20, 23, 3, generator=gen(0), dtype=torch.float64)
    b = (a + 0.2 * torch.randn(a.shape, generator=gen(1), dtype=torch.float64)).clamp(0, 1)
    ref = ssim_reference(a.numpy(), b.numpy())
    assert np.allclose(ssim(a, b, per_frame=True).numpy(), ref, atol=1e-10)
    assert ssim(a, b).item() == pytest.approx(ref.mean(), abs=1e-10)
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, b).item() == pytest.approx(ssim(b, a).item(), abs=1e-12)
    # decreasing with noise
    x = torch.rand(2, 32, 32, 3, generator=gen(2))
    values = [ssim(x, (x + s * torch.randn(x.shape, generator=gen(3))).clamp(0, 1)).item()
              for s in (0.01, 0.05, 0.1, 0.3)]
    assert all(v1 > v2 for v1, v2 in zip(values, values[1:]))
    # an image (H, W, 3) is one frame; differentiable
    img = x[0].clone().requires_grad_(True)
    ssim(img, x[1]).backward()
    assert img.grad is not None and torch.isfinite(img.grad).all()
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 8, 8, 3), torch.rand(1, 8, 8, 3))


# ------------------------------------------------------------------------------------------------ objectives


def test_maximize_flag_and_loss_sign():
    base = torch.rand(4, 8, 8, 3, generator=gen(0))
    video = torch.rand(4, 8, 8, 3, generator=gen(1))
    un = Untargeted(baseline_video=base)
    assert un.maximize and un.needs_pixels and un.name == "untargeted"
    v = un(video=video)
    assert v.item() == pytest.approx(((video - base) ** 2).mean().item(), rel=1e-6)
    assert un.loss(v).item() == pytest.approx(-v.item())
    tg = Targeted(base)
    assert not tg.maximize
    assert tg.loss(tg(video)).item() == pytest.approx(v.item(), rel=1e-6)
    # gradient descent on the loss moves the right way
    x = video.clone().requires_grad_(True)
    un.loss(un(x)).backward()
    assert un(x.detach() - 0.01 * x.grad) > un(video)
    x.grad = None
    tg.loss(tg(x)).backward()
    assert tg(x.detach() - 0.01 * x.grad) < tg(video)
    latent_obj = Untargeted(space="latent")
    assert not latent_obj.needs_pixels
    with pytest.raises(RuntimeError, match="set_baseline"):
        latent_obj(latents=torch.zeros(1, 2, 3, 4, 4))


def test_frames_and_masks_select_the_right_elements():
    T, H, W = 6, 5, 7
    video = torch.rand(T, H, W, 3, generator=gen(0))
    target = torch.rand(T, H, W, 3, generator=gen(1))
    diff2 = (video - target) ** 2
    # frame ranges: tuple, slice with step, negative indices
    assert Targeted(target, frames=(1, 4))(video).item() == pytest.approx(diff2[1:4].mean().item(), rel=1e-6)
    assert Targeted(target, frames=slice(0, 6, 2))(video).item() == pytest.approx(diff2[0::2].mean().item(), rel=1e-6)
    assert Targeted(target, frames=(-2, None))(video).item() == pytest.approx(diff2[4:].mean().item(), rel=1e-6)
    # a target of the selected length is used as is
    assert Targeted(target[1:4], frames=(1, 4))(video).item() == pytest.approx(diff2[1:4].mean().item(), rel=1e-6)
    # image target broadcast over frames
    img = target[0]
    assert Targeted(img)(video).item() == pytest.approx(((video - img) ** 2).mean().item(), rel=1e-6)
    # spatial bool mask
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[1:3, 2:6] = True
    expect = diff2[:, 1:3, 2:6].mean().item()
    assert Targeted(target, mask=mask)(video).item() == pytest.approx(expect, rel=1e-6)
    # float (T, H, W) mask with frames: weighted mean over the selected frames
    wts = torch.rand(T, H, W, generator=gen(2))
    got = Targeted(target, frames=(2, 5), mask=wts)(video).item()
    w = wts[2:5, :, :, None].expand(3, H, W, 3)
    assert got == pytest.approx(((diff2[2:5] * w).sum() / w.sum()).item(), rel=1e-5)
    # untargeted with baseline, frames and mask
    un = Untargeted(baseline_video=target, frames=(0, 2), mask=mask)
    assert un(video).item() == pytest.approx(diff2[0:2, 1:3, 2:6].mean().item(), rel=1e-6)


def test_latent_space_objectives():
    B, C, F, h, w = 2, 4, 5, 3, 3
    lat = torch.randn(B, C, F, h, w, generator=gen(0))
    base = torch.randn(B, C, F, h, w, generator=gen(1))
    un = Untargeted(space="latent", frames=(1, 3))
    un.set_baseline(video=None, latents=base)
    assert un(latents=lat).item() == pytest.approx(((lat - base)[:, :, 1:3] ** 2).mean().item(), rel=1e-6)
    m = torch.zeros(h, w)
    m[0, 0] = 1.0
    tg = Targeted(base[0], space="latent", mask=m)  # (C, F, h, w) broadcast over the batch
    assert tg(latents=lat).item() == pytest.approx(((lat - base[0]) ** 2)[..., 0, 0].mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="latents"):
        tg(video=torch.rand(4, 8, 8, 3))


def test_shape_and_range_errors():
    target = torch.rand(4, 8, 8, 3)
    tg = Targeted(target)
    tg.check(video_shape=(4, 8, 8, 3))
    with pytest.raises(ValueError, match=r"\(4, 8, 8, 3\).*\(4, 16, 16, 3\)"):
        tg.check(video_shape=(4, 16, 16, 3))
    with pytest.raises(ValueError, match=r"\(4, 8, 8, 3\).*\(6, 8, 8, 3\)"):
        tg.check(video_shape=(6, 8, 8, 3))
    with pytest.raises(ValueError, match=r"0 <= start < stop <= 4"):
        Targeted(target, frames=(2, 9)).check(video_shape=(4, 8, 8, 3))
    with pytest.raises(ValueError, match=r"0 <= start < stop <= 4"):
        Targeted(target, frames=(3, 3)).check(video_shape=(4, 8, 8, 3))
    with pytest.raises(ValueError, match="mask"):
        Targeted(target, mask=torch.ones(5, 5)).check(video_shape=(4, 8, 8, 3))
    with pytest.raises(ValueError, match="no element"):
        Targeted(target, mask=torch.zeros(8, 8)).check(video_shape=(4, 8, 8, 3))
    with pytest.raises(ValueError, match=r"\(4, 8, 8, 3\).*\(4, 9, 8, 3\)"):
        Untargeted(baseline_video=target).check(video_shape=(4, 9, 8, 3))
    with pytest.raises(ValueError, match="accepted: 'pixel', 'latent'"):
        Targeted(target, space="rgb")
    # the same errors surface on call
    with pytest.raises(ValueError, match="does not fit"):
        tg(torch.rand(4, 16, 16, 3))


def test_callable_objective_and_factory():
    obj = CallableObjective(lambda v: v[..., 0].mean(), maximize=True)
    video = torch.rand(2, 4, 4, 3, generator=gen(0))
    assert obj.needs_pixels and obj.maximize
    assert obj.loss(obj(video)).item() == pytest.approx(-video[..., 0].mean().item())
    lat_obj = CallableObjective(lambda z: z.norm(), maximize=False, needs_pixels=False, name="norm")
    assert not lat_obj.needs_pixels and lat_obj.name == "norm"
    assert lat_obj(latents=torch.ones(4)).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="scalar"):
        CallableObjective(lambda v: v, maximize=True)(video)
    assert isinstance(make_objective("targeted", target=video), Targeted)
    assert isinstance(make_objective("untargeted", space="latent"), Untargeted)
    with pytest.raises(ValueError, match="accepted: 'untargeted', 'targeted'"):
        make_objective("psnr")
