"""The KV cache of the causal transformer: an explicit object, passed to every call, never module state.

Per layer it holds the self-attention keys and values of the latent frames in the attention window, stored
*before* rotary embedding, plus the cross-attention K/V of the prompt (computed once per prompt).

Window. At most `max_frames` context frames are kept. When a write would overflow, the oldest frames after the
first `sink_frames` (LongLive's frame sink) are evicted. Inference buffers are preallocated and written in
place, so memory is flat once the window is full.

Positions (RoPE), two modes, chosen per cache (`positions=`):

- `"window"` (re-indexing): keys are stored un-rotated; at each call the cached frames get the positions
  0 .. n-1 in slot order (sinks first, then the rest in time order) and the new frames n, n+1, ... Until the
  first eviction these are exactly the absolute frame positions, so cached streaming equals full-sequence
  block-causal attention. After an eviction, every frame in the window keeps its relative distance to every
  other non-sink frame (RoPE only sees distances), and the sink frames sit right before the window. Positions
  never exceed the window size: a stream may be arbitrarily long although Wan's RoPE table covers 1024 frames.
- `"absolute"`: every frame keeps the absolute position it was written at, sinks included, as Self-Forcing's
  and LongLive's `local_attn_size` + `sink_size` do (their weights reproduce their outputs). The cache records
  each slot's position; `next_position` is where the next written frame goes (settable, for a re-cache). A
  stream in this mode ends at the RoPE table (the transformer refuses positions past it).

Modes. `differentiable=False`: preallocated buffers, in-place writes (fast inference). `differentiable=True`:
no in-place writes (tensors are concatenated and sliced), so autograd can follow later blocks back through
cached K/V to earlier noise. Both give the same numbers.
"""

from __future__ import annotations

import torch

POSITION_MODES = ("window", "absolute")


class KVCache:
    def __init__(
        self,
        num_layers: int,
        tokens_per_frame: int,
        *,
        max_frames: int,
        sink_frames: int = 0,
        differentiable: bool = False,
        positions: str = "window",
    ):
        if positions not in POSITION_MODES:
            raise ValueError(f"unknown rope_positions {positions!r}; accepted: {', '.join(POSITION_MODES)}")
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        if not (0 <= sink_frames < max_frames):
            raise ValueError(f"sink_frames must lie in [0, max_frames - 1 = {max_frames - 1}], got {sink_frames}")
        self.num_layers = num_layers
        self.tokens_per_frame = tokens_per_frame
        self.max_frames = max_frames
        self.sink_frames = sink_frames
        self.differentiable = differentiable
        self.positions = positions
        self.next_position = 0  # absolute position of the next frame written
        self._frame_pos: list[int] = []  # absolute position of each held frame, in slot order
        self.num_frames = 0  # frames currently held (same for every layer between calls)
        self.total_frames = 0  # frames ever written
        self._k: list[torch.Tensor | None] = [None] * num_layers  # (B, max_frames * S, H, Dh) or (B, n * S, H, Dh)
        self._v: list[torch.Tensor | None] = [None] * num_layers
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    # -- reading --------------------------------------------------------------------------------------------
    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cached (k, v) of one layer, (B, num_frames * S, H, Dh), un-rotated; None when empty."""
        if self.num_frames == 0 or self._k[layer] is None:
            return None
        n = self.num_frames * self.tokens_per_frame
        return self._k[layer][:, :n], self._v[layer][:, :n]

    def key_positions(self) -> torch.Tensor:
        """RoPE positions (num_frames,) of the held frames, in slot order."""
        if self.positions == "absolute":
            return torch.tensor(self._frame_pos, dtype=torch.long)
        return torch.arange(self.num_frames)

    def query_positions(self, new_frames: int) -> torch.Tensor:
        """RoPE positions (new_frames,) of the frames of the next call."""
        start = self.next_position if self.positions == "absolute" else self.num_frames
        return torch.arange(new_frames) + start

    # -- writing --------------------------------------------------------------------------------------------
    def _evict(self, new_frames: int) -> int:
        """How many old non-sink frames must go so that new_frames fit."""
        if new_frames > self.max_frames - self.sink_frames:
            raise ValueError(
                f"a write of {new_frames} frames does not fit a window of {self.max_frames} frames with "
                f"{self.sink_frames} sink frames; use max_frames >= sink_frames + frames per block"
            )
        return max(0, self.num_frames + new_frames - self.max_frames)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append one layer's K/V for new frames (B, F_new * S, H, Dh). Call `advance(F_new)` after all layers."""
        S = self.tokens_per_frame
        new_frames = k.shape[1] // S
        drop = self._evict(new_frames)
        keep_lo, keep_hi = self.sink_frames * S, self.num_frames * S  # old frames live in [0, keep_hi)
        if self.differentiable:
            old_k, old_v = self.get(layer) or (k[:, :0], v[:, :0])
            if drop:  # drop frames [sink, sink + drop)
                cut = slice(keep_lo, keep_lo + drop * S)
                old_k = torch.cat([old_k[:, : cut.start], old_k[:, cut.stop :]], 1)
                old_v = torch.cat([old_v[:, : cut.start], old_v[:, cut.stop :]], 1)
            self._k[layer] = torch.cat([old_k, k], 1)
            self._v[layer] = torch.cat([old_v, v], 1)
            return
        if self._k[layer] is None or self._k[layer].shape[0] != k.shape[0]:
            shape = (k.shape[0], self.max_frames * S, *k.shape[2:])
            self._k[layer] = k.new_zeros(shape)
            self._v[layer] = v.new_zeros(shape)
        kb, vb = self._k[layer], self._v[layer]
        with torch.no_grad():
            if drop:  # shift the surviving non-sink frames left, in place
                src = slice(keep_lo + drop * S, keep_hi)
                dst = slice(keep_lo, keep_hi - drop * S)
                kb[:, dst] = kb[:, src].clone()
                vb[:, dst] = vb[:, src].clone()
            start = (self.num_frames - drop) * S
            kb[:, start : start + k.shape[1]] = k
            vb[:, start : start + v.shape[1]] = v

    def advance(self, new_frames: int) -> None:
        """Commit a write of new_frames frames (after every layer has written)."""
        drop = self._evict(new_frames)
        s = self.sink_frames
        new = list(range(self.next_position, self.next_position + new_frames))
        self._frame_pos = self._frame_pos[:s] + self._frame_pos[s + drop:] + new
        self.num_frames = min(self.max_frames, self.num_frames + new_frames)
        self.total_frames += new_frames
        self.next_position += new_frames

    def reset(self, keep_cross: bool = False) -> None:
        """Forget all frames (buffers are kept for reuse); optionally keep the prompt's cross-attention K/V."""
        self.num_frames = 0
        self.total_frames = 0
        self.next_position = 0
        self._frame_pos = []
        if self.differentiable:
            self._k = [None] * self.num_layers
            self._v = [None] * self.num_layers
        if not keep_cross:
            self.cross = [None] * self.num_layers

    def nbytes(self) -> int:
        """Bytes held by self-attention K/V buffers (what grows with the stream until the window is full)."""
        return sum(t.numel() * t.element_size() for t in self._k + self._v if t is not None)
