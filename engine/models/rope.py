"""Rotary position embedding (RoPE) as Wan2.1 applies it, and the temporal shift the KV cache re-indexes with.

Wan splits each head's Dh channels into a temporal, a height and a width part (`t_dim = Dh - 4 (Dh // 6)`
channels first, then `2 (Dh // 6)` each) and rotates interleaved channel pairs `(2i, 2i + 1)` of each part by
`position * theta ** (-2i / part_dim)`. A rotation by p followed by one by d is the rotation by p + d, so a key
stored rotated to frame position p moves to p + d by rotating its temporal channels by d alone (`shift_frames`):
the KV cache stores rotated keys and re-indexes them without knowing the un-rotated ones.

Angles are computed in float64 and the cos / sin tables rounded to float32, as diffusers' Wan tables are (the
parent model's numbers); the shift's table stays float64. So a shifted key equals a key rotated afresh to p + d up
to those tables' float32 rounding and the cache dtype's (about 1e-7 relative in float32).
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed

THETA = 10000.0  # Wan's RoPE base, in all three parts


def rope_1d(dim: int, positions: torch.Tensor, theta: float = THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (P, dim) for arbitrary integer positions, same formula as Wan's precomputed table."""
    return get_1d_rotary_pos_embed(
        dim, positions.to(torch.float64), theta, use_real=True, repeat_interleave_real=True, freqs_dtype=torch.float64
    )


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (..., Dh) by cos/sin (..., Dh) broadcastable to it; x's dtype out.

    One complex product per pair, (x_2i + i x_2i+1) (cos + i sin), in float32 (float64 for float64 input or
    tables): the same arithmetic as x1 cos - x2 sin, x1 sin + x2 cos, in one contiguous pass."""
    dt = torch.float64 if torch.float64 in (x.dtype, cos.dtype) else torch.float32
    turn = torch.complex(cos[..., 0::2].to(dt), sin[..., 1::2].to(dt))  # (..., Dh/2)
    xc = torch.view_as_complex(x.to(dt).unflatten(-1, (-1, 2)))  # (..., Dh/2)
    return torch.view_as_real(xc * turn).flatten(-2).type_as(x)


def shift_frames(k: torch.Tensor, delta: int, t_dim: int, theta: float = THETA) -> torch.Tensor:
    """Keys k (B, L, N, Dh) rotated to frame positions p, as if rotated to p + delta: the first t_dim channels of
    each head turn by delta, the height / width channels stay. Out of place (autograd follows it)."""
    if delta == 0 or t_dim == 0:
        return k
    freqs = theta ** -(torch.arange(0, t_dim, 2, dtype=torch.float64, device=k.device) / t_dim)  # (t_dim/2,)
    angle = (delta * freqs).repeat_interleave(2)  # (t_dim,), as the tables' interleaved pairs
    cos, sin = angle.cos(), angle.sin()  # float64: products in float64, cast back to k's dtype
    return torch.cat([apply_rope(k[..., :t_dim], cos, sin), k[..., t_dim:]], dim=-1)
