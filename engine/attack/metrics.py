"""Video similarity metrics: MSE, PSNR, SSIM.

Inputs are videos (T, H, W, C) or single images (H, W, C), float in [0, data_range], channels last, as the
codec decodes them (C = 3). All three are differentiable torch functions (usable as attack objectives), computed
in float32 or higher. By default they return a scalar; ``per_frame=True`` returns one value per frame (T,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _frames(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a pair and return both as (T, H, W, C) in at least float32."""
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim not in (3, 4):
        raise ValueError(f"expected a video (T, H, W, C) or an image (H, W, C), got shape {tuple(a.shape)}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dtype), b.to(dtype)


def mse(a: torch.Tensor, b: torch.Tensor, per_frame: bool = False) -> torch.Tensor:
    """Mean squared error over all pixels and channels (per frame: (T,))."""
    a, b = _frames(a, b)
    per = (a - b).pow(2).flatten(1).mean(1)  # (T,)
    return per if per_frame else per.mean()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, per_frame: bool = False) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / mse)``; ``inf`` for identical inputs.

    The scalar is the PSNR of the whole video (from its overall MSE), not the mean of per-frame PSNRs, so one
    identical frame does not make it infinite; ``per_frame=True`` gives the per-frame values.
    """
    return 10 * torch.log10(data_range ** 2 / mse(a, b, per_frame=per_frame))


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64) -> torch.Tensor:
    """Normalised 1-D Gaussian (size,); SSIM's 2-D window is its outer product with itself."""
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, per_frame: bool = False,
         window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity (Wang, Bovik, Sheikh, Simoncelli 2004, "Image Quality Assessment: From Error
    Visibility to Structural Similarity"), with their defaults: an 11x11 Gaussian window of sigma 1.5,
    K1 = 0.01, K2 = 0.03, weighted (not Bessel-corrected) local statistics, "valid" positions only (no padding),
    each channel on its own. Per frame the SSIM map is averaged over positions and channels; the scalar is the
    mean over frames. H and W must be at least ``window``.
    """
    a, b = _frames(a, b)
    T, H, W, C = a.shape
    if H < window or W < window:
        raise ValueError(f"ssim needs frames of at least {window}x{window} pixels (the window), got {H}x{W}")
    a, b = a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2)  # (T, C, H, W)
    # Filter the five local moments in one grouped, separable convolution: (T, 5C, H, W) -> (T, 5C, H', W').
    x = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    g = gaussian_window(window, sigma, a.dtype).to(a.device)
    x = F.conv2d(x, g.view(1, 1, window, 1).expand(5 * C, 1, window, 1), groups=5 * C)
    x = F.conv2d(x, g.view(1, 1, 1, window).expand(5 * C, 1, 1, window), groups=5 * C)
    mu_a, mu_b, e_aa, e_bb, e_ab = x.split(C, dim=1)  # each (T, C, H', W')
    var_a, var_b, cov = e_aa - mu_a ** 2, e_bb - mu_b ** 2, e_ab - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    per = smap.flatten(1).mean(1)  # (T,)
    return per if per_frame else per.mean()
