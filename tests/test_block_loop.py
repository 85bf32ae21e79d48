"""The block loop's arithmetic against a loop written out by hand from the formulas of DESIGN.md (issue 15, item 2).

The hand loop shares nothing with the engine's sampler but the transformer, and it calls the transformer the
other way: without a KV cache, on the whole history at once (the context inputs of every earlier block followed
by the current noisy block) under the block-causal mask, so what a cache would hold is recomputed each call.
The formulas (DESIGN.md, "Numerical conventions"): flow v = eps - x0, x0 = x_t - sigma * v,
x_t = (1 - sigma) * x0 + sigma * eps, a block starts at sigma = 1 from z0 and is re-noised between steps with the
step noise; the clean block (noised to context_t when that is > 0) is the context of the blocks after it.
"""

from __future__ import annotations

import pytest
import torch

from engine.testing import tiny_engine

PROMPT = "a red circle moving left"


def hand_loop(eng, noise, cond: torch.Tensor, exit_steps: list[int] | None = None) -> torch.Tensor:
    """exit_steps: the step at which each block stops (its x0 there is the output and the context); default last."""
    k = eng.config.num_frame_per_block
    ts = [float(t) for t in eng.schedule.timesteps]
    sig = [t / eng.config.num_train_timesteps for t in ts]  # Wan: sigma = t / num_train_timesteps
    t_ctx = float(eng.schedule.context_t)
    z0 = noise.z0.detach().double()
    steps = [noise.step(i).detach().double() for i in range(noise.num_renoise)]
    B, _, F = z0.shape[:3]
    context, out = [], []  # context: what each earlier block feeds the network, at t_ctx
    for b in range(F // k):
        f = slice(b * k, (b + 1) * k)
        x = z0[:, :, f]
        last = len(ts) - 1 if exit_steps is None else exit_steps[b]
        for i, t in enumerate(ts[:last + 1]):
            seq = torch.cat([*context, x], dim=2)
            t_frames = torch.tensor([t_ctx] * (b * k) + [t] * k).expand(B, -1)
            v = eng.transformer(seq.float(), t_frames, cond, num_frame_per_block=k).sample[:, :, -k:].double()
            x0 = x - sig[i] * v
            if i < last:
                x = (1 - sig[i + 1]) * x0 + sig[i + 1] * steps[i][:, :, f]
        s_ctx = t_ctx / eng.config.num_train_timesteps
        ctx = x0 if t_ctx == 0 else (1 - s_ctx) * x0 + s_ctx * steps[len(ts) - 1][:, :, f]
        context.append(ctx)
        out.append(x0)
    return torch.cat(out, dim=2)


@pytest.mark.parametrize("settings", [{}, dict(denoising_steps=[1000.0, 500.0], warp_denoising_steps=False, context_t=100.0)])
@torch.no_grad()
def test_engine_stream_equals_the_hand_written_loop(settings):
    eng = tiny_engine(**settings)
    noise = eng.make_noise(21, seed=7)
    cond = eng.conditioning(PROMPT).cond
    got = eng.generate(PROMPT, noise=noise, output_type="latent").latents.double()
    want = hand_loop(eng, noise, cond)
    assert got.shape == want.shape
    err = (got - want).abs().max() / want.abs().max()
    assert err < 1e-5, float(err)


def test_default_step_list_is_the_warped_list_of_the_design():
    """shift 5: sigma' = 5 sigma / (1 + 4 sigma) on [1000, 750, 500, 250] gives [1000, 937.5, 833.33, 625]."""
    ts = [float(t) for t in tiny_engine().schedule.timesteps]
    assert ts == pytest.approx([1000.0, 937.5, 833.333333, 625.0], abs=1e-3)


@pytest.mark.parametrize("context_t", [0.0, 100.0])
def test_self_forcing_rollout_equals_the_hand_written_loop(context_t):
    """Training sees what inference does: the rollout with an exit step per block is the hand loop stopped at
    those steps (the earlier steps without gradient, the exit step with it)."""
    from engine.training.rollout import self_forcing_rollout

    eng = tiny_engine(context_t=context_t)
    noise = eng.make_noise(45, seed=3)  # 12 latent frames: 4 blocks
    cond = eng.conditioning(PROMPT).cond
    exits = [3, 0, 2, 1]
    T = eng.transformer
    r = self_forcing_rollout(T, cond, noise, eng.schedule,
                             lambda: T.make_cache(*noise.shape[-2:], max_frames=12, differentiable=True),
                             num_frame_per_block=eng.config.num_frame_per_block, exit_steps=exits)
    with torch.no_grad():
        want = hand_loop(eng, noise, cond, exits)
    assert r.x0.requires_grad and r.grad_frames.all()
    err = (r.x0.detach().double() - want).abs().max() / want.abs().max()
    assert err < 1e-5, float(err)
    with torch.no_grad():  # and with every block at the last step it is the engine's own video
        full = self_forcing_rollout(T, cond, noise, eng.schedule, lambda: T.make_cache(*noise.shape[-2:], max_frames=12),
                                    num_frame_per_block=3, exit_steps=[3] * 4, grad=False).x0
    assert (full.double() - hand_loop(eng, noise, cond)).abs().max() / want.abs().max() < 1e-5
