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


def _add_stream(container, H: int, W: int, fps: int, crf: int, **options):
    stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
    stream.height, stream.width = H + H % 2, W + W % 2  # yuv420p needs even sizes: see _pad_even
    stream.pix_fmt = "yuv420p"
    # mbtree=0: with x264's macroblock tree, small frames (64x64 and below here) encoded to different bitstreams
    # from run to run (up to 22 levels apart once decoded; it reads memory it did not write), so a seed's mp4
    # was not always its video. Without it every encode of the same frames is the same bytes.
    params = ":".join(p for p in ("mbtree=0", options.pop("x264-params", "")) if p)
    stream.options = {"crf": str(crf), "preset": "veryfast", "x264-params": params, **options}
    return stream


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """Pad odd heights / widths by repeating the last row / column (yuv420p)."""
    H, W = frames.shape[1:3]
    if H % 2 or W % 2:
        frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")
    return frames


def _mux_frames(container, stream, frames: np.ndarray) -> None:
    for f in _pad_even(frames):
        for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
            container.mux(packet)


def _encode(container, frames: np.ndarray, fps: int, crf: int) -> None:
    stream = _add_stream(container, frames.shape[1], frames.shape[2], fps, crf)
    _mux_frames(container, stream, frames)
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


class Mp4Recorder:
    """An H.264 recording that grows on disk, never in memory: frames are encoded as they come.

    The file is a fragmented mp4 (one fragment per frame, no encoder delay), so a copy taken at any moment is a
    valid video of everything recorded so far (`snapshot`), except the newest frame, whose fragment is written
    when the next frame comes or at `close()`. A crash leaves the file playable up to its last fragment.
    """

    def __init__(self, path: str | os.PathLike, fps: int = 16, crf: int = 18):
        self.path, self.fps, self.crf = os.fspath(path), fps, crf
        self.num_frames = 0
        self._file = self._container = self._stream = None
        self.closed = False

    def add(self, frames) -> None:
        """Append uint8 (T, H, W, 3) frames."""
        if self.closed:
            raise ValueError("the recording is closed")
        frames = _check_frames(frames)
        if self._container is None:
            self._file = open(self.path, "wb")
            self._container = av.open(self._file, mode="w", format="mp4", options={
                "movflags": "frag_every_frame+empty_moov+default_base_moof", "flush_packets": "1"})
            self._stream = _add_stream(self._container, frames.shape[1], frames.shape[2], self.fps, self.crf,
                                       tune="zerolatency")
        _mux_frames(self._container, self._stream, frames)
        self._file.flush()
        self.num_frames += len(frames)

    def snapshot(self, dest: str | os.PathLike) -> str:
        """Copy the recording so far to dest, atomically."""
        if self.num_frames == 0:
            raise ValueError("nothing recorded yet")
        import shutil

        from .atomic import atomic_path

        with atomic_path(dest) as tmp:
            shutil.copyfile(self.path, tmp)
        return os.fspath(dest)

    def close(self) -> None:
        """Flush the encoder and finish the file (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self._container is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._file.close()
