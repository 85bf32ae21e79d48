"""The faster Wan VAE kernels (engine/models/vae_kernels.py) against PyTorch's own: forward and gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F_
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm

from engine.models.vae_kernels import FastCausalConv3d, FastRMSNorm, conv3d_onednn, fast_wan_vae
from engine.sampling.codec import StreamingDecoder, decode_full
from engine.testing import tiny_vae


@pytest.mark.parametrize("x_shape, w_shape", [
    ((1, 8, 6, 10, 12), (5, 8, 3, 3, 3)),   # the decoder's 3x3x3 layers
    ((2, 4, 3, 7, 7), (6, 4, 3, 3, 3)),     # batch > 1, one output frame
    ((1, 6, 4, 5, 5), (12, 6, 3, 1, 1)),    # Resample's time convolution
    ((1, 6, 2, 5, 5), (3, 6, 1, 1, 1)),     # 1x1x1 shortcut
    ((1, 3, 5, 6, 6), (4, 3, 2, 3, 2)),     # uneven kernel
])
def test_conv3d_onednn_matches_conv3d_forward_and_gradients(x_shape, w_shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=g, requires_grad=True)
    w = torch.randn(w_shape, generator=g, requires_grad=True)
    b = torch.randn(w_shape[0], generator=g, requires_grad=True)
    ref = F_.conv3d(x, w, b)
    out = conv3d_onednn(x, w, b)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn(ref.shape, generator=g)
    ref_grads = torch.autograd.grad(ref, (x, w, b), gy)
    for a, r in zip(torch.autograd.grad(out, (x, w, b), gy), ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
    # frozen weights (an attack): the input's gradient alone; no bias; a bias gradient without the weight's
    gx, = torch.autograd.grad(conv3d_onednn(x, w.detach(), b.detach()), x, gy)
    torch.testing.assert_close(gx, ref_grads[0], rtol=1e-4, atol=1e-4)
    gx, = torch.autograd.grad(conv3d_onednn(x, w.detach(), None), x, gy)
    torch.testing.assert_close(gx, torch.autograd.grad(F_.conv3d(x, w, None), x, gy)[0], rtol=1e-4, atol=1e-4)
    gb, = torch.autograd.grad(conv3d_onednn(x.detach(), w.detach(), b), b, gy)
    torch.testing.assert_close(gb, gy.sum((0, 2, 3, 4)), rtol=1e-4, atol=1e-4)


def test_fast_rms_norm_matches_f_normalize_with_a_finite_gradient_at_zero():
    torch.manual_seed(0)
    ref = WanRMS_norm(6, images=False)
    ref.gamma.data.uniform_(0.5, 1.5)
    fast = copy.deepcopy(ref)
    fast.__class__ = FastRMSNorm
    x = torch.randn(1, 6, 3, 4, 5)
    x[:, :, 0, 0, 0] = 0.0  # a zero vector: F.normalize's eps case
    x.requires_grad_(True)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-6, atol=1e-6)
    gy = torch.randn(1, 6, 3, 4, 5)
    gf = torch.autograd.grad(fast(x), (x, fast.gamma), gy)
    gr = torch.autograd.grad(ref(x), (x, ref.gamma), gy)
    assert torch.isfinite(gf[0]).all()
    for a, r in zip(gf, gr):  # the input's and gamma's gradients
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    fast.gamma.requires_grad_(False)  # frozen weights (an attack): the input's alone
    torch.testing.assert_close(torch.autograd.grad(fast(x), x, gy)[0], gr[0], rtol=1e-5, atol=1e-5)
    x64 = torch.randn(1, 6, 2, 3, 3, dtype=torch.float64, requires_grad=True)  # float64: finite differences
    fast64 = copy.deepcopy(fast).double()
    assert torch.autograd.gradcheck(lambda t: fast64(t), (x64,))


def test_fast_wan_vae_swaps_classes_keeps_state_and_decodes_the_same():
    vae = tiny_vae()
    fast = fast_wan_vae(copy.deepcopy(vae))
    convs = [m for m in fast.modules() if isinstance(m, WanCausalConv3d)]
    assert convs and all(type(m) is FastCausalConv3d for m in convs)
    assert all(type(m) is FastRMSNorm for m in fast.modules() if isinstance(m, WanRMS_norm))
    assert fast.state_dict().keys() == vae.state_dict().keys()
    z = torch.randn(1, 4, 6, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(decode_full(fast, z), decode_full(vae, z), rtol=1e-5, atol=1e-5)
        dec = StreamingDecoder(fast)
        parts = torch.cat([dec.decode(z[:, :, i:i + 3]) for i in (0, 3)], 2)
        torch.testing.assert_close(parts, decode_full(vae, z), rtol=1e-4, atol=1e-4)
    # gradients to the latents and to the weights (VAE training goes through the same modules)
    zr = z.clone().requires_grad_(True)
    gz_fast, *gw_fast = torch.autograd.grad(decode_full(fast, zr).square().sum(), [zr, *fast.decoder.parameters()])
    gz, *gw = torch.autograd.grad(decode_full(vae, zr).square().sum(), [zr, *vae.decoder.parameters()])
    torch.testing.assert_close(gz_fast, gz, rtol=1e-4, atol=1e-4)
    for a, r in zip(gw_fast, gw):
        torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-3)
