"""Codebook analysis of a quantized generator: usage, perplexity, dead codes, per-frame code maps.

    stats = codebook_stats(indices, codebook_size)                 # any index tensor
    report = analyze_codebook(engine, prompts=[...], num_frames=21, seed=0)
    report.write(out_dir)                                          # codebook.json + PNG plots

Definitions (over a set of N token codes, counts n_k, p_k = n_k / N):
- usage: fraction of the K codes used at least once;
- perplexity: exp(H(p)), H in nats; K for a uniform use of all codes, 1 for a single code;
- dead codes: K minus the codes used (`dead_codes`); during training the EMA variant (codes whose EMA cluster
  size is below the replacement threshold) is reported by `engine.training.vq`.

The generation pass records the codes of every network call through a small recording wrapper around the
transformer (`return_vq=True`), local to the call: the model keeps no record of its own.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.models.quantized_wan import QuantizedCausalWanTransformer3DModel


def codebook_stats(indices: torch.Tensor | np.ndarray, codebook_size: int) -> dict:
    """Usage, perplexity and dead codes of a set of code indices (any shape).

    Returns {"num_tokens", "codebook_size", "used_codes", "usage", "perplexity", "dead_codes", "entropy",
    "counts" (list of K ints)}.
    """
    idx = torch.as_tensor(indices).reshape(-1).long()
    if idx.numel() == 0:
        raise ValueError("codebook_stats needs at least one index")
    if int(idx.min()) < 0 or int(idx.max()) >= codebook_size:
        raise ValueError(f"indices must lie in [0, {codebook_size}), got [{int(idx.min())}, {int(idx.max())}]")
    counts = torch.bincount(idx, minlength=codebook_size).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    used = int((counts > 0).sum())
    return {"num_tokens": int(idx.numel()), "codebook_size": int(codebook_size), "used_codes": used,
            "usage": used / codebook_size, "perplexity": math.exp(entropy), "dead_codes": codebook_size - used,
            "entropy": entropy, "counts": counts.long().tolist()}


def _summary(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k != "counts"}


class _Recorder:
    """Wraps a quantized transformer for the block sampler: same calls, same outputs, codes recorded."""

    def __init__(self, model: QuantizedCausalWanTransformer3DModel):
        self.model = model
        self.calls: list[dict] = []

    @property
    def dtype(self):
        return self.model.dtype

    def __call__(self, x, t, cond, **kw):
        out = self.model(x, t, cond, return_vq=True, **kw)
        if not kw.get("update_cache", False):  # denoising calls only; the context pass re-reads the clean block
            self.calls.append({"t": float(t.reshape(-1)[0]), "indices": out.vq.indices.detach().cpu(),
                               "commitment": float(out.vq.commitment)})
        return out


@dataclass
class CodebookReport:
    """Result of `analyze_codebook`. code_maps: (P, F, h, w) codes of the final step per latent frame."""

    overall: dict
    per_step: list[dict]
    per_frame: list[dict]
    code_maps: torch.Tensor
    prompts: list[str]
    videos: list[np.ndarray] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"settings": self.settings, "prompts": self.prompts, "overall": self.overall,
                "per_step": self.per_step, "per_frame": self.per_frame,
                "code_maps": self.code_maps.tolist()}

    def write(self, out_dir, *, plots: bool = True, visualize: bool = False) -> dict[str, Path]:
        """codebook.json, and with plots: usage_histogram.png, code_maps.png; with visualize: frames.png."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "codebook.json"}
        paths["json"].write_text(json.dumps(self.to_json(), indent=1))
        if plots:
            paths["histogram"] = plot_usage_histogram(self.overall, out / "usage_histogram.png")
            paths["code_maps"] = plot_code_maps(self.code_maps, self.overall["codebook_size"], out / "code_maps.png",
                                                self.prompts)
        if visualize and self.videos:
            paths["frames"] = frame_grid(self.videos, out / "frames.png", self.prompts)
        return paths


@torch.no_grad()
def analyze_codebook(engine, prompts: list[str] | None = None, *, prompt_embeds: torch.Tensor | None = None,
                     num_frames: int | None = None, seed: int = 0, decode: bool = True) -> CodebookReport:
    """Generate one video per prompt (seed, seed + 1, ...) and collect the codes the quantizer chose.

    overall / per_frame: codes of the final denoising step (what the video is made of); per_step: codes of
    every step of the few-step list.
    """
    from engine.sampling.block_sampler import iter_blocks
    from engine.sampling.codec import StreamingDecoder

    model = engine.transformer
    if not isinstance(model, QuantizedCausalWanTransformer3DModel):
        raise ValueError(f"codebook analysis needs a quantized transformer, this engine has "
                         f"{type(model).__name__}")
    if (prompts is None) == (prompt_embeds is None):
        raise ValueError("pass exactly one of prompts and prompt_embeds")
    n = len(prompts) if prompts is not None else prompt_embeds.shape[0]
    labels = list(prompts) if prompts is not None else [f"embedding {i}" for i in range(n)]
    K = model.codebook_size
    schedule = engine.schedule
    steps = [float(t) for t in schedule.timesteps]
    per_step_idx: list[list[torch.Tensor]] = [[] for _ in steps]

    def step_of(t: float) -> int:  # the recorder sees float32 timesteps
        return min(range(len(steps)), key=lambda i: abs(steps[i] - t))

    maps, videos = [], []
    for i in range(n):
        cond = engine.conditioning(prompts[i] if prompts is not None else None,
                                   prompt_embeds[i:i + 1] if prompt_embeds is not None else None)
        noise = engine.make_noise(num_frames, seed + i)
        rec = _Recorder(model)
        caches = engine._caches(cond, noise.shape, differentiable=False)
        decoder = StreamingDecoder(engine.vae) if decode else None
        frames = []
        for info in iter_blocks(rec, cond, noise, schedule, caches,
                                num_frame_per_block=engine.config.num_frame_per_block):
            if decoder is not None:
                video = decoder.decode(info["x0"]).float()  # (1, 3, T, H, W) in [-1, 1]
                frames.append(((video[0].permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1).mul(255).round()
                              .to(torch.uint8).cpu().numpy())
        # with CFG the recorder sees cond and uncond calls; the conditional one comes first at every step
        calls = rec.calls[::2] if cond.uses_cfg else rec.calls
        for c in calls:
            per_step_idx[step_of(c["t"])].append(c["indices"][0])
        final = [c["indices"][0] for c in calls if step_of(c["t"]) == len(steps) - 1]
        maps.append(torch.cat(final, dim=0))  # (F, h, w)
        if frames:
            videos.append(np.concatenate(frames))
    code_maps = torch.stack(maps)  # (P, F, h, w)
    overall = codebook_stats(code_maps, K)
    per_step = [{"step": i, "timestep": steps[i], **_summary(codebook_stats(torch.cat(v), K))}
                for i, v in enumerate(per_step_idx) if v]
    per_frame = [{"frame": f, **_summary(codebook_stats(code_maps[:, f], K))} for f in range(code_maps.shape[1])]
    settings = {"seed": seed, "num_frames": num_frames or engine.config.num_frames, "source": engine.source,
                "quantizer": model.config.quantizer, "codebook_size": K, "codebook_dim": model.vq_head.codebook_dim}
    return CodebookReport(overall, per_step, per_frame, code_maps, labels, videos, settings)


# ------------------------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_usage_histogram(stats: dict, path) -> Path:
    """Code counts sorted by frequency (log scale) with usage / perplexity / dead codes in the title."""
    plt = _plt()
    counts = np.sort(np.asarray(stats["counts"]))[::-1]
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    ax.bar(np.arange(len(counts)), counts, width=1.0, color="#3b6ea5")
    ax.set_yscale("symlog")
    ax.set_xlabel("code (sorted by use)")
    ax.set_ylabel("tokens")
    ax.set_title(f"usage {100 * stats['usage']:.1f}% ({stats['used_codes']}/{stats['codebook_size']}), "
                 f"perplexity {stats['perplexity']:.1f}, dead {stats['dead_codes']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_code_maps(code_maps: torch.Tensor, codebook_size: int, path, labels: list[str] | None = None) -> Path:
    """One row per video, one panel per latent frame: the code of each patch (a categorical colour map)."""
    plt = _plt()
    maps = torch.as_tensor(code_maps).numpy()  # (P, F, h, w)
    P, nF = maps.shape[:2]
    fig, axes = plt.subplots(P, nF, figsize=(1.4 * nF + 0.4, 1.5 * P + 0.3), dpi=100, squeeze=False)
    for p in range(P):
        for f in range(nF):
            ax = axes[p, f]
            ax.imshow(maps[p, f], cmap="tab20", vmin=0, vmax=max(codebook_size - 1, 1), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if maps[p, f].size <= 64:  # small maps: print the codes (colours repeat beyond 20 codes)
                for (i, j), k in np.ndenumerate(maps[p, f]):
                    ax.text(j, i, str(k), ha="center", va="center", fontsize=6)
            if p == 0:
                ax.set_title(f"frame {f}", fontsize=8)
    return _save_rows(plt, fig, axes, labels, path)


def _save_rows(plt, fig, axes, labels: list[str] | None, path) -> Path:
    """Label each row of a (rows, cols) figure, write it as a PNG and close it."""
    for p, label in enumerate(labels or []):
        axes[p, 0].set_ylabel(label[:28], fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def frame_grid(videos: list[np.ndarray], path, labels: list[str] | None = None, max_frames: int = 8) -> Path:
    """A PNG grid: one row per video, up to max_frames evenly spaced frames per row."""
    plt = _plt()
    P = len(videos)
    n = min(max_frames, min(len(v) for v in videos))
    fig, axes = plt.subplots(P, n, figsize=(1.3 * n, 1.4 * P + 0.2), dpi=100, squeeze=False)
    for p, v in enumerate(videos):
        pick = np.linspace(0, len(v) - 1, n).round().astype(int)
        for j, f in enumerate(pick):
            ax = axes[p, j]
            ax.imshow(v[f])
            ax.set_xticks([]), ax.set_yticks([])
            if p == 0:
                ax.set_title(f"t={f}", fontsize=8)
    return _save_rows(plt, fig, axes, labels, path)


def model_tab_summary(engine, out_dir, prompts: list[str] | None = None, num_frames: int | None = None,
                      seed: int = 0) -> tuple[str, list[str]] | None:
    """For the app's Model tab: (markdown, [png paths]) for a quantized engine, None for an unquantized one."""
    if not isinstance(engine.transformer, QuantizedCausalWanTransformer3DModel):
        return None
    prompts = prompts or ["a red circle moving right"]
    rep = analyze_codebook(engine, prompts if engine.text_encoder is not None else None,
                           prompt_embeds=None if engine.text_encoder is not None else
                           torch.zeros(len(prompts), 1, engine.transformer.config.text_dim),
                           num_frames=num_frames, seed=seed, decode=False)
    paths = rep.write(out_dir)
    o, c = rep.overall, engine.transformer.config
    md = (f"**Quantized generator** ({c.quantizer}, {o['codebook_size']} codes of dimension "
          f"{engine.transformer.vq_head.codebook_dim})  \n"
          f"Codebook usage on {len(prompts)} prompt(s): {100 * o['usage']:.1f}% "
          f"({o['used_codes']}/{o['codebook_size']} codes), perplexity {o['perplexity']:.1f}, "
          f"dead codes {o['dead_codes']}")
    return md, [str(paths["histogram"]), str(paths["code_maps"])]
