"""Serving machinery shared by the tabs: input limits, one job per device, stop flags, temporary files, errors.

Nothing here builds UI. A `Serving` object is made once per process around a loaded engine; handlers receive
it and use:

- `Limits` + the `check_*` functions: every value a client sends is checked on the server (the browser's
  sliders are a convenience, not a guarantee: API clients send anything);
- `Serving.device_lock`: one generation or attack at a time on the device. Gradio's shared concurrency id
  already queues the events; the lock also covers the moment after a cancelled event, when Gradio frees its
  slot while the cancelled generator is still finishing its current block;
- `StopFlags`: the Stop buttons. A handler polls its flag between blocks / iterations and ends cleanly;
- `Serving.run_dir()`: a private temporary directory per request, removed when the request ends (Gradio copies
  the files it serves into its own cache, which lives in the app's working directory and is aged out by a
  janitor; everything goes at shutdown);
- `user_errors()`: turns bad values and out-of-memory errors into `gr.Error` messages; the server stays up.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import html
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch

log = logging.getLogger("app")

MAX_SEED = 2**31 - 1


class InputError(ValueError):
    """A request value the server refuses; its message is shown to the user as is."""


@dataclass
class Limits:
    """Server-side bounds on every input. Defaults suit the small CPU model; raise them on a GPU."""

    max_frames: int = 81  # video frames of one generation
    max_attack_frames: int = 21  # video frames of one attack (back-propagation through the whole rollout)
    max_iterations: int = 100  # attack iterations
    max_prompt_chars: int = 300
    max_block_size: int = 8  # latent frames per block
    max_window: int = 1024  # latent frames of the attention window
    max_budget: float = 10.0  # attack eps, in noise standard deviations
    max_lr: float = 10.0
    queue_size: int = 8  # waiting events (all users); beyond it requests are refused
    min_chunk_seconds: float = 1.0  # streamed chunks last at least this long (the last one may be shorter)
    max_live_streams: int = 2  # live streams running at once; later ones wait in line with their position shown
    live_seconds: float = 600.0  # server-side limit of one live stream, in seconds of video

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
                raise ValueError(f"limit {f.name} must be a positive number, got {v!r}")

    @classmethod
    def for_engine(cls, engine, **overrides) -> "Limits":
        """Defaults scaled to the checkpoint: four default-length videos, attacks on one default-length video."""
        n = engine.config.num_frames
        base = dict(max_frames=max(4 * n, 81), max_attack_frames=n)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


# ------------------------------------------------------------------------------------------------ input checks

def check_int(value, name: str, lo: int, hi: int) -> int:
    """An integer in [lo, hi]; floats with an integral value (what JSON clients send) are accepted."""
    if isinstance(value, bool) or value is None:
        raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}") from None
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
        value = int(value)
    if not isinstance(value, int):
        raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {type(value).__name__}")
    if not lo <= value <= hi:
        raise InputError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_float(value, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
    """A finite float in [lo, hi] (or (lo, hi] with lo_open)."""
    bounds = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
    try:
        if isinstance(value, bool) or value is None:
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number in {bounds}, got {value!r}") from None
    if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        raise InputError(f"{name} must be a number in {bounds}, got {value!r}")
    return v


def check_choice(value, name: str, choices) -> str:
    """One of `choices`, exactly."""
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_prompt(prompt, limits: Limits) -> str:
    """A non-empty string of at most max_prompt_chars characters (the model checks its own vocabulary)."""
    if not isinstance(prompt, str):
        raise InputError(f"the prompt must be text, got {type(prompt).__name__}")
    prompt = " ".join(prompt.split())
    if not prompt:
        raise InputError("the prompt is empty: describe the video, e.g. 'a red circle moving left'")
    if len(prompt) > limits.max_prompt_chars:
        raise InputError(f"the prompt has {len(prompt)} characters; the limit is {limits.max_prompt_chars}")
    return prompt


def check_seed(seed) -> int:
    """A seed in [0, 2^31 - 1] (what the seed box and random button produce)."""
    return check_int(seed, "seed", 0, MAX_SEED)


# ------------------------------------------------------------------------------------------------ settings

@dataclass(frozen=True)
class SamplerSettings:
    """Per-request overrides of the few-step sampler (Advanced settings of the Generate tab)."""

    denoising_steps: tuple[float, ...]
    num_frame_per_block: int
    local_attn_frames: int | None
    sink_frames: int


def parse_steps(steps, available: list[float]) -> tuple[float, ...]:
    """The chosen subset of the checkpoint's few-step list, in the checkpoint's (decreasing) order.

    The first step must stay: the sampler starts every block from pure noise (sigma = 1), which only the
    largest timestep describes. Strings ("750" or "750.0", what the checkbox group sends) and numbers are taken.
    """
    if steps is None or isinstance(steps, (str, int, float)):
        steps = [steps] if steps is not None else []
    chosen = set()
    for s in steps:
        try:
            v = float(s)
        except (TypeError, ValueError):
            v = None
        match = [a for a in available if v is not None and abs(a - v) < 1e-6]
        if not match:
            raise InputError(f"unknown denoising step {s!r}; this checkpoint's steps are "
                             f"{', '.join(fmt_step(a) for a in available)}")
        chosen.add(match[0])
    if not chosen:
        raise InputError("choose at least one denoising step")
    if available[0] not in chosen:
        raise InputError(f"the first step ({fmt_step(available[0])}) must stay selected: every block starts "
                         f"from pure noise, which only the first step describes")
    return tuple(a for a in available if a in chosen)


def fmt_step(t: float) -> str:
    """A denoising step as the checkbox group shows it: 1000.0 -> '1000'."""
    return f"{t:g}"


def sampler_settings(engine, limits: Limits, steps, block_size, window, sink) -> SamplerSettings:
    """Check the Advanced settings of a request against the checkpoint and the limits."""
    k = check_int(block_size, "block size (latent frames)", 1, limits.max_block_size)
    sink = check_int(sink if sink not in (None, "") else 0, "sink frames", 0, limits.max_window)
    window = check_int(window if window not in (None, "") else 0, "attention window", 0, limits.max_window)
    if window and window < sink + 2 * k:
        raise InputError(f"an attention window of {window} latent frames is too small: it must hold the sink "
                         f"frames and two blocks ({sink} + 2 x {k} = {sink + 2 * k}); 0 attends to the whole video")
    if sink and not window:
        raise InputError("sink frames need a rolling attention window (set the window > 0)")
    return SamplerSettings(parse_steps(steps, list(engine.config.denoising_steps)), k, window or None, sink)


def with_settings(engine, settings: SamplerSettings | None):
    """A shallow copy of `engine` (sharing its modules) that samples with `settings`; the original is untouched.

    Per-request settings never mutate the shared engine, so concurrent sessions cannot see each other's.
    """
    if settings is None:
        return engine
    config = dataclasses.replace(engine.config, denoising_steps=list(settings.denoising_steps),
                                 num_frame_per_block=settings.num_frame_per_block,
                                 local_attn_frames=settings.local_attn_frames, sink_frames=settings.sink_frames)
    eng = copy.copy(engine)
    eng.config = config
    eng.schedule = config.schedule()
    return eng


def check_frames(engine, num_frames, limit: int) -> int:
    """A video length the engine can make in whole blocks, within the limit; the message lists valid values."""
    valid = [n for n in engine.valid_num_frames(limit) if n <= limit]
    if not valid:
        raise InputError(f"no video length fits the limit of {limit} frames with blocks of "
                         f"{engine.config.num_frame_per_block} latent frames; choose a smaller block size")
    n = check_int(num_frames, "frames", 1, limit)
    if n not in valid:
        raise InputError(f"{n} frames cannot be made of whole blocks of {engine.config.num_frame_per_block} latent "
                         f"frames; accepted up to the limit of {limit}: {', '.join(map(str, valid))}")
    return n


def valid_frames(engine, limit: int) -> list[int]:
    """The video lengths the engine makes in whole blocks, up to `limit`."""
    return [n for n in engine.valid_num_frames(limit) if n <= limit]


# ------------------------------------------------------------------------------------------------ stop flags

class StopFlags:
    """One stop flag per browser session and kind of job ("generate", "attack").

    `arm` runs (unqueued) the moment the user clicks Generate and gives that click a fresh flag; Stop sets the
    current flag, whether the job is still waiting in the queue or running; the job takes its flag with `take`
    (a fresh one for API clients, who never arm) and polls it between blocks.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._flags: dict[tuple[str, str], threading.Event] = {}

    def arm(self, session: str | None, kind: str) -> None:
        with self._lock:
            self._flags[(session or "", kind)] = threading.Event()

    def take(self, session: str | None, kind: str) -> threading.Event:
        """The flag armed for this session's latest click, or a fresh one."""
        with self._lock:
            return self._flags.setdefault((session or "", kind), threading.Event())

    def stop(self, session: str | None, kind: str) -> bool:
        """Set the session's flag; False if it has none (nothing to stop)."""
        with self._lock:
            flag = self._flags.get((session or "", kind))
        if flag is None:
            return False
        flag.set()
        return True

    def release(self, session: str | None, kind: str, flag: threading.Event) -> None:
        """Forget the flag once its job is over (unless a newer click replaced it)."""
        with self._lock:
            if self._flags.get((session or "", kind)) is flag:
                del self._flags[(session or "", kind)]


# ------------------------------------------------------------------------------------------------ errors

def refusal(message: str, title: str = "Invalid input") -> gr.Error:
    """A gr.Error for a refused request: its text HTML-escaped (Gradio's pop-ups render HTML, and the message
    may quote the user's prompt), and no traceback in the server log (Gradio prints one unless told not to)."""
    return gr.Error(html.escape(message, quote=False), title=title, print_exception=False)


def is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


@contextlib.contextmanager
def user_errors(device=None) -> Iterator[None]:
    """Re-raise failures of a request as `gr.Error` with a message the user can act on.

    Bad values (ValueError, including the engine's own checks) keep their message; out-of-memory frees the
    CUDA cache and says what to reduce; anything else is logged with its traceback and reported briefly.
    GeneratorExit and other BaseExceptions pass through untouched (a closed or cancelled handler).
    """
    try:
        yield
    except gr.Error:
        raise
    except (ValueError, FileNotFoundError) as e:
        log.info("refused: %s", e)  # one line: a refused input is not a server fault
        raise refusal(str(e)) from None
    except Exception as e:
        if is_out_of_memory(e):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            where = f" on {device}" if device is not None else ""
            log.warning("out of memory%s", where)
            raise refusal(f"Out of memory{where}: try fewer frames, a smaller attention window, fewer "
                          f"denoising steps or (attacks) fewer frames.", title="Out of memory") from None
        log.exception("request failed")
        raise refusal(f"Internal error ({type(e).__name__}: {e}). The server is still running; "
                      f"please try again or report it.", title="Error") from None


# ------------------------------------------------------------------------------------------------ serving

_CACHES_WE_SET: set[str] = set()


class Serving:
    """Everything the handlers share: the engine, limits, the device lock, stop flags and temporary files.

    Files live under one working directory, removed by `close()` if this object created it:
    `runs/` holds one private directory per request (removed when the request ends) and `gradio/` is Gradio's
    cache of served files (`GRADIO_TEMP_DIR`, unless the user set that variable). A janitor thread deletes cached
    files older than `cache_max_age` seconds: Gradio's own `delete_cache` misses the files of per-session copies
    of components, so without it a long-running server would fill its disk.
    """

    def __init__(self, engine, limits: Limits | None = None, workdir: str | os.PathLike | None = None,
                 cache_max_age: float = 3600.0):
        self.engine = engine
        self.limits = limits or Limits.for_engine(engine)
        self.device = str(engine.device)
        self.concurrency_id = f"engine:{self.device}"
        self.device_lock = threading.Lock()
        self.stops = StopFlags()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="sf-app-")).absolute()
        self.runs_dir = self.workdir / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        user_cache = os.environ.get("GRADIO_TEMP_DIR")
        if user_cache in _CACHES_WE_SET:  # left by an earlier Serving of this process, not by the user
            user_cache = None
        self.cache_dir = Path(user_cache).absolute() if user_cache else self.workdir / "gradio"
        self.cache_max_age = cache_max_age
        self._closed = threading.Event()
        self._janitor: threading.Thread | None = None

    def use_as_gradio_cache(self) -> None:
        """Point Gradio's cache (read by components when they are created) at `cache_dir`; start the janitor."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        os.environ["GRADIO_TEMP_DIR"] = str(self.cache_dir)
        _CACHES_WE_SET.add(str(self.cache_dir))
        if self._janitor is None:
            self._janitor = threading.Thread(target=self._sweep_forever, name="app-cache-janitor", daemon=True)
            self._janitor.start()

    def sweep_cache(self, max_age: float | None = None) -> int:
        """Delete cached files older than max_age seconds (default cache_max_age) and empty folders; returns
        the number of files deleted."""
        max_age = self.cache_max_age if max_age is None else max_age
        now, removed = time.time(), 0
        if not self.cache_dir.is_dir():
            return 0
        for path in sorted(self.cache_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            try:
                if path.is_file() and now - path.stat().st_mtime > max_age:
                    path.unlink()
                    removed += 1
                elif path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
            except OSError:  # raced with Gradio or another sweep: next time
                pass
        return removed

    def _sweep_forever(self) -> None:
        interval = max(1.0, min(600.0, self.cache_max_age / 4))
        while not self._closed.wait(interval):
            self.sweep_cache()

    @contextlib.contextmanager
    def run_dir(self) -> Iterator[Path]:
        """A private directory for one request's files; removed (with everything in it) when the request ends."""
        d = self.new_run_dir()
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def new_run_dir(self) -> Path:
        d = self.runs_dir / f"run-{uuid.uuid4().hex[:12]}"
        d.mkdir()
        return d

    @contextlib.contextmanager
    def device_slot(self, stop: threading.Event | None = None) -> Iterator[bool]:
        """Hold the device for one job. Yields False (without the lock) if `stop` is set while waiting."""
        while not self.device_lock.acquire(timeout=0.25):
            if stop is not None and stop.is_set():
                yield False
                return
        try:
            yield True
        finally:
            self.device_lock.release()

    def close(self) -> None:
        """Stop the janitor; remove the working directory (runs and, unless user-given, the cache) if ours."""
        self._closed.set()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
