"""How well a teacher denoises windows of a stream: its flow-matching loss on block-aligned windows of long shapes
clips, window by window (issue 15, item 6: long-horizon DMD shows the teacher such windows).

    python benchmarks/bench_teacher_windows.py checkpoints/shapes-teacher runs/shapes-teacher-stream/teacher \
        [--clips 64] [--stream-frames 81] [--seed 7] [--history 1] [--by-colour]

Held-out clips (data seed 7; the teachers train on seed 1) of --stream-frames video frames, 30% of them with a
prompt switch (the teacher data's settings, free_frames 16: the objects bounce after that), are encoded whole by
each teacher's VAE, as a stream's frames are. Each window of the teacher's clip length (engine_config num_frames'
latent frames) that starts at a block boundary is noised at fixed timesteps with noise fixed per (clip, window,
timestep), identical for every teacher (a paired comparison), and the teacher's flow prediction is scored against
eps - x0 (`FlowMatchingLoss`, MEAN), conditioned on the window's per-frame prompts. Window 0 is the clip the
teachers were trained on; later windows start mid-stream (a first latent frame of four video frames). With
--history H up to H blocks of the stream before a window go with it, clean at timestep 0 and outside the loss
(what `flow_matching.stream_history` trains).
"""

from __future__ import annotations

import argparse
import json

import torch

import engine
from engine.data.shapes import TEMPORAL, ShapesConfig, ShapesDataset
from engine.models.causal_wan import CausalWanTransformer3DModel
from engine.training.data import encode_video, frame_prompts, seeded
from engine.training.losses import FlowMatchingLoss
from engine.sampling.schedule import FlowSchedule

TIMESTEPS = (100.0, 300.0, 500.0, 700.0, 900.0)


@torch.no_grad()
def window_losses(path: str, clips: int, stream_frames: int, seed: int, history: int = 0, batch: int = 16,
                  by_colour: dict | None = None) -> list[list[float]]:
    """[window][timestep] mean flow-matching loss of the teacher at `path` (an engine directory) on each window's
    F frames, with up to `history` blocks of the stream before it clean at timestep 0. by_colour: filled with
    {colour of the clip's first object: [loss of each (clip, mid-stream window, timestep)]}."""
    eng = engine.Engine.from_pretrained(path)
    net = CausalWanTransformer3DModel.from_pretrained(f"{path}/transformer").eval()
    c, k = eng.config, eng.config.num_frame_per_block
    F = eng.latent_shape(c.num_frames)[2]
    scfg = ShapesConfig(height=c.height, width=c.width, num_frames=stream_frames, fps=c.fps, frames_per_block=k,
                        switch_prob=0.3, free_frames=16)
    ds = ShapesDataset(scfg, seed=seed, length=clips)
    n = (stream_frames - 1) // TEMPORAL + 1
    if (n - F) % k:
        raise ValueError(f"--stream-frames {stream_frames} ({n} latent frames) is not the clip's {F} latent frames "
                         f"plus whole blocks of {k}")
    loss_fn = FlowMatchingLoss(FlowSchedule(c.num_train_timesteps, c.shift))
    out = [[0.0] * len(TIMESTEPS) for _ in range((n - F) // k + 1)]
    for b0 in range(0, clips, batch):
        items = [ds[i] for i in range(b0, min(b0 + batch, clips))]
        lat = encode_video(eng.vae, torch.stack([it["video"] for it in items]))  # (B, C, n, h, w)
        per_frame = [frame_prompts(it["timeline"], n, k) for it in items]
        emb = {p: eng.encode_prompt(p)[0] for p in {p for f in per_frame for p in f}}
        cond = torch.stack([torch.stack([emb[p] for p in f]) for f in per_frame])  # (B, n, L, D)
        for w in range(len(out)):
            h = k * min(w, history)  # clean frames before the window
            x, e = lat[:, :, w * k - h : w * k + F], cond[:, w * k - h : w * k + F]
            for j, t in enumerate(TIMESTEPS):
                eps = torch.randn(x[:, :, h:].shape, generator=seeded(seed, b0, w, j))  # the same with any history
                tt = torch.full((x.shape[0],), t)
                ctx = torch.zeros(x.shape[0], h)
                per_clip = [loss_fn(x[i : i + 1, :, h:], lambda x_t, t_: net(
                    torch.cat([x[i : i + 1, :, :h], x_t], 2), torch.cat([ctx[i : i + 1], t_[:, None].expand(-1, F)], 1),
                    e[i : i + 1]).sample[:, :, h:], t=tt[i : i + 1], eps=eps[i : i + 1])[0].item()
                    for i in range(x.shape[0])]
                out[w][j] += sum(per_clip) / clips
                if by_colour is not None and w:
                    for it, v in zip(items, per_clip):
                        by_colour.setdefault(it["timeline"][0][1].split()[1], []).append(v)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("teachers", nargs="+", help="teacher engine directories")
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--stream-frames", type=int, default=81)
    ap.add_argument("--seed", type=int, default=7, help="data seed of the held-out clips")
    ap.add_argument("--history", type=int, default=0, help="clean stream blocks before each window (timestep 0)")
    ap.add_argument("--by-colour", action="store_true", help="also the mid-stream windows' loss by object colour")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.clips < 1:
        raise SystemExit(f"--clips must be >= 1, got {args.clips}")
    torch.set_num_threads(args.threads)
    colours = {t: {} for t in args.teachers} if args.by_colour else {}
    res = {t: window_losses(t, args.clips, args.stream_frames, args.seed, args.history, by_colour=colours.get(t))
           for t in args.teachers}
    print(f"flow-matching loss by window (block-aligned, window 0 = the training clip), {args.clips} clips of "
          f"{args.stream_frames} frames, data seed {args.seed}, {args.history} clean blocks of history; mean over t "
          f"in {list(TIMESTEPS)}")
    nwin = len(next(iter(res.values())))
    print("| teacher | " + " | ".join(f"window {w}" for w in range(nwin)) + " |")
    print("|---|" + "---:|" * nwin)
    for t, rows in res.items():
        print(f"| {t} | " + " | ".join(f"{sum(r) / len(r):.4f}" for r in rows) + " |")
    if colours:
        names = sorted({c for per in colours.values() for c in per})
        print("\nmid-stream windows (1 on) by the colour of the clip's first object: mean loss (windows)")
        print("| teacher | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for t, per in colours.items():
            print(f"| {t} | " + " | ".join(f"{sum(per[c]) / len(per[c]):.4f} ({len(per[c]) // len(TIMESTEPS)})"
                                          if c in per else "-"
                                          for c in names) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"timesteps": TIMESTEPS, "losses": res}, f, indent=1)
    return res


if __name__ == "__main__":
    main()
