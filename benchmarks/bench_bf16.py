"""bfloat16 against float32 on the CPU at Wan2.1-1.3B's layer shape, side by side in one run (issue 16, part 2).

    OMP_NUM_THREADS=2 python benchmarks/bench_bf16.py [--layers 2] [--latent 16x26] [--blocks 4] [--repeats 3]
        [--threads 2] [--profile 20] [--json out.json]

Random weights at the real layer shape (dim 1536, 12 heads x 128, ffn 8960, text_dim 4096, 512 prompt tokens),
`--layers` of the 30, built through `engine.Engine` and run with `Engine.to(dtype=...)`; latents only
(`output_type="latent"`), so the VAE decoder does not dominate. Latent 16x26 = 104 tokens per frame
(128x208 pixels), 30x52 = 390 (240x416). Runs alternate float32 / bfloat16 in one process; the table reports the
median of per-repeat ratios (the machine is shared) and the output difference:

- rel diff: ||x_bf16 - x_fp32|| / ||x_fp32|| over the latents;
- bf16 + fp32 matmul: bfloat16 weights, linear / conv layers computed in float32 (`float32_compute`), the fast
  bf16 path on a CPU without native bfloat16 matmul (AVX2 only);
- expected: the same difference for a float32 run whose weights and prompt are rounded to bfloat16 (what bf16
  storage alone costs), so "rel diff" within a small multiple of it is the expected bf16 error.

`--profile N` prints torch.profiler's top-N operators (self CPU time) of one bf16 and one fp32 generation.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from engine import Engine
from engine.models.causal_wan import CausalWanTransformer3DModel
from engine.models.precision import bf16_matmul_is_native, float32_compute
from engine.testing import tiny_vae

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def build(layers: int, text_len: int, seed: int = 0):
    torch.manual_seed(seed)
    tr = CausalWanTransformer3DModel.from_config({**WAN_1_3B, "num_layers": layers}).eval()
    eng = Engine(tr, tiny_vae(seed, z_dim=16), height=8, width=8, num_frames=9, text_max_length=text_len)
    emb = torch.randn(1, text_len, WAN_1_3B["text_dim"], generator=torch.Generator().manual_seed(seed))
    return eng, emb


def run(eng: Engine, emb, noise) -> tuple[float, float, torch.Tensor]:
    t0 = time.perf_counter()
    first, out = None, []
    for chunk in eng.stream(prompt_embeds=emb, noise=noise, output_type="latent"):
        out.append(chunk.latents)
        first = first or time.perf_counter() - t0
    return time.perf_counter() - t0, first, torch.cat(out, 2).float()


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def profile(eng, emb, noise, top: int, label: str) -> None:
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CPU]) as p:
        run(eng, emb, noise)
    print(f"\n### profile: {label}\n")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--latent", default="16x26", help="latent HxW (tokens per frame = H*W/4)")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", type=int, default=0, help="print the top-N ops of one run of each dtype")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--variants", nargs="+", default=["float32", "bfloat16", "bf16 + fp32 matmul"],
                    help="which of: float32 (always run, the reference), bfloat16, 'bf16 + fp32 matmul'")
    args = ap.parse_args()
    args.variants = ["float32"] + [v for v in args.variants if v != "float32"]
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    h, w = (int(s) for s in args.latent.split("x"))
    S = (h // 2) * (w // 2)

    f32, emb = build(args.layers, args.text_len)
    bf16 = copy.deepcopy(f32).to(dtype="bfloat16")
    mixed = copy.deepcopy(bf16)
    float32_compute(mixed.transformer)  # bf16 weights, float32 matrix products (engine/models/precision.py)
    engines = {"float32": f32, "bfloat16": bf16, "bf16 + fp32 matmul": mixed}
    rounded = copy.deepcopy(bf16).to(dtype="float32")  # float32 run of bf16-rounded weights: the expected error
    emb_r = emb.bfloat16().float()
    k = f32.config.num_frame_per_block
    shape = (1, 16, args.blocks * k, h, w)
    from engine.sampling.noise import SamplerNoise
    from engine.sampling.block_sampler import num_renoise

    noise = SamplerNoise.from_seed(0, shape, num_renoise(f32.schedule))

    names = [n for n in engines if n in args.variants]
    for n in names:  # warm-up (memo tables, allocator, oneDNN kernels)
        run(engines[n], emb, noise)
    times = {n: [] for n in names}
    firsts = {n: [] for n in names}
    ratios = {n: [] for n in names}
    lat = {}
    for r in range(args.repeats):
        order = names if r % 2 == 0 else names[::-1]  # interleaved, alternating order
        for name in order:
            s, f, x = run(engines[name], emb, noise)
            times[name].append(s), firsts[name].append(f)
            lat[name] = x
        for name in names:
            ratios[name].append(times["float32"][-1] / times[name][-1])
    _, _, x_r = run(rounded, emb_r, noise)
    diffs = {n: rel(lat[n], lat["float32"]) for n in names if n != "float32"}
    d_exp = rel(x_r, lat["float32"])
    n_frames = args.blocks * k

    load = open("/proc/loadavg").read().split()[:3]
    print(f"host: {cpu_name()}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}; native bf16 "
          f"matmul: {bf16_matmul_is_native('cpu')}")
    print(f"Wan-1.3B layer shape, {args.layers} layers, {S} tokens per frame (latent {h}x{w}), {args.blocks} blocks "
          f"x {k} latent frames, 4 steps, {args.text_len} prompt tokens; {args.threads} threads; load average "
          f"{' '.join(load)}; {args.repeats} interleaved repeats\n")
    print("| variant | median s | min s | latent frames / s | first block (s) | speed-up vs float32 (median of "
          "ratios) | rel diff vs float32 |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        med = statistics.median(times[name])
        print(f"| {name} | {med:.2f} | {min(times[name]):.2f} | {n_frames / med:.2f} | "
              f"{statistics.median(firsts[name]):.2f} | {statistics.median(ratios[name]):.2f}x | "
              f"{diffs.get(name, 0.0):.2e} |")
    for name in names[1:]:
        print(f"\n{name}: ratios per repeat {', '.join(f'{x:.2f}' for x in ratios[name])}; max abs diff "
              f"{float((lat[name] - lat['float32']).abs().max()):.2e}")
    print(f"expected bf16 error (float32 run of bf16-rounded weights and prompt): rel diff {d_exp:.2e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"layers": args.layers, "tokens_per_frame": S, "blocks": args.blocks, "threads": args.threads,
                       "seconds": times, "first_block": firsts, "ratios": ratios,
                       "speedup_median": {n: statistics.median(r) for n, r in ratios.items()}, "rel_diff": diffs,
                       "rel_diff_expected": d_exp, "load": load, "cpu": cpu_name(),
                       "capability": torch.backends.cpu.get_cpu_capability()}, fh, indent=2)
    if args.profile:
        for name in names:
            profile(engines[name], emb, noise, args.profile, name)


if __name__ == "__main__":
    main()
