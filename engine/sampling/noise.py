"""SamplerNoise: every random number the few-step sampler consumes, as explicit tensors.

`z0` is the initial noise of all latent frames (B, C, F, H, W), at sigma = 1. `step[i]` is the noise that
re-noises the x0 prediction of denoising step i to the level of step i + 1 (one tensor per re-noising, same
shape as z0; block b uses its frames of each tensor). Noise is drawn on the CPU and then moved, so the same seed
gives the same video on any device.

One scheme, per latent frame: the noise of latent frame f (its z0 frame, then its step noises, in that order) is
drawn from a CPU generator seeded by `frame_seed(seed, f)` alone. Hence the noise of block b is a function of
`(seed, b)` (and the block size), an endless stream needs no preallocated noise (`frame_noise` draws any frame),
and a finite `SamplerNoise` of N frames is exactly the first N frames of the endless stream with that seed — for
any block size. Saved noise files hold the tensors themselves and reproduce their videos whatever the scheme.

Step-noise modes:
- `independent`: step noises are tensors of their own (leaves an attack may optimise);
- `derived`: step[i] is a fixed, seeded permutation of the elements of z0 — exactly Gaussian marginals, and
  the gradient of anything computed from the step noise flows to z0 alone;
- `frozen`: step noises are fixed from the seed and never learn (only z0 does).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load_file

from ..atomic import save_safetensors

MODES = ("independent", "derived", "frozen")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown step-noise mode {mode!r}; accepted: {', '.join(MODES)}")


def frame_seed(seed: int, frame: int) -> int:
    """The 64-bit generator seed of latent frame `frame` of the stream with `seed` (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence([seed, frame]).generate_state(1, dtype=np.uint64)[0])


def check_seed(seed) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")


def frame_noise(seed: int, frame: int, frame_shape, num_renoise: int, *, mode: str = "independent"):
    """z0 (B, C, 1, H, W) of one latent frame and, unless mode is 'derived', its step noises (each z0's shape).

    mode 'derived' returns the frame's permutations of z0's elements (one of numel(z0) per re-noising) instead.
    """
    _check_mode(mode)
    g = torch.Generator("cpu").manual_seed(frame_seed(seed, frame))
    z0 = torch.randn(tuple(frame_shape), generator=g, dtype=torch.float32)
    if mode == "derived":
        return z0, [torch.randperm(z0.numel(), generator=g) for _ in range(num_renoise)]
    return z0, [torch.randn(tuple(frame_shape), generator=g, dtype=torch.float32) for _ in range(num_renoise)]


def block_noise(seed: int, start: int, stop: int, frame_shape, num_renoise: int, *, device="cpu",
                dtype=torch.float32) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """z0 and step noises (B, C, stop - start, H, W) of latent frames [start, stop): what `from_seed(...).block`
    gives, without materialising the frames before `start` (live streams)."""
    frames = [frame_noise(seed, f, frame_shape, num_renoise) for f in range(start, stop)]
    z0 = torch.cat([z for z, _ in frames], dim=2).to(device, dtype)
    steps = [torch.cat([s[i] for _, s in frames], dim=2).to(device, dtype) for i in range(num_renoise)]
    return z0, steps


@dataclass
class SamplerNoise:
    z0: torch.Tensor  # (B, C, F, H, W)
    step_noise: list[torch.Tensor]  # independent / frozen: one (B, C, F, H, W) per re-noising; derived: []
    mode: str = "independent"
    seed: int | None = None
    perms: list[torch.Tensor] | None = None  # derived: one permutation of z0.numel() per re-noising
    prompt: str | None = None  # recorded with saved noise, for reproducibility

    def __post_init__(self):
        _check_mode(self.mode)
        if self.mode == "derived" and (self.perms is None or self.step_noise):
            raise ValueError("derived noise needs perms and no stored step noise")

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_seed(cls, seed: int, shape, num_renoise: int, *, mode: str = "independent", device="cpu",
                  dtype=torch.float32) -> "SamplerNoise":
        """z0 (shape (B, C, F, H, W)) and num_renoise step noises, latent frame by frame (see `frame_noise`).

        'derived': each step noise permutes the elements of z0 within each latent frame (a per-frame permutation,
        so a frame's step noise is still a function of (seed, frame) alone).
        """
        _check_mode(mode)
        check_seed(seed)
        if num_renoise < 0:
            raise ValueError(f"num_renoise must be >= 0, got {num_renoise}")
        shape = tuple(shape)
        if len(shape) != 5:
            raise ValueError(f"noise shape must be (B, C, F, H, W), got {shape}")
        frame_shape = (*shape[:2], 1, *shape[3:])
        frames = [frame_noise(seed, f, frame_shape, num_renoise, mode=mode) for f in range(shape[2])]
        z0 = torch.cat([z for z, _ in frames], dim=2)
        if mode == "derived":
            # frame f's permutation acts on the flat indices of z0[:, :, f] (B, C, H, W order)
            index = torch.arange(z0.numel()).view(shape)
            perms = []
            for i in range(num_renoise):
                perm = torch.empty(z0.numel(), dtype=torch.long)
                for f, (_, p) in enumerate(frames):
                    idx = index[:, :, f].flatten()
                    perm[idx] = idx[p[i]]
                perms.append(perm.to(device))
            return cls(z0.to(device, dtype), [], mode, int(seed), perms)
        steps = [torch.cat([s[i] for _, s in frames], dim=2).to(device, dtype) for i in range(num_renoise)]
        return cls(z0.to(device, dtype), steps, mode, int(seed))

    # -- access ---------------------------------------------------------------------------------------------
    @property
    def num_renoise(self) -> int:
        return len(self.perms) if self.mode == "derived" else len(self.step_noise)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.z0.shape)

    def step(self, i: int) -> torch.Tensor:
        """The re-noising noise after step i, full shape (B, C, F, H, W)."""
        if self.mode == "derived":
            return self.z0.flatten()[self.perms[i]].view_as(self.z0)
        return self.step_noise[i]

    def block(self, start: int, stop: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """z0 and the step noises of latent frames [start, stop)."""
        steps = [self.step(i)[:, :, start:stop] for i in range(self.num_renoise)]
        return self.z0[:, :, start:stop], steps

    def leaves(self, learn=("z0",)) -> list[torch.Tensor]:
        """Make the requested tensors leaves that require grad, and return them (for an optimiser)."""
        learn = tuple(learn)
        bad = set(learn) - {"z0", "step"}
        if bad:
            raise ValueError(f"unknown learnable noise {sorted(bad)}; accepted: 'z0', 'step'")
        if "step" in learn and self.mode != "independent":
            raise ValueError(f"step noise is learnable only in mode 'independent', not {self.mode!r}")
        out = []
        if "z0" in learn:
            self.z0 = self.z0.detach().clone().requires_grad_(True)
            out.append(self.z0)
        if "step" in learn:
            self.step_noise = [s.detach().clone().requires_grad_(True) for s in self.step_noise]
            out += self.step_noise
        return out

    def detach(self) -> "SamplerNoise":
        return SamplerNoise(self.z0.detach().clone(), [s.detach().clone() for s in self.step_noise], self.mode,
                            self.seed, self.perms, self.prompt)

    def to(self, device=None, dtype=None) -> "SamplerNoise":
        perms = None if self.perms is None else [p.to(device) for p in self.perms]
        return SamplerNoise(self.z0.to(device, dtype), [s.to(device, dtype) for s in self.step_noise], self.mode,
                            self.seed, perms, self.prompt)

    # -- persistence ----------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """safetensors file with z0, the step noises (or permutations), seed, mode and prompt; atomic."""
        tensors = {"z0": self.z0.detach().float().cpu().contiguous()}
        for i, s in enumerate(self.step_noise):
            tensors[f"step.{i}"] = s.detach().float().cpu().contiguous()
        for i, p in enumerate(self.perms or []):
            tensors[f"perm.{i}"] = p.cpu().contiguous()
        meta = {"mode": self.mode, "seed": json.dumps(self.seed), "prompt": json.dumps(self.prompt)}
        save_safetensors(tensors, path, metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu", dtype=torch.float32) -> "SamplerNoise":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"noise file {path} does not exist")
        from safetensors import safe_open

        with safe_open(os.fspath(path), "pt") as f:
            meta = f.metadata() or {}
        t = load_file(os.fspath(path))
        n_step = sum(k.startswith("step.") for k in t)
        n_perm = sum(k.startswith("perm.") for k in t)
        steps = [t[f"step.{i}"].to(device, dtype) for i in range(n_step)]
        perms = [t[f"perm.{i}"].to(device) for i in range(n_perm)] if n_perm else None
        return cls(t["z0"].to(device, dtype), steps, meta.get("mode", "independent"),
                   json.loads(meta.get("seed", "null")), perms, json.loads(meta.get("prompt", "null")))
