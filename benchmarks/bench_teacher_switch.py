"""A bidirectional teacher on prompt switches: does it show the old prompt before a switch and the new one after?
(issue 15, item 5: the teacher and the critic must know what a switch looks like.)

    python benchmarks/bench_teacher_switch.py --teacher checkpoints/shapes-teacher [--seeds 0 1] [--limit 32]

For each one-object prompt of the evaluator's set (engine.data.evaluate.EVAL_PROMPTS), each seed and each switch
kind (colour / direction / both), a timeline [(0, p), (b, p')] with p' = engine.data.shapes.next_prompt(p, kind)
(the switch the long-stream evaluation uses) and b the block of the switch (1 or 2 of the 3 blocks of a 33-frame
clip, alternating): the teacher's Euler ODE (--steps, CFG w, standard convention) from the engine's noise for the
seed, conditioned per latent frame (B, F, L, D), decoded by the VAE. The evaluator judges the frames before the
switch against p and the frames from the switch's first frame on against p' (its colour check also fails a colour
the prompt does not name: the old colour must be gone). The same clips without a switch (p throughout) are the
baseline. Reported: colour / shape / direction / all correct on each side, and "switched" = the after-side all
correct.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import engine
from engine.data.evaluate import EVAL_PROMPTS, evaluate_video
from engine.data.shapes import block_frame, ShapesConfig, next_prompt, parse_prompt
from engine.io import to_uint8
from engine.models.causal_wan import CausalWanTransformer3DModel
from engine.sampling.codec import decode_full
from engine.sampling.schedule import FlowSchedule
from engine.training.ode import ode_grid, ode_solve

KINDS = ("color", "direction", "both")
METRICS = ("color", "shape", "direction", "correct")


@torch.no_grad()
def teacher_frames(eng, teacher, prompts_per_frame: list[str], seed: int, steps: int, w: float) -> np.ndarray:
    noise = eng.make_noise(None, seed)
    embeds = {p: eng.encode_prompt(p) for p in set(prompts_per_frame)}  # (1, L, D) each
    cond = torch.stack([embeds[p][0] for p in prompts_per_frame])[None]  # (1, F, L, D)
    grid = ode_grid(FlowSchedule(eng.config.num_train_timesteps, eng.config.shift), steps)
    _, lat = ode_solve(teacher, noise.z0, cond, torch.zeros_like(cond), w, grid)
    video = decode_full(eng.vae, lat).clamp(-1, 1)[0]  # (3, T, H, W)
    return to_uint8((video.permute(1, 2, 3, 0) + 1) / 2)  # (T, H, W, 3)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, help="teacher engine directory (or its transformer/ folder)")
    ap.add_argument("--checkpoint", default=str(engine.default_checkpoint()), help="VAE, text encoder, sampler")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--limit", type=int, default=0, help="first N one-object prompts (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    eng = engine.Engine.from_pretrained(args.checkpoint)
    tdir = args.teacher.rstrip("/")
    tdir = tdir if tdir.endswith("transformer") else f"{tdir}/transformer"
    teacher = CausalWanTransformer3DModel.from_pretrained(tdir).eval()
    cfg = ShapesConfig(height=eng.config.height, width=eng.config.width, num_frames=eng.config.num_frames,
                       frames_per_block=eng.config.num_frame_per_block)
    n_latent = (eng.config.num_frames - 1) // 4 + 1
    k = eng.config.num_frame_per_block
    one = [p for p in EVAL_PROMPTS if len(parse_prompt(p).objects) == 1]
    one = one[:args.limit] if args.limit else one
    rows = []
    rng = np.random.default_rng(0)
    for seed in args.seeds:
        for i, p in enumerate(one):
            for j, kind in enumerate(KINDS):
                b = 1 + (i + j + seed) % 2  # the switch at block 1 or 2
                new = str(next_prompt(parse_prompt(p), kind, rng))
                per_frame = [p if f < b * k else new for f in range(n_latent)]
                s = block_frame(b, cfg)
                for switched, prompts in (("switch", per_frame), ("none", [p] * n_latent)):
                    frames = teacher_frames(eng, teacher, prompts, seed, args.steps, args.guidance)
                    after_prompt = new if switched == "switch" else p
                    before, after = evaluate_video(p, frames[:s]), evaluate_video(after_prompt, frames[s:])
                    rows.append({"seed": seed, "prompt": p, "new": after_prompt, "kind": kind, "block": b,
                                 "case": switched, **{f"before_{m}": before[m] for m in METRICS},
                                 **{f"after_{m}": after[m] for m in METRICS}})
    out = {"teacher": args.teacher, "steps": args.steps, "guidance": args.guidance, "rows": rows}
    print(f"teacher {args.teacher}: {len(one)} one-object prompts x seeds {args.seeds} x {len(KINDS)} kinds; "
          f"{args.steps} Euler steps, CFG {args.guidance}\n")
    print("| case | clips | before: colour / shape / direction / all | after: colour / shape / direction / all |")
    print("|---|---:|---|---|")
    for case in ("none", "switch"):
        r = [x for x in rows if x["case"] == case]
        mean = lambda key: 100 * float(np.mean([x[key] for x in r]))  # noqa: E731
        print(f"| {case} | {len(r)} | " + " / ".join(f"{mean('before_' + m):.1f}" for m in METRICS) + " | "
              + " / ".join(f"{mean('after_' + m):.1f}" for m in METRICS) + " |")
    for kind in KINDS:
        r = [x for x in rows if x["case"] == "switch" and x["kind"] == kind]
        print(f"switch {kind}: after all correct {100 * np.mean([x['after_correct'] for x in r]):.1f}% "
              f"({len(r)} clips)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return out


if __name__ == "__main__":
    main()
