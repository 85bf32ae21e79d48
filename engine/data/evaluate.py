"""Does a video show what its prompt asks for? Colour, shape, direction and flicker of shapes videos.

Works on any uint8 video (F, H, W, 3): dataset renders, or the decoded output of a model, blurred and noisy.

Pixels are classified, not compared for equality (`classify_pixels`): a pixel is an object pixel if it is bright
(HSV value >= 0.45; every dataset background is <= 0.29); bright pixels of saturation >= 0.35 take the palette
colour of nearest hue, bright unsaturated ones (saturation <= 0.2, value >= 0.6) are white, the rest ambiguous.
Each colour mask is cleaned by a 3x3 majority filter (drops speckle and thin blur halos, fills pinholes).

Judged over the free-motion frames 0..free_frames (default (F - 1) // 2, as the dataset: no bounce there):

- colour: the object's colour covers >= min_area of the frame in at least half of these frames, and no colour
  that the prompt does not name does (a rainbow is not "a red circle").
- shape: majority vote over these frames of a per-frame classification of the colour mask by two moment
  features (`shape_features`): vertical skewness (upward triangle -0.57, circle and square 0) and the corner
  ratio E[dx^2 dy^2] / E[dx^4] (square 5/9, circle 1/3).
- direction: least-squares velocity of the mask centroid; one of 8 directions by 45-degree sectors, or None
  (wrong) if slower than min_speed * min(H, W) px per frame.

Flicker (lower is better, in [0, 1]): the mean absolute frame-to-frame change, in units of 255, of background
pixels, i.e. pixels darker than any object (value < 0.35) in both frames and not within 2 px of a brighter
pixel. Shapes-video backgrounds are static, so a clean video scores 0; object motion does not count.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from .shapes import COLORS, DIRECTION_VECTORS, default_free_frames, parse_prompt

EVAL_PROMPTS: list[str] = [  # fixed benchmark: every colour x shape, 8 directions, 16 two-object prompts
    "a red circle moving left", "a green circle moving right", "a blue circle moving up",
    "a yellow circle moving down", "a white circle moving up left", "a purple circle moving up right",
    "a red square moving down left", "a green square moving down right", "a blue square moving left",
    "a yellow square moving right", "a white square moving up", "a purple square moving down",
    "a red triangle moving up left", "a green triangle moving up right", "a blue triangle moving down left",
    "a yellow triangle moving down right", "a white triangle moving left", "a purple triangle moving right",
    "a red circle moving up", "a green circle moving down", "a blue circle moving up left",
    "a yellow circle moving up right", "a white circle moving down left", "a purple circle moving down right",
    "a red square moving left", "a green square moving right", "a blue square moving up",
    "a yellow square moving down", "a white square moving up left", "a purple square moving up right",
    "a red triangle moving down left", "a green triangle moving down right", "a blue triangle moving left",
    "a yellow triangle moving right", "a white triangle moving up", "a purple triangle moving down",
    "a red circle moving up left", "a green circle moving up right", "a blue circle moving down left",
    "a yellow circle moving down right", "a white circle moving left", "a purple circle moving right",
    "a red square moving up", "a green square moving down", "a blue square moving up left",
    "a yellow square moving up right", "a white square moving down left", "a purple square moving down right",
    "a red circle and a blue square moving left",
    "a green square and a yellow triangle moving down",
    "a blue triangle and a white circle moving down left",
    "a yellow circle and a purple triangle moving right",
    "a white square and a red circle moving up left",
    "a purple triangle and a green square moving down right",
    "a red circle and a yellow circle moving up",
    "a green square and a white square moving up right",
    "a blue triangle and a purple triangle moving left",
    "a yellow circle and a red square moving down",
    "a white square and a green triangle moving down left",
    "a purple triangle and a blue circle moving right",
    "a red circle and a green triangle moving up left",
    "a blue square and a yellow circle moving down right",
    "a white triangle and a purple square moving up",
    "a green circle and a purple circle moving up right",
]

COLOR_NAMES = list(COLORS)
MIN_AREA = 0.006   # an object is present in a frame if its colour covers this share of the frame (and >= 4 px)
MIN_SPEED = 0.004  # slower than this * min(H, W) px per frame: no direction
V_OBJECT, S_COLOR, S_WHITE, V_WHITE, V_BACKGROUND = 0.45, 0.35, 0.2, 0.6, 0.35


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (..., 3) -> hue in degrees [0, 360), saturation, value in [0, 1]; each (...)."""
    x = rgb.astype(np.float32) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v, mn = x.max(-1), x.min(-1)
    c = v - mn
    safe = np.where(c > 0, c, 1.0)
    h = np.where(v == r, np.mod((g - b) / safe, 6.0), np.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    return h * 60.0, c / np.maximum(v, 1e-6), v


_PALETTE_HUE = {name: float(_hsv(np.array(rgb, np.uint8))[0]) for name, rgb in COLORS.items() if name != "white"}


def classify_pixels(frames: np.ndarray) -> np.ndarray:
    """uint8 (F, H, W, 3) -> int8 (F, H, W): index into COLORS, or -1 (background or ambiguous)."""
    h, s, v = _hsv(frames)
    names = list(_PALETTE_HUE)
    hues = np.array([_PALETTE_HUE[n] for n in names], np.float32)                 # (K,)
    d = np.abs(h[..., None] - hues)                                                # (F, H, W, K)
    d = np.minimum(d, 360.0 - d)                                                   # circular hue distance
    nearest = np.array([COLOR_NAMES.index(n) for n in names], np.int8)[d.argmin(-1)]
    labels = np.full(h.shape, -1, np.int8)
    labels = np.where((v >= V_OBJECT) & (s >= S_COLOR), nearest, labels)
    labels = np.where((v >= V_WHITE) & (s <= S_WHITE), np.int8(COLOR_NAMES.index("white")), labels)
    return labels.astype(np.int8)


def _box_count(mask: np.ndarray, radius: int) -> np.ndarray:
    """Number of True pixels in the (2r+1)^2 square around each pixel of a bool (..., H, W) mask (outside = 0)."""
    H, W = mask.shape[-2:]
    p = np.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(radius, radius)] * 2).astype(np.int16)
    n = 2 * radius + 1
    return sum(p[..., i:i + H, j:j + W] for i in range(n) for j in range(n))


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """3x3 majority filter of a bool (..., H, W) mask: drops speckle and thin halos, fills pinholes."""
    return _box_count(mask, 1) >= 5


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    return _box_count(mask, radius) > 0


def shape_features(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bool (F, H, W) -> (vertical skewness, corner ratio), each (F,), from central moments of the mask.

    skew = E[dy^3] / E[dy^2]^1.5: -0.57 for an upward triangle (mass at its base, y down), 0 for the
    symmetric circle and square. corner = E[dx^2 dy^2] / mean(E[dx^4], E[dy^4]): 5/9 for an axis-aligned square,
    1/3 for a disk. Moments use every pixel, so they are far steadier under blur and noise than bounding boxes.
    """
    F, H, W = mask.shape
    m = mask.astype(np.float64)
    area = np.maximum(m.sum((1, 2)), 1.0)                                          # (F,)
    ys, xs = np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64)
    cx = (m.sum(1) * xs).sum(1) / area                                             # (F,)
    cy = (m.sum(2) * ys).sum(1) / area
    dx = xs[None, None, :] - cx[:, None, None]                                     # (F, 1, W)
    dy = ys[None, :, None] - cy[:, None, None]                                     # (F, H, 1)
    E = lambda f: (m * f).sum((1, 2)) / area
    skew = E(dy ** 3) / np.maximum(E(dy ** 2), 1e-6) ** 1.5
    corner = E(dx ** 2 * dy ** 2) / np.maximum(0.5 * (E(dx ** 4) + E(dy ** 4)), 1e-6)
    return skew, corner


def classify_shape(skew: float, corner: float) -> str:
    if skew < -0.2:
        return "triangle"
    return "square" if corner >= 0.44 else "circle"


def direction_from_velocity(vx: float, vy: float, min_speed: float) -> str | None:
    """The direction whose 45-degree sector holds (vx, vy) (image coordinates); None if slower than min_speed."""
    if math.hypot(vx, vy) < min_speed:
        return None
    angle = math.atan2(vy, vx)
    gap = lambda d: abs(math.remainder(angle - math.atan2(DIRECTION_VECTORS[d][1], DIRECTION_VECTORS[d][0]),
                                       2 * math.pi))
    return min(DIRECTION_VECTORS, key=gap)


def _check_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 2:
        raise ValueError(f"expected uint8 frames (F >= 2, H, W, 3), got {frames.dtype} {frames.shape}; "
                         f"convert a (3, F, H, W) tensor in [-1, 1] with shapes.tensor_to_frames")
    return frames


def flicker(frames: np.ndarray) -> float:
    """Mean |frame_t - frame_(t-1)| / 255 over background pixels (see the module docstring), in [0, 1]."""
    frames = _check_frames(frames)
    x = frames.astype(np.float32)
    bright = x.max(-1) >= V_BACKGROUND * 255                                       # (F, H, W)
    bg = ~dilate(bright, 2)
    both = bg[1:] & bg[:-1]                                                        # (F-1, H, W)
    diff = np.abs(x[1:] - x[:-1]).mean(-1) / 255.0                                 # (F-1, H, W)
    if both.sum() == 0:           # no background anywhere: fall back to all pixels
        return float(diff.mean())
    return float((diff * both).sum() / both.sum())


def evaluate_video(prompt: str, frames: np.ndarray, free_frames: int | None = None,
                   min_area: float = MIN_AREA, min_speed: float = MIN_SPEED) -> dict:
    """Judge one video against its prompt.

    Returns dict(prompt, color, shape, direction: fractions of the prompt's objects judged correct,
    correct: 1.0 if every object is right in all three, flicker, extra_colors: colours present but not prompted,
    objects: per-object details).
    """
    spec = parse_prompt(prompt, max_objects=None)
    frames = _check_frames(frames)
    F, H, W, _ = frames.shape
    free = default_free_frames(F) if free_frames is None else min(free_frames, F - 1)
    clip = frames[:free + 1]                                                       # (T, H, W, 3) no bounces here
    labels = classify_pixels(clip)                                                 # (T, H, W)
    masks = clean_mask(labels[None] == np.arange(len(COLOR_NAMES), dtype=np.int8)[:, None, None, None])  # (K, T, H, W)
    counts = masks.sum((2, 3))                                                     # (K, T)
    min_pixels = max(4.0, min_area * H * W)
    present = ((counts >= min_pixels).mean(1) >= 0.5)                              # (K,)
    prompted = {c for c, _ in spec.objects}
    extra = [c for k, c in enumerate(COLOR_NAMES) if present[k] and c not in prompted]

    objects = []
    t = np.arange(clip.shape[0], dtype=np.float64)
    ys, xs = np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64)
    for color, shape in spec.objects:
        k = COLOR_NAMES.index(color)
        m, seen = masks[k], counts[k] >= min_pixels                                # (T, H, W), (T,)
        pred_shape, velocity, pred_dir = None, None, None
        if seen.sum() >= 2:
            votes = Counter(classify_shape(a, b) for a, b in zip(*shape_features(m[seen])))
            pred_shape = votes.most_common(1)[0][0]
            area = counts[k][seen].astype(np.float64)
            cx = (m[seen].sum(1) * xs).sum(1) / area                               # (n,)
            cy = (m[seen].sum(2) * ys).sum(1) / area
            vx, vy = np.polyfit(t[seen], cx, 1)[0], np.polyfit(t[seen], cy, 1)[0]
            velocity = (float(vx), float(vy))
            pred_dir = direction_from_velocity(vx, vy, min_speed * min(H, W))
        color_ok = bool(present[k]) and not extra
        objects.append(dict(color=color, shape=shape, present=bool(present[k]),
                            pixels=float(np.median(counts[k])), predicted_shape=pred_shape, velocity=velocity,
                            predicted_direction=pred_dir, color_ok=color_ok,
                            shape_ok=bool(present[k]) and pred_shape == shape,
                            direction_ok=bool(present[k]) and pred_dir == spec.direction))
    mean = lambda key: float(np.mean([o[key] for o in objects]))
    return dict(prompt=prompt, color=mean("color_ok"), shape=mean("shape_ok"), direction=mean("direction_ok"),
                correct=float(all(o["color_ok"] and o["shape_ok"] and o["direction_ok"] for o in objects)),
                flicker=flicker(frames), extra_colors=extra, objects=objects)


def evaluate(prompts: list[str], videos, free_frames: int | None = None) -> dict:
    """Aggregate over videos: colour / shape / direction accuracy per prompted object, `correct` per video,
    mean flicker; `videos` keeps the per-video results."""
    videos = list(videos)
    if len(prompts) != len(videos):
        raise ValueError(f"{len(prompts)} prompts but {len(videos)} videos")
    if not prompts:
        raise ValueError("nothing to evaluate: no prompts")
    return aggregate([evaluate_video(p, v, free_frames) for p, v in zip(prompts, videos)])


def aggregate(results: list[dict]) -> dict:
    """`evaluate`'s figures from per-video results (`evaluate_video`'s)."""
    out = dict(n=len(results))
    for name, key in (("color", "color_ok"), ("shape", "shape_ok"), ("direction", "direction_ok")):
        out[name], out[f"{name}_se"] = mean_and_se([[o[key] for o in r["objects"]] for r in results])
    out["correct"], out["correct_se"] = mean_and_se([[r["correct"]] for r in results])
    return dict(out, flicker=float(np.mean([r["flicker"] for r in results])), videos=results)


def mean_and_se(groups: list[list[float]]) -> tuple[float, float]:
    """Accuracy over all objects and its standard error, with the objects of one video as a cluster (the two
    objects of a video are not independent): p = sum k_v / sum n_v and
    SE^2 = V / (V - 1) * sum_v (k_v - p n_v)^2 / (sum n_v)^2 over the V videos (the usual ratio-estimator
    variance; with one object per video it is the standard error of a mean, p (1 - p) / (V - 1)). NaN for V < 2."""
    k = np.array([sum(g) for g in groups], dtype=float)
    n = np.array([len(g) for g in groups], dtype=float)
    p = float(k.sum() / n.sum())
    V = len(groups)
    se = float(np.sqrt(V / (V - 1) * np.sum((k - p * n) ** 2)) / n.sum()) if V > 1 else float("nan")
    return p, se


def aggregates(res: dict) -> dict:
    """`evaluate`'s figures without the per-video results, for JSON (an undefined standard error is None)."""
    return {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in res.items() if k != "videos"}


def format_table(results: dict) -> str:
    """Markdown table of `evaluate` results: one aggregate dict, or {row name: aggregate dict}."""
    rows = {"video": results} if "color" in results else results
    lines = ["| model | videos | colour | shape | direction | all correct | flicker |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        cells = [f"{100 * r[k]:.1f}%" + (f" ± {100 * r[k + '_se']:.1f}" if np.isfinite(r.get(k + "_se", np.nan))
                                         else "") for k in ("color", "shape", "direction", "correct")]
        lines.append(f"| {name} | {r['n']} | {' | '.join(cells)} | {r['flicker']:.4f} |")
    return "\n".join(lines) + "\n(± one standard error over videos, the objects of a video counted together)"


# ----------------------------------------------------------------------------------- python -m engine eval

def add_arguments(p) -> None:
    """`python -m engine eval --checkpoint DIR [DIR ...]`: generate EVAL_PROMPTS x seeds with each engine
    directory (exactly `Engine.generate`, the Engine's own sampler settings) and print the evaluator's table."""
    p.add_argument("--checkpoint", nargs="+", default=None,
                   help="engine directories (default: the default checkpoint, engine.default_checkpoint())")
    p.add_argument("--limit", type=int, default=0, help=f"use the first N of the {len(EVAL_PROMPTS)} prompts (0: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="noise seeds per prompt (default 0 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core CPU, 2 spinning threads are far slower)")
    p.add_argument("--device", default=None, help="cpu | cuda | ... (default: cuda if available)")
    p.add_argument("--json", default=None, help="also write the per-video results to this JSON file")
    p.add_argument("--decoder", choices=["vae", "fast"], default="vae",
                   help="decode with the full VAE (default) or the checkpoint's fast streaming decoder")
    p.add_argument("--teacher-steps", type=int, default=None, metavar="N",
                   help="evaluate each checkpoint as a bidirectional teacher (a teacher run's engine directory): "
                        "N Euler steps over the whole clip with classifier-free guidance, from the Engine's z0 "
                        "for the seed, instead of the few-step block sampler")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="with --teacher-steps: CFG scale w, standard convention uncond + w (cond - uncond) "
                        "(default: the checkpoint's guidance_scale, which a teacher run writes)")
    g = p.add_argument_group("long streams (engine/data/long_eval.py; docs/live.md)")
    g.add_argument("--long-seconds", type=float, default=None, metavar="S",
                   help="score live streams of S seconds instead: every 33-frame window against its prompt "
                        "(colour, shape, strict and bounce-aware direction)")
    g.add_argument("--switch-every", type=float, default=None, metavar="K",
                   help="with --long-seconds: switch the prompt's colour / direction / both every K seconds and "
                        "score whether the stream follows within 2 blocks (one-object prompts)")
    g.add_argument("--window", type=int, default=None, metavar="W",
                   help="with --long-seconds: rolling window in latent frames (default: the live default)")
    g.add_argument("--sink", type=int, default=None, metavar="N",
                   help="with --long-seconds: sink frames in the window (default: the live default)")
    g.add_argument("--reference", action="store_true",
                   help="score procedural renders instead of the model (the evaluator's ceiling): of the same "
                        "timelines with --long-seconds (bounces included); on short clips, the prompts' renders "
                        "for each seed encoded and decoded by each checkpoint's VAE (the ceiling its codec sets)")


def teacher_video(eng, prompt: str, seed: int, steps: int, w: float) -> np.ndarray:
    """A bidirectional teacher's video (T, H, W, 3) uint8: Euler over the whole clip with CFG w from the Engine's z0
    for `seed` (the student's noise for that seed), decoded by the full VAE."""
    import torch

    from engine.io import to_uint8
    from engine.sampling.codec import decode_full
    from engine.sampling.schedule import FlowSchedule
    from engine.training.ode import ode_grid, ode_solve

    with torch.no_grad():
        noise = eng.make_noise(None, seed)
        cond = eng.encode_prompt(prompt)
        grid = ode_grid(FlowSchedule(eng.config.num_train_timesteps, eng.config.shift), steps)
        _, lat = ode_solve(eng.transformer, noise.z0, cond, torch.zeros_like(cond), w, grid)
        video = decode_full(eng.vae, lat).clamp(-1, 1)[0]  # (3, T, H, W)
    return to_uint8((video.permute(1, 2, 3, 0).float() + 1) / 2)


def vae_reference_video(eng, prompt: str, seed: int) -> np.ndarray:
    """The dataset's render of `prompt` for `seed` at the engine's size, encoded (posterior mode) and decoded by its
    VAE: the best a generator in that latent space can show, uint8 (T, H, W, 3)."""
    import torch

    from engine.io import to_uint8
    from engine.sampling.codec import decode_full
    from engine.training.data import encode_video

    from .shapes import ShapesConfig, frames_to_tensor, render, spec_from_prompt

    c = eng.config
    cfg = ShapesConfig(height=c.height, width=c.width, num_frames=c.num_frames)
    x = frames_to_tensor(render(spec_from_prompt(prompt, seed, cfg), cfg))[None]  # (1, 3, T, H, W)
    with torch.no_grad():
        video = decode_full(eng.vae, encode_video(eng.vae, x)).clamp(-1, 1)[0]
    return to_uint8((video.permute(1, 2, 3, 0).float() + 1) / 2)


def by_object_count(prompts: list[str], res: dict) -> dict:
    """`res` (from `evaluate`) recomputed over the one-object and the two-object prompts apart:
    {"one object": ..., "two objects": ...} (the counts that occur)."""
    counts = [len(parse_prompt(p, max_objects=None).objects) for p in prompts]
    return {name: aggregate([r for r, c in zip(res["videos"], counts) if c == n])
            for n, name in ((1, "one object"), (2, "two objects")) if n in counts}


def run(args) -> int:
    import json

    import torch

    import engine
    from engine.atomic import write_text

    if getattr(args, "long_seconds", None) is not None:
        from .long_eval import run_long

        return run_long(args)
    reference = getattr(args, "reference", False)
    long_only = [f for f, v in (("--switch-every", getattr(args, "switch_every", None)),
                                ("--window", getattr(args, "window", None)), ("--sink", getattr(args, "sink", None)))
                 if v is not None]
    if long_only:
        raise ValueError(f"{', '.join(long_only)} only apply to long streams: add --long-seconds S (S > 0)")
    if not 0 <= args.limit <= len(EVAL_PROMPTS):
        raise ValueError(f"--limit must be in [0, {len(EVAL_PROMPTS)}], got {args.limit}")
    if not args.seeds:
        raise ValueError("--seeds needs at least one seed")
    steps, w = getattr(args, "teacher_steps", None), getattr(args, "guidance", None)
    if steps is not None and steps < 1:
        raise ValueError(f"--teacher-steps must be >= 1, got {steps}")
    if w is not None and (steps is None or not np.isfinite(w) or w < 0):
        raise ValueError("--guidance W (a finite number >= 0) goes with --teacher-steps N")
    if reference and steps is not None:
        raise ValueError("--reference scores renders, not a model: drop --teacher-steps")
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = EVAL_PROMPTS[: args.limit] if args.limit else EVAL_PROMPTS
    jobs = [(p, s) for s in args.seeds for p in prompts]
    rows, parts = {}, {}
    for ckpt in args.checkpoint or [str(engine.default_checkpoint())]:
        eng = engine.Engine.from_pretrained(ckpt, decoder=getattr(args, "decoder", "vae"))
        if args.device:
            eng.to(args.device)
        if reference:
            videos = [vae_reference_video(eng, p, s) for p, s in jobs]
        elif steps is None:
            videos = [eng.generate(p, seed=s).frames for p, s in jobs]
        else:
            videos = [teacher_video(eng, p, s, steps, eng.config.guidance_scale if w is None else w) for p, s in jobs]
        name = f"{ckpt} (renders via its VAE)" if reference else ckpt
        rows[name] = evaluate([p for p, _ in jobs], videos)
        parts[name] = {k: r for k, r in by_object_count([p for p, _ in jobs], rows[name]).items()
                       if len(r["videos"]) < len(jobs)}
    print(f"{len(prompts)} prompts x seeds {args.seeds}")
    table = {}
    for k, r in rows.items():  # each model's row, then its one- and two-object rows
        table[k] = r
        table.update({f"{k}: {part}": x for part, x in parts[k].items()})
    print(format_table(table))
    if args.json:
        out = {k: {**aggregates(r), **{part: aggregates(x) for part, x in parts[k].items()},
                   "videos": [{**{m: v[m] for m in ("prompt", "color", "shape", "direction", "correct")},
                               "seed": s} for v, (_, s) in zip(r["videos"], jobs)]} for k, r in rows.items()}
        write_text(args.json, json.dumps(out, indent=2))
    return 0
