"""python -m engine generate | live | convert | eval | train | merge | ship | attack | sweep

Each sub-command lives with its module: a module that provides `add_arguments(parser)` and `run(args)`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help); modules are imported only when their command runs (or to build its parser)
COMMANDS = {
    "generate": ("engine.commands.generate", "generate a video and write it as mp4"),
    "live": ("engine.commands.live", "an open-ended live stream with prompt switches, written as mp4 + timeline"),
    "convert": ("engine.models.convert", "convert original Wan / Self-Forcing weights to an engine directory"),
    "eval": ("engine.data.evaluate", "score a checkpoint with the shapes evaluator"),
    "train": ("engine.training.cli", "train a VAE, a teacher, an ODE-initialised or a Self-Forcing DMD generator"),
    "merge": ("engine.commands.merge", "interpolate the weights of two generators of one lineage (WiSE-FT)"),
    "ship": ("engine.commands.ship", "copy a trained engine directory, with its model card, to where it ships"),
    "attack": ("engine.attack.cli", "optimise the sampler noise against an objective"),
    "sweep": ("engine.attack.sweep", "run many attacks over prompts x seeds (resumable, sharded)"),
    "quantized": ("engine.quantized.cli", "quantized generator: codebook analysis, conversion, presets"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    runners = {}
    for name, (module, help_) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):  # the command's module is not part of this build
                continue
            raise
        if not hasattr(mod, "add_arguments"):
            continue
        p = sub.add_parser(name, help=help_, description=help_)
        mod.add_arguments(p)
        runners[name] = mod.run
    return parser, runners


def main(argv=None) -> int:
    parser, runners = build_parser()
    args = parser.parse_args(argv)
    try:
        return runners[args.command](args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
