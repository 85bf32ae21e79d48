"""Helpers for the app's tests: a slowed-down tiny engine, an in-process server, reading streamed videos.

Not used by the app itself.
"""

from __future__ import annotations

import contextlib
import io
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from engine.pipeline import Engine
from engine.testing import tiny_engine

from .serving import Limits, Serving
from .ui import build_app, launch_kwargs


class SlowEngine(Engine):
    """An engine that sleeps after every block, so a test can watch a stream while it is being generated."""

    block_delay: float = 0.5

    def stream(self, *args, **kwargs):
        for chunk in super().stream(*args, **kwargs):
            time.sleep(self.block_delay)
            yield chunk


def tiny_app_engine(block_delay: float | None = None, **settings) -> Engine:
    """tiny_engine() (32x32, 16 fps), optionally slowed down by `block_delay` seconds per block."""
    eng = tiny_engine(**settings)
    eng.source = "engine.testing.tiny_engine()"
    eng.model_card = "# Tiny test engine\n\nRandom weights: its videos are noise."
    if block_delay is not None:
        eng.__class__ = SlowEngine
        eng.block_delay = block_delay
    return eng


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningApp:
    url: str
    serving: Serving
    demo: object


@contextlib.contextmanager
def running_app(engine: Engine, limits: Limits | None = None, shutdown_timeout: float = 30.0,
                **kwargs) -> Iterator[RunningApp]:
    """Build and launch the app on a free loopback port of this process; close it (and its files) at exit."""
    serving = Serving(engine, limits)
    demo = build_app(serving)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **{**launch_kwargs(demo), **kwargs})
    try:
        yield RunningApp(f"http://127.0.0.1:{port}/", serving, demo)
    finally:
        server = getattr(demo, "server", None)
        demo.close()
        thread = getattr(server, "thread", None)
        if thread is not None:  # shutdown (and Gradio's cache cleanup) ends when the server thread does
            thread.join(timeout=shutdown_timeout)
        serving.close()


def fetch_stream(stream: dict, timeout: float = 30.0) -> tuple[bytes, list[float]]:
    """The MPEG-TS bytes of a streamed gr.Video output (its HLS playlist, joined) and the segment durations."""
    import httpx

    url = stream["url"]
    playlist = httpx.get(url, timeout=timeout).text
    base = url.rsplit("/", 1)[0]
    data, durations = b"", []
    for line in playlist.splitlines():
        if line.startswith("#EXTINF:"):
            durations.append(float(line.split(":", 1)[1].rstrip(",")))
        elif line and not line.startswith("#"):
            r = httpx.get(f"{base}/{line}", timeout=timeout)
            r.raise_for_status()
            data += r.content
    return data, durations


def decode_frames(data: bytes, container_format: str | None = None) -> np.ndarray:
    """Decode video bytes (mp4 or MPEG-TS) with PyAV -> uint8 (T, H, W, 3)."""
    import av

    with av.open(io.BytesIO(data), format=container_format) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
