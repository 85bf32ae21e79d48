"""python -m engine train STAGE --config FILE --output-dir DIR [--max-steps N] [--minutes M] [--resume] [--key value ...]

STAGE: vae | teacher | ode-init | dmd | vq | vq-dmd. FILE: a YAML preset (a path, or a name from configs/ such as
tiny-dmd). `--key value` overrides any config key with a dotted path (`--dmd.loss sid --optim.lr 1e-5`); values are
YAML. Several processes: `accelerate launch --config_file configs/accelerate-ddp.yaml -m engine train ...` or
`torchrun --nproc_per_node N -m engine train ...`. See docs/training.md.

The default model (docs/default-model.md) is a chain of these stages with the shapes presets: vae
(configs/shapes-vae.yaml: the codec, and the base directory with a new text encoder) -> teacher (its latent cache
at data.path) -> ode-init (configs/shapes-ode-init.yaml: the ODE bank, then the causal student) -> dmd; then
`python -m engine eval` (students, or teachers with --teacher-steps) and `python -m engine ship`.

The fast streaming decoder (TAEHV architecture) is distilled from an engine's VAE by the stage fast-decoder:
`python -m engine train fast-decoder --config fast-decoder --output-dir runs/fast-decoder --minutes 30`; its options
are those of `engine.training.fast_decoder` (a preset's keys, `--key value`, --minutes, --resume).
"""

from __future__ import annotations

import argparse
import sys

from .config import STAGES, dump_config, list_presets, load_config, positive_minutes

EXIT_NONFINITE = 3
FAST_DECODER_STAGE = "fast-decoder"


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"YAML preset: a path or a name in configs/ ({', '.join(list_presets())})")
    p.add_argument("--output-dir", help="run directory (metrics, checkpoints, engine directories, samples)")
    p.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    p.add_argument("--minutes", type=positive_minutes, default=None,
                   help="wall-clock budget of this call (train.max_minutes): a checkpoint at the end; --resume goes on")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("stage", choices=STAGES + (FAST_DECODER_STAGE,))
    _options(p)
    # everything after STAGE, including the options above when they come after it, lands here: run() sorts it out
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value config overrides (dotted keys)")


def parse(args) -> tuple[argparse.Namespace, list[str]]:
    """Split the remainder into the known options and the config overrides."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _options(p)
    known, overrides = p.parse_known_args(args.overrides or [])
    for k, v in vars(known).items():
        if v is not None and v is not False:  # not `v not in (None, False)`: 0 == False, and --max-steps 0 counts
            setattr(args, k, v)
    return args, overrides


def run_fast_decoder(args) -> int:
    """The fast-decoder stage: hand the command line to its driver."""
    from .fast_decoder import main as fast_decoder_main

    argv = [x for k in ("config", "output_dir") if getattr(args, k) for x in (f"--{k.replace('_', '-')}", getattr(args, k))]
    argv += (["--max-steps", str(args.max_steps)] if args.max_steps is not None else [])
    argv += [flag for flag, on in (("--resume", args.resume), ("--print-config", args.print_config)) if on]
    argv += ["--minutes", str(args.minutes)] if args.minutes is not None else []
    return fast_decoder_main(argv + list(args.overrides or []))


def run(args) -> int:
    if args.stage == FAST_DECODER_STAGE:
        return run_fast_decoder(args)
    args, overrides = parse(args)
    if not args.config:
        raise ValueError("--config FILE is required (a YAML preset; see configs/)")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    if not args.output_dir:
        raise ValueError("--output-dir DIR is required")
    from .trainer import train

    result = train(cfg, args.output_dir, stage=args.stage, resume=args.resume, max_steps=args.max_steps,
                   minutes=args.minutes)
    if result.stopped == "nonfinite":
        print(f"error: the run stopped at step {result.step} after too many non-finite steps in a row",
              file=sys.stderr)
        return EXIT_NONFINITE
    if result.stage.rt.is_main:
        print(f"done: step {result.step}; engine directory {result.output_dir / result.stage.product}")
    return 0
