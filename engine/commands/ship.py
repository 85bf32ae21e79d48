"""python -m engine ship SRC --out DIR [--card FILE] [--force]: a trained engine directory, ready to hand out.

The last step of a training chain (docs/default-model.md): every stage of `python -m engine train` already writes
engine directories (DIR/teacher, DIR/generator: symlinks into checkpoints, their VAE and text encoder hard-linked),
so shipping loads one with `Engine.from_pretrained` (which checks it) and writes a self-contained copy (safetensors,
engine_config.json, the model card as README.md) atomically to --out, e.g. checkpoints/shapes-sf.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="engine directory to ship (e.g. runs/shapes-dmd/generator)")
    p.add_argument("--out", required=True, help="destination engine directory (e.g. checkpoints/shapes-sf)")
    p.add_argument("--card", default=None, help="model card (markdown) written as README.md; default: the source's")
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def run(args) -> int:
    from engine import Engine
    from engine.atomic import refuse_to_replace

    out = Path(args.out)
    refuse_to_replace(out, args.force)
    if args.card is not None and not Path(args.card).is_file():
        raise FileNotFoundError(f"model card {args.card} does not exist")
    eng = Engine.from_pretrained(args.source)
    if args.card is not None:
        eng.model_card = Path(args.card).read_text()
    record = Path(args.source) / "training.json"  # what made it (a distillation checks its teacher by it)
    eng.save_pretrained(out, extra_files={"training.json": record.read_text()} if record.is_file() else None)
    print(f"shipped {args.source} -> {out}")
    return 0
