"""Video files through PyAV: H.264 mp4 files, and self-contained mp4 chunks for streaming."""

from __future__ import annotations

import io
import os
from fractions import Fraction

import av
import numpy as np

from .atomic import write_bytes


def _check_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if len(frames) == 0:
        raise ValueError("no frames to encode")
    return frames


def _encode(container, frames: np.ndarray, fps: int, crf: int) -> None:
    T, H, W, _ = frames.shape
    stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
    # yuv420p needs even sizes: pad by repeating the last row / column
    Hp, Wp = H + H % 2, W + W % 2
    if (Hp, Wp) != (H, W):
        frames = np.pad(frames, ((0, 0), (0, Hp - H), (0, Wp - W), (0, 0)), mode="edge")
    stream.height, stream.width = Hp, Wp
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": str(crf), "preset": "veryfast"}
    for f in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def encode_mp4(frames, fps: int = 16, crf: int = 18) -> bytes:
    """uint8 (T, H, W, 3) -> bytes of a self-contained H.264 mp4 (a streaming chunk or a whole video)."""
    frames = _check_frames(frames)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        _encode(container, frames, fps, crf)
    return buf.getvalue()


def write_mp4(path: str | os.PathLike, frames, fps: int = 16, crf: int = 18) -> str:
    """Write an H.264 mp4 atomically (temporary file in the same directory, then rename)."""
    data = encode_mp4(frames, fps, crf)
    path = os.fspath(path)
    write_bytes(path, data)
    return path


def read_video(path_or_bytes) -> tuple[np.ndarray, float]:
    """Decode a video file (path or bytes) -> (uint8 (T, H, W, 3), fps)."""
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else os.fspath(path_or_bytes)
    with av.open(src) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 0)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    return np.stack(frames), fps
