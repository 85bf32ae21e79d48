"""The Generate tab's handler: stream H.264 chunks to the browser while the engine generates them.

The engine yields one block of frames at a time (a fraction of a second of video for a small model). Gradio's
streaming `gr.Video` plays a sequence of self-contained mp4 chunks through HLS; a chunk shorter than about a
second makes the player stall between chunks, so blocks are grouped until a chunk holds at least
`Limits.min_chunk_seconds` of video (the last chunk may be shorter). The status line is updated after every
block, so the user sees progress even between chunks, and the Stop flag is polled after every block.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import gradio as gr
import numpy as np

from engine.models.text import check_prompts
from engine.video import encode_mp4, write_mp4

from .serving import (Serving, check_frames, check_prompt, check_seed, sampler_settings, user_errors,
                      with_settings)


@dataclass
class Progress:
    """What the status line shows, updated after every block."""

    num_frames: int
    fps: int
    block: int = 0
    num_blocks: int = 0
    frames_done: int = 0
    elapsed: float = 0.0
    first_block: float | None = None
    chunks: int = 0
    state: str = "running"  # running | done | stopped
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        gen_fps = self.frames_done / self.elapsed if self.elapsed > 0 else 0.0
        head = {"running": "Generating", "done": "Done", "stopped": "Stopped"}[self.state]
        if self.block == 0:  # nothing made yet
            return f"**{head}**" + "".join(f" · {n}" for n in self.notes)
        parts = [f"**{head}** · block {self.block} of {self.num_blocks}",
                 f"{self.frames_done} / {self.num_frames} frames",
                 f"{gen_fps:.1f} frames/s generated ({gen_fps / self.fps:.2f}x real time at {self.fps} fps)"]
        if self.first_block is not None:
            parts.append(f"first block after {self.first_block:.2f} s")
        parts.append(f"{self.elapsed:.1f} s")
        return " · ".join(parts) + "".join(f"\n\n{n}" for n in self.notes)


def generate_stream(serving: Serving, prompt, num_frames, seed, steps, block_size, window, sink,
                    stop: threading.Event | None = None):
    """Generator of (video chunk path | gr.skip(), status markdown, download path | gr.skip()).

    Every value is checked first (a bad one raises gr.Error before any work). Then, holding the device:
    one status update per block, one mp4 chunk per >= min_chunk_seconds of frames, and at the end the whole
    video as one mp4 for download. A set `stop` flag ends the run after the current block; what was made so
    far is still delivered (stream end and download).
    """
    stop = stop or threading.Event()
    limits = serving.limits
    with user_errors(serving.device):
        prompt = check_prompt(prompt, limits)
        seed = check_seed(seed)
        settings = sampler_settings(serving.engine, limits, steps, block_size, window, sink)
        eng = with_settings(serving.engine, settings)
        num_frames = check_frames(eng, num_frames, limits.max_frames)
        if eng.tokenizer is not None:  # the model's own vocabulary check, cheap, before taking the device
            check_prompts(eng.tokenizer, [prompt])

    fps = int(eng.config.fps)
    min_chunk = max(1, math.ceil(limits.min_chunk_seconds * fps))
    progress = Progress(num_frames=num_frames, fps=fps)
    if stop.is_set():
        progress.state = "stopped"
        progress.notes.append("Stopped before it started.")
        yield gr.skip(), progress.markdown(), gr.skip()
        return

    with serving.run_dir() as run_dir:
        result = yield from _run(serving, eng, prompt, num_frames, seed, fps, min_chunk, progress, stop, run_dir)
        if result is not None:  # outside the device slot: the next job may start while Gradio sends this
            yield result


def _run(serving: Serving, eng, prompt, num_frames, seed, fps, min_chunk, progress, stop, run_dir):
    """Generate while holding the device; yields the intermediate updates, returns the final one (or None)."""
    with serving.device_slot(stop) as got_device:
        if not got_device:
            progress.state = "stopped"
            progress.notes.append("Stopped while waiting for the device.")
            return gr.skip(), progress.markdown(), gr.skip()
        frames_all: list[np.ndarray] = []
        pending: list[np.ndarray] = []
        previous_chunk = None
        t0 = time.perf_counter()
        with user_errors(serving.device):
            blocks = eng.stream(prompt, num_frames=num_frames, seed=seed)
            try:
                for chunk in blocks:
                    # Gradio has read the previous chunk by the time this generator is resumed.
                    if previous_chunk is not None:
                        previous_chunk.unlink(missing_ok=True)
                        previous_chunk = None
                    frames_all.append(chunk.frames)
                    pending.append(chunk.frames)
                    progress.block, progress.num_blocks = chunk.block + 1, chunk.num_blocks
                    progress.frames_done += len(chunk.frames)
                    progress.elapsed = time.perf_counter() - t0
                    if progress.first_block is None:
                        progress.first_block = progress.elapsed
                    if chunk.block + 1 == chunk.num_blocks or stop.is_set():
                        break
                    video = gr.skip()
                    if sum(len(f) for f in pending) >= min_chunk:
                        previous_chunk = _write_chunk(run_dir, progress, pending, fps)
                        video, pending = str(previous_chunk), []
                    yield video, progress.markdown(), gr.skip()
                    if stop.is_set():  # checked before the next block is computed
                        break
            finally:
                blocks.close()
            if not frames_all:
                raise gr.Error("the engine produced no frames")
            # The final update carries the last chunk, the whole video and the final status together, so a
            # client reading only the final result still gets the end of the stream.
            if previous_chunk is not None:
                previous_chunk.unlink(missing_ok=True)
            video = str(_write_chunk(run_dir, progress, pending, fps)) if pending else gr.skip()
            frames = np.concatenate(frames_all)
            full = write_mp4(run_dir / f"video-seed{seed}-{len(frames)}f.mp4", frames, fps)
    progress.elapsed = time.perf_counter() - t0
    if stop.is_set() and progress.frames_done < num_frames:
        progress.state = "stopped"
        progress.notes.append(f"Stopped by the user after block {progress.block}; the download holds "
                              f"the {progress.frames_done} frames made so far.")
    else:
        progress.state = "done"
    return video, progress.markdown(), full


def _write_chunk(run_dir, progress: Progress, frames: list[np.ndarray], fps: int):
    """One self-contained H.264 mp4 chunk (PyAV) in the run directory."""
    progress.chunks += 1
    path = run_dir / f"chunk-{progress.chunks:04d}.mp4"
    path.write_bytes(encode_mp4(np.concatenate(frames), fps))
    return path
