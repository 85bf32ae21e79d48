"""AttackResult: what a noise attack produced, and how it is written to (and read back from) a directory.

Directory layout written by ``AttackResult.save(dir)`` (atomically: a temporary directory renamed into place):

    noise.safetensors          the optimised SamplerNoise (z0, step noises or permutations; seed, mode, prompt)
    initial_noise.safetensors  only when the attack did not start from a seed (a seed regenerates it otherwise)
    result.json                summary, settings, objective, budget, Gaussianity of the noise, stop reason
    history.json, history.csv  one row per iteration (objective, loss, grad norm, perturbation, MSE/PSNR/SSIM...)
    baseline.mp4, attacked.mp4 the videos (H.264; lossy - regenerate from the noise for exact frames)
    curves.png                 the history as curves
    frames.png                 a strip of frames: baseline / attacked / amplified difference

``AttackResult.load(dir, engine=...)`` reads it back and regenerates both videos exactly from the noise.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..sampling.noise import SamplerNoise

HISTORY_COLUMNS = ("iteration", "objective", "loss", "regularizer", "grad_norm", "delta_rms", "delta_linf",
                   "z0_norm_ratio", "lr", "mse", "psnr", "ssim", "latent_mse", "seconds", "final")
RESULT_FILE = "result.json"


def _json_safe(x):
    """Non-finite floats -> strings ('inf', '-inf', 'nan'): strict JSON has no Infinity / NaN."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _json_float(x):
    return float(x) if isinstance(x, str) and x in ("inf", "-inf", "nan") else x


def _from_json(x):
    if isinstance(x, dict):
        return {k: _from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    return _json_float(x)


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    return (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


@dataclass
class AttackResult:
    """The outcome of engine.attack(...).

    Videos are float (T, H, W, 3) in [0, 1] (as Engine.generate(output_type="pt")); latents (B, C, F, h, w).
    ``noise`` is the best noise found (detached); ``initial_noise`` the seeded one. ``history`` has one dict per
    evaluated point (the last one, ``final=True``, is the point after the last step, evaluated without a
    gradient). ``best_value`` is the objective at ``noise``; ``baseline_value`` at the unattacked noise.
    ``metrics`` compare the attacked with the baseline video (mse, psnr, ssim, latent_mse) and give the size of
    the perturbation (delta_rms, delta_linf in noise standard deviations). ``gaussianity`` maps each learned
    tensor ('z0', 'step.i') to engine.attack.budget.gaussianity of it; ``gaussianity_initial`` the same before.
    """

    prompt: str | None
    seed: int | None
    noise: SamplerNoise
    initial_noise: SamplerNoise | None
    baseline_video: torch.Tensor | None
    attacked_video: torch.Tensor | None
    baseline_latents: torch.Tensor | None
    attacked_latents: torch.Tensor | None
    history: list[dict]
    best_iteration: int
    best_value: float
    baseline_value: float | None
    objective: dict
    budget: dict
    settings: dict
    gaussianity: dict
    gaussianity_initial: dict
    stop_reason: str
    seconds: float
    fps: int = 16
    metrics: dict = field(default_factory=dict)

    # -- summaries ------------------------------------------------------------------------------------------
    @property
    def iterations(self) -> int:
        """Gradient evaluations made (the final, gradient-free evaluation not counted)."""
        return sum(1 for h in self.history if not h.get("final"))

    def summary(self) -> dict:
        """One flat row: what a sweep table shows for this attack."""
        g = self.gaussianity.get("z0") or next(iter(self.gaussianity.values()), {})
        return {
            "prompt": self.prompt, "seed": self.seed, "objective": self.objective.get("name"),
            "maximize": self.objective.get("maximize"), "space": self.objective.get("space"),
            "budget": self.budget.get("kind"), "eps": self.budget.get("eps"),
            "mode": self.noise.mode, "learn": "+".join(self.settings.get("learn", ())),
            "baseline_value": self.baseline_value, "best_value": self.best_value,
            "best_iteration": self.best_iteration, "iterations": self.iterations,
            "mse": self.metrics.get("mse"), "psnr": self.metrics.get("psnr"), "ssim": self.metrics.get("ssim"),
            "latent_mse": self.metrics.get("latent_mse"), "delta_rms": self.metrics.get("delta_rms"),
            "delta_linf": self.metrics.get("delta_linf"), "norm_ratio": g.get("norm_ratio"), "ks": g.get("ks"),
            "ks_pvalue": g.get("ks_pvalue"), "stop_reason": self.stop_reason, "seconds": self.seconds,
            "seconds_per_iteration": self.seconds / max(1, self.iterations),
        }

    def __repr__(self) -> str:
        s = self.summary()
        return (f"AttackResult({s['objective']}, prompt={self.prompt!r}, seed={self.seed}, best={self.best_value:.5g} "
                f"at iteration {self.best_iteration} of {self.iterations}, psnr={s['psnr']}, "
                f"stop={self.stop_reason!r})")

    # -- writing --------------------------------------------------------------------------------------------
    def history_csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for h in self.history:
            w.writerow({k: ("" if h.get(k) is None else h.get(k)) for k in HISTORY_COLUMNS})
        return buf.getvalue()

    def to_json(self) -> dict:
        return _json_safe({
            "summary": self.summary(), "prompt": self.prompt, "seed": self.seed, "mode": self.noise.mode,
            "noise_shape": list(self.noise.shape), "objective": self.objective, "budget": self.budget,
            "settings": self.settings, "metrics": self.metrics, "gaussianity": self.gaussianity,
            "gaussianity_initial": self.gaussianity_initial, "best_iteration": self.best_iteration,
            "best_value": self.best_value, "baseline_value": self.baseline_value, "stop_reason": self.stop_reason,
            "seconds": self.seconds, "fps": self.fps,
        })

    def write_to(self, directory: str | os.PathLike, *, videos: bool = True, plots: bool = True) -> Path:
        """Write every file into an existing directory (not atomic; `save` is)."""
        from ..video import write_mp4

        d = Path(directory)
        self.noise.save(d / "noise.safetensors")
        if self.seed is None and self.initial_noise is not None:
            self.initial_noise.save(d / "initial_noise.safetensors")
        (d / RESULT_FILE).write_text(json.dumps(self.to_json(), indent=2))
        (d / "history.json").write_text(json.dumps(_json_safe(self.history), indent=1))
        (d / "history.csv").write_text(self.history_csv())
        if videos:
            for name, v in (("baseline", self.baseline_video), ("attacked", self.attacked_video)):
                if v is not None:
                    write_mp4(d / f"{name}.mp4", _to_uint8(v), self.fps)
        if plots:
            self.plot_curves(d / "curves.png")
            if self.baseline_video is not None and self.attacked_video is not None:
                self.plot_frames(d / "frames.png")
        return d

    def save(self, directory: str | os.PathLike, *, videos: bool = True, plots: bool = True) -> Path:
        """Write the result directory atomically (an existing one is replaced)."""
        from ..io import atomic_directory

        return atomic_directory(directory, lambda tmp: self.write_to(tmp, videos=videos, plots=plots))

    # -- figures (matplotlib's object API: no global pyplot state) ------------------------------------------
    def plot_curves(self, path) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        h = self.history
        it = [e["iteration"] for e in h]

        def col(k):
            return [np.nan if e.get(k) is None else float(e[k]) for e in h]

        fig = Figure(figsize=(13, 6.5), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(2, 3)
        direction = "max" if self.objective.get("maximize") else "min"
        chi = any(e.get("regularizer") for e in h)
        panels = [
            (axes[0, 0], [("objective", "objective")], f"objective ({self.objective.get('name')}, {direction})"),
            (axes[0, 1], [("loss", "loss")] + ([("regularizer", "chi-shell regulariser")] if chi else []), "loss"),
            (axes[0, 2], [("grad_norm", "grad norm")], "gradient norm"),
            (axes[1, 0], [("delta_rms", "RMS"), ("delta_linf", "L-inf")], "perturbation (noise std)"),
            (axes[1, 1], [("psnr", "PSNR (dB)")], "PSNR to baseline (dB)"),
            (axes[1, 2], [("ssim", "SSIM")], "SSIM to baseline (MSE dashed, right axis)"),
        ]
        for ax, series, title in panels:
            for key, label in series:
                y = col(key)
                if any(np.isfinite(v) for v in y):
                    ax.plot(it, y, marker=".", label=label)
            if self.best_iteration >= 0:
                ax.axvline(self.best_iteration, color="grey", ls=":", lw=1)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
            if len(ax.get_legend_handles_labels()[0]) > 1:
                ax.legend(fontsize=8)
        y = col("mse")
        if any(np.isfinite(v) for v in y):
            axes[1, 2].twinx().plot(it, y, ls="--", color="tab:orange")
        g = [v for v in col("grad_norm") if np.isfinite(v)]
        if g and min(g) > 0:
            axes[0, 2].set_yscale("log")
        fig.suptitle(f"{self.prompt!r} seed {self.seed}: {self.stop_reason}", fontsize=10)
        fig.savefig(path, dpi=90)

    def plot_frames(self, path, columns: int = 8) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        a, b = _to_uint8(self.baseline_video), _to_uint8(self.attacked_video)
        T = len(a)
        idx = np.unique(np.linspace(0, T - 1, min(columns, T)).round().astype(int))
        diff = np.abs(a.astype(np.float32) - b.astype(np.float32))
        amplify = 255 / max(float(diff.max()), 1.0)  # the largest difference shows as full white
        diff = np.clip(diff * amplify, 0, 255).astype(np.uint8)
        rows = [("baseline", a), ("attacked", b), (f"|diff| x{amplify:.3g}", diff)]
        fig = Figure(figsize=(1.6 * len(idx) + 0.8, 1.7 * len(rows)), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(rows), len(idx), squeeze=False)
        for r, (name, frames) in enumerate(rows):
            for c, t in enumerate(idx):
                ax = axes[r, c]
                ax.imshow(frames[t], interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"frame {t}", fontsize=8)
                if c == 0:
                    ax.set_ylabel(name, fontsize=9)
        fig.savefig(path, dpi=90)

    # -- reading --------------------------------------------------------------------------------------------
    @staticmethod
    def load_noise(directory: str | os.PathLike, device="cpu", dtype=torch.float32) -> SamplerNoise:
        """The optimised noise of a saved attack: Engine.generate(noise=...) regenerates the attacked video."""
        return SamplerNoise.load(Path(directory) / "noise.safetensors", device=device, dtype=dtype)

    @classmethod
    def load(cls, directory: str | os.PathLike, engine=None, *, prompt_embeds=None) -> "AttackResult":
        """Read a saved result. With an engine, both videos are regenerated exactly from the noise (the prompt is
        re-encoded unless prompt_embeds is given); without one, the videos and latents are None."""
        d = Path(directory)
        if not (d / RESULT_FILE).is_file():
            raise FileNotFoundError(f"{d} is not an attack result directory (no {RESULT_FILE})")
        meta = _from_json(json.loads((d / RESULT_FILE).read_text()))
        history = _from_json(json.loads((d / "history.json").read_text()))
        device = engine.device if engine is not None else "cpu"
        dtype = torch.float64 if engine is not None and engine.dtype == torch.float64 else torch.float32
        noise = cls.load_noise(d, device, dtype)
        initial = None
        if (d / "initial_noise.safetensors").is_file():
            initial = SamplerNoise.load(d / "initial_noise.safetensors", device=device, dtype=dtype)
        elif meta["seed"] is not None:
            initial = SamplerNoise.from_seed(meta["seed"], noise.shape, noise.num_renoise, mode=noise.mode,
                                             device=device, dtype=dtype)
            initial.prompt = noise.prompt
        videos = [None] * 4
        if engine is not None:
            if prompt_embeds is None and meta["prompt"] is None:
                raise ValueError("this attack was run from prompt embeddings: pass prompt_embeds= to regenerate")
            kw = dict(prompt_embeds=prompt_embeds) if prompt_embeds is not None else dict(prompt=meta["prompt"])
            with torch.no_grad():
                att = engine.generate(noise=noise, output_type="pt", **kw)
                base = engine.generate(noise=initial, output_type="pt", **kw) if initial is not None else None
            videos = [None if base is None else base.frames, att.frames,
                      None if base is None else base.latents, att.latents]
        return cls(prompt=meta["prompt"], seed=meta["seed"], noise=noise, initial_noise=initial,
                   baseline_video=videos[0], attacked_video=videos[1], baseline_latents=videos[2],
                   attacked_latents=videos[3], history=history, best_iteration=meta["best_iteration"],
                   best_value=meta["best_value"], baseline_value=meta["baseline_value"], objective=meta["objective"],
                   budget=meta["budget"], settings=meta["settings"], gaussianity=meta["gaussianity"],
                   gaussianity_initial=meta["gaussianity_initial"], stop_reason=meta["stop_reason"],
                   seconds=meta["seconds"], fps=meta["fps"], metrics=meta["metrics"])
