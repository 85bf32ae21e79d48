"""Training data: deterministic, resumable, rank-sharded batches of latents and prompt embeddings.

A *source* is an indexable collection of items; an item is a dict with `latents` (C, F, h, w) in the
transformer's normalised latent space (optional) and either `prompt_embeds` (L, D) or (F, L, D), or a `caption`
(encoded by the frozen text encoder, with a per-caption cache) and optionally `frame_prompts` (one caption per
latent frame: a clip whose prompt switches, its timeline as the conditioning). A batch of such items carries
per-frame prompt embeddings (B, F, L, D), which the transformer's cross-attention reads frame by frame. Sources:

    SyntheticSource     random latents and embeddings (tests, benchmarks)
    ShapesSource        engine.data.shapes videos, VAE-encoded on the fly (captions only when no latents needed)
    LatentDirSource     a directory of cached latents + prompt embeddings (format below)
    PromptFileSource    a text file, one prompt per line

`TrainData.batch(k)` returns micro-batch number k of this process. It is a pure function of (seed, k, rank):
global sample s = (k * world + rank) * batch_size + j goes to dataset index perm_e[s mod N], with perm_e a
seeded permutation for epoch e = s // N. The trainer stores k in its checkpoint, so a resumed run sees exactly
the batches an uninterrupted run would have seen, on any number of workers of the same world size.

Latent directory format (`write_latent_dir`, `LatentDirSource`):

    meta.json                 {"format": "engine-latents/1", "num_samples": N, "latent_shape": [C, F, h, w] | null,
                               "embed_shape": [L, D], "source": {...}}
    shard-*.safetensors       indices (n,) int64, prompt_embeds (n, L, D) or (n, F, L, D) per latent frame,
                              [latents (n, C, F, h, w)];
                              metadata {"captions": JSON list of n strings}

meta.json is written last: a directory without it is incomplete (an interrupted cache) and is rebuilt.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..atomic import save_safetensors

from engine.models.text import check_prompts, encode_prompts
from engine.sampling.codec import normalize_latents

LATENT_FORMAT = "engine-latents/1"


def seeded(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of non-negative ints (numpy SeedSequence: well mixed, no collisions)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator("cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class Batch:
    """One micro-batch. prompt_embeds (B, L, D) float32, or (B, F, L, D) per latent frame; latents (B, C, F, h, w) float32 or None; extra: any
    other tensors of the source's items, stacked (e.g. ODE trajectories)."""

    prompt_embeds: torch.Tensor
    latents: torch.Tensor | None
    captions: list[str] | None
    indices: list[int]
    extra: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.prompt_embeds.shape[0]


class PromptEncoder:
    """The frozen text encoder with a cache per caption (small vocabularies repeat captions constantly)."""

    def __init__(self, text_encoder, tokenizer, max_length: int, device, max_cached: int = 4096):
        self.text_encoder, self.tokenizer, self.max_length = text_encoder, tokenizer, max_length
        self.device, self.max_cached = device, max_cached
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def available(self) -> bool:
        return self.text_encoder is not None and self.tokenizer is not None

    def check(self, captions: list[str]) -> None:
        """Raise early (ValueError) for prompts the model cannot encode."""
        if not self.available:
            raise ValueError("captions need a text encoder and tokenizer in the base engine directory "
                             "(models.base); or use data with cached prompt embeddings")
        check_prompts(self.tokenizer, list(captions))

    def __call__(self, captions: list[str]) -> torch.Tensor:
        """captions -> (B, L, D) float32 on the CPU."""
        if not self.available:
            self.check(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            emb = encode_prompts(self.text_encoder, self.tokenizer, missing, max_length=self.max_length,
                                 device=self.device).float().cpu()  # (n, L, D)
            for c, e in zip(missing, emb):
                self._cache[c] = e
                while len(self._cache) > self.max_cached:
                    self._cache.popitem(last=False)
        return torch.stack([self._cache[c] for c in captions])


# ---------------------------------------------------------------------------------------------------- sources


class SyntheticSource:
    """Random latents (C, F, h, w) and embeddings (L, D), a pure function of (seed, index)."""

    def __init__(self, num_samples: int, latent_shape, embed_shape, seed: int = 0):
        self.n, self.seed = num_samples, seed
        self.latent_shape, self.embed_shape = tuple(latent_shape), tuple(embed_shape)

    def __len__(self) -> int:
        return self.n

    def get(self, i: int, need_latents: bool) -> dict:
        g = seeded(self.seed, i)
        emb = torch.randn(self.embed_shape, generator=g)
        item = {"prompt_embeds": emb}
        if need_latents:
            item["latents"] = torch.randn(self.latent_shape, generator=g)
        return item


class ShapesSource:
    """engine.data.shapes clips; latents by VAE encoding (the posterior mode, normalised), captions as text.

    With switch clips (shapes switch_prob > 0) every item also has `frame_prompts`, the prompt of each latent
    frame (frame f lies in block f // frames_per_block), so that all batches have one form: the clip's timeline,
    which the dmd rollout switches on (ode-init reads its first prompt, `first_prompt`). Without latents no video
    is rendered: the timeline comes from the clip's description.
    """

    def __init__(self, shapes_cfg, seed: int, num_samples: int, vae=None):
        from engine.data.shapes import ShapesDataset

        self.dataset = ShapesDataset(shapes_cfg, seed=seed, length=num_samples)
        self.vae = vae
        self.per_frame = shapes_cfg.switch_prob > 0

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, i: int, need_latents: bool) -> dict:
        from engine.data.shapes import caption

        if not need_latents:  # captions need no rendering
            spec = self.dataset.spec(i)
            out = {"caption": caption(spec)}
            if self.per_frame:
                from engine.data.shapes import TEMPORAL, timeline_of

                cfg = self.dataset.cfg
                out["frame_prompts"] = frame_prompts(timeline_of(spec), (cfg.num_frames - 1) // TEMPORAL + 1,
                                                     cfg.frames_per_block)
            return out
        item = self.dataset[i]
        out = {"caption": item["caption"], "latents": encode_video(self.vae, item["video"][None])[0]}
        if self.per_frame:
            out["frame_prompts"] = frame_prompts(item["timeline"], out["latents"].shape[1],
                                                 self.dataset.cfg.frames_per_block)
        return out


def frame_prompts(timeline, num_frames: int, frames_per_block: int) -> list[str]:
    """The prompt in force at each of num_frames latent frames under a timeline [(block, prompt), ...]."""
    from engine.live import check_timeline

    timeline = check_timeline(timeline)
    return [next(p for b, p in reversed(timeline) if b * frames_per_block <= f) for f in range(num_frames)]


def first_prompt(prompt_embeds: torch.Tensor) -> torch.Tensor:
    """(B, L, D) as is; a timeline (B, F, L, D) -> the prompt of its first frame (B, L, D)."""
    return prompt_embeds[:, 0] if prompt_embeds.ndim == 4 else prompt_embeds


def embed_items(items: list[dict], prompts: "PromptEncoder") -> torch.Tensor:
    """Prompt embeddings of items: (B, L, D), or (B, F, L, D) when the items carry per-frame prompts."""
    if all("prompt_embeds" in it for it in items):
        return torch.stack([it["prompt_embeds"] for it in items])
    if "frame_prompts" in items[0]:
        flat = [c for it in items for c in it["frame_prompts"]]
        return prompts(flat).unflatten(0, (len(items), -1))  # (B * F, L, D) -> (B, F, L, D)
    return prompts([it["caption"] for it in items])


@torch.no_grad()
def encode_video(vae, video: torch.Tensor) -> torch.Tensor:
    """video (B, 3, T, H, W) in [-1, 1] -> normalised latents (B, C, F, h, w) float32 (posterior mode)."""
    if vae is None:
        raise ValueError("encoding videos needs a VAE in the base engine directory (models.base)")
    dev = next(vae.parameters()).device
    z = vae.encode(video.to(dev, vae.dtype)).latent_dist.mode()
    return normalize_latents(vae, z).float().cpu()


class PromptFileSource:
    """A text file, one prompt per line (blank lines and lines starting with # are skipped)."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} (data.path) does not exist")
        self.prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        if not self.prompts:
            raise ValueError(f"prompt file {path} holds no prompts")

    def __len__(self) -> int:
        return len(self.prompts)

    def get(self, i: int, need_latents: bool) -> dict:
        if need_latents:
            raise ValueError("data.source 'prompts' has no latents; the teacher stage needs shapes, latents or "
                             "synthetic data")
        return {"caption": self.prompts[i]}


class LatentDirSource:
    """A directory of cached latents and prompt embeddings (see the module docstring for the format)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a latent directory (no meta.json); write one with "
                                    f"engine.training.data.write_latent_dir or data.source: shapes with data.path")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != LATENT_FORMAT:
            raise ValueError(f"{meta_path}: format {self.meta.get('format')!r}, expected {LATENT_FORMAT!r}")
        self._files = {}
        self._where: dict[int, tuple[Path, int]] = {}
        self._captions: dict[int, str] = {}
        for shard in sorted(self.path.glob("shard-*.safetensors")):
            f = safe_open(str(shard), "pt")
            self._files[shard] = f
            caps = json.loads((f.metadata() or {}).get("captions", "null") or "null")
            for row, idx in enumerate(f.get_tensor("indices").tolist()):
                self._where[idx] = (shard, row)
                if caps is not None:
                    self._captions[idx] = caps[row]
        n = self.meta["num_samples"]
        if sorted(self._where) != list(range(n)):
            raise ValueError(f"latent directory {self.path}: meta.json promises {n} samples, the shards hold "
                             f"{len(self._where)} (indices must be 0..{n - 1})")

    @property
    def latent_shape(self) -> tuple | None:
        s = self.meta.get("latent_shape")
        return tuple(s) if s is not None else None

    @property
    def embed_shape(self) -> tuple:
        return tuple(self.meta["embed_shape"])

    def __len__(self) -> int:
        return self.meta["num_samples"]

    def get(self, i: int, need_latents: bool) -> dict:
        shard, row = self._where[i]
        f = self._files[shard]
        item = {"prompt_embeds": f.get_slice("prompt_embeds")[row : row + 1][0].float()}
        if need_latents:
            if self.latent_shape is None:
                raise ValueError(f"latent directory {self.path} holds prompt embeddings only; the teacher needs "
                                 f"latents")
            item["latents"] = f.get_slice("latents")[row : row + 1][0].float()
        if i in self._captions:
            item["caption_text"] = self._captions[i]
        return item


def write_latent_shard(path: str | os.PathLike, indices, prompt_embeds: torch.Tensor,
                       latents: torch.Tensor | None = None, captions: list[str] | None = None) -> None:
    """One shard file, written atomically. prompt_embeds (n, L, D) or (n, F, L, D), latents (n, C, F, h, w)."""
    path = Path(path)
    tensors = {"indices": torch.as_tensor(list(indices), dtype=torch.int64),
               "prompt_embeds": prompt_embeds.detach().cpu().contiguous()}
    if latents is not None:
        if latents.shape[0] != prompt_embeds.shape[0]:
            raise ValueError(f"{latents.shape[0]} latents for {prompt_embeds.shape[0]} prompt embeddings")
        tensors["latents"] = latents.detach().cpu().contiguous()
    meta = {"captions": json.dumps(list(captions))} if captions is not None else {}
    save_safetensors(tensors, path, metadata=meta)


def write_latent_meta(directory: str | os.PathLike, num_samples: int, latent_shape, embed_shape,
                      source: dict | None = None) -> None:
    """meta.json, written last (atomically): it marks the directory complete."""
    meta = {"format": LATENT_FORMAT, "num_samples": int(num_samples),
            "latent_shape": list(latent_shape) if latent_shape is not None else None,
            "embed_shape": list(embed_shape), "source": source or {}}
    tmp = Path(directory) / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, Path(directory) / "meta.json")


def write_latent_dir(directory: str | os.PathLike, prompt_embeds: torch.Tensor, latents: torch.Tensor | None = None,
                     captions: list[str] | None = None, source: dict | None = None) -> Path:
    """Write a whole (single-shard) latent directory: the format `data.source: latents` reads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n = prompt_embeds.shape[0]
    write_latent_shard(directory / "shard-00000.safetensors", range(n), prompt_embeds, latents, captions)
    write_latent_meta(directory, n, None if latents is None else latents.shape[1:], prompt_embeds.shape[1:], source)
    return directory


def build_latent_cache(directory: str | os.PathLike, source: ShapesSource, prompts: PromptEncoder, *,
                       rank: int, world: int, barrier, is_main: bool, description: dict) -> LatentDirSource:
    """Encode every item of `source` once into `directory` (items i = rank mod world on each process).

    A complete directory made for the same `description` is reused; a different description is an error.
    """
    directory = Path(directory)
    meta = directory / "meta.json"
    if meta.is_file():
        found = json.loads(meta.read_text()).get("source")
        if found != description:
            raise ValueError(f"latent cache {directory} was made for other settings:\n  found    {found}\n  wanted   "
                             f"{description}\ndelete it or set data.path to another directory")
        return LatentDirSource(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if is_main:  # leftovers of an interrupted build (maybe with another world size)
        for stale in directory.glob("shard-*.safetensors"):
            stale.unlink()
    barrier()
    mine = list(range(rank, len(source), world))
    chunk = 16
    for c in range(0, len(mine), chunk):
        idx = mine[c : c + chunk]
        items = [source.get(i, need_latents=True) for i in idx]
        caps = [it["caption"] for it in items]
        shard = directory / f"shard-r{rank:04d}-{c // chunk:06d}.safetensors"
        write_latent_shard(shard, idx, embed_items(items, prompts), torch.stack([it["latents"] for it in items]), caps)
    barrier()
    if is_main:  # shapes from any one shard
        with safe_open(str(sorted(directory.glob("shard-*.safetensors"))[0]), "pt") as f:
            lat, emb = f.get_slice("latents").get_shape(), f.get_slice("prompt_embeds").get_shape()
        write_latent_meta(directory, len(source), lat[1:], emb[1:], description)
    barrier()
    return LatentDirSource(directory)


# ------------------------------------------------------------------------------------------------------ batches


class TrainData:
    """Rank-sharded micro-batches; `batch(k)` is a pure function of (seed, k, rank). See the module docstring."""

    def __init__(self, source, prompts: PromptEncoder, *, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1, need_latents: bool, window: tuple[int, int, int] | None = None):
        if len(source) < 1:
            raise ValueError("the training data is empty")
        self.source, self.prompts = source, prompts
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.need_latents = need_latents
        self.window = window  # (F, k, h): each sample a random window of F latent frames at a block of k frames,
        # behind up to h blocks of its stream (TrainData.cut)
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.source)

    def index(self, sample: int) -> int:
        """Dataset index of global sample number `sample`."""
        n = len(self.source)
        epoch, pos = divmod(sample, n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(n, generator=seeded(self.seed, 0x5EED, epoch)))
        return int(self._perm[1][pos])

    def batch(self, k: int) -> Batch:
        first = (k * self.world + self.rank) * self.batch_size
        indices = [self.index(first + j) for j in range(self.batch_size)]
        items = [self.source.get(i, self.need_latents) for i in indices]
        if self.window:
            items = [self.cut(it, first + j) for j, it in enumerate(items)]
        return self.collate(items, indices)

    def cut(self, item: dict, sample: int) -> dict:
        """A long clip's window of F latent frames from a block boundary b drawn uniformly for this sample number
        (a pure function of (seed, sample), so a resumed run cuts the same windows). With h history blocks the cut
        starts min(b, h) blocks earlier and is F + h k frames long (at the clip's start: its first F + h k frames),
        and `history_frames` says how many frames lie before the window. The latents and the per-frame prompts are
        cut; a caption names the clip's first prompt, so it is kept only for a cut at frame 0 or a clip without a
        timeline."""
        F, k, h = self.window
        n = item["latents"].shape[1]
        if n < F + h * k or (n - F) % k:
            raise ValueError(f"a stream clip of {n} latent frames has no whole windows of {F} frames at blocks of {k} "
                             f"behind {h} blocks")
        b = int(torch.randint((n - F) // k + 1, (), generator=seeded(self.seed, 0x3A1D, sample)))
        s, e = k * max(0, b - h), k * max(b, h) + F  # the cut: history, then the window (longer at the start)
        out = dict(item, latents=item["latents"][:, s:e])
        per_frame = "frame_prompts" in item or item.get("prompt_embeds", torch.empty(0)).ndim == 3
        if "frame_prompts" in item:
            out["frame_prompts"] = item["frame_prompts"][s:e]
        if "prompt_embeds" in item and item["prompt_embeds"].ndim == 3:
            out["prompt_embeds"] = item["prompt_embeds"][s:e]
        if per_frame and s:
            out.pop("caption", None), out.pop("caption_text", None)
        if h:
            out["history_frames"] = torch.tensor(k * min(b, h))
        return out

    def collate(self, items: list[dict], indices: list[int]) -> Batch:
        captions = [it.get("caption", it.get("caption_text")) for it in items]
        emb = embed_items(items, self.prompts)
        latents = torch.stack([it["latents"] for it in items]) if self.need_latents else None
        known = {"prompt_embeds", "latents", "caption", "caption_text", "frame_prompts"}
        extra = {k: torch.stack([it[k] for it in items]) for k in items[0] if k not in known}
        return Batch(emb, latents, captions if all(c is not None for c in captions) else None, indices, extra)
