"""How much of the first block of a teacher's ODE trajectory can a causal student predict? The floor of the ODE
init's first-block loss, against the loss the init reaches.

    python benchmarks/bench_ode_causality.py runs/rebuild/ode [runs/other/ode ...] [--limit 32] [--variants 8]

Each argument is an `ode-init` run's output directory (config.yaml, trajectories/, generator/). The causal student
predicts block 0 at t = 1000 from block 0's noise and the prompt alone; a bidirectional teacher's block 0 also
depends on the noise of the later frames. For each of the run's first `--limit` prompts (the bank's embeddings)
the teacher's ODE is solved from fresh noise `--variants` times with block 0's noise kept and every later frame's
noise redrawn (same teacher, steps and guidance as the bank, checked by re-solving the bank's own noise): the
spread of block 0's x0 over the variants (its variance, unbiased, averaged over elements) is what no causal student
can predict, the floor of the ODE init's block-0 loss at t = 1000 (next to the variance of block 0's x0 over
the bank's trajectories: prompts and noise both vary). Beside it, that loss on the same fresh noise for
the run's generator (the init) and for the teacher's weights run as the causal student (the init's starting
point), and the init's loss on the bank's own trajectories (its training data: below the floor means memorised).
A bank made with `ode.causal_teacher` is re-solved the same way (its floor is 0 by construction).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.io import quiet_loaders  # noqa: E402

_HELD_OUT = 424242  # seed tag of the held-out noise (the bank's noise is seeded by the run's train.seed)


@torch.no_grad()
def block0_x0(model, z0: torch.Tensor, emb: torch.Tensor, frames: int) -> torch.Tensor:
    """The causal student's x0 of block 0 from pure noise (t = 1000, sigma 1, empty KV cache)."""
    from engine.sampling.schedule import flow_to_x0

    B, _, fpb, h, w = z0.shape
    cache = model.make_cache(h, w, max_frames=max(frames - fpb, fpb))
    v = model(z0, torch.full((B, fpb), 1000.0), emb, kv_cache=cache, update_cache=False).sample
    return flow_to_x0(z0, v, torch.ones(B, fpb))


@torch.no_grad()
def measure(run: Path, limit: int, variants: int, batch: int) -> dict:
    from engine.sampling.schedule import FlowSchedule
    from engine.training.config import load_config
    from engine.training.data import seeded
    from engine.training.ode import TrajectoryBank, ode_grid, ode_solve
    from engine.training.stages import BlockCausal, load_transformer

    bank_dir = run / "trajectories"
    needed = (run / "config.yaml", bank_dir / "bank.json", run / "generator")
    if not all(p.exists() for p in needed):
        raise ValueError(f"{run} is not a finished ode-init run directory (needs config.yaml, trajectories/bank.json "
                         "and generator/)")
    n = min(limit, len(list(bank_dir.glob("traj-*.safetensors"))))
    if n < 1:
        raise ValueError(f"{bank_dir} holds no trajectories")
    cfg = load_config(str(run / "config.yaml"), [])
    with quiet_loaders():
        teacher = load_transformer(cfg.models.teacher, "models.teacher").eval()
        init = load_transformer(str(run / "generator"), "models.generator").eval()
    sched = cfg.engine.schedule()
    flow = FlowSchedule(cfg.engine.num_train_timesteps, cfg.engine.shift)
    grid = ode_grid(flow, cfg.ode.num_steps, sched.timesteps)
    fpb = cfg.engine.num_frame_per_block
    bank = TrajectoryBank(bank_dir, n)
    solver = BlockCausal(teacher, fpb) if cfg.ode.causal_teacher else teacher  # as the bank was made
    rows = {k: [] for k in ("floor", "init", "teacher_as_student", "init_on_bank", "bank_check")}
    bank_x0 = []
    for s in range(0, n, batch):
        items = [bank.get(i, need_latents=False) for i in range(s, min(n, s + batch))]
        z_bank = torch.stack([t["states"][0] for t in items])  # (B, C, F, h, w): the state at t = 1000 is the noise
        x0_bank = torch.stack([t["x0"] for t in items])
        emb = torch.stack([t["prompt_embeds"] for t in items])
        B, C, F, h, w = z_bank.shape
        # held out: fresh noise (not a bank trajectory), its block 0 shared by the K variants
        zs = torch.stack([torch.randn((variants, C, F, h, w), generator=seeded(_HELD_OUT, s + i)) for i in range(B)])
        zs[:, :, :, :fpb] = zs[:, :1, :, :fpb]
        zs = torch.cat([z_bank[:, None], zs], 1)  # (B, 1 + K, C, F, h, w); entry 0: the bank's own noise
        e = emb[:, None].expand(B, variants + 1, *emb.shape[1:]).reshape(-1, *emb.shape[1:])
        _, x = ode_solve(solver, zs.reshape(-1, C, F, h, w), e, torch.zeros_like(e), cfg.ode.guidance_scale, grid,
                         num_train_timesteps=flow.num_train_timesteps)
        x = x.reshape(B, variants + 1, C, F, h, w)[:, :, :, :fpb]  # block 0's x0
        rows["bank_check"].append((x[:, 0] - x0_bank[:, :, :fpb]).abs().amax())
        bank_x0.append(x0_bank[:, :, :fpb])
        held = x[:, 1:]  # (B, K, C, fpb, h, w)
        rows["floor"].append(held.var(dim=1, unbiased=True).mean(dim=(1, 2, 3, 4)))
        for name, model in (("init", init), ("teacher_as_student", teacher)):
            pred = block0_x0(model, zs[:, 1, :, :fpb], emb, F)  # (B, C, fpb, h, w)
            rows[name].append((pred[:, None] - held).square().mean(dim=(1, 2, 3, 4, 5)))
        pred = block0_x0(init, z_bank[:, :, :fpb], emb, F)
        rows["init_on_bank"].append((pred - x0_bank[:, :, :fpb]).square().mean(dim=(1, 2, 3, 4)))
    check = float(torch.stack(rows.pop("bank_check")).max())
    if check > 1e-3:
        raise ValueError(f"{run}: re-solving the bank's own noise differs from its x0 by {check:.2e}; the teacher or "
                         "the ODE settings are not those the bank was made with")
    spread = float(torch.cat(bank_x0).var(dim=0).mean()) if n > 1 else float("nan")  # over prompts and noise
    return {"n": n, "check": check, "bank_spread": spread, **{k: float(torch.cat(v).mean()) for k, v in rows.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="finished ode-init run directories")
    ap.add_argument("--limit", type=int, default=32, help="first N trajectories (>= 1; default 32)")
    ap.add_argument("--variants", type=int, default=8, help="redraws of the later noise per trajectory (>= 2)")
    ap.add_argument("--batch", type=int, default=8, help="trajectories per ODE solve (each with its variants)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    if a.limit < 1:
        ap.error(f"--limit must be >= 1, got {a.limit}")
    if a.variants < 2:
        ap.error(f"--variants must be >= 2 (a variance needs two), got {a.variants}")
    if a.batch < 1:
        ap.error(f"--batch must be >= 1, got {a.batch}")
    torch.set_num_threads(a.threads)
    print("| run | prompts | block 0 over the bank | floor | the init, held-out noise | the init, its bank's noise "
          "| teacher weights as student |\n|---|---:|---:|---:|---:|---:|---:|")
    for run in a.runs:
        try:
            r = measure(Path(run), a.limit, a.variants, a.batch)
        except (ValueError, OSError) as e:
            ap.exit(2, f"error: {e}\n")
        cells = " | ".join(f"{r[k]:.4f}" for k in ("bank_spread", "floor", "init", "init_on_bank", "teacher_as_student"))
        print(f"| {run} | {r['n']} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
