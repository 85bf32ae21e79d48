"""A prompt switch with LongLive's KV re-cache: the one implementation behind the live stream (`engine.live`) and
the Self-Forcing rollout (`training.rollout`), so that training sees at a switch exactly what inference does.

At a switch to a new prompt before block b (after block b - 1's context pass, under its own prompt):

    cache.cross = None                        the new prompt's cross-attention K/V are computed at the next call
    recache:  cache.reset(); for each run of the window's stored context inputs (consecutive frames, at most a
              block, sinks apart): context pass under the new prompt at the run's positions
              -> the self-attention K/V of the window, as if the window had been written under the new prompt

The context inputs are what the context passes fed the network (`ContextRecord`), kept frame by frame and evicted
like the cache (the oldest frame after the sinks leaves when the window is full): bounded, as the cache is.

In a batch whose items switch at different blocks (training data timelines), the re-cache runs for the whole
batch and the items that did not switch get their K/V back (`items`, `KVCache.keep_items`): every item sees what
its own live stream would.
"""

from __future__ import annotations

import torch

from ..models.kv_cache import KVCache
from .block_sampler import Conditioning, context_pass
from .schedule import FewStepSchedule


class ContextRecord:
    """The context inputs a KV cache holds, in slot order: [(frame, (B, C, 1, H, W)), ...]. `add` mirrors the
    cache's eviction (the oldest frame after `sink_frames` leaves once `max_frames` are held)."""

    def __init__(self, max_frames: int, sink_frames: int):
        self.max_frames, self.sink_frames = max_frames, sink_frames
        self.frames: list[tuple[int, torch.Tensor]] = []

    @classmethod
    def of(cls, cache: KVCache) -> "ContextRecord":
        return cls(cache.max_frames, cache.sink_frames)

    def add(self, start: int, ctx: torch.Tensor) -> None:
        """Record a context pass's input ctx (B, C, n, H, W) of latent frames start .. start + n - 1."""
        self.frames += [(start + i, ctx[:, :, i:i + 1]) for i in range(ctx.shape[2])]
        while len(self.frames) > self.max_frames:
            del self.frames[self.sink_frames]

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self):
        return iter(self.frames)


@torch.no_grad()
def recache(model, cond: torch.Tensor, schedule: FewStepSchedule, cache: KVCache, record: ContextRecord,
            num_frame_per_block: int, *, items: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> None:
    """Rebuild `cache`'s self-attention K/V under the prompt `cond` (B, L, D) from the context inputs of `record`,
    in runs of consecutive frames of at most one block, each at its frames' positions (LongLive's KV re-cache).

    items: (B,) bool, the batch items to re-cache (None: all); the others keep the K/V they had.
    dtype: the network's (default model.dtype; a wrapped model has none)."""
    held = cache.held() if items is not None else None
    cache.reset()
    run: list[tuple[int, torch.Tensor]] = []
    plain = Conditioning(cond)  # the cond cache only: a negative prompt does not switch

    def flush():
        if run:
            cache.next_position = run[0][0]
            ctx = torch.cat([t for _, t in run], dim=2)
            context_pass(model, plain, ctx, [], schedule, (cache, None), ctx=ctx, dtype=dtype)
            run.clear()
    for f, t in record.frames:
        if run and (f != run[-1][0] + 1 or len(run) == num_frame_per_block or len(run) == record.sink_frames):
            flush()
        run.append((f, t))
    flush()
    cache.next_position = record.frames[-1][0] + 1
    if held is not None:
        cache.keep_items(held, items)


def switch_prompt(model, cond: torch.Tensor, schedule: FewStepSchedule, cache: KVCache, record: ContextRecord,
                  num_frame_per_block: int, *, recache_window: bool = True, items: torch.Tensor | None = None,
                  dtype: torch.dtype | None = None) -> bool:
    """Switch `cache` (the cond cache) to the prompt `cond` (B, L, D) before the next block: drop its
    cross-attention K/V and, with recache_window, re-cache the window (`recache`). Returns whether it re-cached."""
    cache.cross = [None] * cache.num_layers
    if not (recache_window and len(record)):
        return False
    recache(model, cond, schedule, cache, record, num_frame_per_block, items=items, dtype=dtype)
    return True
