"""The KV cache of the causal transformer: an explicit object, passed to every call, never module state.

Per layer it holds the self-attention keys and values of the latent frames in the attention window, the keys
stored *rotated* (RoPE applied at the frame position they hold in the cache, `key_positions()`), plus the
cross-attention K/V of the prompt (computed once per prompt). A call rotates only its new frames' queries and
keys (at `query_positions()`) and attends over the held keys as stored: nothing cached is re-rotated or
re-projected per call.

Window. At most `max_frames` context frames are kept. When a write would overflow, the oldest frames after the
first `sink_frames` (LongLive's frame sink) are evicted. Inference buffers are preallocated (room for the
window plus one call's new frames) and written in place, so memory is flat once they exist.

Positions (RoPE), two modes, chosen per cache (`positions=`):

- `"window"` (re-indexing): the cached frames sit at positions 0 .. n-1 in slot order (sinks first, then the
  rest in time order) and the new frames of a call at n, n+1, ... Until the first eviction these are exactly the
  absolute frame positions, so cached streaming equals full-sequence block-causal attention. An eviction of d
  frames moves every surviving non-sink frame d positions down: their stored keys are rotated by -d in their
  temporal RoPE channels (`rope.shift_frames`; exact, as a rotation by p then by -d is the rotation by p - d),
  once per committed write, only the frames that move. After an eviction every frame keeps its relative
  distance to every other non-sink frame (RoPE only sees distances), and the sink frames sit right before the
  window. Positions never exceed the window size: a stream may be arbitrarily long although Wan's RoPE table
  covers 1024 frames. A frame's key is re-rotated at most (max_frames - sink_frames) / (frames per write)
  times in its life, one rounding of the cache's dtype each (about 1e-7 relative in float32).
- `"absolute"`: every frame keeps the absolute position it was written at, sinks included, as Self-Forcing's
  and LongLive's `local_attn_size` + `sink_size` do (their weights reproduce their outputs): keys are rotated
  once, when computed, and never again. The cache records each slot's position; `next_position` is where the
  next written frame goes (settable, for a re-cache). A stream in this mode ends at the RoPE table (the
  transformer refuses positions past it).

`rope_t_dim` (the temporal RoPE channels of a head; `make_cache` passes the model's) is what a window re-index
rotates; 0 means the keys carry no temporal rotation (a cache of plain tensors).

Calls. `extend(layer, k, v)` gives the held K/V followed by a call's new ones, not committed: the denoising
steps of a block read the cache this way. In the in-place mode without autograd the new K/V go into the free
slots after the held frames and the result is a view of the buffers (no concatenation); a later call simply
overwrites those slots. `write` + `advance` commit a call's frames (the context pass).

Modes. `differentiable=False`: preallocated buffers, in-place writes (fast inference; with autograd enabled the
reads concatenate instead, and writes are not tracked). `differentiable=True`: no in-place writes (tensors are
concatenated, sliced and rotated out of place), so autograd can follow later blocks back through cached K/V to
earlier noise. Both give the same numbers.
"""

from __future__ import annotations

import torch

from .rope import THETA, shift_frames

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
        rope_t_dim: int = 0,
        rope_theta: float = THETA,
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
        self.rope_t_dim = rope_t_dim
        self.rope_theta = rope_theta
        self.next_position = 0  # absolute position of the next frame written
        self._frame_pos: list[int] = []  # absolute position of each held frame, in slot order
        self.num_frames = 0  # frames currently held (same for every layer between calls)
        self.total_frames = 0  # frames ever written
        # in place: (B, capacity * S, N, Dh) buffers; differentiable: (B, num_frames * S, N, Dh) tensors
        self._k: list[torch.Tensor | None] = [None] * num_layers
        self._v: list[torch.Tensor | None] = [None] * num_layers
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    # -- reading --------------------------------------------------------------------------------------------
    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cached (k, v) of one layer, (B, num_frames * S, H, Dh), k rotated to key_positions(); None when empty."""
        if self.num_frames == 0 or self._k[layer] is None:
            return None
        n = self.num_frames * self.tokens_per_frame
        return self._k[layer][:, :n], self._v[layer][:, :n]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The held (k, v) followed by a call's new ones (B, F_new * S, H, Dh), k rotated to query_positions(F_new);
        nothing is committed. In place without autograd: the new K/V go into the free slots after the held ones
        and the result is a view of the buffers; otherwise a concatenation."""
        if self._in_place():
            n = self.num_frames * self.tokens_per_frame
            kb, vb = self._buffers(layer, k, n + k.shape[1])
            kb[:, n : n + k.shape[1]] = k
            vb[:, n : n + v.shape[1]] = v
            return kb[:, : n + k.shape[1]], vb[:, : n + v.shape[1]]
        past = self.get(layer)
        if past is None:
            return k, v
        return torch.cat([past[0], k], 1), torch.cat([past[1], v], 1)

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
    def _in_place(self) -> bool:
        return not self.differentiable and not torch.is_grad_enabled()

    def _buffers(self, layer: int, like: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's in-place buffers, allocated on first use (room for the window and this call's frames) and
        grown when a call brings more frames than they have room for; tokens: how many must fit."""
        kb, vb = self._k[layer], self._v[layer]
        held = self.num_frames * self.tokens_per_frame
        same = kb is not None and (kb.shape[0], *kb.shape[2:]) == (like.shape[0], *like.shape[2:]) and \
            kb.dtype == like.dtype and kb.device == like.device
        if same and kb.shape[1] >= tokens:
            return kb, vb
        if kb is not None and not same and held:
            raise ValueError(f"the cache holds {self.num_frames} frames of shape {tuple(kb.shape[2:])}, batch "
                             f"{kb.shape[0]}, {kb.dtype} on {kb.device}; got batch {like.shape[0]}, "
                             f"{tuple(like.shape[2:])}, {like.dtype} on {like.device}: reset() it first")
        shape = (like.shape[0], self.max_frames * self.tokens_per_frame + tokens - held, *like.shape[2:])
        new_k, new_v = like.new_zeros(shape), like.new_zeros(shape)
        if same and held:  # grown: keep what is held
            new_k[:, :held], new_v[:, :held] = kb[:, :held], vb[:, :held]
        self._k[layer], self._v[layer] = new_k, new_v
        return new_k, new_v

    def _evict(self, new_frames: int) -> int:
        """How many old non-sink frames must go so that new_frames fit."""
        if new_frames > self.max_frames - self.sink_frames:
            raise ValueError(
                f"a write of {new_frames} frames does not fit a window of {self.max_frames} frames with "
                f"{self.sink_frames} sink frames; use max_frames >= sink_frames + frames per block"
            )
        return max(0, self.num_frames + new_frames - self.max_frames)

    def _moves_keys(self) -> bool:
        """Whether an eviction re-rotates the keys that move down (window positions of rotated keys)."""
        return self.positions == "window" and self.rope_t_dim > 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append one layer's K/V for new frames (B, F_new * S, H, Dh), k rotated to query_positions(F_new).
        Call `advance(F_new)` after all layers."""
        S = self.tokens_per_frame
        new_frames = k.shape[1] // S
        drop = self._evict(new_frames)
        lo, n = self.sink_frames * S, self.num_frames * S  # old frames live in [0, n), sinks in [0, lo)
        if self.differentiable:
            past = self.get(layer)
            all_k, all_v = (k, v) if past is None else (torch.cat([past[0], k], 1), torch.cat([past[1], v], 1))
            if drop:  # drop frames [sink, sink + drop); the ones after them move down
                cut = lo + drop * S
                moved = all_k[:, cut:]
                if self._moves_keys():
                    moved = shift_frames(moved, -drop, self.rope_t_dim, self.rope_theta)
                all_k = torch.cat([all_k[:, :lo], moved], 1)
                all_v = torch.cat([all_v[:, :lo], all_v[:, cut:]], 1)
            self._k[layer], self._v[layer] = all_k, all_v
            return
        with torch.no_grad():
            kb, vb = self._buffers(layer, k, n + k.shape[1])
            end = n + k.shape[1]
            kb[:, n:end] = k  # already there when extend() wrote it in this call: the same values
            vb[:, n:end] = v
            if drop:  # shift the surviving non-sink frames (new ones included) left, in place
                src, dst = slice(lo + drop * S, end), slice(lo, end - drop * S)
                if self._moves_keys():
                    kb[:, dst] = shift_frames(kb[:, src], -drop, self.rope_t_dim, self.rope_theta)  # a new tensor
                else:
                    kb[:, dst] = kb[:, src].clone()
                vb[:, dst] = vb[:, src].clone()

    def advance(self, new_frames: int) -> None:
        """Commit a write of new_frames frames (after every layer has written)."""
        drop = self._evict(new_frames)
        s = self.sink_frames
        new = list(range(self.next_position, self.next_position + new_frames))
        self._frame_pos = self._frame_pos[:s] + self._frame_pos[s + drop:] + new
        self.num_frames = min(self.max_frames, self.num_frames + new_frames)
        self.total_frames += new_frames
        self.next_position += new_frames

    def held(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """A copy of every layer's held (k, v) (None where empty), for `keep_items`."""
        return [None if (kv := self.get(i)) is None else (kv[0].clone(), kv[1].clone())
                for i in range(self.num_layers)]

    def keep_items(self, held: list, items: torch.Tensor) -> None:
        """Give the batch items where `items` (B,) is False their K/V of `held` back (taken by `held()` while the
        cache held the same frames in the same slots): a re-cache of some items of a batch only."""
        for layer, old in enumerate(held):
            cur = self.get(layer)
            if old is None or cur is None:
                continue
            if old[0].shape != cur[0].shape:
                raise ValueError(f"keep_items: the cache holds {tuple(cur[0].shape)} in layer {layer}, the kept K/V "
                                 f"are {tuple(old[0].shape)}: they must hold the same frames")
            m = items.to(cur[0].device).view(-1, 1, 1, 1)
            k, v = torch.where(m, cur[0], old[0]), torch.where(m, cur[1], old[1])
            if self.differentiable:
                self._k[layer], self._v[layer] = k, v
            else:
                with torch.no_grad():
                    cur[0].copy_(k)  # views of the buffers
                    cur[1].copy_(v)

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
