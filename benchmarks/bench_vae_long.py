"""Does a VAE keep colours on long clips? Encode and decode procedural shapes streams longer than its training
windows and score each 33-frame window with the shapes evaluator (colour, shape, bounce-aware direction: the long
evaluation's, which counts motion along the prompted axes with any wall reflection) and PSNR against the render.

    python benchmarks/bench_vae_long.py checkpoints/shapes-sf runs/shapes-vae-long/base [--frames 133] [--limit 18]

Each source is an engine or base directory with vae/. The streams are `engine.data.long_eval.reference_stream`
renders (the dataset's physics, bounces off the walls) of the first `--limit` one-object prompts of the
evaluator's set (every colour x shape with 18), seeds `--seeds`; each is encoded in one pass (the posterior mode)
and decoded in one pass, as the latent cache and the streaming decoder see it. The render itself scores the
evaluator's ceiling (the `render` row). A VAE whose causal caches only learned the first frames after a start
(training windows shorter than its temporal receptive field) scores well on window 0 and loses colours later:
the teacher then learns those colour changes from its latents, and the student streams them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.data.evaluate import EVAL_PROMPTS  # noqa: E402
from engine.data.long_eval import reference_stream, score_stream  # noqa: E402
from engine.io import quiet_loaders, to_uint8  # noqa: E402

WINDOW = 33


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-10))


@torch.no_grad()
def roundtrip(vae, frames: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(frames).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
    out = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return to_uint8((out[0].permute(1, 2, 3, 0) + 1) / 2)


def score(prompt: str, frames: np.ndarray, render: np.ndarray) -> list[tuple[float, float, float, float]]:
    """(colour, shape, bounce-aware direction, PSNR) of each whole 33-frame window."""
    windows = score_stream(frames, [(0, prompt)], window=WINDOW)["windows"]  # judged as evaluate_video judges
    return [(w["color"], w["shape"], w["motion"], psnr(frames[a:a + WINDOW], render[a:a + WINDOW]))
            for w, a in zip(windows, range(0, len(frames) - WINDOW + 1, WINDOW))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+", help="engine or base directories with vae/")
    ap.add_argument("--frames", type=int, default=133, help="stream length, 1 + 4k frames (default 133: 4 windows)")
    ap.add_argument("--limit", type=int, default=18, help="one-object prompts of EVAL_PROMPTS (1-48)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    if a.frames < 2 * WINDOW or (a.frames - 1) % 4:
        ap.error(f"--frames must be 1 + 4k and at least {2 * WINDOW} (two windows), got {a.frames}")
    one_object = [p for p in EVAL_PROMPTS if " and " not in p]
    if not 1 <= a.limit <= len(one_object):
        ap.error(f"--limit must be in [1, {len(one_object)}], got {a.limit}")
    vaes = {}
    for src in a.sources:
        if not (Path(src) / "vae" / "config.json").is_file():
            ap.error(f"{src}: no vae/ inside (give an engine or base directory)")
        from diffusers import AutoencoderKLWan

        with quiet_loaders():
            vaes[src] = AutoencoderKLWan.from_pretrained(Path(src) / "vae").eval()
    torch.set_num_threads(a.threads)
    prompts = one_object[:a.limit]
    rows: dict[str, list] = {"render": []}
    rows.update({src: [] for src in vaes})
    for seed in a.seeds:
        for p in prompts:
            render = reference_stream([(0, p)], a.frames, seed)
            rows["render"].append(score(p, render, render))
            for src, vae in vaes.items():
                rows[src].append(score(p, roundtrip(vae, render), render))
    n_win = (a.frames - WINDOW) // WINDOW + 1
    print(f"{len(prompts)} one-object prompts x seeds {a.seeds}; {a.frames}-frame streams, {n_win} windows of "
          f"{WINDOW} frames; colour / shape / direction (bounce-aware): the evaluators' fraction correct; PSNR "
          "against the render (dB)\n")
    print("| source | " + " | ".join(f"window {w} colour / shape / direction / PSNR" for w in range(n_win)) + " |")
    print("|---|" + "---:|" * n_win)
    for src, streams in rows.items():
        s = np.array(streams)  # (streams, windows, 4)
        cells = [f"{100 * s[:, w, 0].mean():.1f} / {100 * s[:, w, 1].mean():.1f} / {100 * s[:, w, 2].mean():.1f} / "
                 + ("-" if src == "render" else f"{s[:, w, 3].mean():.1f}") for w in range(n_win)]
        print(f"| {src} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
