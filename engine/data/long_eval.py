"""Long-stream evaluation: does a live stream keep its prompt for minutes, and does it follow a prompt switch?

`python -m engine eval --long-seconds S [--switch-every K] [--window W --sink N]` (engine/data/evaluate.py hands
over to `run_long`). For each prompt x seed a live stream (`Engine.live`, rolling window W latent frames with N
sinks; default the live default) of S seconds, rounded up to whole blocks, is generated and scored:

- windows: every consecutive, non-overlapping 33-frame window [33 i, 33 i + 33) with `judge_window` against the
  prompt in force at its first frame; a window that contains a switch (a switch frame strictly inside it) is
  skipped. `judge_window` gives `evaluate_video`'s colour / shape / direction / correct and two more:
  - direction (strict, `direction`): `evaluate_video`'s, a signed fit over the window's first half that assumes
    no bounce there, as in the dataset's clips. A long stream bounces whenever it likes, so a window whose first
    half holds a bounce is judged wrong even if the motion is right (reference streams: ~36% on 60-s streams).
  - direction, bounce-aware (`motion`): a wall bounce flips the sign of one velocity component, so a prompted
    direction fixes a reflection class ({left, right}, {up, down}, the four diagonals) and a speed per axis. Per
    prompted object, over the whole window, `reflection_speeds` takes per axis the median over t of
    |c(t + 3) - c(t)| / 3 of the centroid c (a bounce touches only the 3 pairs that straddle it; jitter is
    divided by 3); `bounce_aware_direction` turns (|vx|, |vy|) into the prompt's quadrant and asks
    `direction_from_velocity` (the evaluator's 45-degree sectors and min_speed) for the prompted direction. So
    it passes motion along the prompted axes at speed with any reflections, and fails an object that stops
    (for most of the window), moves along the wrong axes, or ignores a direction switch. It does not check
    where the reversals happen: an object going back and forth along the right axis away from the walls passes.
  - all correct, bounce-aware (`motion_correct`): every object right in colour, shape and motion.
- switches (`--switch-every K`): at the first block whose first frame is at or after K, 2K, ... seconds, the
  single-object prompt changes its colour, its direction, or both, in a fixed cycle (colour, direction, both)
  with seeded new values (`switch_prompts`; a new direction is always of another reflection class, so the
  bounce-aware direction tells a followed switch from an ignored one). A switch counts as reached within 2
  blocks for a metric if a window starting at the first frame of block switch_block + 2, 33 frames long (or what
  remains before the next switch, at least 9 frames), is judged right against the new prompt. colour_ok already
  requires the old colour to be gone (the evaluator refuses colours the prompt does not name); motion, the old
  direction gone (it is of another class).

`score_stream` is the model-free part: frames + timeline in, per-window and per-switch results out.
`reference_stream` renders what a perfect model of the data would show (the evaluator's ceiling).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import numpy as np

from ..live import block_at_seconds, block_start_frame
from .evaluate import (COLOR_NAMES, EVAL_PROMPTS, MIN_AREA, MIN_SPEED, classify_pixels, clean_mask,
                       direction_from_velocity, evaluate_video, mean_and_se)
from .shapes import (DIRECTION_VECTORS, DIRECTIONS, PromptSpec, ShapesConfig, VideoSpec, next_prompt, parse_prompt,
                     render, spec_from_prompt)

WINDOW_FRAMES = 33   # the evaluator's clip length: the default model's training clips (2 s at 16 fps)
REACH_BLOCKS = 2     # a switch must be on screen within this many blocks
MIN_SWITCH_FRAMES = 9
MOTION_LAG = 3       # frames between the two centroids of a displacement in the bounce-aware direction
CHANGE_CYCLE = ("color", "direction", "both")
ONE_OBJECT_PROMPTS = [p for p in EVAL_PROMPTS if len(parse_prompt(p, max_objects=None).objects) == 1]
METRICS = ("color", "shape", "direction", "correct", "motion", "motion_correct")
METRIC_NAMES = {"color": "colour", "shape": "shape", "direction": "direction", "correct": "all correct",
                "motion": "direction (bounce-aware)", "motion_correct": "all correct (bounce-aware)"}


# ------------------------------------------------------------------------------------------- stream geometry
# block_start_frame / block_at_seconds: engine.live's (one definition of where blocks start)


def num_blocks_for(num_frames: int, num_frame_per_block: int, temporal: int = 4) -> int:
    """The fewest blocks whose video has at least num_frames frames (>= 1 block)."""
    b = 1
    while block_start_frame(b, num_frame_per_block, temporal) < num_frames:
        b += 1
    return b


def switch_blocks(seconds: float, every: float, fps: int, num_frame_per_block: int, temporal: int = 4) -> list[int]:
    """Blocks of the switches at every, 2 every, ... seconds (< seconds) of a stream of `seconds` seconds."""
    check_long_args(seconds, every)
    num_blocks = num_blocks_for(math.ceil(seconds * fps - 1e-9), num_frame_per_block, temporal)
    out, j = [], 1
    while j * every < seconds - 1e-9:
        b = block_at_seconds(j * every, fps, num_frame_per_block, temporal)
        if b >= num_blocks:
            break
        if out and b <= out[-1]:
            raise ValueError(f"--switch-every {every:g} s is shorter than a block; accepted: --switch-every >= "
                             f"{block_seconds(fps, num_frame_per_block, temporal):g} s")
        out.append(b)
        j += 1
    return out


def block_seconds(fps: int, num_frame_per_block: int, temporal: int = 4) -> float:
    return temporal * num_frame_per_block / fps


def check_long_args(seconds, every=None) -> None:
    """ValueError naming the flag and its accepted range."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
            or seconds <= 0:
        raise ValueError(f"--long-seconds must be a number of seconds > 0, got {seconds!r}")
    if every is not None and (isinstance(every, bool) or not isinstance(every, (int, float))
                              or not math.isfinite(every) or not 0 < every < seconds):
        raise ValueError(f"--switch-every must be a number of seconds in (0, {seconds:g}) (shorter than "
                         f"--long-seconds {seconds:g}), got {every!r}")


# ------------------------------------------------------------------------------------------------ prompts

def reflection_class(direction: str) -> tuple[int, int]:
    """(|dx|, |dy|) of the direction's step: (1, 0) for left / right, (0, 1) for up / down, (1, 1) for the four
    diagonals. A wall bounce flips the sign of one velocity component, so motion never leaves its class."""
    dx, dy = DIRECTION_VECTORS[direction]
    return abs(dx), abs(dy)


def switch_prompts(first: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n successive (prompt, change) after `first` (one object): change cycles colour, direction, both (seeded). The
    new colour is drawn from those that differ from the current one (`shapes.next_prompt`, as the training data's
    switch clips); the new direction from another reflection class than the current one (`reflection_class`): a
    switch left -> right looks like a bounce, and the bounce-aware direction could not tell it from an ignored
    switch. The shape stays."""
    spec = parse_prompt(first, max_objects=None)
    if len(spec.objects) != 1:
        raise ValueError(f"prompt switches need one-object prompts, got {first!r}")
    rng = np.random.default_rng([int(seed), 4243])
    out = []
    for j in range(n):
        change = CHANGE_CYCLE[j % len(CHANGE_CYCLE)]
        if change in ("color", "both"):
            spec = next_prompt(spec, "color", rng)
        if change in ("direction", "both"):
            other = [d for d in DIRECTIONS if reflection_class(d) != reflection_class(spec.direction)]
            spec = PromptSpec(spec.objects, str(rng.choice(other)))
        out.append((str(spec), change))
    return out


def stream_timeline(prompt: str, seconds: float, every: float | None, fps: int, num_frame_per_block: int,
                    temporal: int = 4, seed: int = 0) -> tuple[list[tuple[int, str]], list[str]]:
    """([(block, prompt), ...], [change per switch]) for one stream."""
    if every is None:
        return [(0, prompt)], []
    blocks = switch_blocks(seconds, every, fps, num_frame_per_block, temporal)
    prompts = switch_prompts(prompt, len(blocks), seed)
    return [(0, prompt)] + [(b, p) for b, (p, _) in zip(blocks, prompts)], [c for _, c in prompts]


# ------------------------------------------------------------------------------------------------ scoring

def centroid_tracks(frames: np.ndarray, colors, min_area: float = MIN_AREA) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per colour, over every frame: (centroid (F, 2) x, y of the evaluator's cleaned colour mask, seen (F,): the
    mask covers min_area of the frame and >= 4 px, as `evaluate_video` counts an object seen)."""
    F, H, W, _ = frames.shape
    labels = classify_pixels(frames)                                                # (F, H, W)
    ys, xs = np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64)
    out = []
    for color in colors:
        m = clean_mask(labels == COLOR_NAMES.index(color))                          # (F, H, W)
        area = m.sum((1, 2)).astype(np.float64)
        a = np.maximum(area, 1.0)
        c = np.stack([(m.sum(1) * xs).sum(1) / a, (m.sum(2) * ys).sum(1) / a], 1)   # (F, 2)
        out.append((c, area >= max(4.0, min_area * H * W)))
    return out


def reflection_speeds(c: np.ndarray, seen: np.ndarray, lag: int = MOTION_LAG) -> np.ndarray | None:
    """Reflection-invariant speed (|vx|, |vy|) in px per frame of a centroid track c (F, 2): per axis the median over
    t of |c(t + lag) - c(t)| / lag, over the pairs seen at both ends (None without one). A wall bounce flips one
    component's sign and touches only the lag pairs that straddle it; centroid jitter of e px adds about e / lag."""
    i = np.arange(len(c) - lag)
    ok = seen[i] & seen[i + lag]
    if not ok.any():
        return None
    return np.median(np.abs(c[i + lag] - c[i])[ok], 0) / lag


def bounce_aware_direction(speeds, direction: str, min_speed: float) -> str | None:
    """`direction_from_velocity` of the speeds (|vx|, |vy|) turned into the quadrant of the prompted direction: the
    prompted direction itself iff the motion is along its axes and at least min_speed fast, whatever wall
    reflections it went through; None if there are no speeds or they are too slow."""
    if speeds is None:
        return None
    ux, uy = DIRECTION_VECTORS[direction]
    return direction_from_velocity(-speeds[0] if ux < 0 else speeds[0], -speeds[1] if uy < 0 else speeds[1],
                                   min_speed)


def judge_window(prompt: str, frames: np.ndarray) -> dict:
    """`evaluate_video`'s colour / shape / direction / correct, plus the bounce-aware direction over the whole
    window (motion: share of the prompt's objects present and moving along the prompted axes, any reflection;
    motion_correct: every object right in colour, shape and motion) and each object's speeds (|vx|, |vy|)."""
    r = evaluate_video(prompt, frames)
    spec = parse_prompt(prompt, max_objects=None)
    min_speed = MIN_SPEED * min(frames.shape[1:3])
    speeds, ok = [], []
    for o, (c, seen) in zip(r["objects"], centroid_tracks(frames, [c for c, _ in spec.objects])):
        s = reflection_speeds(c, seen)
        speeds.append(None if s is None else [float(v) for v in s])
        ok.append(o["present"] and bounce_aware_direction(s, spec.direction, min_speed) == spec.direction)
    return {"prompt": prompt, **{m: r[m] for m in ("color", "shape", "direction", "correct")},
            "motion": float(np.mean(ok)),
            "motion_correct": float(all(o["color_ok"] and o["shape_ok"] and m for o, m in zip(r["objects"], ok))),
            "speeds": speeds, "extra_colors": r["extra_colors"], "flicker": r["flicker"]}


def score_stream(frames, timeline, *, num_frame_per_block: int = 3, temporal: int = 4, fps: int = 16,
                 window: int = WINDOW_FRAMES, reach_blocks: int = REACH_BLOCKS,
                 min_frames: int = MIN_SWITCH_FRAMES) -> dict:
    """Score a stream's frames (N, H, W, 3) uint8 under its timeline [(block, prompt), ...] (block 0 first).

    windows: one dict per window [window i, window (i + 1)) with index, start_frame, seconds, and either
    `judge_window`'s figures (colour / shape / direction / correct / motion / motion_correct) against the prompt in
    force at its first frame, or skipped=True where a switch falls strictly inside it. switches: one dict per switch
    with block, frame, old / new prompt, the frames scored from block + reach_blocks, and `judge_window`'s figures
    (or skipped=True when fewer than min_frames frames remain before the next switch or the stream's end).
    """
    from ..live import check_timeline

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (N, H, W, 3), got {frames.dtype} {frames.shape}")
    timeline = check_timeline(timeline)
    N = len(frames)
    starts = [block_start_frame(b, num_frame_per_block, temporal) for b, _ in timeline]
    if starts[-1] >= N:
        raise ValueError(f"the timeline switches at frame {starts[-1]} (block {timeline[-1][0]}), past the "
                         f"stream's {N} frames")

    def prompt_at(f):
        return next(p for s, (_, p) in zip(reversed(starts), reversed(timeline)) if s <= f)

    windows = []
    for i in range(N // window):
        a, e = i * window, (i + 1) * window
        w = {"index": i, "start_frame": a, "seconds": a / fps}
        if any(a < s < e for s in starts[1:]):
            windows.append({**w, "prompt": None, "skipped": True})
        else:
            windows.append({**w, **judge_window(prompt_at(a), frames[a:e]), "skipped": False})

    switches = []
    for j in range(1, len(timeline)):
        b, new = timeline[j]
        a = block_start_frame(b + reach_blocks, num_frame_per_block, temporal)
        limit = starts[j + 1] if j + 1 < len(starts) else N
        e = min(a + window, limit)
        s = {"block": b, "frame": starts[j], "seconds": starts[j] / fps, "old": timeline[j - 1][1], "prompt": new,
             "scored_frames": [a, max(a, e)]}
        if e - a < min_frames:
            switches.append({**s, "skipped": True})
        else:
            switches.append({**s, **judge_window(new, frames[a:e]), "skipped": False})
    return {"num_frames": N, "timeline": [list(t) for t in timeline], "windows": windows, "switches": switches}


def _share(groups: list[list[float]]) -> tuple[float, float] | tuple[None, None]:
    groups = [g for g in groups if g]
    if not groups:
        return None, None
    p, se = mean_and_se(groups)
    return p, (se if math.isfinite(se) else None)


def summarize(streams: list[dict], seconds: float, fps: int, window: int = WINDOW_FRAMES) -> dict:
    """Across streams (each a `score_stream` result): per window position, first window, last minute (windows
    starting in the last 60 s, the first window excluded), second half, worst window by colour and by all correct
    (bounce-aware), switches.
    Shares with a standard error over streams (a stream's windows counted together, `mean_and_se`)."""
    n_pos = max(len(s["windows"]) for s in streams)
    positions = []
    for i in range(n_pos):
        ws = [s["windows"][i] for s in streams if i < len(s["windows"]) and not s["windows"][i]["skipped"]]
        row = {"index": i, "seconds": i * window / fps, "n": len(ws)}
        row.update({m: (float(np.mean([w[m] for w in ws])) if ws else None) for m in METRICS})
        positions.append(row)

    def part(name, keep):
        out = {"part": name, "windows": 0}
        for m in METRICS:
            groups = [[w[m] for w in s["windows"] if not w["skipped"] and keep(w)] for s in streams]
            out["windows"] = sum(map(len, groups))
            out[m], out[m + "_se"] = _share(groups)
        return out
    last_from = max(seconds - 60.0, window / fps)
    parts = [part("first window", lambda w: w["index"] == 0),
             part(f"last minute (from {last_from:.1f} s)", lambda w: w["index"] > 0 and w["seconds"] >= last_from - 1e-9),
             part(f"second half (from {seconds / 2:.1f} s)", lambda w: w["seconds"] >= seconds / 2 - 1e-9),
             part("all windows", lambda w: True)]
    scored = [p for p in positions if p["n"]]
    worst = min(scored, key=lambda p: (p["color"], p["index"])) if scored else None
    worst_correct = min(scored, key=lambda p: (p["motion_correct"], p["index"])) if scored else None

    sw = [[x for x in s["switches"] if not x["skipped"]] for s in streams]
    switches = {"n": sum(len(s["switches"]) for s in streams), "scored": sum(map(len, sw))}
    for m in METRICS:
        switches[m], switches[m + "_se"] = _share([[x[m] for x in g] for g in sw])
    by_change = {}
    for s in streams:
        for x, c in zip(s["switches"], s.get("changes", [])):
            if not x["skipped"]:
                by_change.setdefault(c, []).append(x)
    switches["by_change"] = {c: {"n": len(xs), **{m: float(np.mean([x[m] for x in xs])) for m in METRICS}}
                             for c, xs in by_change.items()}
    return {"positions": positions, "parts": parts, "worst": worst, "worst_correct": worst_correct,
            "switches": switches}


# -------------------------------------------------------------------------------------------- generation

def reference_stream(timeline, num_frames: int, seed: int, *, num_frame_per_block: int = 3, temporal: int = 4,
                     height: int = 64, width: int = 64, fps: int = 16) -> np.ndarray:
    """A procedural stream under the timeline, one continuous scene with the dataset's physics: the first prompt's
    objects placed at random (free for frames 0..1 only) on one background, moving in a straight line and bouncing
    off the walls. At a switch the objects keep their positions, sizes, speed and current velocity, turn to the new
    direction if the prompt changes it, and take the new colours and shapes, from the switch's first frame (the
    prompts must name as many objects).
    What a perfect model of the data would show; its scores are the evaluator's ceiling on long streams."""
    out = np.empty((num_frames, height, width, 3), np.uint8)
    starts = [block_start_frame(b, num_frame_per_block, temporal) for b, _ in timeline] + [num_frames]
    spec = spec_from_prompt(timeline[0][1], seed * 1000, ShapesConfig(height=height, width=width, fps=fps,
                                                                      free_frames=1))
    objects, speed = spec.objects, math.hypot(spec.objects[0].vx, spec.objects[0].vy)
    direction = None
    for j, (_, prompt) in enumerate(timeline):
        a, e = starts[j], min(starts[j + 1], num_frames)
        if e <= a:
            break
        p = parse_prompt(prompt, max_objects=None)
        if len(p.objects) != len(objects):
            raise ValueError(f"a reference stream keeps its objects: {prompt!r} names {len(p.objects)}, the first "
                             f"prompt {len(objects)}")
        if j:  # the scene goes on: same positions and speed, the new colours and shapes, the new direction if any
            objects = tuple(dataclasses.replace(o, color=c, shape=sh) for o, (c, sh) in zip(objects, p.objects))
        if j and p.direction != direction:
            ux, uy = DIRECTION_VECTORS[p.direction]
            vx, vy = speed * ux / math.hypot(ux, uy), speed * uy / math.hypot(ux, uy)
            objects = tuple(dataclasses.replace(o, vx=vx, vy=vy) for o in objects)
        direction = p.direction
        n = 1 + 4 * max(1, math.ceil((e - a) / 4))  # frames 0 .. e - a: the next segment starts at e - a
        cfg = ShapesConfig(height=height, width=width, num_frames=n, fps=fps, free_frames=1)
        out[a:e] = render(VideoSpec(objects, spec.background), cfg)[: e - a]
        objects = tuple(_moved(o, e - a, width, height) for o in objects)
    return out


def _moved(o, m: int, width: int, height: int):
    """The bouncing object `o` (shapes.trajectory) at frame m: its position and its velocity there (a component is
    reversed after an odd number of bounces on its axis: the odd folds of shapes.reflect's triangle wave)."""
    state = []
    for p, v, side in ((o.x, o.vx, width), (o.y, o.vy, height)):
        span = side - 2 * o.size
        u = np.mod(p + v * m - o.size, 2 * span)
        state.append((float(o.size + span - abs(u - span)), v if u < span else -v))
    (x, vx), (y, vy) = state
    return dataclasses.replace(o, x=x, y=y, vx=vx, vy=vy)


def generate_stream(eng, timeline, num_blocks: int, seed: int, *, window: int, sink: int) -> tuple[np.ndarray, dict]:
    """The live stream's frames (N, H, W, 3) and its cost: seconds, generated frames/s, KV bytes."""
    t0 = time.perf_counter()
    chunks = []
    with eng.live(timeline=timeline, seed=seed, pace=False, record=False, max_blocks=num_blocks,
                  local_attn_frames=window, sink_frames=sink) as live:
        for chunk in live:
            chunks.append(chunk.frames)
        stats = live.stats
    seconds = time.perf_counter() - t0
    frames = np.concatenate(chunks)
    return frames, {"seconds": seconds, "fps": len(frames) / seconds, "kv_bytes": stats["kv_bytes"],
                    "block_p50": stats["block_p50"], "block_p99": stats["block_p99"]}


def check_window(eng, window: int, sink: int):
    """The engine with this window and sink, or a ValueError that names --window / --sink and the range."""
    k = eng.config.num_frame_per_block
    try:
        return eng.with_settings(local_attn_frames=window, sink_frames=sink)
    except ValueError as e:
        raise ValueError(f"--window {window} --sink {sink} cannot hold the sinks and a block: accepted --sink >= 0 "
                         f"and --window >= --sink + 2 x {k} (two blocks of {k} latent frames) = {max(sink, 0) + 2 * k} "
                         f"latent frames ({e})") from None


def long_eval(eng, prompts: list[str], seeds: list[int], seconds: float, *, switch_every: float | None = None,
              window: int | None = None, sink: int | None = None, reference: bool = False, log=None) -> dict:
    """Generate (or, reference=True, render procedurally) and score one stream per prompt x seed; see the module
    docstring. Returns {settings, summary, streams}."""
    from ..live import live_default_window
    from ..sampling.codec import temporal_compression

    check_long_args(seconds, switch_every)
    c = eng.config
    k, tc, fps = c.num_frame_per_block, temporal_compression(eng.vae), int(c.fps)
    default_window, default_sink = live_default_window(c, tc)
    window = default_window if window is None else window
    sink = default_sink if sink is None else sink
    check_window(eng, window, sink)
    if switch_every is not None and switch_every < block_seconds(fps, k, tc) - 1e-9:
        raise ValueError(f"--switch-every must be at least one block ({block_seconds(fps, k, tc):g} s) and shorter "
                         f"than --long-seconds {seconds:g}, got {switch_every:g}")
    num_blocks = num_blocks_for(math.ceil(seconds * fps - 1e-9), k, tc)
    streams = []
    for seed in seeds:
        for prompt in prompts:
            timeline, changes = stream_timeline(prompt, seconds, switch_every, fps, k, tc, seed)
            if reference:
                frames = reference_stream(timeline, block_start_frame(num_blocks, k, tc), seed, num_frame_per_block=k,
                                          temporal=tc, height=c.height, width=c.width, fps=fps)
                cost = {}
            else:
                frames, cost = generate_stream(eng, timeline, num_blocks, seed, window=window, sink=sink)
            res = score_stream(frames, timeline, num_frame_per_block=k, temporal=tc, fps=fps)
            streams.append({"prompt": prompt, "seed": seed, "changes": changes, "cost": cost, **res})
            if log is not None:
                ws = [w for w in res["windows"] if not w["skipped"]]
                print(f"[long-eval] seed {seed} {prompt!r}: {len(frames)} frames"
                      + (f" in {cost['seconds']:.1f} s ({cost['fps']:.0f} fps)" if cost else " (reference)")
                      + f", colour {100 * np.mean([w['color'] for w in ws]):.0f}%, all correct (bounce-aware) "
                      f"{100 * np.mean([w['motion_correct'] for w in ws]):.0f}% of windows", file=log, flush=True)
    settings = {"seconds": seconds, "num_blocks": num_blocks, "num_frames": block_start_frame(num_blocks, k, tc),
                "fps": fps, "window": window, "sink": sink, "switch_every": switch_every, "reference": reference,
                "num_frame_per_block": k, "seeds": list(seeds), "prompts": list(prompts)}
    summary = summarize(streams, seconds, fps)
    if not reference:
        summary["cost"] = {"fps": float(np.mean([s["cost"]["fps"] for s in streams])),
                           "seconds_per_stream": float(np.mean([s["cost"]["seconds"] for s in streams])),
                           "kv_bytes": streams[0]["cost"]["kv_bytes"]}
    return {"settings": settings, "summary": summary, "streams": streams}


# --------------------------------------------------------------------------------------------------- output

def _pct(v, se=None) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.1f}%" + (f" ± {100 * se:.1f}" if se is not None else "")


def format_long(res: dict) -> str:
    s, summ = res["settings"], res["summary"]
    head = (f"{s['seconds']:g} s streams ({s['num_frames']} frames, {s['num_blocks']} blocks) x "
            f"{len(s['prompts'])} prompts x seeds {s['seeds']}; window {s['window']} latent frames, sink {s['sink']}"
            + (f"; a switch every {s['switch_every']:g} s" if s["switch_every"] else "")
            + ("; procedural reference streams" if s["reference"] else ""))
    names = " | ".join(METRIC_NAMES[m] for m in METRICS)
    lines = [head, "", f"| window | start (s) | streams | {names} |", "|---:|---:|---:|" + "---:|" * len(METRICS)]
    for p in summ["positions"]:
        lines.append(f"| {p['index']} | {p['seconds']:.1f} | {p['n']} | "
                     + " | ".join(_pct(p[m]) for m in METRICS) + " |")
    lines += ["", f"| part | windows | {names} |", "|---|---:|" + "---:|" * len(METRICS)]
    for p in summ["parts"]:
        lines.append(f"| {p['part']} | {p['windows']} | " + " | ".join(_pct(p[m], p[m + '_se']) for m in METRICS)
                     + " |")
    w, wc = summ["worst"], summ.get("worst_correct")
    if w is not None:
        lines.append(f"\nworst window (colour): #{w['index']} at {w['seconds']:.1f} s: colour {_pct(w['color'])} "
                     f"over {w['n']} streams")
    if wc is not None:
        lines.append(f"worst window (all correct, bounce-aware): #{wc['index']} at {wc['seconds']:.1f} s: "
                     f"{_pct(wc['motion_correct'])} over {wc['n']} streams")
    sw = summ["switches"]
    if sw["n"]:
        lines.append(f"switches: {sw['n']} ({sw['scored']} scored); reached within {REACH_BLOCKS} blocks: "
                     + ", ".join(f"{METRIC_NAMES[m]} {_pct(sw[m], sw[m + '_se'])}" for m in METRICS))
        for c, x in sw["by_change"].items():
            lines.append(f"  {c} changes ({x['n']}): " + ", ".join(f"{METRIC_NAMES[m]} {_pct(x[m])}" for m in METRICS))
    if "cost" in summ:
        cst = summ["cost"]
        lines.append(f"cost: {cst['fps']:.1f} generated frames/s ({cst['seconds_per_stream']:.1f} s a stream), "
                     f"KV cache {cst['kv_bytes'] / 2 ** 20:.2f} MiB")
    lines.append("(± one standard error over streams, the windows of a stream counted together)")
    return "\n".join(lines)


def run_long(args) -> int:
    """`python -m engine eval --long-seconds S ...` (flags: engine/data/evaluate.py add_arguments)."""
    import json

    import torch

    import engine
    from engine.atomic import write_text

    check_long_args(args.long_seconds, args.switch_every)
    prompts_all = ONE_OBJECT_PROMPTS if args.switch_every is not None else EVAL_PROMPTS
    if not 0 <= args.limit <= len(prompts_all):
        raise ValueError(f"--limit must be in [0, {len(prompts_all)}]"
                         + (" (switches use the one-object prompts)" if args.switch_every is not None else "")
                         + f", got {args.limit}")
    if not args.seeds:
        raise ValueError("--seeds needs at least one seed")
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = prompts_all[: args.limit] if args.limit else prompts_all
    out = {}
    for ckpt in args.checkpoint or [str(engine.default_checkpoint())]:
        eng = engine.Engine.from_pretrained(ckpt)
        if args.device:
            eng.to(args.device)
        res = long_eval(eng, prompts, args.seeds, args.long_seconds, switch_every=args.switch_every,
                        window=args.window, sink=args.sink, reference=args.reference, log=sys.stderr)
        print(f"{ckpt}: " + format_long(res), flush=True)
        out[ckpt] = res
    if args.json:
        write_text(args.json, json.dumps(out, indent=1))
    return 0
