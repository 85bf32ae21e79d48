"""Faster CPU kernels for diffusers' AutoencoderKLWan at small sizes: the same parameters, the same numbers up to
float rounding, forward and backward.

Measured on this 2-core CPU, one thread (benchmarks/RESULTS.md, "Cheaper attacks"), two layers dominate the
default model's VAE decoder, and both run on slow generic paths at its size:

- `WanCausalConv3d`. PyTorch picks oneDNN for a float32 3D convolution on a CPU only when the input is large
  enough (batch > 1, or N * C * D * H > 20480, aten/src/ATen/native/Convolution.cpp "for some case, native is
  faster"); below that it runs `slow_conv3d` (im2col + GEMM). A 64x64 decoder's layers (8-32 channels, 3-6
  frames, one video) all fall below the threshold, and slow_conv3d is about 4x slower than oneDNN there, its
  backward 5-6x. Here those convolutions call oneDNN directly (`torch.mkldnn_convolution`), and their backward
  to the input is a oneDNN convolution too (`_OneDnnConv3d`). Only the cases the threshold keeps on the slow
  path take this route (CPU, float32, stride 1, no dilation or groups, oneDNN available); the real Wan VAE's
  layers are large and keep PyTorch's own choice, as do CUDA, float64 (gradient checks) and half precision.
- `WanRMS_norm`. `F.normalize(x, dim=1)` reduces over the channel dimension of a (B, C, T, H, W) tensor with
  `linalg_vector_norm`, about 30x slower at these shapes than the same formula written as a sum of squares
  (`x * rsqrt(max(sum_c x^2, eps^2))`, eps = 1e-12 as F.normalize), with a fused backward: forward + backward
  about 5x faster, and half the memory saved for backward.

`fast_wan_vae(vae)` swaps the classes of those modules in place (exact instances only; state dict, save / load
and isinstance checks unchanged) and returns the VAE. Engine applies it to its VAE.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm

MKLDNN_MIN_SIZE = 20480  # PyTorch's threshold (N * C * D * H) below which a batch-1 float32 conv stays native


def _slow_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether PyTorch would run this (stride-1, ungrouped) float32 CPU convolution on its native slow path."""
    n, c, d, h = x.shape[:4]
    big_kernel = weight.shape[-1] > 3 and weight.shape[-2] > 3
    return n == 1 and not big_kernel and n * c * d * h <= MKLDNN_MIN_SIZE


class _OneDnnConv3d(torch.autograd.Function):
    """F.conv3d(x, weight, bias) (stride 1, no padding) on oneDNN, forward and backward.

    Backward to the input: the transposed convolution of a stride-1 conv is a conv of the output gradient, padded by
    kernel - 1, with the kernel flipped and its channel axes swapped; oneDNN runs it as fast as the forward. The
    weight / bias gradients (VAE training) use PyTorch's convolution_backward. The input is saved only when the
    weight needs a gradient: with frozen weights (an attack) a convolution keeps nothing for backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        ctx.has_bias = bias is not None
        return torch.mkldnn_convolution(x, weight, bias, (0, 0, 0), (1, 1, 1), (1, 1, 1), 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        gy = gy.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            kt, kh, kw = weight.shape[2:]
            w_t = weight.flip(2, 3, 4).transpose(0, 1).contiguous()  # (C, Co, kt, kh, kw)
            gx = torch.mkldnn_convolution(gy, w_t, None, (kt - 1, kh - 1, kw - 1), (1, 1, 1), (1, 1, 1), 1)
        need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.has_bias
        if need_w or need_b:
            if x is None:  # the bias alone
                gb = gy.sum((0, 2, 3, 4))
            else:
                _, gw, gb = torch.ops.aten.convolution_backward(
                    gy, x, weight, [weight.shape[0]] if ctx.has_bias else None, (1, 1, 1), (0, 0, 0), (1, 1, 1),
                    False, (0, 0, 0), 1, (False, need_w, need_b))
        return gx, gw, gb


def conv3d_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.conv3d(x, weight, bias) for stride 1, no padding, dilation 1, groups 1, on oneDNN whatever the size.

    x (B, C, D, H, W), weight (Co, C, kt, kh, kw) -> (B, Co, D - kt + 1, H - kh + 1, W - kw + 1). Differentiable in
    x, weight and bias (once: no double backward).
    """
    return _OneDnnConv3d.apply(x.contiguous(), weight.contiguous(), bias)


class FastCausalConv3d(WanCausalConv3d):
    """WanCausalConv3d whose small float32 CPU convolutions run on oneDNN (module docstring)."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
                and self.stride == (1, 1, 1) and self.dilation == (1, 1, 1) and self.groups == 1
                and self.padding == (0, 0, 0) and self.padding_mode == "zeros" and _slow_path(x, weight)
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            return conv3d_onednn(x, weight, bias)
        return super()._conv_forward(x, weight, bias)


class _RMSNormChannels(torch.autograd.Function):
    """x * rsqrt(max(sum_c x^2, eps^2)) * gamma * scale over dim 1, with a fused backward that saves x alone
    (plus the small per-position 1 / norm): autograd's version of the formula keeps x * inv as well, and its
    backward of the two products and the reduction costs about twice as much."""

    @staticmethod
    def forward(ctx, x, gamma, scale: float):
        inv = (x * x).sum(1, keepdim=True).clamp_min(1e-24).rsqrt()  # (B, 1, ...)
        ctx.save_for_backward(x, inv, gamma)
        ctx.scale = scale
        return x * inv * (gamma * scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, go):
        x, inv, gamma = ctx.saved_tensors
        gx = ggamma = None
        if ctx.needs_input_grad[0]:
            gn = go * (gamma * ctx.scale)  # the gradient of n = x * inv
            # dn/dx = inv (I - n n^T) where the norm is above eps; inv is a constant where the clamp holds
            coef = (gn * x).sum(1, keepdim=True) * inv.pow(3) * (inv < 1e12)
            gx = gn * inv - x * coef
        if ctx.needs_input_grad[1]:
            dims = [d for d in range(x.ndim) if d != 1]
            ggamma = (go * x * inv).sum(dims).view(gamma.shape) * ctx.scale
        return gx, ggamma, None


class FastRMSNorm(WanRMS_norm):
    """WanRMS_norm with F.normalize's formula written as a channel sum of squares (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channel_first or x.dtype not in (torch.float32, torch.float64):
            return super().forward(x)
        # 1 / max(||x||, 1e-12) as F.normalize, x * x rather than x.pow(2) (pow's backward is a generic kernel)
        out = _RMSNormChannels.apply(x, self.gamma, self.scale)
        return out + self.bias if torch.is_tensor(self.bias) else out


_SWAP = {WanCausalConv3d: FastCausalConv3d, WanRMS_norm: FastRMSNorm}


def fast_wan_vae(vae: torch.nn.Module) -> torch.nn.Module:
    """Swap the VAE's causal 3D convolutions and RMS norms for the faster subclasses above (in place); returns it."""
    for m in vae.modules():
        cls = _SWAP.get(type(m))
        if cls is not None:
            m.__class__ = cls
    return vae
