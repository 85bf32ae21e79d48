"""The fast streaming decoder against the full VAE decoder, side by side in one run (issue 16, part 1).

    python benchmarks/bench_decoder.py                       # the shipped default model, one torch thread
    python benchmarks/bench_decoder.py --runs 9 --json out.json

Measured, interleaved run by run (this machine is shared and noisy: ratios, not absolute times, are the result):

- end-to-end: `Engine.generate` of 33 frames with decoder="vae" and decoder="fast" (what users run): generated
  frames/s and the first frame's latency (the first block's frames exist after `first_block_seconds`), plus the
  latents alone (output_type="latent") and the decode alone of the same latents;
- fidelity: PSNR of the fast decode (streamed block by block) against the VAE's full decode on held-out clips:
  shapes-dataset clips encoded by the VAE (a dataset seed the decoder was not trained on) and latents the engine
  generates for the evaluator's prompts (seeds the training did not use);
- evaluator: `engine.data.evaluate` scores of the same generated latents decoded both ways (EVAL_PROMPTS x seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

import engine
from engine.data.evaluate import EVAL_PROMPTS, aggregates, evaluate, format_table
from engine.data.shapes import ShapesConfig, ShapesDataset
from engine.io import to_uint8
from engine.sampling.codec import decode_full, normalize_latents

PROMPT = "a red circle moving left"


def stream_decode(eng, z: torch.Tensor, decoder: str) -> torch.Tensor:
    """(1, C, F, h, w) -> video (1, 3, T, H, W) in [-1, 1], decoded block by block as Engine.stream does."""
    dec, k = eng.streaming_decoder(decoder), eng.config.num_frame_per_block
    return torch.cat([dec.decode(z[:, :, i:i + k]) for i in range(0, z.shape[2], k)], dim=2)


def frames_of(video: torch.Tensor):
    return to_uint8((video[0].permute(1, 2, 3, 0).float() + 1) / 2)  # (T, H, W, 3)


def psnr_of(pairs) -> float:
    sq, n = 0.0, 0
    for a, b in pairs:
        sq, n = sq + ((a.float() - b.float()) ** 2).sum().item(), n + a.numel()
    return 10 * math.log10(4.0 / max(sq / n, 1e-12))


@torch.no_grad()
def speed(eng, runs: int) -> dict:
    for d in ("vae", "fast"):  # warm-up
        eng.generate(PROMPT, seed=0, decoder=d)
    rows = {k: [] for k in ("vae_s", "fast_s", "vae_first", "fast_first", "latent_s", "vae_decode", "fast_decode")}
    for r in range(runs):
        for d in ("vae", "fast"):
            t = eng.generate(PROMPT, seed=r, decoder=d).timings
            rows[f"{d}_s"].append(t["seconds"])
            rows[f"{d}_first"].append(t["first_block_seconds"])
        t0 = time.perf_counter()
        z = eng.generate(PROMPT, seed=r, output_type="latent").latents
        rows["latent_s"].append(time.perf_counter() - t0)
        for d in ("vae", "fast"):
            t0 = time.perf_counter()
            stream_decode(eng, z, d)
            rows[f"{d}_decode"].append(time.perf_counter() - t0)
    n = eng.config.num_frames
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {"runs": runs, "num_frames": n, **{f"median_{k}": v for k, v in med.items()},
            "fps_vae": n / med["vae_s"], "fps_fast": n / med["fast_s"], "fps_latents": n / med["latent_s"],
            "fps_ratio": statistics.median(a / b for a, b in zip(rows["vae_s"], rows["fast_s"])),
            "first_frame_ratio": statistics.median(a / b for a, b in zip(rows["vae_first"], rows["fast_first"])),
            "decode_ratio": statistics.median(a / b for a, b in zip(rows["vae_decode"], rows["fast_decode"]))}


@torch.no_grad()
def fidelity(eng, clips: int, seed: int) -> dict:
    c = eng.config
    data = ShapesDataset(ShapesConfig(height=c.height, width=c.width, num_frames=c.num_frames), seed=seed)
    enc = []
    for i in range(clips):
        z = normalize_latents(eng.vae, eng.vae.encode(data[i]["video"][None]).latent_dist.mode())
        enc.append((stream_decode(eng, z, "fast"), decode_full(eng.vae, z).clamp(-1, 1)))
    return {"psnr_encoded": psnr_of(enc), "encoded_clips": clips, "dataset_seed": seed}


@torch.no_grad()
def scores(eng, prompts, seeds) -> tuple[dict, float]:
    jobs = [(p, s) for s in seeds for p in prompts]
    videos = {"vae": [], "fast": []}
    pairs = []
    for p, s in jobs:
        z = eng.generate(p, seed=s, output_type="latent").latents
        v, f = stream_decode(eng, z, "vae"), stream_decode(eng, z, "fast")
        pairs.append((f, v))
        videos["vae"].append(frames_of(v))
        videos["fast"].append(frames_of(f))
    rows = {f"{d} decoder": evaluate([p for p, _ in jobs], videos[d]) for d in ("vae", "fast")}
    return rows, psnr_of(pairs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(engine.default_checkpoint()))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=7, help="interleaved speed runs")
    ap.add_argument("--clips", type=int, default=32, help="held-out encoded shapes clips for the PSNR")
    ap.add_argument("--dataset-seed", type=int, default=12345, help="held-out clips (training used 1 and 1001)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="evaluator noise seeds")
    ap.add_argument("--limit", type=int, default=0, help="first N evaluator prompts (0: all 64)")
    ap.add_argument("--speed-only", action="store_true", help="skip the PSNR and the evaluator")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    eng = engine.Engine.from_pretrained(a.checkpoint, decoder="fast")
    fd = eng.fast_decoder
    print(f"checkpoint {a.checkpoint}; torch threads {a.threads}; fast decoder {sum(p.numel() for p in fd.parameters()) / 1e3:.0f}k "
          f"parameters (channels {list(fd.config.channels)}, {fd.config.blocks_per_stage} blocks per stage), VAE decoder "
          f"{sum(p.numel() for p in eng.vae.decoder.parameters()) / 1e3:.0f}k")
    sp = speed(eng, a.runs)
    print(f"speed ({sp['num_frames']} frames of {eng.config.height}x{eng.config.width}, {a.runs} interleaved runs, medians):")
    print("| path | generated frames/s | first frame (s) | decode of 33 frames (s) |\n|---|---:|---:|---:|")
    for d in ("vae", "fast"):
        print(f"| {d} | {sp[f'fps_{d}']:.1f} | {sp[f'median_{d}_first']:.3f} | {sp[f'median_{d}_decode']:.3f} |")
    print(f"| latents only | {sp['fps_latents']:.1f} | | |")
    print(f"ratios (median of per-run ratios): end-to-end fps {sp['fps_ratio']:.2f}x (target >= 3), first frame "
          f"{sp['first_frame_ratio']:.2f}x sooner (target >= 2), decode {sp['decode_ratio']:.1f}x; fast path "
          f"{sp['fps_fast']:.0f} frames/s (target >= 200)")
    if a.speed_only:
        if a.json:
            from engine.atomic import write_text

            write_text(a.json, json.dumps({"speed": sp}, indent=2))
        return 0
    fi = fidelity(eng, a.clips, a.dataset_seed)
    prompts = EVAL_PROMPTS[: a.limit] if a.limit else EVAL_PROMPTS
    rows, psnr_gen = scores(eng, prompts, a.seeds)
    fi["psnr_generated"] = psnr_gen
    print(f"PSNR fast vs full VAE decode: held-out encoded clips {fi['psnr_encoded']:.2f} dB ({a.clips} clips, dataset "
          f"seed {a.dataset_seed}); generated latents {psnr_gen:.2f} dB ({len(prompts)} prompts x seeds {a.seeds}) "
          f"(target >= 28)")
    print(format_table(rows))
    agg = {k: aggregates(r) for k, r in rows.items()}
    diff = {m: 100 * (agg["fast decoder"][m] - agg["vae decoder"][m]) for m in ("color", "shape", "direction", "correct")}
    print("fast - vae, points: " + ", ".join(f"{m} {v:+.1f}" for m, v in diff.items()) + " (target within 2)")
    if a.json:
        from engine.atomic import write_text

        write_text(a.json, json.dumps({"speed": sp, "fidelity": fi, "scores": agg, "diff_points": diff}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
