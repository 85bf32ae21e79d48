"""How good is an ODE-init run's trajectory bank? Decode the teacher's x0 of its first trajectories with the
teacher's VAE and score them with the shapes evaluator against the captions they were made from.

    python benchmarks/bench_ode_bank.py runs/rebuild/ode [runs/other/ode ...] [--limit 128]

Each argument is an `ode-init` run's output directory (with `config.yaml` and `trajectories/`). The captions are
rebuilt from the run's resolved config exactly as the stage drew them (its shapes source, item i of the bank is
data item i), and checked against the prompt embeddings stored in the bank (re-encoded by the teacher's text
encoder: a mismatch is an error, not a score). The bank is the ODE init's regression target, so its scores are the
ceiling of what the causal student can learn from it; the student's own `python -m engine eval` figures on the
same split (one object / two objects) show how far below that ceiling it stays.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.data.evaluate import by_object_count, evaluate  # noqa: E402
from engine.io import quiet_loaders, to_uint8  # noqa: E402


def bank_captions(run: Path, n: int):
    """(captions of items 0..n-1, the run's config): the stage's own data source, without rendering."""
    from engine.training.config import load_config
    from engine.training.data import ShapesSource
    from engine.training.stages import shapes_config

    cfg = load_config(str(run / "config.yaml"), [])
    if cfg.data.source != "shapes":
        raise ValueError(f"{run}: the bank was made from data.source {cfg.data.source!r}; only 'shapes' has captions")
    src = ShapesSource(shapes_config(cfg), cfg.data.seed, cfg.data.num_samples)
    return [src.get(i % len(src), False)["caption"] for i in range(n)], cfg


@torch.no_grad()
def score_bank(run: Path, limit: int) -> dict:
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    from engine.sampling.codec import decode_full
    from engine.training.data import PromptEncoder
    from engine.training.ode import TrajectoryBank

    bank = run / "trajectories"
    if not (run / "config.yaml").is_file() or not (bank / "bank.json").is_file():
        raise ValueError(f"{run} is not an ode-init run directory (needs config.yaml and trajectories/bank.json)")
    n = min(limit, len(list(bank.glob("traj-*.safetensors"))))
    if n < 2:
        raise ValueError(f"{bank} holds fewer than 2 trajectories")
    captions, cfg = bank_captions(run, n)
    teacher = Path(cfg.models.teacher)
    with quiet_loaders():
        vae = AutoencoderKLWan.from_pretrained(teacher / "vae").eval()
        enc = PromptEncoder(UMT5EncoderModel.from_pretrained(teacher / "text_encoder").eval(),
                            AutoTokenizer.from_pretrained(teacher / "tokenizer"), cfg.engine.text_max_length, "cpu")
    trajectories, videos = TrajectoryBank(bank, n), []
    for i, cap in enumerate(captions):
        t = trajectories.get(i, need_latents=False)
        if not torch.allclose(enc([cap])[0], t["prompt_embeds"], atol=1e-5):
            raise ValueError(f"trajectory {i}: its prompt embeddings are not those of {cap!r} (the caption this "
                             f"run's config draws for it); was {bank} made by another config?")
        video = decode_full(vae, t["x0"][None])[0]  # (3, T, H, W) in [-1, 1]
        videos.append(to_uint8((video.permute(1, 2, 3, 0) + 1) / 2))
    res = evaluate(captions, videos)
    return {"all": res, **by_object_count(captions, res)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="ode-init run directories (config.yaml + trajectories/)")
    ap.add_argument("--limit", type=int, default=128, help="score the first N trajectories (>= 2; default 128)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    if a.limit < 2:
        ap.error(f"--limit must be >= 2, got {a.limit}")
    torch.set_num_threads(a.threads)
    print("| bank | prompts | videos | colour | shape | direction | all correct |\n|---|---|---:|---:|---:|---:|---:|")
    for run in a.runs:
        try:
            parts = score_bank(Path(run), a.limit)
        except (ValueError, OSError) as e:
            ap.exit(2, f"error: {e}\n")
        for name, r in parts.items():
            cells = " | ".join(f"{100 * r[k]:.1f}%" for k in ("color", "shape", "direction", "correct"))
            print(f"| {run} | {name} | {r['n']} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
