"""Cached streaming vs recomputing without a cache, side by side in one run; and cache memory over a long stream.

    python benchmarks/bench_engine.py [--blocks 8] [--long-blocks 50] [--repeats 3]

Prints a markdown table: seconds per video, ratio, latent frames / s, first-block latency, peak memory, and
the KV-cache bytes after each block of a rolling-window stream.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from engine.sampling.block_sampler import Conditioning, iter_blocks
from engine.sampling.noise import SamplerNoise
from engine.sampling.schedule import FewStepSchedule, add_noise, flow_to_x0
from engine.testing import tiny_transformer

K = 3  # latent frames per block
H = W = 16  # latent size (128 x 128 pixels with an 8x VAE)


def cached(model, cond, noise, sched, max_frames):
    cache = model.make_cache(H, W, max_frames=max_frames)
    out, first = [], None
    t0 = time.perf_counter()
    for info in iter_blocks(model, Conditioning(cond), noise, sched, cache, num_frame_per_block=K):
        out.append(info["x0"])
        first = first or time.perf_counter() - t0
    return torch.cat(out, 2), first


def recompute(model, cond, noise, sched):
    """No cache: every denoising step re-runs all earlier clean blocks with the block-causal mask."""
    n_blocks = noise.shape[2] // K
    ctx, first = None, None
    t0 = time.perf_counter()
    for b in range(n_blocks):
        x, steps = noise.block(b * K, (b + 1) * K)
        for i, t in enumerate(sched.timesteps):
            inp = x if ctx is None else torch.cat([ctx, x], 2)
            tf = torch.full((1, inp.shape[2]), float(t))
            tf[:, : inp.shape[2] - K] = sched.context_t
            v = model(inp, tf, cond, num_frame_per_block=K).sample[:, :, -K:]
            x0 = flow_to_x0(x, v, sched.sigmas[i])
            if i + 1 < len(sched):
                x = add_noise(x0, steps[i], sched.sigmas[i + 1])
        ctx = x0 if ctx is None else torch.cat([ctx, x0], 2)
        first = first or time.perf_counter() - t0
    return ctx, first


def setup(blocks):
    torch.set_grad_enabled(False)
    model = tiny_transformer(num_layers=4, num_attention_heads=4, attention_head_dim=32, ffn_dim=512, text_dim=32)
    sched = FewStepSchedule.from_denoising_steps([1000, 750, 500, 250])
    cond = torch.randn(1, 16, 32)
    noise = SamplerNoise.from_seed(0, (1, 4, blocks * K, H, W), len(sched) - 1)
    return model, sched, cond, noise


def child(mode, blocks):
    """One mode in a fresh process: seconds, first-block latency and the peak RSS growth it caused."""
    model, sched, cond, noise = setup(blocks)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    lat, first = cached(model, cond, noise, sched, blocks * K) if mode == "cached" else recompute(model, cond, noise, sched)
    sec = time.perf_counter() - t0
    grow = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    torch.save(lat, f"/tmp/bench_engine_{mode}.pt")
    print(json.dumps({"seconds": sec, "first": first, "peak_mb": grow / 1024}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--long-blocks", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=["cached", "recompute"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.blocks)
    n = args.blocks * K
    rows = {}
    for r in range(args.repeats):  # interleaved, so machine noise hits both alike
        for name in ("cached", "recompute"):
            out = subprocess.run([sys.executable, __file__, "--child", name, "--blocks", str(args.blocks)],
                                 capture_output=True, text=True, check=True).stdout
            m = json.loads(out.strip().splitlines()[-1])
            rows.setdefault(name, []).append((m["seconds"], m["first"], m["peak_mb"]))
    a, b = torch.load("/tmp/bench_engine_cached.pt"), torch.load("/tmp/bench_engine_recompute.pt")
    print(f"max |cached - recompute| over the latents: {(a - b).abs().max():.2e}\n")
    best = {k: min(v, key=lambda r: r[0]) for k, v in rows.items()}
    print(f"tiny model (4 layers, width 128), {args.blocks} blocks x {K} latent frames of {H}x{W}, 4 steps; "
          f"best of {args.repeats}\n")
    print("| mode | seconds | speed-up | latent frames / s | video frames / s (x4) | first block (s) | peak RSS growth MB |")
    print("|---|---|---|---|---|---|---|")
    for k in ("cached", "recompute"):
        s, f, m = best[k]
        print(f"| {k} | {s:.3f} | {best['recompute'][0] / s:.2f}x | {n / s:.1f} | {4 * n / s:.1f} | {f:.3f} | "
              f"{m:.1f} |")
    model, sched, cond, _ = setup(args.blocks)

    # long stream, rolling window: cache bytes must stop growing once the window is full
    long_noise = SamplerNoise.from_seed(1, (1, 4, args.long_blocks * K, H, W), len(sched) - 1)
    cache = model.make_cache(H, W, max_frames=4 * K, sink_frames=K)
    sizes = []
    for _ in iter_blocks(model, Conditioning(cond), long_noise, sched, cache, num_frame_per_block=K):
        sizes.append(cache.nbytes())
    diff = model.make_cache(H, W, max_frames=4 * K, sink_frames=K, differentiable=True)
    dsizes = []
    for _ in iter_blocks(model, Conditioning(cond), long_noise, sched, diff, num_frame_per_block=K):
        dsizes.append(diff.nbytes())
    pick = sorted({i for i in (0, 4, 9, 24, args.long_blocks - 1) if i < args.long_blocks})
    print(f"\n{args.long_blocks} blocks, window {4 * K} frames with {K} sink frames: KV bytes after blocks "
          f"{[i + 1 for i in pick]}:")
    print(f"- in-place (preallocated): {[sizes[i] for i in pick]}")
    print(f"- differentiable: {[dsizes[i] for i in pick]} (grows until the window is full, then flat)")


if __name__ == "__main__":
    main()
