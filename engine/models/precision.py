"""bfloat16 weights with float32 matrix products, for CPUs whose bfloat16 matmul is emulated.

On a CPU with AVX-512 BF16 (or AMX), oneDNN multiplies bfloat16 matrices natively, faster than float32. Without
it (e.g. AMD Zen 3, AVX2 only; `torch.backends.cpu.get_cpu_capability()` says "AVX2") PyTorch falls back to a
generic kernel: measured on such a host, a (312 x 1536) @ (1536 x 8960) product took 590 ms in bfloat16 against
100 ms in float32, and a whole Wan-1.3B-shaped run 5x longer than in float32 (benchmarks/RESULTS.md, issue 16).

`float32_compute(model)` keeps every parameter in its dtype (bf16 memory, the same state dict) and runs the
linear and 3D-convolution layers in float32: weights are copied into a float32 scratch buffer shared by all
layers of the same weight shape (a copy into a warm buffer costs ~3 ms for 1536 x 8960 here, a fresh `.float()`
~28 ms: the allocation's page faults, not the conversion, are the cost), inputs are upcast, the result is cast
back to the input's dtype. Under autograd it uses plain `.float()` copies (the scratch would be overwritten
before backward). Modules that are already float32 compute exactly as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_


def bf16_matmul_is_native(device: torch.device | str = "cpu") -> bool:
    """True where bfloat16 matrix products run in hardware: CUDA, or a CPU with AVX-512 BF16 or AMX tiles."""
    device = torch.device(device)
    if device.type != "cpu":
        return True
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


class _Scratch:
    """One float32 buffer per (shape, device), reused by every layer of that weight shape."""

    def __init__(self):
        self.buffers: dict = {}

    def float32(self, p: torch.Tensor) -> torch.Tensor:
        if p.dtype == torch.float32:
            return p
        if torch.is_grad_enabled() and p.requires_grad:
            return p.float()
        key = (tuple(p.shape), p.device)
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = torch.empty(p.shape, dtype=torch.float32, device=p.device)
        return buf.copy_(p)


class Float32ComputeLinear(torch.nn.Linear):
    """nn.Linear whose product runs in float32 whatever the dtype of its weights (same parameters)."""

    _scratch: _Scratch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32 or x.dtype == torch.float64:
            return super().forward(x)
        b = self.bias.float() if self.bias is not None else None
        return F_.linear(x.float(), self._scratch.float32(self.weight), b).to(x.dtype)


class Float32ComputeConv3d(torch.nn.Conv3d):
    """nn.Conv3d computed in float32 whatever the dtype of its weights (same parameters)."""

    _scratch: _Scratch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32 or x.dtype == torch.float64:
            return super().forward(x)
        b = self.bias.float() if self.bias is not None else None
        return self._conv_forward(x.float(), self._scratch.float32(self.weight), b).to(x.dtype)


_SWAP = {torch.nn.Linear: Float32ComputeLinear, torch.nn.Conv3d: Float32ComputeConv3d}


def float32_compute(model: torch.nn.Module) -> torch.nn.Module:
    """Make model's nn.Linear / nn.Conv3d layers compute in float32 (in place; parameters untouched); returns it.

    Only exact nn.Linear / nn.Conv3d instances change class (to a subclass with the same parameters), so the
    state dict, save_pretrained and from_pretrained see the same model.
    """
    scratch = _Scratch()
    for m in model.modules():
        cls = _SWAP.get(type(m))
        if cls is not None:
            m.__class__ = cls
            m._scratch = scratch
    return model


def is_float32_compute(model: torch.nn.Module) -> bool:
    return any(isinstance(m, (Float32ComputeLinear, Float32ComputeConv3d)) for m in model.modules())
