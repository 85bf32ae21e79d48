"""LiveStream: an open-ended, interactive stream of blocks (`Engine.live`); `generate` and `stream` are finite cuts.

    live = engine.live("a red circle moving left", seed=0)
    for chunk in live:                       # StreamChunk per block, decoded frames as soon as they exist
        show(chunk.frames)
        if want_change: live.set_prompt("a blue square moving up")   # from any thread; next block
    live.save("live.mp4")                    # mp4 so far (atomic) + live.json (seed, timeline, settings)
    live.close()

Per block b (k = num_frame_per_block latent frames):

    noise of frames [b k, (b + 1) k)   <- engine.sampling.noise.block_noise(seed, ...): a function of (seed, b)
    pending prompt change at b?        -> new cross-attention K/V; recache: the window's stored context inputs
                                          re-run under the new prompt to refresh the self-attention K/V (LongLive)
    x0 = denoise_block(...)            -> decoded (causal decoder state) -> yielded, recorded
    context pass of x0                 -> KV cache (run before block b + 1, under block b's prompt)

Everything a stream holds is bounded: the KV window, the window's context inputs (for the re-cache), the decoder's
causal state, a few hundred block timings; the recording grows on disk, not in memory. The seed plus the
timeline `[(block, prompt), ...]` (and the settings) reproduce the whole stream: `Engine.replay`.

Pacing (pace=True): a playback clock at the video's fps starts when the first block is yielded; before block b
is computed, the stream waits until at most `lookahead_blocks` blocks of yielded video are still unplayed. So it
never races ahead of a viewer, and a prompt change is on screen within two blocks.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .models.text import check_prompts
from .sampling.block_sampler import Conditioning, context_pass, denoise_block, num_renoise
from .sampling.codec import decode_together, temporal_compression
from .sampling.recache import ContextRecord, switch_prompt
from .sampling.noise import block_noise, check_seed


def live_default_window(config, temporal: int = 4) -> tuple[int, int]:
    """(window, sink) in latent frames for a live stream whose call and checkpoint set no window: the clip the model
    was made on (`config.num_frames`, in whole blocks of latent frames: the temporal positions and distances it has
    seen), its first block kept as the frame sink; at least the sink plus two blocks. The default model: 9 / 3 (33
    frames); a Self-Forcing Wan2.1 checkpoint: 21 / 3 (81 frames). A longer window puts the current block at
    positions the model never saw, and the shapes model then drifts (docs/live.md, "The live default window")."""
    k = config.num_frame_per_block
    clip = ((config.num_frames - 1) // temporal + 1) // k * k
    return max(clip, 3 * k), k


def block_start_frame(block: int, num_frame_per_block: int, temporal: int = 4) -> int:
    """Index of the first video frame of `block` (block 0 gives 1 + 4 (k - 1) frames, every later one 4 k)."""
    return 0 if block == 0 else 1 + temporal * (num_frame_per_block * block - 1)


def block_at_seconds(seconds: float, fps: int, num_frame_per_block: int, temporal: int = 4) -> int:
    """The first block whose first frame is shown at or after `seconds` of video."""
    b = 0
    while block_start_frame(b, num_frame_per_block, temporal) < seconds * fps - 1e-9:
        b += 1
    return b


def check_timeline(timeline, *, num_blocks: int | None = None) -> list[tuple[int, str]]:
    """[(block, prompt), ...] with block 0 first and strictly increasing blocks; a clear error otherwise."""
    if not isinstance(timeline, (list, tuple)) or not timeline:
        raise ValueError(f"timeline must be a non-empty list of [block, prompt] pairs, got {timeline!r}")
    out, last = [], -1
    for i, entry in enumerate(timeline):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ValueError(f"timeline entry {i} must be a [block, prompt] pair, got {entry!r}")
        block, prompt = entry
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 0:
            raise ValueError(f"timeline entry {i}: block must be an int >= 0, got {block!r}")
        if i == 0 and block != 0:
            raise ValueError(f"timeline must start at block 0 (the first prompt), got block {block}")
        if block <= last:
            raise ValueError(f"timeline blocks must increase: entry {i} has block {block} after block {last}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"timeline entry {i}: the prompt must be non-empty text, got {prompt!r}")
        if num_blocks is not None and block >= num_blocks:
            raise ValueError(f"timeline entry {i}: block {block} is past the stream's {num_blocks} blocks")
        out.append((int(block), prompt))
        last = block
    return out


def read_timeline(path: str | os.PathLike) -> dict:
    """The JSON written by `LiveStream.save` (or {"seed": ..., "timeline": [[block, prompt], ...]}), checked."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"timeline file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"timeline file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or "timeline" not in data:
        raise ValueError(f"timeline file {path} must hold an object with a 'timeline' list of [block, prompt]")
    data["timeline"] = check_timeline(data["timeline"])
    return data


class LiveStream:
    """An open-ended stream; see the module docstring. Made by `Engine.live`."""

    def __init__(self, engine, prompt: str | None = None, *, seed: int = 0, timeline=None, recache: bool = True,
                 decoder: str | None = None,
                 lookahead_blocks: int = 1, pace: bool = True, max_blocks: int | None = None,
                 max_seconds: float | None = None, lock=None, record: bool = True, decode: bool = True,
                 height: int | None = None, width: int | None = None, on_frames=None):
        c = engine.config
        if c.local_attn_frames is None:
            raise ValueError("a live stream needs a rolling window (local_attn_frames); the unwindowed path grows "
                             "without bound and drifts")
        if isinstance(lookahead_blocks, bool) or not isinstance(lookahead_blocks, int) or not 1 <= lookahead_blocks <= 8:
            raise ValueError(f"lookahead_blocks must be an int in [1, 8], got {lookahead_blocks!r}")
        if max_blocks is not None and (isinstance(max_blocks, bool) or not isinstance(max_blocks, int)
                                       or max_blocks < 1):
            raise ValueError(f"max_blocks must be an int >= 1 or None, got {max_blocks!r}")
        if max_seconds is not None and (isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float))
                                        or not max_seconds > 0 or not math.isfinite(max_seconds)):
            raise ValueError(f"max_seconds must be a number > 0 or None, got {max_seconds!r}")
        if (prompt is None) == (timeline is None):
            raise ValueError("pass exactly one of prompt and timeline")
        timeline = check_timeline([(0, prompt)] if timeline is None else timeline)
        self.engine, self.seed = engine, seed
        self.recache, self.lookahead_blocks, self.pace = bool(recache), lookahead_blocks, pace
        self.max_blocks, self.max_seconds = max_blocks, max_seconds
        self._lock = lock
        self.on_frames = on_frames  # called (block, uint8 frames (T, H, W, 3)) as each latent frame is decoded
        self._record_lock = threading.Lock()
        k = c.num_frame_per_block
        shape = engine.latent_shape(1 + temporal_compression(engine.vae) * (k - 1), height, width)
        self._frame_shape = (shape[0], shape[1], 1, *shape[3:])
        self._dtype = torch.float64 if engine.dtype == torch.float64 else torch.float32
        self._num_renoise = num_renoise(engine.schedule)
        check_seed(seed)
        self.tc = temporal_compression(engine.vae)
        self.fps = int(c.fps)

        # prompts: the current conditioning, and switches scheduled for later blocks {block: (prompt, cond)}
        first = timeline[0][1]
        self._cond = self._conditioning(first)
        self.prompt = first
        self._pending: dict[int, tuple[str, Conditioning]] = {b: (p, self._conditioning(p)) for b, p in timeline[1:]}
        self.timeline: list[tuple[int, str]] = [(0, first)]
        self._switch_lock = threading.Lock()
        self._unstarted = 0

        self.caches = engine._caches(self._cond, self._frame_shape, differentiable=False)
        self._ctx = ContextRecord.of(self.caches[0])  # the context inputs the cond cache holds, for the re-cache
        self._deferred = None  # (x0, steps) of the last block: its context pass runs before the next block
        self.decoder_name = engine._check_decoder(decoder or engine.decoder)  # "vae" | "fast"
        self.decoder = engine.streaming_decoder(self.decoder_name) if decode else None

        self.block = 0  # the next block to compute
        self.frames = 0  # video frames yielded
        self.closed = False
        self.error: BaseException | None = None
        self._wake = threading.Event()  # set by close(): ends a pacing wait at once
        self._t_first: float | None = None
        self._t_start = time.perf_counter()
        self._busy = 0.0  # seconds spent computing (generation + decode), not waiting
        self._block_seconds: collections.deque = collections.deque(maxlen=512)
        self.recaches = 0
        self._tmp = Path(tempfile.mkdtemp(prefix="live-")) if record else None
        self.recorder = None
        if record:
            from .video import Mp4Recorder

            self.recorder = Mp4Recorder(self._tmp / "live.mp4", self.fps)

    # -- prompts --------------------------------------------------------------------------------------------
    def _conditioning(self, prompt: str) -> Conditioning:
        eng = self.engine
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty; write a description such as 'a red circle moving left'")
        if eng.tokenizer is not None:
            check_prompts(eng.tokenizer, [prompt])
        return eng.conditioning(prompt)

    def set_prompt(self, text: str, *, at_block: int | None = None) -> int:
        """Switch to `text` from block `at_block` (default: the next block computed); returns that block.

        A bad prompt raises ValueError and the stream goes on with the prompt it had. Thread-safe.
        """
        if self.closed:
            raise ValueError("the stream is closed")
        cond = self._conditioning(text)  # validates before anything changes
        with self._switch_lock:
            now = self._unstarted  # the first block whose prompt is not fixed yet (a block may be computing)
            if at_block is None:
                at_block = now
            elif isinstance(at_block, bool) or not isinstance(at_block, (int, np.integer)):
                raise ValueError(f"at_block must be an int >= {now}, got {at_block!r}")
            elif at_block < now:
                raise ValueError(f"block {at_block} is in the past: the stream is at block {now}; accepted: "
                                 f"at_block >= {now}")
            self._pending[int(at_block)] = (" ".join(text.split()), cond)
        return int(at_block)

    def _apply_switch(self, b: int) -> None:
        with self._switch_lock:
            switch = self._pending.pop(b, None)
            self._unstarted = b + 1
        if switch is None:
            return
        prompt, cond = switch
        if prompt == self.prompt:
            return
        self.prompt, self._cond = prompt, cond
        self.timeline.append((b, prompt))
        eng = self.engine  # the new prompt's cross-attention K/V at the next call; the window re-cached under it
        if switch_prompt(eng.transformer, cond.cond, eng.schedule, self.caches[0], self._ctx,
                         eng.config.num_frame_per_block, recache_window=self.recache):
            self.recaches += 1

    # -- iteration ------------------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self):
        if self.closed or self._finished():
            self.close()
            raise StopIteration
        self._wait_for_viewer()
        if self.closed:
            raise StopIteration
        t0 = time.perf_counter()
        with self._lock if self._lock is not None else contextlib.nullcontext():
            x0, seconds_generate = self._step(self._compute_block)
            t1 = time.perf_counter()
            frames = None
            if self.decoder is not None:  # latent frame by latent frame
                frames = self._step(lambda: np.concatenate([self._decoded(self.decoder.decode(x0[:, :, i:i + 1]))
                                                            for i in range(x0.shape[2])]))
        return self._step(self._finish, x0, frames, t0, seconds_generate, time.perf_counter() - t1)

    def _step(self, fn, *args):
        """Run one part of a block; an error closes the stream (the recording so far stays) and is re-raised."""
        try:
            return fn(*args)
        except BaseException as e:
            self.error = e
            self.close()
            raise

    def _decoded(self, video: torch.Tensor) -> np.ndarray:
        """Decoded video (1, 3, T, H, W) in [-1, 1] of one latent frame -> uint8 (T, H, W, 3), handed to on_frames
        at once (the first video frame of a block goes out before the block is decoded)."""
        from .io import to_uint8

        frames = to_uint8((video[0].permute(1, 2, 3, 0).float() + 1) / 2)
        if self.on_frames is not None:
            self.on_frames(self.block, frames)
        return frames

    def _finish(self, x0, frames, t0: float, seconds_generate: float, seconds_decode: float):
        """Record the block, advance the counters, make its StreamChunk."""
        from .pipeline import StreamChunk

        with self._record_lock:  # close() may come from another thread meanwhile
            if self.recorder is not None and frames is not None and not self.recorder.closed:
                self.recorder.add(frames)
        b = self.block
        self.block += 1
        n = self.tc * x0.shape[2] - (self.tc - 1 if b == 0 else 0)  # 1 + 4 (k - 1) frames first, then 4 k
        self.frames += n
        spent = seconds_generate + seconds_decode
        self._busy += spent
        self._block_seconds.append(spent)
        if self._t_first is None:
            self._t_first = time.perf_counter()
        return StreamChunk(b, None, frames, x0, seconds_generate, seconds_decode,
                           time.perf_counter() - self._t_start, prompt=self.prompt)

    @torch.no_grad()
    def _compute_block(self):
        eng, b = self.engine, self.block
        t0 = time.perf_counter()
        if self._deferred is not None:  # the previous block becomes context, under its own prompt
            ctx = context_pass(eng.transformer, self._cond, *self._deferred, eng.schedule, self.caches)
            self._ctx.add((b - 1) * eng.config.num_frame_per_block, ctx)
            self._deferred = None
        self._apply_switch(b)
        k = eng.config.num_frame_per_block
        x, steps = block_noise(self.seed, b * k, (b + 1) * k, self._frame_shape, self._num_renoise,
                               device=eng.device, dtype=self._dtype)
        x0 = denoise_block(eng.transformer, self._cond, x, steps, eng.schedule, self.caches)
        self._deferred = (x0, steps)
        return x0, time.perf_counter() - t0

    def _finished(self) -> bool:
        if self.max_blocks is not None and self.block >= self.max_blocks:
            return True
        return self.max_seconds is not None and self.frames >= self.max_seconds * self.fps

    def due_in(self) -> float:
        """Seconds until pacing lets this stream compute its next block (0: now): it may be at most
        lookahead_blocks blocks ahead of a viewer who started watching at its first block."""
        if not self.pace or self._t_first is None:
            return 0.0
        per_block = self.tc * self.engine.config.num_frame_per_block
        shown = (time.perf_counter() - self._t_first) * self.fps + 1  # frame 0 shows at once
        ahead = self.frames - shown  # yielded frames the viewer has not seen yet
        return max(0.0, (ahead - self.lookahead_blocks * per_block) / self.fps)

    def _wait_for_viewer(self) -> None:
        while not self.closed:
            wait = self.due_in()
            if wait <= 0:
                return
            self._wake.wait(wait)

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """Generated frames/s (computing time only), real-time factor, block latency p50 / p99, KV bytes."""
        lat = sorted(self._block_seconds)
        fps = self.frames / self._busy if self._busy > 0 else 0.0

        def q(p):
            return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else 0.0
        return {"block": self.block, "frames": self.frames, "seconds_video": self.frames / self.fps,
                "fps": fps, "realtime_factor": fps / self.fps, "block_p50": q(0.5), "block_p99": q(0.99),
                "prompt": self.prompt, "recaches": self.recaches,
                "kv_bytes": sum(c.nbytes() for c in self.caches if c is not None)}

    def settings(self) -> dict:
        c = self.engine.config
        return {"num_frame_per_block": c.num_frame_per_block, "local_attn_frames": c.local_attn_frames,
                "sink_frames": c.sink_frames, "rope_positions": c.rope_positions,
                "denoising_steps": list(c.denoising_steps), "guidance_scale": c.guidance_scale,
                "recache": self.recache, "decoder": self.decoder_name}

    def save(self, path: str | os.PathLike) -> Path:
        """The stream so far as an mp4 (atomic; after close() every frame, mid-stream all but the newest) and the
        timeline as JSON beside it (same name, .json): seed, timeline, blocks, settings. Works after an error."""
        if self.recorder is None:
            raise ValueError("this stream does not record (record=False)")
        path = Path(path)
        if path.suffix.lower() != ".mp4":
            raise ValueError(f"save writes an mp4: the path must end in .mp4, got {path.name!r}")
        self.recorder.snapshot(path)
        from .atomic import write_text

        meta = {"seed": self.seed, "timeline": [list(t) for t in self.timeline], "num_blocks": self.block,
                "num_frames": self.frames, "fps": self.fps, "checkpoint": self.engine.source, **self.settings()}
        write_text(path.with_suffix(".json"), json.dumps(meta, indent=2))
        return path

    def close(self) -> None:
        """End the stream (idempotent); the recording stays available to save() until the object is gone."""
        if self.closed:
            return
        self.closed = True
        self._wake.set()
        if self.recorder is not None:
            with self._record_lock:
                self.recorder.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            try:
                self.close()
            finally:
                shutil.rmtree(tmp, ignore_errors=True)



class LiveGroup:
    """Several live streams of one engine, advanced together by one thread (a server's viewers).

    Each round (`step`), every stream that pacing lets go computes its block (the transformer, stream after
    stream: their caches differ in fill and positions) and then all their blocks are decoded together, one
    batched VAE call per latent frame (`decode_together`): on this CPU the decoder is most of a block's time
    and a batch of 4 costs about 1.4x a batch of 1. Streams due within `align_seconds` (default: half a block of
    video) join the round early, which keeps the viewers' blocks in phase so they batch; with lookahead_blocks=1
    a stream is then at most 1.5 blocks ahead of its viewer, so a prompt change is on screen within two blocks. Per stream the frames equal its own iteration up to float rounding of batched kernels.
    """

    def __init__(self, align_seconds: float | None = None):
        self.streams: list[LiveStream] = []
        self.align_seconds = align_seconds
        self.cond = threading.Condition()  # notified on add: a scheduler waiting for streams wakes up

    def add(self, stream: LiveStream) -> None:
        with self.cond:
            self.streams.append(stream)
            self.cond.notify_all()

    def _align(self, s: LiveStream) -> float:
        if self.align_seconds is not None:
            return self.align_seconds
        return 0.5 * s.tc * s.engine.config.num_frame_per_block / s.fps  # half a block of video

    def next_due(self) -> float | None:
        """Seconds until a round would compute something (0: now); None without streams."""
        with self.cond:
            return min((max(0.0, s.due_in() - self._align(s)) for s in self.streams), default=None)

    def step(self) -> list[tuple[LiveStream, object]]:
        """One round. Returns (stream, StreamChunk) for each stream that made a block, (stream, None) for each that
        ended (closed or at its limit; removed from the group) and (stream, exception) for each that failed
        (closed, removed; its recording so far stays)."""
        out: list[tuple[LiveStream, object]] = []
        with self.cond:
            streams = list(self.streams)
        due = []
        for s in streams:
            if s.closed or s._finished():
                s.close()
                out.append((s, None))
            elif s.due_in() <= self._align(s):
                due.append(s)
        computed = []
        for s in due:
            t0 = time.perf_counter()
            try:
                x0, seconds_generate = s._step(s._compute_block)
            except Exception as e:
                out.append((s, e))
                continue
            computed.append((s, x0, seconds_generate, t0))
        decoding = [c for c in computed if c[0].decoder is not None]
        parts: dict[int, list[np.ndarray]] = {id(c[0]): [] for c in decoding}
        t1 = time.perf_counter()
        if decoding:
            try:
                with torch.no_grad():
                    for i in range(max(c[1].shape[2] for c in decoding)):
                        live = [c for c in decoding if i < c[1].shape[2]]
                        videos = decode_together([c[0].decoder for c in live], [c[1][:, :, i:i + 1] for c in live])
                        for (s, *_), v in zip(live, videos):
                            parts[id(s)].append(s._decoded(v))
            except Exception as e:  # a decoder failed: every stream of this round fails with it
                for s, *_ in decoding:
                    s.error = e
                    s.close()
                    out.append((s, e))
                computed = [c for c in computed if c[0].decoder is None]
        seconds_decode = (time.perf_counter() - t1) / max(1, len(decoding))  # the batch's time, shared
        for s, x0, seconds_generate, t0 in computed:
            frames = np.concatenate(parts[id(s)]) if s.decoder is not None else None
            try:
                out.append((s, s._step(s._finish, x0, frames, t0, seconds_generate,
                                       seconds_decode if s.decoder is not None else 0.0)))
            except Exception as e:
                out.append((s, e))
        ended = {id(s) for s, item in out if item is None or isinstance(item, BaseException)}
        if ended:
            with self.cond:
                self.streams = [s for s in self.streams if id(s) not in ended]
        return out
