"""Procedural shapes videos: the training data of the default model, deterministic by seed, no download.

One or two objects (circle / square / triangle, in one of six colours) on a dark plain or gradient background,
all moving in the same one of eight directions at the same speed, bouncing off the walls. Captions come from a
tiny grammar over a fixed word list (`VOCABULARY`), so a word-level text encoder covers every prompt:

    prompt    := object ("and" object)* "moving" direction
    object    := "a" colour shape
    direction := "left" | "right" | "up" | "down" | "up left" | "up right" | "down left" | "down right"

    "a red circle moving left"        "a blue square and a yellow triangle moving up right"

Bouncing and direction. Objects start where they can move freely (no wall contact) for the first
`free_frames` frames (frames 0..free_frames, default (num_frames - 1) // 2, i.e. 1 s at 16 fps for 33
frames); bounces can happen only after that. The caption names the direction of this free part, and the
evaluator (`evaluate.py`) judges direction over the same frames. During the free part two objects keep a fixed
offset (same velocity), placed so that their boxes never overlap, so each stays fully visible.

Coordinates: continuous pixels, (0, 0) is the top-left corner of the image and pixel (i, j) covers
[j, j+1) x [i, i+1); x to the right, y down, so "up" is decreasing y. Object `size` r is the half-extent of
its bounding box: circle of radius r, square of side 2r, upward triangle with base 2r and height 2r. Shapes are
drawn anti-aliased from signed distances, so sub-pixel motion is smooth.

Backgrounds are dark and nearly neutral (max channel <= 72, small tint), so they never share a colour with an
object: every object colour has value >= 200 and, except white, high saturation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# Object palette (RGB). Hues: red 0, yellow 54, green 128, blue 228, purple 281 degrees; white is unsaturated.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 255),
    "yellow": (240, 220, 40),
    "white": (240, 240, 240),
    "purple": (170, 60, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# direction -> unit step (dx, dy) in image coordinates (y down)
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
    "up left": (-1, -1), "up right": (1, -1), "down left": (-1, 1), "down right": (1, 1),
}
DIRECTIONS: tuple[str, ...] = tuple(DIRECTION_VECTORS)
GRAMMAR_WORDS = ("a", "and", "moving")
VOCABULARY: list[str] = sorted(set(GRAMMAR_WORDS) | set(COLORS) | set(SHAPES)
                               | {w for d in DIRECTIONS for w in d.split()})
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient")


def default_free_frames(num_frames: int) -> int:
    """Frames 0..free_frames move without bounces: the first half of the clip."""
    return (num_frames - 1) // 2


@dataclass
class ShapesConfig:
    """Video geometry and sampling ranges. Sizes and speeds are fractions of min(height, width)."""

    height: int = 64
    width: int = 64
    num_frames: int = 33               # 1 + 4k (the Wan VAE compresses time 4x after the first frame)
    fps: int = 16
    min_objects: int = 1
    max_objects: int = 2
    size_range: tuple[float, float] = (0.12, 0.17)       # half-extent r: 7.7 .. 10.9 px at 64 px
    speed_range: tuple[float, float] = (0.016, 0.024)    # px per frame / min side: 1.0 .. 1.5 px at 64 px
    free_frames: int | None = None     # None -> (num_frames - 1) // 2
    gradient_prob: float = 0.5

    def __post_init__(self):
        if self.num_frames < 5 or (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames must be 1 + 4k with k >= 1 (5, 9, ..., 33), got {self.num_frames}")
        if self.height < 32 or self.width < 32 or self.height % 8 or self.width % 8:
            raise ValueError(f"height and width must be multiples of 8 and >= 32, got {self.height}x{self.width}")
        if not 1 <= self.min_objects <= self.max_objects <= len(COLORS):
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(COLORS)} (objects have distinct "
                             f"colours), got {self.min_objects}, {self.max_objects}")
        if self.free_frames is None:
            self.free_frames = default_free_frames(self.num_frames)
        if not 1 <= self.free_frames < self.num_frames:
            raise ValueError(f"free_frames must be in [1, num_frames), got {self.free_frames}")
        room = 2 * self.size_range[1] + self.speed_range[1] * self.free_frames
        if room > 0.9:
            raise ValueError(f"objects of size {self.size_range[1]} at speed {self.speed_range[1]} cannot move "
                             f"freely for {self.free_frames} frames (needs {room:.2f} of the frame side, max 0.9)")

    @property
    def scale(self) -> int:
        return min(self.height, self.width)


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    size: float        # half-extent r of the bounding box, px
    x: float           # centre at frame 0, px
    y: float
    vx: float          # px per frame
    vy: float


@dataclass(frozen=True)
class Background:
    kind: str                          # "plain" | "gradient"
    color0: tuple[int, int, int]
    color1: tuple[int, int, int]       # == color0 for "plain"
    angle: float = 0.0                 # gradient direction, radians (0: color0 on the left, color1 on the right)


@dataclass(frozen=True)
class VideoSpec:
    objects: tuple[ShapeObject, ...]
    background: Background

    @property
    def direction(self) -> str:
        dirs = {direction_of(o.vx, o.vy) for o in self.objects}
        if len(dirs) != 1:
            raise ValueError(f"objects move in different directions {sorted(map(str, dirs))}; a caption needs one")
        return dirs.pop()


@dataclass(frozen=True)
class PromptSpec:
    objects: tuple[tuple[str, str], ...]    # ((colour, shape), ...)
    direction: str

    def __str__(self) -> str:
        return " and ".join(f"a {c} {s}" for c, s in self.objects) + f" moving {self.direction}"


def direction_of(vx: float, vy: float, eps: float = 1e-6) -> str | None:
    """Exact direction word of a dataset velocity (signs of its components); None if it is zero."""
    key = (int(np.sign(vx)) if abs(vx) > eps else 0, int(np.sign(vy)) if abs(vy) > eps else 0)
    return {v: d for d, v in DIRECTION_VECTORS.items()}.get(key)


# ----------------------------------------------------------------------------------------------- captions

def tokenize(prompt: str) -> list[str]:
    """Lower-case, whitespace split: the same words a word-level text encoder sees."""
    return prompt.lower().split()


def caption(spec: VideoSpec) -> str:
    return str(PromptSpec(tuple((o.color, o.shape) for o in spec.objects), spec.direction))


def parse_prompt(prompt: str, max_objects: int | None = 2) -> PromptSpec:
    """Parse a prompt of the caption grammar; ValueError with a clear message if the model cannot render it."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    words = tokenize(prompt)
    example = "e.g. 'a red circle moving left' or 'a blue square and a yellow triangle moving up right'"
    if not words:
        raise ValueError(f"empty prompt; describe one or two objects and a direction, {example}")
    unknown = list(dict.fromkeys(w for w in words if w not in VOCABULARY))
    if unknown:
        raise ValueError(f"unknown word(s) {', '.join(repr(w) for w in unknown)} in prompt {prompt!r}; "
                         f"the model knows only these words: {', '.join(VOCABULARY)}")
    form = "'a <colour> <shape> [and a <colour> <shape>] moving <direction>'"
    if words.count("moving") != 1:
        raise ValueError(f"ungrammatical prompt {prompt!r}: expected {form} with 'moving' exactly once, {example}")
    i = words.index("moving")
    head, tail = words[:i], " ".join(words[i + 1:])
    if tail not in DIRECTION_VECTORS:
        swapped = " ".join(tail.split()[::-1])
        hint = f" (did you mean {swapped!r}?)" if swapped in DIRECTION_VECTORS else ""
        raise ValueError(f"ungrammatical prompt {prompt!r}: {tail!r} after 'moving' is not a direction{hint}; "
                         f"directions are {', '.join(repr(d) for d in DIRECTIONS)}")
    chunks = [[]]
    for w in head:  # split the words before 'moving' at each 'and'
        if w == "and":
            chunks.append([])
        else:
            chunks[-1].append(w)
    objects = []
    for j, w in enumerate(chunks):
        if len(w) != 3 or w[0] != "a" or w[1] not in COLORS or w[2] not in SHAPES:
            raise ValueError(f"ungrammatical prompt {prompt!r}: object {j + 1} is {' '.join(w)!r}, expected "
                             f"'a <colour> <shape>' (colours: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)}); "
                             f"a prompt has the form {form}")
        objects.append((w[1], w[2]))
    if max_objects is not None and len(objects) > max_objects:
        raise ValueError(f"prompt {prompt!r} names {len(objects)} objects but at most {max_objects} are supported")
    colors = [c for c, _ in objects]
    if len(set(colors)) != len(colors):
        raise ValueError(f"prompt {prompt!r} repeats a colour; objects must have different colours "
                         f"(they are told apart by colour)")
    return PromptSpec(tuple(objects), tail)


# ----------------------------------------------------------------------------------------------- sampling

def _rng(rng_or_seed) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def _dark_color(rng: np.random.Generator) -> tuple[int, int, int]:
    """Dark, nearly neutral: grey 10..60 plus a tint of at most +-12 per channel (max channel <= 72)."""
    grey = rng.uniform(10, 60)
    return tuple(int(round(grey + t)) for t in rng.uniform(-12, 12, size=3))


def sample_background(rng, cfg: ShapesConfig) -> Background:
    rng = _rng(rng)
    c0 = _dark_color(rng)
    if rng.random() < cfg.gradient_prob:
        return Background("gradient", c0, _dark_color(rng), float(rng.uniform(0, 2 * math.pi)))
    return Background("plain", c0, c0, 0.0)


def sample_spec(rng_or_seed, cfg: ShapesConfig, prompt: PromptSpec | str | None = None) -> VideoSpec:
    """A random video; with `prompt`, one whose objects and direction are the prompt's (the rest random).

    Objects start so that they move freely for frames 0..cfg.free_frames and their boxes stay >= 2 px apart.
    """
    rng = _rng(rng_or_seed)
    if isinstance(prompt, str):
        prompt = parse_prompt(prompt, max_objects=None)
    if prompt is None:
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        colors = rng.choice(list(COLORS), size=n, replace=False)
        kinds = [(str(c), SHAPES[rng.integers(len(SHAPES))]) for c in colors]
        direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
    else:
        kinds, direction = list(prompt.objects), prompt.direction
    speed = rng.uniform(*cfg.speed_range) * cfg.scale
    ux, uy = DIRECTION_VECTORS[direction]
    norm = math.hypot(ux, uy)
    vx, vy = speed * ux / norm, speed * uy / norm
    travel_x, travel_y = vx * cfg.free_frames, vy * cfg.free_frames
    gap = 2.0

    def axis_range(r, extent, travel):  # start positions with [c - r, c + r] inside [0, extent] for all free t
        return r + max(0.0, -travel), extent - r - max(0.0, travel)

    shrink = 1.0
    for attempt in range(400):
        if attempt and attempt % 50 == 0:
            shrink *= 0.9          # crowded (many objects, small frame): make the objects smaller, keep trying
        objects = []
        for color, shape in kinds:
            r = rng.uniform(*cfg.size_range) * cfg.scale * shrink
            x = rng.uniform(*axis_range(r, cfg.width, travel_x))
            y = rng.uniform(*axis_range(r, cfg.height, travel_y))
            ok = all(max(abs(x - o.x), abs(y - o.y)) >= r + o.size + gap for o in objects)
            if not ok:
                break
            objects.append(ShapeObject(color, shape, float(r), float(x), float(y), float(vx), float(vy)))
        if len(objects) == len(kinds):
            return VideoSpec(tuple(objects), sample_background(rng, cfg))
    raise RuntimeError(f"could not place {len(kinds)} objects in a {cfg.height}x{cfg.width} frame; "
                       f"use fewer objects, a larger frame or smaller size_range")


def spec_from_prompt(prompt: str | PromptSpec, seed: int, cfg: ShapesConfig | None = None) -> VideoSpec:
    """A random video matching `prompt` (objects, colours, direction); deterministic in (prompt, seed)."""
    cfg = cfg or ShapesConfig()
    if isinstance(prompt, str):
        prompt = parse_prompt(prompt, max_objects=None)
    return sample_spec(np.random.default_rng([seed, 7919]), cfg, prompt)


# ----------------------------------------------------------------------------------------------- rendering

def reflect(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold unbounded positions into [lo, hi] as a ball bouncing between two walls (a triangle wave)."""
    span = hi - lo
    if span <= 0:
        return np.full_like(p, lo)
    u = np.mod(p - lo, 2 * span)
    return lo + span - np.abs(u - span)


def trajectory(obj: ShapeObject, cfg: ShapesConfig) -> tuple[np.ndarray, np.ndarray]:
    """Centre (x, y) per frame, each (F,), with bounces."""
    t = np.arange(cfg.num_frames, dtype=np.float64)
    x = reflect(obj.x + obj.vx * t, obj.size, cfg.width - obj.size)
    y = reflect(obj.y + obj.vy * t, obj.size, cfg.height - obj.size)
    return x, y


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (px, negative inside) to the shape centred at the origin; exact inside, approximate outside."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - r
    if shape == "triangle":  # apex (0, -r), base corners (+-r, r): three half-planes
        s5 = math.sqrt(5.0)
        return np.maximum(dy - r, (2 * np.abs(dx) - dy - r) / s5)
    raise ValueError(f"unknown shape {shape!r}; shapes are {SHAPES}")


def render_background(bg: Background, cfg: ShapesConfig) -> np.ndarray:
    """(H, W, 3) float32 in 0..255."""
    c0, c1 = np.array(bg.color0, np.float32), np.array(bg.color1, np.float32)
    if bg.kind == "plain":
        return np.broadcast_to(c0, (cfg.height, cfg.width, 3)).astype(np.float32)
    ys, xs = np.mgrid[0:cfg.height, 0:cfg.width].astype(np.float32) + 0.5
    ca, sa = math.cos(bg.angle), math.sin(bg.angle)
    proj = (xs - cfg.width / 2) * ca + (ys - cfg.height / 2) * sa                  # (H, W)
    half = (abs(ca) * cfg.width + abs(sa) * cfg.height) / 2
    t = np.clip(proj / (2 * half) + 0.5, 0, 1)[..., None]                         # (H, W, 1)
    return (c0 * (1 - t) + c1 * t).astype(np.float32)


def render(spec: VideoSpec, cfg: ShapesConfig) -> np.ndarray:
    """uint8 frames (F, H, W, 3)."""
    F, H, W = cfg.num_frames, cfg.height, cfg.width
    video = np.repeat(render_background(spec.background, cfg)[None], F, axis=0)  # (F, H, W, 3)
    ys = np.arange(H, dtype=np.float32) + 0.5
    xs = np.arange(W, dtype=np.float32) + 0.5
    for obj in spec.objects:
        cx, cy = trajectory(obj, cfg)                                            # (F,), (F,)
        dx = xs[None, None, :] - cx.astype(np.float32)[:, None, None]           # (F, 1, W)
        dy = ys[None, :, None] - cy.astype(np.float32)[:, None, None]           # (F, H, 1)
        dx, dy = np.broadcast_arrays(dx, dy)                                     # (F, H, W)
        alpha = np.clip(0.5 - _signed_distance(obj.shape, dx, dy, obj.size), 0, 1)[..., None]  # (F, H, W, 1)
        video = video * (1 - alpha) + np.array(COLORS[obj.color], np.float32) * alpha
    return np.clip(np.rint(video), 0, 255).astype(np.uint8)


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float32 (3, F, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """float (3, F, H, W) in [-1, 1] -> uint8 (F, H, W, 3)."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a (3, F, H, W) tensor, got shape {tuple(video.shape)}")
    x = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).numpy()


# ----------------------------------------------------------------------------------------------- dataset

class ShapesDataset(torch.utils.data.Dataset):
    """`length` random clips; item i is a pure function of (seed, i), so workers and epochs agree.

    Returns dict(video=float32 (3, F, H, W) in [-1, 1], caption=str).
    """

    def __init__(self, cfg: ShapesConfig | None = None, seed: int = 0, length: int = 100_000):
        self.cfg, self.seed, self.length = cfg or ShapesConfig(), seed, length

    def __len__(self) -> int:
        return self.length

    def spec(self, i: int) -> VideoSpec:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of length {self.length}")
        return sample_spec(np.random.default_rng([self.seed, i]), self.cfg)

    def __getitem__(self, i: int) -> dict:
        spec = self.spec(int(i))
        return {"video": frames_to_tensor(render(spec, self.cfg)), "caption": caption(spec)}
