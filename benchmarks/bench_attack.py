"""Noise-attack iterations on the tiny model: speed and peak memory, with and without cutting the gradient paths
through the KV cache, with and without activation checkpointing, and memory as the stream grows.

    python benchmarks/bench_attack.py [--size 64] [--blocks 1,2,4,8] [--speed-blocks 4] [--steps 3] [--repeats 2]

Every configuration runs in a fresh subprocess, so its peak resident memory (ru_maxrss) is its own; the figure
reported is the peak during the attack minus the resident memory after a warm-up generation (model, caches and
allocator already in place). The workers run with MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns freed
tensors to the system at once: resident memory then follows live tensors instead of the allocator's high-water
mark (without it, fragmentation makes every configuration look like it grows with the stream).

Seconds per iteration: the median over the iterations after the first of a run, the smallest over --repeats
runs, the configurations interleaved (round robin) so that the load of the shared machine falls on all of them
alike. Pixel-space rows decode the video (the causal 3D-conv VAE decoder dominates a tiny model's cost);
latent-space rows (an untargeted objective on the latents) skip it and show the transformer and its KV-cache
paths alone. Prints two markdown tables; the machine is shared and noisy: read ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def worker(cfg: dict) -> dict:
    """One attack in this process: {'s_per_it', 'peak_mb', ...}."""
    import torch

    from engine.testing import tiny_engine

    torch.set_num_threads(cfg["threads"])
    eng = tiny_engine(height=cfg["size"], width=cfg["size"])
    k, tc = eng.config.num_frame_per_block, 4
    num_frames = 1 + tc * (cfg["blocks"] * k - 1)
    with torch.no_grad():  # warm-up: weights touched, kernels initialised
        eng.generate("a red circle moving left", num_frames=num_frames, seed=0, output_type="pt")
    rss0 = _rss_mb()
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    r = eng.attack("a red circle moving left", seed=0, num_frames=num_frames, steps=cfg["steps"], lr=0.05,
                   learn=("z0", "step"), detach_cache=cfg["detach_cache"], checkpointing=cfg["checkpointing"],
                   transformer_checkpoint="layer", decoder_checkpoint="frame",  # checkpointed wherever it can be
                   objective="untargeted", space=cfg.get("space", "pixel"))
    total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    its = [h["seconds"] for h in r.history if not h.get("final")]
    return dict(cfg, num_frames=num_frames, s_per_it=statistics.median(its[1:] or its), total_s=total,
                peak_mb=peak - rss0, warmup_peak_mb=peak0 - rss0, rss0_mb=rss0)


def run_worker(script: str, cfg: dict, tree: Path = REPO) -> dict:
    """`python script --worker cfg` in a fresh process importing `engine` from `tree`; its last stdout line (JSON).
    MALLOC_MMAP_THRESHOLD_ makes freed tensors go back to the system at once (see the module docstring)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=str(tree) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, script, "--worker", json.dumps(cfg)], capture_output=True, text=True,
                       env=env, cwd=tree)
    if p.returncode:
        raise RuntimeError(f"worker {cfg} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_config(cfg: dict) -> dict:
    return run_worker(__file__, cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="video height = width in pixels")
    ap.add_argument("--blocks", default="1,2,4,8", help="stream lengths (blocks of 3 latent frames) for table 2")
    ap.add_argument("--speed-blocks", type=int, default=4, help="stream length for table 1")
    ap.add_argument("--steps", type=int, default=3, help="attack iterations per configuration")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="runs per configuration of table 1")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    base = dict(size=args.size, steps=args.steps, threads=args.threads)
    print(f"tiny engine (2-layer transformer, base_dim-8 VAE), {args.size}x{args.size} video, learn z0 + step "
          f"noise, Adam, {args.steps} iterations per run, {args.threads} thread(s); peak = max RSS during the attack "
          f"minus RSS after a warm-up generation\n")

    configs = [dict(base, blocks=args.speed_blocks, space=space, checkpointing=ckpt, detach_cache=detach)
               for space in ("pixel", "latent") for ckpt in (True, False) for detach in (False, True)]
    runs = [[] for _ in configs]
    for _ in range(args.repeats):  # round robin: the machine's load falls on every configuration alike
        for i, cfg in enumerate(configs):
            runs[i].append(run_config(cfg))
    rows = [min(rs, key=lambda r: r["s_per_it"]) | {"peak_mb": max(r["peak_mb"] for r in rs)} for rs in runs]
    print(f"Table 1: one attack iteration (forward + backward), {args.speed_blocks} blocks = "
          f"{rows[0]['num_frames']} frames, best of {args.repeats} runs\n")
    print("| objective space | checkpointing | KV-cache gradient paths | s / iteration | vs default | peak MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ref = next(x for x in rows if x["space"] == r["space"] and x["checkpointing"] and not x["detach_cache"])
        print(f"| {r['space']} | {'on' if r['checkpointing'] else 'off'} | "
              f"{'cut (detach_cache)' if r['detach_cache'] else 'kept'} | {r['s_per_it']:.3f} | "
              f"{r['s_per_it'] / ref['s_per_it']:.2f}x | {r['peak_mb']:.0f} |")

    blocks = [int(b) for b in args.blocks.split(",")]
    mem = {(b, c): run_config(dict(base, blocks=b, checkpointing=c, detach_cache=False))
           for b in blocks for c in (True, False)}
    print("\nTable 2: peak memory of an attack iteration as the stream grows (KV-cache paths kept)\n")
    print("| blocks | frames | peak MB, checkpointing on | peak MB, off | off / on | s / it on | s / it off |")
    print("|---|---|---|---|---|---|---|")
    for b in blocks:
        on, off = mem[b, True], mem[b, False]
        print(f"| {b} | {on['num_frames']} | {on['peak_mb']:.0f} | {off['peak_mb']:.0f} | "
              f"{off['peak_mb'] / max(on['peak_mb'], 1):.1f}x | {on['s_per_it']:.2f} | {off['s_per_it']:.2f} |")
    if len(blocks) > 1:
        b0, b1 = blocks[0], blocks[-1]
        for c in (True, False):
            slope = (mem[b1, c]["peak_mb"] - mem[b0, c]["peak_mb"]) / (b1 - b0)
            print(f"\ncheckpointing {'on' if c else 'off'}: {slope:.1f} MB more peak memory per block", end="")
        print()


if __name__ == "__main__":
    main()
