"""The block loop's arithmetic against a loop written out by hand from the formulas of DESIGN.md (issue 15, item 2).

The hand loop shares nothing with the engine's sampler but the transformer, and it calls the transformer the
other way: without a KV cache, on the whole history at once (the context inputs of every earlier block followed
by the current noisy block) under the block-causal mask, so what a cache would hold is recomputed each call.
The formulas (DESIGN.md, "Numerical conventions"): flow v = eps - x0, x0 = x_t - sigma * v,
x_t = (1 - sigma) * x0 + sigma * eps, a block starts at sigma = 1 from z0 and is re-noised between steps with the
step noise; the clean block (noised to context_t when that is > 0) is the context of the blocks after it.
The same is done for the loop's other two settings: DDIM on an eps-predicting model (Song et al. 2021, eq. 12,
with the betas and the "trailing" timesteps written out here, not read from diffusers), and the ODE regression
(teacher forcing: the input is a trajectory's state, the context its clean x0). Each hand loop also runs with a
deliberate mistake, which the comparison must catch.
"""

from __future__ import annotations

import pytest
import torch

from engine.testing import tiny_engine

PROMPT = "a red circle moving left"


def hand_loop(eng, noise, cond: torch.Tensor, exit_steps: list[int] | None = None, mistake: str | None = None):
    """exit_steps: the step at which each block stops (its x0 there is the output and the context); default last.
    mistake: a wrong formula, to show that the comparison catches it."""
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
                s = sig[i] if mistake == "renoise at the current sigma" else sig[i + 1]
                x = (1 - s) * x0 + s * steps[i][:, :, f]
        s_ctx = t_ctx / eng.config.num_train_timesteps
        ctx = x0 if t_ctx == 0 else (1 - s_ctx) * x0 + s_ctx * steps[len(ts) - 1][:, :, f]
        if mistake == "context at sigma = 0":
            ctx = x0
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


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.mark.parametrize("mistake", ["renoise at the current sigma", "context at sigma = 0"])
@torch.no_grad()
def test_the_flow_comparison_catches_a_wrong_formula(mistake):
    eng = tiny_engine(context_t=100.0)
    noise = eng.make_noise(21, seed=7)
    cond = eng.conditioning(PROMPT).cond
    got = eng.generate(PROMPT, noise=noise, output_type="latent").latents
    assert rel_err(got, hand_loop(eng, noise, cond)) < 1e-5
    assert rel_err(got, hand_loop(eng, noise, cond, mistake=mistake)) > 1e-3


# -- DDIM: the block loop with the DDIM step rule ------------------------------------------------------------

def hand_ddim(model, z: torch.Tensor, cond: torch.Tensor, n: int, k: int, mistake: str | None = None):
    """Block-autoregressive DDIM, eta = 0, linear betas 1e-4 .. 0.02 over T = 1000 (Ho et al. 2020), "trailing"
    timesteps t_j = round(T - j T / n) - 1 (Lin et al. 2024), a_prev = abar[t - T // n] (1 below 0):
    x0 = (x - sqrt(1 - a) eps) / sqrt(a);  x <- sqrt(a_prev) x0 + sqrt(1 - a_prev) eps. The block's output is x
    after its last step; it is the context (at t = 0) of the blocks after it."""
    T = 1000
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    ts = [round(T - j * T / n) - 1 for j in range(n)]
    B, _, F = z.shape[:3]
    context, out = [], []
    for b in range(F // k):
        x = z[:, :, b * k:(b + 1) * k].double()
        for t in ts:
            seq = torch.cat([*context, x], dim=2).float()
            t_frames = torch.tensor([0.0] * (b * k) + [float(t)] * k).expand(B, -1)
            eps = model(seq, t_frames, cond, num_frame_per_block=k).sample[:, :, -k:].double()
            a = abar[t]
            a_prev = abar[t - T // n] if t - T // n >= 0 else torch.tensor(1.0, dtype=torch.float64)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        if mistake == "x0 prediction as the output":
            x = x0
        context.append(x)
        out.append(x)
    return torch.cat(out, dim=2)


@pytest.mark.parametrize("n", [2, 7])  # T / n whole (the last a_prev is 1) and not (it is abar[0])
@torch.no_grad()
def test_ddim_blocks_equal_the_hand_written_loop(n):
    from engine.quantized.presets import tiny_quantized_transformer
    from engine.sampling.ddpm import DDPMSchedule, ddim_sample

    torch.manual_seed(0)  # the codebook's k-means initialisation at the first call draws from the global generator
    model = tiny_quantized_transformer(noise_schedule="linear", seed=1)
    g = torch.Generator().manual_seed(0)
    z, cond = torch.randn(1, 4, 9, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    got = ddim_sample(model, cond, z, DDPMSchedule("linear"), n, num_frame_per_block=3)
    # the sampler's float32 rounding is amplified by 1 / sqrt(abar[999]) ~ 150 in the x0 of the first step
    assert rel_err(got, hand_ddim(model, z, cond, n, 3)) < 5e-4
    if n == 7:
        assert rel_err(got, hand_ddim(model, z, cond, n, 3, mistake="x0 prediction as the output")) > 1e-3


# -- the ODE regression: the block loop teacher-forced on a trajectory --------------------------------------

def hand_ode_regression(model, bank: dict, ks: list[torch.Tensor], sched, k: int, mistake: str | None = None):
    """Per block b and sample s: the state at few-step timestep t = ts[ks[b][s]] (sigma = t / 1000) of the
    trajectory, after the trajectory's clean x0 of the earlier blocks at t = 0; x0 = x - sigma v; the block's loss
    mean((x0 - x0_target)^2). Returns the per-block losses."""
    states, x0 = bank["states"], bank["x0"]
    B, F = x0.shape[0], x0.shape[2]
    losses = []
    for b in range(F // k):
        f = slice(b * k, (b + 1) * k)
        ts = torch.tensor([sched.timesteps[int(i)] for i in ks[b]])  # (B,)
        x = states[torch.arange(B), ks[b]][:, :, f]  # (B, C, k, H, W)
        history = states[torch.arange(B), ks[b]] if mistake == "noisy context" else x0
        seq = torch.cat([history[:, :, :b * k], x], dim=2)
        t_frames = torch.cat([torch.zeros(B, b * k), ts[:, None].expand(B, k)], dim=1)  # (B, (b + 1) k)
        v = model(seq, t_frames, bank["prompt_embeds"], num_frame_per_block=k).sample[:, :, -k:]
        pred = x - (ts / 1000)[:, None, None, None, None] * v
        losses.append((pred - x0[:, :, f]).square().mean())
    return losses


@pytest.mark.parametrize("mistake", [None, "noisy context"])
def test_ode_regression_equals_the_hand_written_loss(mistake):
    from engine.sampling.schedule import FewStepSchedule
    from engine.testing import tiny_transformer
    from engine.training.ode import ode_regression

    sched, k, B, F = FewStepSchedule.from_denoising_steps([1000, 750, 500, 250]), 3, 3, 9
    model = tiny_transformer(seed=2).train()
    g = torch.Generator().manual_seed(0)
    bank = {"states": torch.randn(B, len(sched), 4, F, 4, 4, generator=g), "x0": torch.randn(B, 4, F, 4, 4, generator=g),
            "prompt_embeds": torch.randn(B, 7, 32, generator=g)}
    loss, losses = ode_regression(model, bank, torch.arange(B), sched, k, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the steps ode_regression drew: one (B,) per block, in block order
    ks = [torch.randint(0, len(sched), (B,), generator=g) for _ in range(F // k)]
    assert len({int(i) for kb in ks for i in kb}) > 1  # per-sample steps, not one for all
    want = hand_ode_regression(model, bank, ks, sched, k, mistake)
    err = rel_err(torch.stack(losses).detach(), torch.stack(want).detach())
    if mistake is not None:
        assert err > 1e-3
        return
    assert err < 1e-5
    params = [p for p in model.parameters() if p.requires_grad]  # and the same gradient, through the cache
    got_g = torch.autograd.grad(loss, params, allow_unused=True)
    want_g = torch.autograd.grad(torch.stack(want).mean(), params, allow_unused=True)
    for a, b in zip(got_g, want_g):
        assert (a is None) == (b is None)
        if a is not None:
            assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-8
