"""The teacher as an ODE solver: classifier-free-guided Euler sampling, trajectories for the causal init.

The probability-flow ODE of flow matching is dx/dsigma = v(x, sigma) (v = eps - x0), integrated from sigma = 1
(noise) to 0 (data) on the shifted grid `FlowSchedule.euler_timesteps(N)`. The few-step timesteps of the
generator are inserted into that grid, so the states kept for ODE regression lie exactly on them:

    grid = sorted(euler_timesteps(N) U few_step_timesteps, descending);    x_{k+1} = x_k + (s_{k+1} - s_k) v(x_k, t_k)

Guidance: the standard convention v = v_u + w (v_c - v_u), both branches in one batched call.

`TrajectoryBank` stores a fixed set of trajectories (one safetensors file each, written atomically, sharded over
processes, reused on resume), so that an ode-init run can afford many Euler steps per trajectory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..atomic import save_safetensors

from engine.sampling.block_sampler import FlowStep, block_loop
from engine.sampling.schedule import FewStepSchedule, FlowSchedule

from .losses import ODERegressionLoss


def guided_flow(model, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                scale: float) -> torch.Tensor:
    """Flow prediction with CFG, float32. x (B, C, F, H, W); t (B,) or (B, F); cond / uncond (B, L, D).

    scale uses the standard convention uncond + scale * (cond - uncond); scale 1 or uncond None: one call.
    """
    dtype = next(model.parameters()).dtype
    xin = x.to(dtype)
    if uncond is None or scale == 1.0:
        return model(xin, t, cond.to(xin.device, dtype)).sample.float()
    emb = torch.cat([cond, uncond.expand_as(cond)]).to(xin.device, dtype)  # (2B, L, D)
    v = model(torch.cat([xin, xin]), torch.cat([t, t]), emb).sample.float()  # (2B, C, F, H, W)
    v_c, v_u = v.chunk(2)
    return v_u + scale * (v_c - v_u)


def ode_grid(flow: FlowSchedule, num_steps: int, keep=()) -> list[float]:
    """The shifted Euler grid of num_steps steps from T to 0 with the `keep` timesteps inserted (descending)."""
    grid = sorted(set(flow.euler_timesteps(num_steps)) | {float(t) for t in keep}, reverse=True)
    out = [grid[0]]
    for t in grid[1:]:  # merge near-duplicates (a kept timestep that is already a grid point)
        if abs(t - out[-1]) > 1e-6:
            out.append(t)
    return out


@torch.no_grad()
def ode_solve(model, z: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float,
              grid: list[float], keep=(), num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler from z (B, C, F, H, W) at grid[0] to grid[-1] (normally 0).

    Returns (states (B, K, C, F, H, W) at the `keep` timesteps, in the order given, and the final x float32).
    """
    keep = [float(t) for t in keep]
    states: list[torch.Tensor | None] = [None] * len(keep)
    x = z.float()
    B = x.shape[0]
    for i, t in enumerate(grid):
        for k, tk in enumerate(keep):
            if abs(tk - t) <= 1e-6:
                states[k] = x.clone()
        if i + 1 == len(grid):
            break
        tt = torch.full((B,), float(t), device=x.device)
        v = guided_flow(model, x, tt, cond, uncond, scale)
        x = x + (grid[i + 1] - t) / num_train_timesteps * v
    missing = [tk for tk, s in zip(keep, states) if s is None]
    if missing:
        raise ValueError(f"timesteps {missing} are not on the ODE grid")
    st = torch.stack(states, dim=1) if keep else x.new_zeros((B, 0, *x.shape[1:]))
    return st, x


def ode_regression(model, bank: dict, idx: torch.Tensor, sched: FewStepSchedule, fpb: int,
                   g: torch.Generator, *, cache_model=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The ODE-init loss on bank trajectories `idx` (CausVid / Self-Forcing's causal initialisation), as a teacher-
    forced run of the block loop: per block, the x0 prediction from the state at a random step of the few-step
    list (per sample) against the trajectory's x0, with the trajectory's clean x0 of the earlier blocks as KV-cache
    context (where the sampler writes its own, at context_t = 0). Returns (mean loss, per-block losses).

    bank: "states" (N, K, C, F, H, W) at the few-step timesteps, "x0" (N, C, F, H, W), "prompt_embeds" (N, L, D).
    cache_model: the module whose `make_cache` builds the KV cache when `model` is a wrapper without one (DDP);
    default `model`. The exit steps are drawn from `g`, one (B,) per block in block order.
    """
    states, x0, emb = bank["states"][idx], bank["x0"][idx], bank["prompt_embeds"][idx]
    B, n_frames = len(idx), x0.shape[2]
    num_blocks = n_frames // fpb
    cache = (cache_model or model).make_cache(x0.shape[3], x0.shape[4], max_frames=max(n_frames - fpb, fpb), differentiable=True)
    exits = [torch.randint(0, len(sched), (B,), generator=g) for _ in range(num_blocks)]  # (B,) per block

    def frames(b):
        return slice(b * fpb, (b + 1) * fpb)

    def denoise(x, t, update):  # (B, C, Fb, H, W), (B, Fb) -> flow
        return model(x, t, emb, kv_cache=cache, update_cache=update).sample

    blocks = block_loop(denoise, FlowStep(sched), lambda b: (states[torch.arange(B), exits[b]][:, :, frames(b)], []),
                        num_blocks=num_blocks, exit_steps=exits, start="exit",
                        context=lambda b, pred, noise: (x0[:, :, frames(b)], 0.0))
    losses = [ODERegressionLoss()(info["x0"], x0[:, :, frames(info["block"])])[0] for info in blocks]
    return torch.stack(losses).mean(), losses


class TrajectoryBank:
    """A directory of ODE trajectories: traj-<i>.safetensors with states (K, C, F, H, W), x0 (C, F, H, W),
    prompt_embeds (L, D); bank.json describes how they were made (a different description is an error)."""

    def __init__(self, directory: str | os.PathLike, size: int):
        self.dir, self.size = Path(directory), size

    def path(self, i: int) -> Path:
        return self.dir / f"traj-{i:07d}.safetensors"

    def check_description(self, description: dict, is_main: bool) -> None:
        meta = self.dir / "bank.json"
        if meta.is_file():
            found = json.loads(meta.read_text())
            if found != description:
                raise ValueError(f"trajectory bank {self.dir} was made for other settings:\n  found    {found}\n"
                                 f"  wanted   {description}\ndelete it or use another output directory")
        elif is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps(description, indent=2))

    def missing(self, indices) -> list[int]:
        return [i for i in indices if not self.path(i).is_file()]

    def write(self, i: int, states: torch.Tensor, x0: torch.Tensor, prompt_embeds: torch.Tensor) -> None:
        save_safetensors({"states": states.contiguous().cpu(), "x0": x0.contiguous().cpu(),
                          "prompt_embeds": prompt_embeds.contiguous().cpu()}, self.path(i))

    # the TrainData source interface
    def __len__(self) -> int:
        return self.size

    def get(self, i: int, need_latents: bool) -> dict:
        t = load_file(self.path(i))
        return {"prompt_embeds": t["prompt_embeds"].float(), "states": t["states"].float(), "x0": t["x0"].float()}
