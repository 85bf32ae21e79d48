"""python -m engine.quantized analyze | convert | presets   (also `python -m engine quantized ...` when registered)

    analyze CHECKPOINT --prompt P [--prompt P2 ...] --out DIR [--analyze-codebook] [--visualize]
        --analyze-codebook: codebook.json (usage, perplexity, dead codes overall / per step / per frame, code maps)
                            + usage_histogram.png + code_maps.png
        --visualize:        frames.png (a grid of frames per prompt) + one mp4 per prompt
    convert SRC --out DST [--preset NAME] [--quantizer vq|fsq] [--codebook-size K] [--codebook-dim D] ...
        an engine directory whose transformer gets a fresh quantizer head (to be trained: vq / vq-dmd stages)
    presets
        the table of named presets
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="action", required=True)

    a = sub.add_parser("analyze", help="codebook analysis and frame grids of a quantized checkpoint")
    a.add_argument("checkpoint", help="engine directory with a quantized transformer")
    a.add_argument("--prompt", action="append", default=None, help="repeatable; default: 'a red circle moving right'")
    a.add_argument("--frames", type=int, default=None, help="video frames (default: the checkpoint's)")
    a.add_argument("--seed", type=int, default=0, help="seed of the first prompt (seed + i for the i-th)")
    a.add_argument("--out", default="codebook-analysis", help="output directory")
    a.add_argument("--analyze-codebook", action="store_true", help="write codebook.json and the PNG plots")
    a.add_argument("--visualize", action="store_true", help="write frames.png and one mp4 per prompt")
    a.add_argument("--device", default="cpu")
    a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])

    c = sub.add_parser("convert", help="add a fresh quantizer head to an engine directory's transformer")
    c.add_argument("source", help="engine directory")
    c.add_argument("--out", required=True, help="new engine directory")
    c.add_argument("--preset", default=None, help="take the quantizer settings of this preset")
    c.add_argument("--quantizer", choices=["vq", "fsq"], default=None)
    c.add_argument("--codebook-size", type=int, default=None)
    c.add_argument("--codebook-dim", type=int, default=None)
    c.add_argument("--fsq-levels", type=int, nargs="+", default=None)
    c.add_argument("--noise-schedule", choices=["flow", "linear", "cosine"], default=None)
    c.add_argument("--seed", type=int, default=0, help="initialisation seed of the projections")

    sub.add_parser("presets", help="print the named presets")


def run(args) -> int:
    if args.action == "presets":
        from .presets import PRESETS, preset_table

        print(preset_table())
        for p in PRESETS.values():
            print(f"- {p.name}: {p.description}")
        return 0
    if args.action == "convert":
        return _convert(args)
    return _analyze(args)


def _analyze(args) -> int:
    from engine.video import write_mp4

    from .analysis import analyze_codebook
    from engine.pipeline import Engine

    if not (args.analyze_codebook or args.visualize):
        raise ValueError("nothing to do: pass --analyze-codebook and / or --visualize")
    eng = Engine.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype)
    prompts = args.prompt or ["a red circle moving right"]
    if args.frames is not None:
        eng.latent_frames(args.frames)  # validate before any work
    rep = analyze_codebook(eng, prompts, num_frames=args.frames, seed=args.seed, decode=args.visualize)
    out = Path(args.out)
    paths = rep.write(out, plots=args.analyze_codebook, visualize=args.visualize)
    if not args.analyze_codebook:
        paths.pop("json").unlink()
    if args.visualize:
        for i, frames in enumerate(rep.videos):
            paths[f"video{i}"] = Path(write_mp4(out / f"video-{i}.mp4", frames, eng.config.fps))
    o = rep.overall
    print(f"codebook usage {100 * o['usage']:.1f}% ({o['used_codes']}/{o['codebook_size']}), perplexity "
          f"{o['perplexity']:.2f}, dead codes {o['dead_codes']} over {o['num_tokens']} tokens")
    for name, p in paths.items():
        print(f"wrote {p}")
    return 0


def _convert(args) -> int:
    import torch

    from engine.models.quantized_wan import QuantizedCausalWanTransformer3DModel
    from engine.training.vq import quantizer_config
    from engine.training.vq_config import VQTrainConfig

    from engine.pipeline import Engine

    eng = Engine.from_pretrained(args.source)
    if isinstance(eng.transformer, QuantizedCausalWanTransformer3DModel):
        raise ValueError(f"{args.source} is quantized already")
    over = {k: v for k, v in (("quantizer", args.quantizer), ("codebook_size", args.codebook_size),
                              ("codebook_dim", args.codebook_dim), ("fsq_levels", args.fsq_levels)) if v is not None}
    if args.quantizer == "fsq" and "codebook_size" not in over:
        over["codebook_size"] = None  # implied by the levels
    qcfg = quantizer_config(VQTrainConfig(preset=args.preset, quantizer=over))
    if args.noise_schedule is not None:
        qcfg["noise_schedule"] = args.noise_schedule
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        eng.transformer = QuantizedCausalWanTransformer3DModel.from_unquantized(eng.transformer, **qcfg).eval()
    path = eng.save_pretrained(args.out)
    keys = ("quantizer", "codebook_size", "codebook_dim")
    print(f"wrote {path}: {json.dumps({k: eng.transformer.config[k] for k in keys})}")
    return 0


def main(argv=None) -> int:
    import sys

    p = argparse.ArgumentParser(prog="python -m engine.quantized")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
