"""Speed and memory of the tiny training stages on this CPU, and where a DMD step spends its time.

    python benchmarks/bench_training.py [--steps 20] [--warmup 3]

Each stage runs in its own process (so that peak RSS is its own) with the tiny presets (configs/tiny-*.yaml:
shapes data, one torch thread) and random tiny engines as teacher / generator; TensorBoard, samples and
intermediate checkpoints are off. Steps per second come from the `step_time` of metrics.jsonl after `warmup`
steps (the run's start-up and final checkpoint are excluded). Peak memory is the worker's max RSS; "train
delta" is its growth over the RSS just before training starts. The DMD breakdown splits each step into the
rollouts (generator with gradient, critic without), the generator update (scores, loss, backward, AdamW)
and the critic update (denoising loss, backward, AdamW), from the timings the trainer logs; drawing the batch
counts in its update, "outside" is the rest of the step (logging, counters).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {  # name -> (stage, preset, extra overrides)
    "teacher": ("teacher", "tiny-teacher", {"models.base": "{teacher}"}),
    "teacher (synthetic latents, no VAE)": ("teacher", "tiny-teacher", {"models.base": "{teacher}",
                                                                        "data.source": "synthetic"}),
    "ode-init": ("ode-init", "tiny-ode-init", {}),
    "dmd (DMD loss)": ("dmd", "tiny-dmd", {"dmd.loss": "dmd"}),
    "dmd (SiD loss)": ("dmd", "tiny-dmd", {"dmd.loss": "sid"}),
}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(case: str, steps: int, out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    from engine.testing import tiny_engine
    from engine.training.config import load_config
    from engine.training.trainer import train

    stage, preset, extra = CASES[case]
    tiny_engine(seed=0).save_pretrained(out / "teacher")
    tiny_engine(seed=1).save_pretrained(out / "generator")
    over = {"models.teacher": str(out / "teacher"), "models.generator": str(out / "generator"),
            "train.tensorboard": False, "sample.every": 0, "train.save_every": 10**9, "train.max_steps": steps,
            **{k: v.format(teacher=out / "teacher") if isinstance(v, str) else v for k, v in extra.items()}}
    cfg = load_config(preset, [a for k, v in over.items() for a in (f"--{k}", json.dumps(v))])
    import gc

    gc.collect()
    before = rss_mb()
    train(cfg, out / "run")
    rows = [json.loads(ln) for ln in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    (out / "result.json").write_text(json.dumps({"rows": rows, "rss_before": before, "rss_peak": rss_mb()}))


def summarize(name: str, res: dict, warmup: int) -> dict:
    rows = res["rows"][warmup:]
    total = sum(r["step_time"] for r in rows)
    out = {"case": name, "steps": len(rows), "steps_per_s": len(rows) / total, "ms_per_step": 1000 * total / len(rows),
           "peak_mb": res["rss_peak"], "delta_mb": res["rss_peak"] - res["rss_before"]}
    if name.startswith("dmd"):
        g = sum(r.get("time/generator_update", 0.0) for r in rows)
        gr = sum(r.get("generator/time_rollout", 0.0) for r in rows)
        c = sum(r.get("time/critic_update", 0.0) for r in rows)
        cr = sum(r.get("critic/time_rollout", 0.0) for r in rows)
        out.update(rollout=(gr + cr) / total, generator=(g - gr) / total, critic=(c - cr) / total,
                   other=1 - (g + c) / total, gen_update_s=g / max(1, sum("time/generator_update" in r for r in rows)),
                   critic_update_s=c / len(rows))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.steps, Path(args.dir))
        return
    results = []
    for name in CASES:
        with tempfile.TemporaryDirectory() as d:
            cmd = [sys.executable, __file__, "--worker", name, "--dir", d, "--steps", str(args.steps)]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results.append(summarize(name, json.loads((Path(d) / "result.json").read_text()), args.warmup))

    import torch

    print(f"Tiny training stages, torch {torch.__version__}, CPU, 1 thread, batch 2 per step, {args.steps} steps "
          f"({args.warmup} warm-up steps excluded)\n")
    print("| stage | steps/s | ms/step | peak RSS (MB) | train delta (MB) |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['case']} | {r['steps_per_s']:.1f} | {r['ms_per_step']:.1f} | {r['peak_mb']:.0f} | "
              f"{r['delta_mb']:.0f} |")
    print("\nShare of a DMD step (generator every 5th step, critic every step; averaged over the measured steps):\n")
    print("| loss | rollouts | generator update (excl. rollout) | critic update (excl. rollout) | outside | "
          "one generator update (ms) | one critic update (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if "rollout" in r:
            print(f"| {r['case'][5:-1]} | {r['rollout']:.0%} | {r['generator']:.0%} | {r['critic']:.0%} | "
                  f"{r['other']:.0%} | {1000 * r['gen_update_s']:.1f} | {1000 * r['critic_update_s']:.1f} |")


if __name__ == "__main__":
    main()
