"""python -m engine merge A B --weight W --out DIR: a generator whose weights lie on the line from A to B.

Weight-space interpolation of two fine-tunes of one network (WiSE-FT, Wortsman et al. 2022; model soups): the
transformer and text encoder become (1 - W) * A + W * B, tensor by tensor (float64 sums, cast back). It trades what
one stage gained against what the other kept without training again: docs/default-model.md uses it between a DMD
stage that holds a long stream's colour and a later one that follows short-clip prompts better. A and B must be
one architecture with one sampler configuration and one VAE (interpolating the decoder of latents would change
what the latents mean); the VAE, tokenizer, fast decoder and the rolling-window settings are A's. The result is
written atomically with a training.json that names its sources.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch


# engine_config.json settings that say how a stream is served, not what the weights were trained for: they may
# differ (e.g. a run directory without the live window beside a shipped model with it) and the result takes A's
SERVING_SETTINGS = ("local_attn_frames", "sink_frames")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="engine directory at --weight 0 (e.g. the stage that holds long streams)")
    p.add_argument("b", help="engine directory at --weight 1")
    p.add_argument("--weight", type=float, required=True, help="share of B, in [0, 1]")
    p.add_argument("--out", required=True, help="destination engine directory")
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def _interpolate_into(target: torch.nn.Module, other: torch.nn.Module, weight: float, what: str) -> None:
    """target's floating tensors <- (1 - weight) * target + weight * other; integer buffers must agree."""
    mine, theirs = target.state_dict(), other.state_dict()
    if mine.keys() != theirs.keys():
        diff = sorted(set(mine) ^ set(theirs))
        raise ValueError(f"the two {what}s have different tensors ({len(diff)} differ, e.g. {diff[0]!r}); "
                         f"merge needs one architecture")
    mixed = {}
    for name, a in mine.items():
        b = theirs[name]
        if a.shape != b.shape:
            raise ValueError(f"{what} tensor {name!r} has shape {tuple(a.shape)} in A and {tuple(b.shape)} in B; "
                             f"merge needs one architecture")
        if a.is_floating_point():
            mixed[name] = (a.double() * (1 - weight) + b.double() * weight).to(a.dtype)
        elif not torch.equal(a, b):
            raise ValueError(f"{what} buffer {name!r} differs between A and B and cannot be interpolated")
        else:
            mixed[name] = a
    target.load_state_dict(mixed)


def merge_engines(a, b, weight: float):
    """Engine a, changed in place to (1 - weight) * a + weight * b (transformer, text encoder); returns a."""
    if not (isinstance(weight, (int, float)) and 0.0 <= weight <= 1.0):
        raise ValueError(f"--weight must be in [0, 1] (the share of B), got {weight!r}")
    ca, cb = dataclasses.asdict(a.config), dataclasses.asdict(b.config)
    changed = sorted(k for k in ca if ca[k] != cb[k] and k not in SERVING_SETTINGS)
    if changed:
        raise ValueError(f"A and B have different engine_config.json settings ({', '.join(changed)}); merge needs "
                         f"one sampler configuration")
    va, vb = a.vae.state_dict(), b.vae.state_dict()
    if va.keys() != vb.keys() or any(not torch.equal(va[k], vb[k]) for k in va):
        raise ValueError("A and B have different VAEs; merge interpolates generators of one latent space, so both "
                         "must carry the same vae/ (e.g. two stages distilled against one teacher)")
    if (a.text_encoder is None) != (b.text_encoder is None):
        raise ValueError("one of A and B has a text encoder and the other has none")
    _interpolate_into(a.transformer, b.transformer, weight, "transformer")
    if a.text_encoder is not None:
        _interpolate_into(a.text_encoder, b.text_encoder, weight, "text encoder")
    return a


def run(args) -> int:
    from engine import Engine
    from engine.atomic import refuse_to_replace

    out = Path(args.out)
    refuse_to_replace(out, args.force)
    a, b = Engine.from_pretrained(args.a), Engine.from_pretrained(args.b)
    merge_engines(a, b, args.weight)

    a.model_card = (f"# merged generator\n\n`python -m engine merge {args.a} {args.b} --weight {args.weight}`: "
                    f"{1 - args.weight:g} x the first + {args.weight:g} x the second (transformer, text encoder).\n")
    record = {"stage": "merge", "network": "generator", "weight": args.weight,
              "sources": [str(Path(args.a)), str(Path(args.b))]}
    a.save_pretrained(out, extra_files={"training.json": json.dumps(record)})
    print(f"merged {args.a} x {1 - args.weight:g} + {args.b} x {args.weight:g} -> {out}")
    return 0
