"""Attack objectives: what a noise attack optimises, and in which direction.

An objective maps the decoded video (T, H, W, 3) in [0, 1] and/or the latents (B, C, F, h, w) to a scalar
``value`` and says whether that value is to be maximised. The optimisation loop never flips signs by hand:

    value = objective(video=video, latents=latents)    # pass video=None when not objective.needs_pixels
    objective.loss(value).backward()                   # loss = -value if objective.maximize else value

Before any work the loop calls ``objective.check(video_shape=..., latent_shape=...)``; shape and frame-range
errors are raised there (and again, cheaply, on every call).

Regions. ``frames`` (a ``slice`` or ``(start, stop)``, Python semantics, negative indices from the end) selects
frames along the frame axis: video frames T (dim -4 of (..., T, H, W, 3)) in pixel space, latent frames F
(dim -3 of (B, C, F, h, w)) in latent space. ``mask`` weights positions: (H, W) or (T, H, W) in pixel space,
(h, w) or (F, h, w) in latent space, bool or float >= 0; it is broadcast over channels (and batch). The MSE is
then ``sum(mask * (x - y)^2) / sum(mask)`` over the selected frames (the sum taken over broadcast elements).

Frame-carrying tensors (a target or a (T, H, W) mask) may have the video's frame count (they are sliced with
``frames``), the number of selected frames (used as is) or 1 (broadcast); after that they must broadcast to the
selected part of the video / latents.
"""

from __future__ import annotations

from typing import Callable

import torch

SPACES = ("pixel", "latent")


def _compute(x: torch.Tensor) -> torch.Tensor:
    """At least float32 for the arithmetic (float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def _as_slice(frames) -> slice:
    if frames is None:
        return slice(None)
    if isinstance(frames, slice):
        sl = frames
    elif isinstance(frames, (tuple, list)) and len(frames) == 2:
        sl = slice(*frames)
    else:
        raise ValueError(f"frames must be None, a slice or (start, stop), got {frames!r}")
    for v in (sl.start, sl.stop):
        if v is not None and not isinstance(v, int):
            raise ValueError(f"frame indices must be ints or None, got {frames!r}")
    if sl.step is not None and (not isinstance(sl.step, int) or sl.step < 1):
        raise ValueError(f"frame step must be a positive int, got {sl.step!r}")
    return sl


class Objective:
    """Base class. Subclasses set ``name``, ``maximize`` and ``space``, and implement ``__call__``."""

    name: str = "objective"
    maximize: bool = False
    space: str = "pixel"  # "pixel": uses the decoded video; "latent": uses the latents only

    @property
    def needs_pixels(self) -> bool:
        """True if the objective reads the decoded video; False lets the loop skip decoding."""
        return self.space == "pixel"

    def loss(self, value: torch.Tensor) -> torch.Tensor:
        """The quantity to minimise: ``-value`` if ``maximize`` else ``value``."""
        return -value if self.maximize else value

    def check(self, video_shape=None, latent_shape=None) -> None:
        """Raise ValueError if the objective cannot work on data of these shapes (None: not known yet)."""

    def __call__(self, video: torch.Tensor | None = None, latents: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _input(self, video, latents) -> torch.Tensor:
        x = video if self.needs_pixels else latents
        if x is None:
            what = "the decoded video (needs_pixels=True)" if self.needs_pixels else "the latents (space='latent')"
            raise ValueError(f"objective {self.name!r} works on {what}; it was not given")
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, maximize={self.maximize}, space={self.space!r})"


class _RegionMSE(Objective):
    """Shared machinery: weighted MSE over a frame range and a spatial mask, in pixel or latent space."""

    def __init__(self, space: str = "pixel", frames=None, mask=None):
        if space not in SPACES:
            raise ValueError(f"unknown space {space!r}; accepted: {', '.join(map(repr, SPACES))}")
        self.space = space
        self.frames = _as_slice(frames)
        self.mask = None
        if mask is not None:
            mask = torch.as_tensor(mask).detach()
            if mask.ndim not in (2, 3):
                raise ValueError(f"mask must be (H, W) or (T, H, W), got shape {tuple(mask.shape)}")
            mask = mask.double()
            if not torch.isfinite(mask).all() or (mask < 0).any():
                raise ValueError("mask values must be finite and >= 0")
            # Pixel space is channels-last: give the mask a trailing channel axis so it aligns with (T, H, W, 3).
            self.mask = mask[..., None] if space == "pixel" else mask

    @property
    def _fdim(self) -> int:
        """Frame axis counted from the end: (..., T, H, W, 3) -> -4; (B, C, F, h, w) -> -3."""
        return -4 if self.space == "pixel" else -3

    def _shape(self, video_shape, latent_shape):
        shape = video_shape if self.space == "pixel" else latent_shape
        return None if shape is None else tuple(shape)

    def _range(self, shape: tuple) -> range:
        """The selected frame indices of data with this shape; ValueError if out of bounds."""
        if len(shape) < -self._fdim:
            layout = "(T, H, W, 3)" if self.space == "pixel" else "(B, C, F, h, w)"
            raise ValueError(f"{self.space} data must be {layout}, got shape {shape}")
        n = shape[self._fdim]
        sl = self.frames
        start = 0 if sl.start is None else sl.start + (n if sl.start < 0 else 0)
        stop = n if sl.stop is None else sl.stop + (n if sl.stop < 0 else 0)
        if not 0 <= start < stop <= n:
            raise ValueError(f"frame range {sl.start}:{sl.stop} is out of bounds for {n} frames: need "
                             f"0 <= start < stop <= {n} (negative indices count from the end, -{n} at most)")
        return range(start, stop, sl.step or 1)

    def _take(self, t: torch.Tensor, rng: range) -> torch.Tensor:
        index = (Ellipsis, slice(rng.start, rng.stop, rng.step)) + (slice(None),) * (-self._fdim - 1)
        return t[index]

    def _fit(self, t: torch.Tensor, shape: tuple, what: str) -> torch.Tensor:
        """Slice a frame-carrying tensor with the selection and check it broadcasts to the selected data."""
        rng = self._range(shape)
        n, selected = shape[self._fdim], list(shape)
        selected[self._fdim] = len(rng)
        if t.ndim >= -self._fdim and t.shape[self._fdim] == n and len(rng) != n:
            t = self._take(t, rng)
        try:
            ok = torch.broadcast_shapes(t.shape, tuple(selected)) == tuple(selected)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{what} of shape {tuple(t.shape)} does not fit {self.space} data of shape {shape} "
                             f"(frames {rng.start}:{rng.stop}:{rng.step} selected -> {tuple(selected)}); its frame "
                             f"count must be {n}, {len(rng)} or 1 and the other dims must broadcast")
        return t

    def _check_region(self, shape: tuple) -> None:
        self._range(shape)
        if self.mask is not None:
            w = self._fit(self.mask, shape, "mask")
            if w.sum() <= 0:
                raise ValueError("mask selects no element in the selected frames (all weights are 0)")

    def _mse(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Weighted MSE between the selected part of ``x`` and ``y`` (full-length or already fitted)."""
        shape = tuple(x.shape)
        rng = self._range(shape)
        x = _compute(self._take(x, rng))
        y = self._fit(y, shape, "reference").to(x)
        sq = (x - y).pow(2)
        if self.mask is None:
            return sq.mean()
        w = self._fit(self.mask, shape, "mask").to(x).expand(sq.shape)
        return (sq * w).sum() / w.sum()


class Untargeted(_RegionMSE):
    """Push the output away from the baseline of the same seed: maximise MSE(output, baseline) over the region.

    The loop generates the baseline first and calls ``set_baseline(video, latents)``; or pass it here. The
    gradient is exactly 0 at the baseline itself, so start the attack from ``Budget.random_start``.
    """

    name = "untargeted"
    maximize = True

    def __init__(self, baseline_video=None, baseline_latents=None, space: str = "pixel", frames=None, mask=None):
        super().__init__(space, frames, mask)
        self.baseline_video = self.baseline_latents = None
        self.set_baseline(baseline_video, baseline_latents)

    def set_baseline(self, video: torch.Tensor | None = None, latents: torch.Tensor | None = None) -> None:
        """Store (detached copies of) the unattacked output; only the one of this objective's space is needed."""
        self.baseline_video = None if video is None else video.detach().clone()
        self.baseline_latents = None if latents is None else latents.detach().clone()

    @property
    def baseline(self) -> torch.Tensor | None:
        return self.baseline_video if self.space == "pixel" else self.baseline_latents

    def check(self, video_shape=None, latent_shape=None) -> None:
        shape = self._shape(video_shape, latent_shape)
        if shape is None:
            return
        self._check_region(shape)
        if self.baseline is not None and tuple(self.baseline.shape) != shape:
            raise ValueError(f"baseline {self.space} shape {tuple(self.baseline.shape)} differs from the "
                             f"{self.space} shape {shape} (the baseline must come from the same configuration)")

    def __call__(self, video=None, latents=None) -> torch.Tensor:
        x = self._input(video, latents)
        if self.baseline is None:
            raise RuntimeError(f"untargeted objective has no {self.space} baseline: call set_baseline() first")
        self.check(**{("video_shape" if self.space == "pixel" else "latent_shape"): x.shape})
        return self._mse(x, self.baseline)


class Targeted(_RegionMSE):
    """Pull the output toward a target: minimise MSE(output, target) over the region.

    target: pixel space, a video (T, H, W, 3) or an image (H, W, 3) broadcast over frames (any tensor that
        broadcasts, e.g. a colour (3,), works too); latent space, latents (B, C, F, h, w) or (C, F, h, w).
        Its frame count may be the video's (sliced with ``frames``), the selection's, or 1.
    """

    name = "targeted"
    maximize = False

    def __init__(self, target: torch.Tensor, space: str = "pixel", frames=None, mask=None):
        super().__init__(space, frames, mask)
        if target is None:
            raise ValueError("targeted objective needs a target")
        self.target = torch.as_tensor(target).detach().clone()

    def check(self, video_shape=None, latent_shape=None) -> None:
        shape = self._shape(video_shape, latent_shape)
        if shape is None:
            return
        self._check_region(shape)
        self._fit(self.target, shape, "target")

    def __call__(self, video=None, latents=None) -> torch.Tensor:
        x = self._input(video, latents)
        self.check(**{("video_shape" if self.space == "pixel" else "latent_shape"): x.shape})
        return self._mse(x, self.target)


class CallableObjective(Objective):
    """Any user function ``fn(video) -> scalar tensor`` (or ``fn(latents)`` with ``needs_pixels=False``)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], maximize: bool, needs_pixels: bool = True,
                 name: str | None = None):
        if not callable(fn):
            raise ValueError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.maximize = bool(maximize)
        self.space = "pixel" if needs_pixels else "latent"
        self.name = name or getattr(fn, "__name__", "callable")

    def __call__(self, video=None, latents=None) -> torch.Tensor:
        value = self.fn(self._input(video, latents))
        if not torch.is_tensor(value) or value.numel() != 1:
            got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"objective {self.name!r} must return a scalar tensor, got {got}")
        return value.reshape(())


OBJECTIVES = {"untargeted": Untargeted, "targeted": Targeted}


def make_objective(name: str, **kwargs) -> Objective:
    """Build a named objective: ``make_objective("targeted", target=img, frames=(0, 4))``."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; accepted: {', '.join(map(repr, OBJECTIVES))}")
    return OBJECTIVES[name](**kwargs)
