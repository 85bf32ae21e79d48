"""python -m engine attack "PROMPT" [--seed S] [--objective untargeted|targeted --target FILE] [--budget l2 --eps 0.1]
[--steps N --lr LR --optimizer adam|sgd|pgd] [--learn z0,step --step-noise independent|derived|frozen] --out DIR

Optimise the sampler noise of one video against an objective and write the result directory (see
engine/attack/result.py). The attack options are shared with `python -m engine sweep`.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch

from ..sampling.noise import MODES
from .budget import KINDS
from .optimize import (DECODER_CHECKPOINTS, LR_SCHEDULES, OPTIMIZERS, TRANSFORMER_CHECKPOINTS, AttackSettings,
                       check_attack, resolve_budget, resolve_objective)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov")
TENSOR_SUFFIXES = (".pt", ".pth", ".safetensors", ".npy")


def add_attack_arguments(p: argparse.ArgumentParser) -> None:
    """The options of one attack (everything but the prompt(s), the seed(s) and the output)."""
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", default=None, help="engine directory (default: the shipped model)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is fastest for tiny models on a busy machine)")
    g.add_argument("--frames", type=int, default=None, help="video frames (1 + 4 (N - 1), N whole blocks)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)

    g = p.add_argument_group("objective")
    g.add_argument("--objective", default="untargeted", choices=["untargeted", "targeted"],
                   help="untargeted: maximise MSE to the baseline video; targeted: minimise MSE to --target")
    g.add_argument("--target", default=None,
                   help=f"target for 'targeted': image ({', '.join(IMAGE_SUFFIXES)}), video "
                        f"({', '.join(VIDEO_SUFFIXES)}) or tensor ({', '.join(TENSOR_SUFFIXES)}); pixel values in "
                        f"[0, 1] (images and videos are scaled from uint8), same size as the video")
    g.add_argument("--space", default="pixel", choices=["pixel", "latent"])
    g.add_argument("--frame-range", default=None, metavar="START:STOP",
                   help="only these frames (video frames in pixel space, latent frames in latent space)")
    g.add_argument("--region", default=None, metavar="Y0:Y1,X0:X1",
                   help="only this rectangle (pixels in pixel space, latent pixels in latent space)")

    g = p.add_argument_group("budget")
    g.add_argument("--budget", default="none", choices=list(KINDS), help="ball around the initial noise")
    g.add_argument("--eps", type=float, default=None, help="radius in noise standard deviations (RMS for l2)")
    g.add_argument("--chi-weight", type=float, default=0.0, help="weight of ReNO's chi-shell regulariser on ||z||")
    g.add_argument("--renormalize", action="store_true", help="rescale the noise to ||z|| = sqrt(d) after each step")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--lr", type=float, default=0.05, help="step size, noise standard deviations")
    g.add_argument("--optimizer", default="adam", choices=list(OPTIMIZERS))
    g.add_argument("--lr-schedule", default="constant", choices=list(LR_SCHEDULES))
    g.add_argument("--warmup", type=int, default=0)
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--grad-clip", type=float, default=None, help="clip the global gradient norm")
    g.add_argument("--learn", default="z0", help="z0, step or z0,step")
    g.add_argument("--step-noise", default="independent", choices=list(MODES), help="step-noise mode")
    rs = g.add_mutually_exclusive_group()
    rs.add_argument("--random-start", dest="random_start", action="store_true", default=None,
                    help="start at a random point of the budget (default: only for untargeted)")
    rs.add_argument("--no-random-start", dest="random_start", action="store_false")
    g.add_argument("--start-scale", type=float, default=None, help="random-start radius (default: eps, else 0.05)")
    g.add_argument("--patience", type=int, default=None, help="stop after N iterations without improvement")
    g.add_argument("--min-delta", type=float, default=0.0)
    g.add_argument("--stop-value", type=float, default=None, help="stop once the objective reaches this value")
    g.add_argument("--detach-cache", action="store_true",
                   help="cut gradient paths through the KV cache (faster, partial gradients for early blocks)")
    g.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="keep all activations (faster, much more memory)")
    g.add_argument("--transformer-checkpoint", default="auto", choices=list(TRANSFORMER_CHECKPOINTS),
                   help="under checkpointing: every transformer layer call, off, or auto (off when its activations "
                        "fit within half the generation's memory)")
    g.add_argument("--decoder-checkpoint", default="auto", choices=list(DECODER_CHECKPOINTS),
                   help="VAE decoder checkpoint segments under checkpointing: one latent frame (least memory), "
                        "one block, off (no recompute, most memory), or auto (the last frames kept as far as "
                        "the generation's memory allows)")

    g = p.add_argument_group("output")
    g.add_argument("--no-videos", action="store_true", help="do not write baseline.mp4 / attacked.mp4")
    g.add_argument("--no-plots", action="store_true", help="do not write curves.png / frames.png")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="result directory (default: attacks/<prompt>-s<seed>)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    add_attack_arguments(p)


# ------------------------------------------------------------------------------------------------ parsing
def _range(text: str, what: str) -> tuple[int | None, int | None]:
    m = re.fullmatch(r"\s*(-?\d*)\s*:\s*(-?\d*)\s*", text or "")
    if not m:
        raise ValueError(f"{what} must look like START:STOP (either may be empty), got {text!r}")
    return tuple(int(x) if x else None for x in m.groups())


def settings_from_args(args) -> dict:
    """The AttackSettings fields given on the command line, validated (ValueError before any work)."""
    settings = dict(steps=args.steps, lr=args.lr, optimizer=args.optimizer, lr_schedule=args.lr_schedule,
                    warmup=args.warmup, momentum=args.momentum, grad_clip=args.grad_clip, learn=args.learn,
                    step_noise_mode=args.step_noise, random_start=args.random_start, start_scale=args.start_scale,
                    patience=args.patience, min_delta=args.min_delta, stop_value=args.stop_value,
                    detach_cache=args.detach_cache, checkpointing=args.checkpointing,
                    transformer_checkpoint=args.transformer_checkpoint, decoder_checkpoint=args.decoder_checkpoint)
    s = AttackSettings(**settings)
    settings["learn"] = s.learn
    return settings


def budget_from_args(args) -> dict:
    b = dict(kind=args.budget, eps=args.eps, chi_weight=args.chi_weight, renormalize=args.renormalize)
    resolve_budget(b)
    return b


def load_target(path: str) -> torch.Tensor:
    """An image (H, W, 3), video (T, H, W, 3) in [0, 1], or a tensor file as is."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"target file {p} does not exist")
    suffix = p.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        import numpy as np
        from PIL import Image

        with Image.open(p) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).float() / 255
    if suffix in VIDEO_SUFFIXES:
        from ..video import read_video

        return torch.from_numpy(read_video(p)[0]).float() / 255
    if suffix in (".pt", ".pth"):
        t = torch.load(p, map_location="cpu", weights_only=True)
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        d = load_file(p)
        if len(d) != 1 and "target" not in d:
            raise ValueError(f"{p} holds tensors {sorted(d)}: expected one tensor, or one named 'target'")
        t = d.get("target", next(iter(d.values())))
    elif suffix == ".npy":
        import numpy as np

        t = torch.from_numpy(np.load(p))
    else:
        raise ValueError(f"unknown target file type {suffix!r}; accepted: "
                         f"{', '.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES + TENSOR_SUFFIXES)}")
    if not torch.is_tensor(t):
        raise ValueError(f"{p} does not hold a tensor")
    return t.float() if t.dtype != torch.float64 else t


def objective_from_args(args, engine) -> dict:
    """objective=..., target=..., space=..., frames=..., mask=... for engine.attack (checked against the engine)."""
    if args.objective == "untargeted" and args.target:
        raise ValueError("--target is for --objective targeted")
    kw = dict(objective=args.objective, space=args.space)
    if args.target:
        kw["target"] = load_target(args.target)
    if args.frame_range:
        kw["frames"] = _range(args.frame_range, "--frame-range")
    if args.region:
        parts = args.region.split(",")
        if len(parts) != 2:
            raise ValueError(f"--region must look like Y0:Y1,X0:X1, got {args.region!r}")
        (y0, y1), (x0, x1) = _range(parts[0], "--region rows"), _range(parts[1], "--region columns")
        shape = engine.latent_shape(args.frames or engine.config.num_frames, args.height, args.width)
        h, w = shape[3:]
        if args.space == "pixel":
            from ..sampling.codec import spatial_compression

            h, w = h * spatial_compression(engine.vae), w * spatial_compression(engine.vae)
        mask = torch.zeros(h, w)
        mask[slice(y0, y1), slice(x0, x1)] = 1
        if mask.sum() == 0:
            raise ValueError(f"--region {args.region} selects nothing of a {h}x{w} {args.space} frame")
        kw["mask"] = mask
    resolve_objective(**kw)
    return kw


def load_engine(args):
    from .. import Engine, default_checkpoint

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    path = args.checkpoint or default_checkpoint()
    return Engine.from_pretrained(path, device=args.device, dtype=args.dtype)


def prepare(args):
    """Validate every option, load the engine, check shapes: (engine, kwargs for engine.attack). No model call."""
    settings, budget = settings_from_args(args), budget_from_args(args)
    eng = load_engine(args)
    kwargs = dict(objective_from_args(args, eng), budget=budget, num_frames=args.frames, height=args.height,
                  width=args.width, **settings)
    obj_kw = {k: kwargs[k] for k in ("target", "space", "frames", "mask") if k in kwargs}
    check_attack(eng, objective=resolve_objective(kwargs["objective"], **obj_kw), num_frames=args.frames,
                 height=args.height, width=args.width)
    return eng, kwargs


def slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", (text or "").lower()).strip("-")
    return s[:n].rstrip("-") or "prompt"


def format_summary(s: dict) -> str:
    def f(x, spec=".4g"):
        return "-" if x is None else (format(x, spec) if isinstance(x, (int, float)) and math.isfinite(x) else str(x))

    return (f"objective {s['objective']} ({'max' if s['maximize'] else 'min'}, {s['space']}): baseline "
            f"{f(s['baseline_value'])} -> best {f(s['best_value'])} at iteration {s['best_iteration']} of "
            f"{s['iterations']}\nattacked vs baseline: PSNR {f(s['psnr'], '.2f')} dB, SSIM {f(s['ssim'])}, "
            f"MSE {f(s['mse'])}; perturbation RMS {f(s['delta_rms'])}, L-inf {f(s['delta_linf'])}\n"
            f"noise: ||z|| / sqrt(d) = {f(s['norm_ratio'])}, KS {f(s['ks'])} (p = {f(s['ks_pvalue'])})\n"
            f"stopped: {s['stop_reason']}; {f(s['seconds'], '.1f')} s ({f(s['seconds_per_iteration'], '.2f')} s per "
            f"iteration)")


def run(args) -> int:
    eng, kwargs = prepare(args)
    out = Path(args.out or f"attacks/{slug(args.prompt)}-s{args.seed}")
    result = eng.attack(args.prompt, seed=args.seed, progress=args.progress, **kwargs)
    result.save(out, videos=not args.no_videos, plots=not args.no_plots)
    print(format_summary(result.summary()))
    print(f"wrote {out}")
    return 0
