"""GPU benchmark at the real size: Wan2.1-T2V-1.3B with random weights, 480x832, 81 frames (issue 16, part 4).

    python benchmarks/bench_gpu.py --json bench_gpu.json              # one GPU; all installed attention backends
    python benchmarks/bench_gpu.py --compile --backends native         # + torch.compile of the transformer
    python benchmarks/bench_gpu.py --tiny                              # CPU, tiny config, seconds (tests/)

Nothing is downloaded: the transformer is `CausalWanTransformer3DModel.from_config` of the Wan2.1-T2V-1.3B
config (30 layers, dim 1536, 12 heads, ffn 8960, text_dim 4096, patch (1, 2, 2), 16 channels), the VAE
`AutoencoderKLWan()` with its defaults (the Wan2.1 VAE, base_dim 96), both with random weights, built into an
`engine.Engine` (4 steps [1000, 750, 500, 250] warped with shift 5, 3 latent frames per block, bf16) and fed random
`prompt_embeds` (1, 512, 4096) instead of a text encoder (UMT5-XXL runs once per prompt, not per frame).

Per attention backend (diffusers' dispatcher, `transformer.set_attention_backend`: native SDPA, and on a GPU its
cuDNN and flash kernels forced (`_native_cudnn`, `_native_flash`), flash-attn and xformers where installed; a
backend that fails is reported and skipped) and per decoder (`--decoders vae fast`: the Wan VAE, or the fast
decoder with TAEHV's Wan2.1 architecture and random weights): `--warmup` untimed runs, then `--repeats` timed ones. A run is what `Engine.stream` does, with a CUDA synchronisation after each block so that
the split is real: the transformer generates block b (`output_type="latent"`), the streaming VAE decoder turns it
into uint8 frames on the host, then block b + 1. Reported (median over the timed runs):

- fps: video frames / wall seconds of the whole run (81 / s);
- first chunk: seconds from the call to the first block's frames on the host (generation + decode of block 0);
- per block: generation seconds per block (block 0 has no cache; the last has the longest one);
- decode share: decode seconds / total (`vae_share` in the JSON);
- peak GPU memory (torch.cuda.max_memory_allocated) over the timed runs.

`--budget-s` (default 420) stops starting new runs once that much wall time has passed, so a full invocation
stays under 8 minutes on one GPU. References: Self-Forcing 17.0 FPS, 0.69 s first chunk on one H100; target on
one H200: >= 25 FPS, first chunk <= 0.4 s.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import sys
import time

import torch

from engine import Engine
from engine.models.causal_wan import CausalWanTransformer3DModel
from engine.io import to_uint8
from engine.sampling.codec import StreamingDecoder, StreamingFastDecoder, num_video_frames

WAN_T2V_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
# diffusers' attention backend -> the module it needs (None: PyTorch's own SDPA kernels, always there on a GPU)
BACKENDS = {"native": None, "_native_cudnn": None, "_native_flash": None, "flash": "flash_attn",
            "xformers": "xformers"}


def installed_backends(device: torch.device) -> list[str]:
    if device.type != "cuda":
        return ["native"]
    return [b for b, mod in BACKENDS.items() if mod is None or importlib.util.find_spec(mod) is not None]


def build(args, device: torch.device, dtype: str) -> tuple[Engine, torch.Tensor]:
    torch.manual_seed(0)
    if args.tiny:
        from engine.testing import tiny_transformer_config, tiny_vae

        with torch.device(device):
            tr = CausalWanTransformer3DModel.from_config(tiny_transformer_config(in_channels=16, out_channels=16))
        vae, text_len, text_dim = tiny_vae(0, z_dim=16), 16, tr.config.text_dim
    else:
        from diffusers import AutoencoderKLWan

        with torch.device(device):  # random init directly on the GPU: seconds, not minutes
            tr = CausalWanTransformer3DModel.from_config(WAN_T2V_1_3B)
            vae = AutoencoderKLWan()
        text_len, text_dim = 512, WAN_T2V_1_3B["text_dim"]
    eng = Engine(tr, vae, height=args.height, width=args.width, num_frames=args.frames, text_max_length=text_len,
                 num_frame_per_block=3, denoising_steps=[1000.0, 750.0, 500.0, 250.0])
    eng.to(device, dtype)
    emb = torch.randn(1, text_len, text_dim, generator=torch.Generator().manual_seed(0))
    return eng, emb


def make_decoder(eng: Engine, kind: str, device: torch.device, dtype: str):
    """A fresh streaming decoder: the VAE's, or the fast one (TAEHV's Wan2.1 layout, random weights; tiny widths
    with --tiny)."""
    if kind == "vae":
        return StreamingDecoder(eng.vae)
    if "fast" not in _FAST:
        from engine.models.fast_decoder import FastVideoDecoder

        torch.manual_seed(0)
        kw = dict(channels=(16, 8, 8, 8), blocks_per_stage=1) if eng.transformer.config.num_layers < 30 else {}
        with torch.device(device):
            _FAST["fast"] = FastVideoDecoder(latent_channels=eng.transformer.config.out_channels, **kw).eval()
        _FAST["fast"].to(device, getattr(torch, dtype))
    return StreamingFastDecoder(_FAST["fast"])


_FAST: dict = {}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_run(eng: Engine, emb: torch.Tensor, noise, device, decoder) -> dict:
    gen, dec, first = [], [], None
    sync(device)
    t_start = t = time.perf_counter()
    n_latent = 0
    for chunk in eng.stream(prompt_embeds=emb, noise=noise, output_type="latent"):
        sync(device)
        t1 = time.perf_counter()
        gen.append(t1 - t)
        video = decoder.decode(chunk.latents)  # (B, 3, T, H, W) in [-1, 1]
        frames = to_uint8((video[0].permute(1, 2, 3, 0).float() + 1) / 2)  # (T, H, W, 3) on the host
        t = time.perf_counter()
        dec.append(t - t1)
        first = first if first is not None else t - t_start
        n_latent += chunk.latents.shape[2]
    total = time.perf_counter() - t_start
    n = num_video_frames(eng.vae, n_latent)
    assert frames.dtype.name == "uint8"
    return {"seconds": total, "fps": n / total, "first_chunk_s": first, "block_generate_s": gen,
            "block_decode_s": dec, "vae_share": sum(dec) / total, "num_frames": n}


def bench_backend(eng, emb, noise, device, backend, decoder, args, t0) -> dict:
    eng.transformer.set_attention_backend(backend)
    new = lambda: make_decoder(eng, decoder, device, args.dtype)  # noqa: E731
    for _ in range(args.warmup):
        one_run(eng, emb, noise, device, new())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for _ in range(args.repeats):
        if runs and time.perf_counter() - t0 > args.budget_s:
            break
        runs.append(one_run(eng, emb, noise, device, new()))
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    per_block = [statistics.median(r["block_generate_s"][b] for r in runs) for b in range(len(runs[0]["block_generate_s"]))]
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"backend": backend, "decoder": decoder, "runs": len(runs), "fps": med("fps"), "first_chunk_s": med("first_chunk_s"),
            "seconds": med("seconds"), "vae_share": med("vae_share"), "block_generate_s": per_block,
            "block_decode_s_median": statistics.median(d for r in runs for d in r["block_decode_s"]),
            "peak_memory_gb": peak / 2**30, "peak_memory_kind": "cuda allocated" if device.type == "cuda" else "host RSS",
            "num_frames": runs[0]["num_frames"]}


def main(argv=None) -> dict:
    with torch.no_grad():  # a context, not the global switch: the CPU test calls main() inside pytest
        return _main(argv)


def _main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random config on the CPU (CI)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--backends", nargs="+", default=None, help="of native, flash, xformers; default: all installed")
    ap.add_argument("--decoders", nargs="+", default=["vae"], choices=["vae", "fast"],
                    help="vae: the Wan VAE's streaming decoder; fast: the fast decoder (TAEHV's Wan2.1 architecture, "
                         "random weights)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer (in place)")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no new timed run after this many seconds")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args(argv)
    args.height = args.height or (32 if args.tiny else 480)
    args.width = args.width or (32 if args.tiny else 832)
    args.frames = args.frames or (9 if args.tiny else 81)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    eng, emb = build(args, device, args.dtype)
    if args.compile:
        eng.transformer.compile()  # in place: stays a CausalWanTransformer3DModel; the warm-up pays the compile
    noise = eng.make_noise(args.frames, seed=0)
    wanted = args.backends or installed_backends(device)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": args.dtype, "compile": args.compile, "tiny": args.tiny,
            "height": args.height, "width": args.width, "frames": args.frames,
            "layers": eng.transformer.config.num_layers, "build_s": time.perf_counter() - t0,
            "results": [], "skipped": {}}
    for backend in wanted:
        for decoder in args.decoders:
            key = f"{backend}, {decoder}"
            if time.perf_counter() - t0 > args.budget_s:
                info["skipped"][key] = "time budget spent"
                continue
            try:
                info["results"].append(bench_backend(eng, emb, noise, device, backend, decoder, args, t0))
            except Exception as e:  # a backend missing or unable to run this shape: say so, go on
                info["skipped"][key] = f"{type(e).__name__}: {e}"[:300]
    eng.transformer.set_attention_backend("native")
    info["total_s"] = time.perf_counter() - t0

    print(f"{info['device']}, {args.dtype}, compile={args.compile}, {info['layers']} layers, {args.height}x{args.width}, "
          f"{args.frames} frames; built in {info['build_s']:.1f} s, total {info['total_s']:.1f} s\n")
    print("| backend | decoder | runs | fps | first chunk (s) | s per run | per-block generate (s): first / median / last | "
          "decode share | peak memory GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in info["results"]:
        g = r["block_generate_s"]
        print(f"| {r['backend']} | {r['decoder']} | {r['runs']} | {r['fps']:.1f} | {r['first_chunk_s']:.3f} | {r['seconds']:.2f} | "
              f"{g[0]:.3f} / {statistics.median(g):.3f} / {g[-1]:.3f} | {100 * r['vae_share']:.0f}% | "
              f"{r['peak_memory_gb']:.1f} ({r['peak_memory_kind']}) |")
    for b, why in info["skipped"].items():
        print(f"skipped {b}: {why}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(info, fh, indent=2)
    return info


if __name__ == "__main__":
    main(sys.argv[1:])
