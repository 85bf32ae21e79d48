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

Prompt switches (`switch_prob` > 0): a share of the clips changes its prompt once, at the first video frame of a
latent block (`frames_per_block` latent frames; block b starts at frame 1 + 4 (k b - 1), as in the live stream):
an object changes colour, the objects change direction, both, or a second object appears (`SWITCH_KINDS`; the
seeded choice of the new prompt is `next_prompt`, the one the long-stream evaluator's switches use). The scene
continues through the switch (objects keep their positions), and the path of every object is wall-free from its
first frame through the free part (first half) of the last segment, so each prompt's caption is true where the
evaluator judges it; speed is lowered (to at most half the slowest speed) and objects shrink for a clip where that path would
not fit. A clip comes with its timeline
`[(block, prompt), ...]` (one entry without a switch).

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
SWITCH_KINDS: tuple[str, ...] = ("color", "direction", "both", "object")  # what a prompt switch changes
SWITCH_STREAM = 0x5717  # the seed stream of switch clips, apart from the clip stream (seed, i)
MIN_SEGMENT_FRAMES = 9   # frames each side of a switch: enough for the evaluator to judge either prompt
MIN_SPEED_FRACTION = 0.5  # a switch clip slows to fit its path, never below this share of the slowest speed
TEMPORAL = 4             # the Wan VAE's time compression: latent frame f > 0 covers video frames 4f - 3 .. 4f


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
    objects_p: tuple[float, ...] | None = None   # P(min_objects), ..., P(max_objects) objects; None: uniform
    size_range: tuple[float, float] = (0.12, 0.17)       # half-extent r: 7.7 .. 10.9 px at 64 px
    speed_range: tuple[float, float] = (0.016, 0.024)    # px per frame / min side: 1.0 .. 1.5 px at 64 px
    free_frames: int | None = None     # None -> (num_frames - 1) // 2
    gradient_prob: float = 0.5
    switch_prob: float = 0.0           # share of clips whose prompt switches once, at a latent-block boundary
    switch_kinds: tuple[str, ...] = SWITCH_KINDS
    frames_per_block: int = 3          # latent frames per block (the engine's num_frame_per_block)

    def __post_init__(self):
        if self.num_frames < 5 or (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames must be 1 + 4k with k >= 1 (5, 9, ..., 33), got {self.num_frames}")
        if self.height < 32 or self.width < 32 or self.height % 8 or self.width % 8:
            raise ValueError(f"height and width must be multiples of 8 and >= 32, got {self.height}x{self.width}")
        if not 1 <= self.min_objects <= self.max_objects <= len(COLORS):
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(COLORS)} (objects have distinct "
                             f"colours), got {self.min_objects}, {self.max_objects}")
        if self.objects_p is not None:
            self.objects_p = tuple(self.objects_p)
            n = self.max_objects - self.min_objects + 1
            if len(self.objects_p) != n or any(not 0 <= p <= 1 for p in self.objects_p) \
                    or abs(sum(self.objects_p) - 1) > 1e-6:
                raise ValueError(f"objects_p must be {n} probabilities (of {self.min_objects}..{self.max_objects} "
                                 f"objects) in [0, 1] summing to 1, got {list(self.objects_p)}")
        if self.free_frames is None:
            self.free_frames = default_free_frames(self.num_frames)
        if not 1 <= self.free_frames < self.num_frames:
            raise ValueError(f"free_frames must be in [1, num_frames), got {self.free_frames}")
        room = 2 * self.size_range[1] + self.speed_range[1] * self.free_frames
        if room > 0.9:
            raise ValueError(f"objects of size {self.size_range[1]} at speed {self.speed_range[1]} cannot move "
                             f"freely for {self.free_frames} frames (needs {room:.2f} of the frame side, max 0.9)")
        self._check_switches()

    def _check_switches(self) -> None:
        if isinstance(self.switch_prob, bool) or not isinstance(self.switch_prob, (int, float)) \
                or not 0 <= self.switch_prob <= 1:
            raise ValueError(f"switch_prob must be a number in [0, 1], got {self.switch_prob!r}")
        if isinstance(self.frames_per_block, bool) or not isinstance(self.frames_per_block, int) \
                or self.frames_per_block < 1:
            raise ValueError(f"frames_per_block must be an int >= 1, got {self.frames_per_block!r}")
        self.switch_kinds = tuple(self.switch_kinds)
        bad = [k for k in self.switch_kinds if k not in SWITCH_KINDS]
        if not self.switch_kinds or bad or len(set(self.switch_kinds)) != len(self.switch_kinds):
            raise ValueError(f"switch_kinds must be distinct kinds among {list(SWITCH_KINDS)} (at least one), got "
                             f"{list(self.switch_kinds)}")
        if self.switch_prob > 0 and "object" in self.switch_kinds and (
                self.min_objects >= self.max_objects or (self.objects_p is not None and not sum(self.objects_p[:-1]))):
            raise ValueError(f"switch kind 'object' adds an object: it needs min_objects < max_objects and objects_p "
                             f"> 0 below max_objects, got {self.min_objects}, {self.max_objects}, objects_p "
                             f"{self.objects_p}")
        if self.switch_prob > 0 and not switch_blocks(self):
            n = next(n for n in range(5, 10_000, 4) if _switch_blocks(n, self.frames_per_block))
            raise ValueError(f"num_frames {self.num_frames} leaves no latent block to switch at (each side of a "
                             f"switch needs >= {MIN_SEGMENT_FRAMES} frames, {self.frames_per_block} latent frames "
                             f"per block): accepted num_frames >= {n} (1 + 4k), or switch_prob 0")

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


# ----------------------------------------------------------------------------------------------- switches

def next_prompt(prompt: PromptSpec, kind: str, rng: np.random.Generator, max_objects: int = 2) -> PromptSpec:
    """The prompt after a switch of this kind (seeded by rng): "color" recolours one object (the only one, or a
    random one) to a colour no object has; "direction" picks another direction; "both" does the two; "object"
    adds an object of a free colour and a random shape. Shapes and the other objects stay."""
    objects, direction = list(prompt.objects), prompt.direction
    used = [c for c, _ in objects]
    if kind not in SWITCH_KINDS:
        raise ValueError(f"unknown switch kind {kind!r}; kinds are {list(SWITCH_KINDS)}")
    if kind in ("color", "both"):
        j = 0 if len(objects) == 1 else int(rng.integers(len(objects)))
        objects[j] = (str(rng.choice([c for c in COLORS if c not in used])), objects[j][1])
    if kind in ("direction", "both"):
        direction = str(rng.choice([d for d in DIRECTIONS if d != direction]))
    if kind == "object":
        if len(objects) >= max_objects:
            raise ValueError(f"switch kind 'object' cannot add to {len(objects)} objects (max_objects {max_objects})")
        objects.append((str(rng.choice([c for c in COLORS if c not in used])), SHAPES[rng.integers(len(SHAPES))]))
    return PromptSpec(tuple(objects), direction)


def block_frame(block: int, cfg: "ShapesConfig") -> int:
    """First video frame of a latent block (the live stream's alignment: engine.live.block_start_frame)."""
    from ..live import block_start_frame

    return block_start_frame(block, cfg.frames_per_block, TEMPORAL)


def switch_blocks(cfg: "ShapesConfig") -> list[int]:
    """Blocks a clip can switch at: at least MIN_SEGMENT_FRAMES frames before and after the block's first frame."""
    return _switch_blocks(cfg.num_frames, cfg.frames_per_block)


def _switch_blocks(num_frames: int, frames_per_block: int) -> list[int]:
    from ..live import block_start_frame

    starts = [block_start_frame(b, frames_per_block, TEMPORAL) for b in range(1, num_frames)]
    return [b for b, s in enumerate(starts, 1) if MIN_SEGMENT_FRAMES <= s <= num_frames - MIN_SEGMENT_FRAMES]


@dataclass(frozen=True)
class SwitchSpec:
    """A clip whose prompt switches: the timeline, the objects (in prompt order; object k first shown at frame
    appear[k], where its centre is (x, y)), the speed (px per frame) shared by all objects, the background."""

    timeline: tuple[tuple[int, PromptSpec], ...]   # (block, prompt), block 0 first
    objects: tuple[ShapeObject, ...]
    appear: tuple[int, ...]
    speed: float
    background: Background


def _unit_path(timeline, cfg: "ShapesConfig") -> np.ndarray:
    """(F, 2) displacement at unit speed from frame 0: frame t's step goes along the direction of the prompt in
    force at frame t (a new direction moves the object from the switch frame on)."""
    v = np.zeros((cfg.num_frames, 2))
    for b, prompt in timeline:
        ux, uy = DIRECTION_VECTORS[prompt.direction]
        v[block_frame(b, cfg):] = (ux / math.hypot(ux, uy), uy / math.hypot(ux, uy))
    return np.concatenate([np.zeros((1, 2)), np.cumsum(v[:-1], 0)])             # (F, 2)


def free_until(timeline, cfg: "ShapesConfig") -> int:
    """Last frame of the wall-free path: the end of the free part of the last prompt's segment (its first half, at
    most cfg.free_frames frames: a long clip bounces after that, as a stream does)."""
    s = block_frame(timeline[-1][0], cfg)
    return s + min(cfg.free_frames, default_free_frames(cfg.num_frames - s))


def _num_objects(rng: np.random.Generator, cfg: "ShapesConfig", top: int) -> int:
    """How many objects a random clip gets: min_objects..top, uniform or by cfg.objects_p (renormalised over that
    range)."""
    if cfg.objects_p is None:
        return int(rng.integers(cfg.min_objects, top + 1))
    p = np.asarray(cfg.objects_p[: top - cfg.min_objects + 1], dtype=np.float64)
    if p.sum() <= 0:
        raise ValueError(f"objects_p {list(cfg.objects_p)} gives no weight to {cfg.min_objects}..{top} objects")
    return cfg.min_objects + int(rng.choice(len(p), p=p / p.sum()))


def sample_switch_spec(rng_or_seed, cfg: "ShapesConfig", first: PromptSpec | str | None = None,
                       kind: str | None = None, block: int | None = None) -> SwitchSpec:
    """A random clip with one prompt switch; `first`, `kind`, `block` fix those parts (the rest random)."""
    rng = _rng(rng_or_seed)
    kind = cfg.switch_kinds[rng.integers(len(cfg.switch_kinds))] if kind is None else kind
    if isinstance(first, str):
        first = parse_prompt(first, max_objects=None)
    if first is None:
        n = _num_objects(rng, cfg, cfg.max_objects - (kind == "object"))
        colors = rng.choice(list(COLORS), size=n, replace=False)
        first = PromptSpec(tuple((str(c), SHAPES[rng.integers(len(SHAPES))]) for c in colors),
                           DIRECTIONS[rng.integers(len(DIRECTIONS))])
    blocks = switch_blocks(cfg)
    block = int(rng.choice(blocks)) if block is None else block
    if block not in blocks:
        raise ValueError(f"block {block} cannot hold a switch in a {cfg.num_frames}-frame clip; blocks: {blocks}")
    timeline = ((0, first), (block, next_prompt(first, kind, rng, cfg.max_objects)))
    last = timeline[-1][1].objects
    kinds = [first.objects[k] if k < len(first.objects) else last[k] for k in range(len(last))]
    appear = tuple(0 if k < len(first.objects) else block_frame(block, cfg) for k in range(len(last)))
    path, end = _unit_path(timeline, cfg), free_until(timeline, cfg)
    speed = rng.uniform(*cfg.speed_range) * cfg.scale
    objects = _place(rng, cfg, kinds, appear, path, end, speed)
    if objects is None:
        raise RuntimeError(f"could not place {len(kinds)} objects in a {cfg.height}x{cfg.width} frame; use fewer objects, "
                           f"a larger frame or smaller size_range")
    objects, speed = objects
    return SwitchSpec(timeline, objects, appear, speed, sample_background(rng, cfg))


def _place(rng, cfg, kinds, appear, path, end, speed):
    """Objects whose paths stay inside the frame from their first frame to `end` and keep >= 2 px apart;
    (objects, speed) or None. Colours are those of the first prompt naming each object."""
    lengths = np.array([cfg.width, cfg.height], np.float64)
    shrink, gap = 1.0, 2.0
    for attempt in range(400):
        if attempt and attempt % 50 == 0:
            shrink *= 0.9
        sizes = [rng.uniform(*cfg.size_range) * cfg.scale * shrink for _ in kinds]
        spans = [(path[a:end + 1] - path[a]).min(0) for a in appear], [(path[a:end + 1] - path[a]).max(0) for a in appear]
        reach = np.max([hi - lo for lo, hi in zip(*spans)], 0)                      # (2,) unit-speed extent, px
        # slow down a clip whose path would not fit (leaving each further object a fair chance of a place apart
        # from the others): the caption must hold wherever it is judged
        room = lengths - 2 * max(sizes) - (len(sizes) - 1) * (2 * max(sizes) + gap)  # (2,) px
        v = float(min(speed, 0.999 * (room / np.maximum(reach, 1e-9)).min()))
        if v < MIN_SPEED_FRACTION * cfg.speed_range[0] * cfg.scale:
            continue  # too slow to read a direction from: try again (objects shrink every 50 attempts)
        objects, at = [], []
        for k, (color, shape) in enumerate(kinds):
            r, lo, hi = sizes[k], spans[0][k] * v, spans[1][k] * v
            x, y = (rng.uniform(r - lo[i], lengths[i] - r - hi[i]) for i in range(2))
            p0 = np.array([x, y]) - v * path[appear[k]]                               # where it would be at frame 0
            if any(np.abs(p0 - q).max() < r + o.size + gap for o, q in zip(objects, at)):
                break
            ux, uy = path[min(appear[k] + 1, len(path) - 1)] - path[appear[k]]
            objects.append(ShapeObject(color, shape, float(r), float(x), float(y), float(v * ux), float(v * uy)))
            at.append(p0)
        if len(objects) == len(kinds):
            return tuple(objects), float(v)
    return None


def timeline_of(spec: "VideoSpec | SwitchSpec") -> list[tuple[int, str]]:
    """[(block, prompt), ...]: the live stream's timeline of a clip (one entry without a switch)."""
    if isinstance(spec, SwitchSpec):
        return [(b, str(p)) for b, p in spec.timeline]
    return [(0, caption(spec))]


# ----------------------------------------------------------------------------------------------- captions

def tokenize(prompt: str) -> list[str]:
    """Lower-case, whitespace split: the same words a word-level text encoder sees."""
    return prompt.lower().split()


def caption(spec: "VideoSpec | SwitchSpec") -> str:
    """The prompt of a clip; of a switch clip, its first prompt."""
    if isinstance(spec, SwitchSpec):
        return str(spec.timeline[0][1])
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
        n = _num_objects(rng, cfg, cfg.max_objects)
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


def switch_tracks(spec: SwitchSpec, cfg: ShapesConfig):
    """Per object of a switch clip: centre x, y (F,) with bounces, colour (F, 1, 1, 3), shown (F, 1, 1, 1)."""
    F = cfg.num_frames
    path = _unit_path(spec.timeline, cfg) * spec.speed                           # (F, 2) px
    starts = [block_frame(b, cfg) for b, _ in spec.timeline] + [F]
    out = []
    for k, (obj, a) in enumerate(zip(spec.objects, spec.appear)):
        x = reflect(obj.x + path[:, 0] - path[a, 0], obj.size, cfg.width - obj.size)
        y = reflect(obj.y + path[:, 1] - path[a, 1], obj.size, cfg.height - obj.size)
        color = np.zeros((F, 1, 1, 3), np.float32)
        shown = np.zeros((F, 1, 1, 1), np.float32)
        for j, (_, prompt) in enumerate(spec.timeline):
            if k < len(prompt.objects):
                color[starts[j]:starts[j + 1]] = COLORS[prompt.objects[k][0]]
                shown[starts[j]:starts[j + 1]] = 1.0
        out.append((obj, x, y, color, shown))
    return out


def render(spec: "VideoSpec | SwitchSpec", cfg: ShapesConfig) -> np.ndarray:
    """uint8 frames (F, H, W, 3)."""
    F, H, W = cfg.num_frames, cfg.height, cfg.width
    video = np.repeat(render_background(spec.background, cfg)[None], F, axis=0)  # (F, H, W, 3)
    ys = np.arange(H, dtype=np.float32) + 0.5
    xs = np.arange(W, dtype=np.float32) + 0.5
    if isinstance(spec, SwitchSpec):
        tracks = switch_tracks(spec, cfg)
    else:
        tracks = [(o, *trajectory(o, cfg), np.array(COLORS[o.color], np.float32), None) for o in spec.objects]
    for obj, cx, cy, color, shown in tracks:
        dx = xs[None, None, :] - cx.astype(np.float32)[:, None, None]           # (F, 1, W)
        dy = ys[None, :, None] - cy.astype(np.float32)[:, None, None]           # (F, H, 1)
        dx, dy = np.broadcast_arrays(dx, dy)                                     # (F, H, W)
        alpha = np.clip(0.5 - _signed_distance(obj.shape, dx, dy, obj.size), 0, 1)[..., None]  # (F, H, W, 1)
        if shown is not None:  # an object not yet on screen draws nothing
            alpha = alpha * shown
        video = video * (1 - alpha) + color * alpha
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

    Returns dict(video=float32 (3, F, H, W) in [-1, 1], caption=str (the first prompt), timeline=[(block,
    prompt), ...]). With cfg.switch_prob > 0 a clip switches its prompt with that probability (decided from
    (seed, i) on a stream of its own, so a clip without a switch is the clip of switch_prob 0).
    """

    def __init__(self, cfg: ShapesConfig | None = None, seed: int = 0, length: int = 100_000):
        self.cfg, self.seed, self.length = cfg or ShapesConfig(), seed, length

    def __len__(self) -> int:
        return self.length

    def spec(self, i: int) -> VideoSpec | SwitchSpec:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of length {self.length}")
        if self.cfg.switch_prob > 0:
            rng = np.random.default_rng([self.seed, i, SWITCH_STREAM])
            if rng.random() < self.cfg.switch_prob:
                return sample_switch_spec(rng, self.cfg)
        return sample_spec(np.random.default_rng([self.seed, i]), self.cfg)

    def __getitem__(self, i: int) -> dict:
        spec = self.spec(int(i))
        return {"video": frames_to_tensor(render(spec, self.cfg)), "caption": caption(spec),
                "timeline": timeline_of(spec)}
