"""Training module: configs, data, rollout, losses on tiny models, the three stages end to end, resume, guards.

Everything runs on the CPU with engine.testing's tiny components (one torch thread: tiny models are dominated
by per-operation overhead). The 2-process test lives in test_training_dist.py.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.pipeline import Engine
from engine.sampling.block_sampler import Conditioning, num_renoise, sample
from engine.sampling.noise import SamplerNoise
from engine.sampling.schedule import FewStepSchedule, FlowSchedule
from engine.testing import tiny_engine, tiny_transformer
from engine.training import cli as train_cli
from engine.training.config import STAGES as STAGE_NAMES
from engine.training.config import Config, from_dict, list_presets, load_config, parse_overrides
from engine.training.data import (PromptEncoder, SyntheticSource, TrainData, LatentDirSource, ShapesSource,
                                  build_latent_cache, write_latent_dir)
from engine.training.ode import ode_grid, ode_solve
from engine.training.rollout import draw_exit_steps, self_forcing_rollout
from engine.training.stages import STAGES, Runtime, StepRandom, load_components
from engine.training.trainer import EMA, param_checksums, train

TIME_KEYS = ("time", "step_time")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Engine directories: two random tiny engines (teacher / generator) and one with another text width."""
    root = tmp_path_factory.mktemp("engines")
    tiny_engine(seed=0).save_pretrained(root / "teacher")
    tiny_engine(seed=1).save_pretrained(root / "generator")
    eng = tiny_engine(seed=2)
    odd = Engine(tiny_transformer(seed=2, text_dim=48), eng.vae, eng.text_encoder, eng.tokenizer, **vars(eng.config))
    odd.save_pretrained(root / "odd")
    return root


def tiny(stage: str, dirs: Path | None = None, **over) -> Config:
    """A tiny preset with test defaults (synthetic data, no TensorBoard / samples) and dotted overrides."""
    preset = {"teacher": "tiny-teacher", "ode-init": "tiny-ode-init", "dmd": "tiny-dmd"}[stage]
    items = {"data.source": "synthetic", "data.num_samples": 16, "train.tensorboard": False, "sample.every": 0,
             "train.max_steps": 2, "ode.num_steps": 4}
    if dirs is not None:
        items.update({"models.teacher": str(dirs / "teacher"), "models.generator": str(dirs / "generator")})
    items.update(over)
    args = []
    for k, v in items.items():
        args += [f"--{k}", json.dumps(v)]
    return load_config(preset, args)


def rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def strip_times(r: dict) -> dict:
    return {k: v for k, v in r.items() if not any(k.startswith(t) or k.endswith("time_rollout") for t in TIME_KEYS)}


def build_stage(cfg: Config, tmp_path: Path):
    comps = load_components(cfg, cfg.stage, torch.device("cpu"))
    st = STAGES[cfg.stage](cfg, Runtime(torch.device("cpu"), output_dir=tmp_path), comps)
    st.bind(st.trainables, st.trainables)
    return st


# ---------------------------------------------------------------------------------------------------- config


def test_presets_load_and_validate():
    names = list_presets()
    assert {"tiny-teacher", "tiny-ode-init", "tiny-dmd", "self-forcing-wan1.3b-dmd"} <= set(names)
    for n in names:
        cfg = load_config(n)
        assert cfg.stage in STAGE_NAMES
    sf = load_config("self-forcing-wan1.3b-dmd")
    assert sf.dmd.guidance_scale == 4.0 and sf.optim.betas == (0.0, 0.999) and sf.dmd.dfake_gen_update_ratio == 5


def test_unknown_keys_are_errors_listing_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"dmd\.los .*valid keys: loss, sid_alpha, guidance_scale"):
        load_config("tiny-dmd", ["--dmd.los", "sid"])
    with pytest.raises(ValueError, match="unknown config key.*bogus.*valid keys: stage, models, engine"):
        from_dict(Config, {"bogus": 1})
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: tiny-dmd.yaml\ntrain:\n  batchsize: 3\n")
    with pytest.raises(ValueError, match="train.batchsize.*batch_size"):
        load_config(str(bad))
    with pytest.raises(ValueError, match="unknown engine settings|engine.hieght"):
        load_config("tiny-dmd", ["--engine.hieght", "64"])


def test_overrides_are_typed_and_dotted():
    cfg = load_config("tiny-dmd", ["--dmd.loss", "sid", "--dmd.sid-alpha=1.2", "--optim.betas", "[0.9, 0.99]",
                                   "--engine.denoising_steps", "[1000, 500]", "--train.batch_size", "3"])
    assert (cfg.dmd.loss, cfg.dmd.sid_alpha, cfg.optim.betas, cfg.train.batch_size) == ("sid", 1.2, (0.9, 0.99), 3)
    assert cfg.engine.denoising_steps == [1000.0, 500.0]
    assert cfg.engine.height == 32  # from _tiny-common.yaml through `extends`
    with pytest.raises(ValueError, match="train.batch_size: 'x' is not a int"):
        load_config("tiny-dmd", ["--train.batch_size", "x"])
    # YAML 1.1 reads 3e-4 (no dot) as a string: a float key still takes it; a word is still refused
    assert load_config("tiny-dmd", ["--optim.lr", "3e-4"]).optim.lr == 3e-4
    with pytest.raises(ValueError, match="optim.lr: 'fast' is not a float"):
        load_config("tiny-dmd", ["--optim.lr", "fast"])
    with pytest.raises(ValueError, match="dmd.loss = 'kl' is invalid: expected one of dmd, sid, fgm"):
        load_config("tiny-dmd", ["--dmd.loss", "kl"])
    assert parse_overrides(["--a.b-c", "null"]) == {"a": {"b_c": None}}


def test_cli_separates_options_from_overrides():
    import argparse

    p = argparse.ArgumentParser()
    train_cli.add_arguments(p)
    args = p.parse_args(["dmd", "--config", "tiny-dmd", "--dmd.loss", "sid", "--output-dir", "o", "--resume",
                         "--max-steps", "7", "--train.seed", "-1"])
    args, over = train_cli.parse(args)
    assert (args.stage, args.config, args.output_dir, args.resume, args.max_steps) == ("dmd", "tiny-dmd", "o", True, 7)
    assert over == ["--dmd.loss", "sid", "--train.seed", "-1"]
    # --max-steps 0 after the stage (an ode-init run that only makes its bank) is 0, not "not given"
    args, _ = train_cli.parse(p.parse_args(["ode-init", "--config", "tiny-ode-init", "--max-steps", "0"]))
    assert args.max_steps == 0


# ------------------------------------------------------------------------------------------------------ data


def test_batches_are_deterministic_sharded_and_cover_epochs():
    src = SyntheticSource(10, (4, 3, 2, 2), (5, 8), seed=0)
    enc = PromptEncoder(None, None, 5, "cpu")
    r0 = TrainData(src, enc, batch_size=2, seed=1, rank=0, world=2, need_latents=True)
    r1 = TrainData(src, enc, batch_size=2, seed=1, rank=1, world=2, need_latents=True)
    b = r0.batch(0)
    assert b.latents.shape == (2, 4, 3, 2, 2) and b.prompt_embeds.shape == (2, 5, 8)
    assert torch.equal(b.latents, r0.batch(0).latents)  # a pure function of k
    seen = [i for k in range(5) for r in (r0, r1) for i in r.batch(k).indices]  # 20 samples = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert set(r0.batch(0).indices).isdisjoint(r1.batch(0).indices)


def test_latent_directory_and_shapes_cache(tmp_path):
    lat, emb = torch.randn(3, 4, 6, 4, 4), torch.randn(3, 16, 32)
    write_latent_dir(tmp_path / "lat", emb, lat, ["a", "b", "c"])
    src = LatentDirSource(tmp_path / "lat")
    item = src.get(1, need_latents=True)
    assert torch.equal(item["latents"], lat[1]) and torch.equal(item["prompt_embeds"], emb[1])
    assert src.latent_shape == (4, 6, 4, 4) and item["caption_text"] == "b"

    eng = tiny_engine()
    from engine.data.shapes import ShapesConfig

    shapes = ShapesSource(ShapesConfig(height=32, width=32, num_frames=9), seed=0, num_samples=3, vae=eng.vae)
    enc = PromptEncoder(eng.text_encoder, eng.tokenizer, 16, "cpu")
    kw = dict(rank=0, world=1, barrier=lambda: None, is_main=True)
    cache = build_latent_cache(tmp_path / "cache", shapes, enc, description={"v": 1}, **kw)
    assert len(cache) == 3 and cache.latent_shape == (4, 3, 4, 4)
    again = build_latent_cache(tmp_path / "cache", shapes, enc, description={"v": 1}, **kw)  # reused
    assert torch.equal(again.get(2, True)["latents"], shapes.get(2, True)["latents"])
    with pytest.raises(ValueError, match="made for other settings"):
        build_latent_cache(tmp_path / "cache", shapes, enc, description={"v": 2}, **kw)


# ---------------------------------------------------------------------------------------------- ode, rollout


class PointMass(torch.nn.Module):
    """The exact flow of a data distribution concentrated on one point: v = (x - target) / sigma."""

    def __init__(self, target):
        super().__init__()
        self.target = target
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, emb, **kw):
        sigma = (t.float() / 1000).view(-1, 1, 1, 1, 1)
        return types.SimpleNamespace(sample=(x - self.target) / sigma)


def test_ode_solve_is_exact_for_a_point_mass_and_keeps_the_few_step_states():
    target, z = torch.randn(1, 4, 3, 2, 2), torch.randn(1, 4, 3, 2, 2)
    keep = FewStepSchedule.from_denoising_steps([1000, 750, 500, 250]).timesteps
    grid = ode_grid(FlowSchedule(1000, 5.0), 6, keep)
    assert all(any(abs(g - k) < 1e-9 for g in grid) for k in keep) and grid[-1] == 0
    emb = torch.zeros(1, 2, 8)
    states, x0 = ode_solve(PointMass(target), z, emb, emb, 4.0, grid, keep=keep)
    torch.testing.assert_close(x0, target, atol=1e-5, rtol=0)
    for k, t in enumerate(keep):  # Euler on this flow stays on the straight line (1 - s) target + s z
        s = t / 1000
        torch.testing.assert_close(states[:, k], (1 - s) * target + s * z, atol=1e-5, rtol=0)


def test_rollout_without_gradient_is_the_inference_sampler():
    model = tiny_transformer(seed=3)
    schedule = FewStepSchedule.from_denoising_steps([1000, 750, 500, 250], context_t=20.0)
    noise = SamplerNoise.from_seed(5, (1, 4, 6, 4, 4), num_renoise(schedule))
    cond = torch.randn(1, 16, 32)

    def cache(diff):
        return lambda: model.make_cache(4, 4, max_frames=3, differentiable=diff)

    with torch.no_grad():
        ref = sample(model, Conditioning(cond), noise, schedule, cache(False)(), num_frame_per_block=3)
        got = self_forcing_rollout(model, cond, noise, schedule, cache(False), num_frame_per_block=3,
                                   exit_steps=[3, 3], grad=False)
    torch.testing.assert_close(got.x0, ref, atol=1e-6, rtol=0)
    with_grad = self_forcing_rollout(model, cond, noise, schedule, cache(True), num_frame_per_block=3,
                                     exit_steps=[3, 3], grad=True)
    torch.testing.assert_close(with_grad.x0.detach(), ref, atol=1e-5, rtol=0)


class Spy(torch.nn.Module):
    """Records, per call, whether autograd is on, whether the cache is written, and the timestep."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, emb, **kw):
        self.calls.append((torch.is_grad_enabled(), kw.get("update_cache", False), round(float(t.flatten()[0]), 2)))
        return self.model(x, t, emb, **kw)


def test_rollout_puts_gradient_only_through_the_exit_step():
    model = Spy(tiny_transformer(seed=4))
    schedule = FewStepSchedule.from_denoising_steps([1000, 750, 500, 250])
    ts = [round(t, 2) for t in schedule.timesteps]
    noise = SamplerNoise.from_seed(1, (1, 4, 6, 4, 4), num_renoise(schedule))
    noise.leaves(["z0", "step"])
    cond = torch.randn(1, 16, 32)
    res = self_forcing_rollout(model, cond, noise, schedule,
                               lambda: model.model.make_cache(4, 4, max_frames=3, differentiable=True),
                               num_frame_per_block=3, exit_steps=[2, 0])
    # block 0: two steps without gradient, the exit step with gradient, the context pass without; block 1: exit at 0
    assert model.calls == [(False, False, ts[0]), (False, False, ts[1]), (True, False, ts[2]), (False, True, 0.0),
                           (True, False, ts[0])]
    full = schedule.timesteps
    assert res.block_ranges == [(full[3], full[2]), (full[1], full[0])] and res.timestep_range == (full[3], full[0])
    g_z0, g_step1 = torch.autograd.grad(res.x0.sum(), [noise.z0, noise.step_noise[1]], allow_unused=True)
    # block 0 exits at step 2: its input came from no-grad steps, so no gradient reaches its noise
    assert g_z0[:, :, :3].abs().max() == 0 and g_z0[:, :, 3:].abs().max() > 0
    assert g_step1 is None or g_step1.abs().max() == 0
    # and the parameters get gradient (through both exit steps and the text path)
    res = self_forcing_rollout(model, cond, noise.detach(), schedule,
                               lambda: model.model.make_cache(4, 4, max_frames=3, differentiable=True),
                               num_frame_per_block=3, exit_steps=[1, 1], grad_first_block=False)
    assert res.grad_frames.tolist() == [False] * 3 + [True] * 3
    res.x0.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["model.condition_embedder.text_embedder.linear_1.weight"].abs().max() > 0


def test_exit_steps_are_shared_and_optionally_equal():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    per_block = draw_exit_steps(5, 4, g(), same_step_across_blocks=False)
    assert per_block == draw_exit_steps(5, 4, g(), same_step_across_blocks=False)  # shared: a function of the seed
    assert len(set(draw_exit_steps(5, 4, g(), same_step_across_blocks=True))) == 1
    assert draw_exit_steps(3, 4, g(), same_step_across_blocks=False, last_step_only=True) == [3, 3, 3]


# ------------------------------------------------------------------------------------------------ losses


@pytest.mark.parametrize("stage, update, over", [
    ("teacher", "teacher", {}),
    ("ode-init", "generator", {}),
    ("dmd", "generator", {"dmd.loss": "dmd"}),
    ("dmd", "generator", {"dmd.loss": "sid", "dmd.sid_alpha": 1.2}),
    ("dmd", "generator", {"dmd.loss": "fgm", "rollout.grad_first_block": False, "dmd.timesteps_from_rollout": True,
                          "rollout.same_step_across_blocks": False}),
    ("dmd", "generator", {"dmd.loss": "sid", "train.gradient_checkpointing": True}),
    ("dmd", "critic", {"dmd.critic_target": "flow"}),
    ("dmd", "critic", {"dmd.critic_target": "eps", "engine.context_t": 30.0}),
])
def test_each_loss_has_finite_gradients_on_tiny_models(dirs, tmp_path, stage, update, over):
    cfg = tiny(stage, dirs, **{"models.base": str(dirs / "teacher"), **over})
    st = build_stage(cfg, tmp_path)
    fn = {u.name: u.loss for u in st.updates(1)}[update]
    loss, logs = fn(st.data.batch(0), StepRandom(0, 1, update, 0, 0))
    assert loss.ndim == 0 and torch.isfinite(loss) and any(k.endswith("_loss") for k in logs)
    loss.backward()
    trained = st.trainables[update]
    grads = [p.grad for p in trained.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    frozen = [m for n, m in st.trainables.items() if n != update] + [getattr(st, "teacher", None)]
    for m in filter(None, frozen):  # the other networks' parameters never learn from this loss
        assert all(p.grad is None for p in m.parameters())


# ---------------------------------------------------------------------------------------------- end to end


def test_three_stages_through_the_cli_load_and_generate(dirs, tmp_path):
    """teacher (shapes, VAE on the fly, CFG dropout) -> ode-init -> dmd, each a real run, each loadable."""
    common = ["--train.tensorboard", "false", "--max-steps", "2", "--data.num_samples", "8"]
    run = lambda *a: train_cli.run(_ns(*a))  # noqa: E731
    assert run("teacher", "--config", "tiny-teacher", "--output-dir", str(tmp_path / "t"), "--models.base",
               str(dirs / "teacher"), "--sample.every", "2", *common) == 0
    teacher = tmp_path / "t" / "teacher"
    assert (tmp_path / "t" / "samples" / "step-00000002-0.mp4").is_file()
    assert run("ode-init", "--config", "tiny-ode-init", "--output-dir", str(tmp_path / "o"), "--models.teacher",
               str(teacher), "--ode.num_steps", "4", *common) == 0
    assert run("dmd", "--config", "tiny-dmd", "--output-dir", str(tmp_path / "d"), "--models.teacher", str(teacher),
               "--models.generator", str(tmp_path / "o" / "generator"), "--dmd.loss", "sid", *common) == 0
    for out, product, loss in (("t", "teacher", "fm_loss"), ("o", "generator", "ode_loss"),
                               ("d", "generator", "sid_loss")):
        r = rows(tmp_path / out)
        assert [x["step"] for x in r] == [1, 2] and np.isfinite(r[0][loss])
        eng = Engine.from_pretrained(tmp_path / out / product)
        video = eng.generate("a red circle moving right", seed=0)
        assert video.frames.shape == (21, 32, 32, 3)
    assert "critic_loss" in rows(tmp_path / "d")[1]
    assert json.loads((tmp_path / "d" / "generator" / "engine_config.json").read_text())["num_frame_per_block"] == 3
    assert Engine.from_pretrained(tmp_path / "t" / "teacher").config.guidance_scale == 4.0
    Engine.from_pretrained(tmp_path / "d" / "critic")
    Engine.from_pretrained(tmp_path / "d" / "generator_raw")


def _ns(stage, *rest):
    import argparse

    p = argparse.ArgumentParser()
    train_cli.add_arguments(p)
    return p.parse_args([stage, *rest])


def test_ode_init_from_a_prompt_file_with_a_trajectory_bank(dirs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes\na red circle moving left\n\na blue square and a white triangle moving up\n")
    over = {"data.source": "prompts", "data.path": str(prompts), "ode.num_trajectories": 3, "train.max_steps": 2}
    result = train(tiny("ode-init", dirs, **over), tmp_path / "run")
    bank = sorted(p.name for p in (tmp_path / "run" / "trajectories").iterdir())
    assert bank == ["bank.json", "traj-0000000.safetensors", "traj-0000001.safetensors", "traj-0000002.safetensors"]
    assert len(result.stage.data) == 3 and all(np.isfinite(r["ode_loss"]) for r in rows(tmp_path / "run"))
    with pytest.raises(ValueError, match="trajectory bank .* was made for other settings"):
        train(tiny("ode-init", dirs, **{**over, "ode.num_steps": 5}), tmp_path / "run", resume=True)


def test_ode_causal_teacher_makes_each_blocks_x0_independent_of_later_noise(dirs, tmp_path):
    """ode.causal_teacher: the teacher's ODE under the block-causal mask, so block 0's x0 (and its kept states) do
    not change when only the later frames' noise does; bidirectionally they do. The bank records the option."""
    over = {"models.base": str(dirs / "teacher")}
    runs = {}
    for causal in (False, True):
        st = build_stage(tiny("ode-init", dirs, **over, **{"ode.causal_teacher": causal}), tmp_path / str(causal))
        cond = st.data.batch(0).prompt_embeds[:1]
        z = torch.randn((1, *st.shape), generator=torch.Generator().manual_seed(0))
        z2 = z.clone()
        z2[:, :, st.block:] = torch.randn(z2[:, :, st.block:].shape, generator=torch.Generator().manual_seed(1))
        runs[causal] = [st._trajectories(cond, zz) for zz in (z, z2)]
    (s1, x1), (s2, x2) = runs[True]
    b = slice(0, st.block)
    assert torch.allclose(x1[:, :, b], x2[:, :, b], atol=1e-5)
    assert torch.allclose(s1[:, :, :, b], s2[:, :, :, b], atol=1e-5)
    assert not torch.allclose(x1[:, :, st.block:], x2[:, :, st.block:], atol=1e-3)
    (_, y1), (_, y2) = runs[False]
    assert not torch.allclose(y1[:, :, b], y2[:, :, b], atol=1e-3)
    train(tiny("ode-init", dirs, **over, **{"ode.causal_teacher": True, "ode.num_trajectories": 2,
                                            "train.max_steps": 1}), tmp_path / "bank")
    assert json.loads((tmp_path / "bank" / "trajectories" / "bank.json").read_text())["causal_teacher"] is True


def test_ode_init_loss_is_the_block_loop_regression_with_clean_context(dirs, tmp_path):
    """The stage's default loss is `ode_regression` (the recipe's ODE init, clean KV-cache context) on the same
    batch and random stream; `ode.context: noisy` is the one-call block-causal form, a different number."""
    from engine.training.ode import ode_regression

    over = {"models.base": str(dirs / "teacher"), "ode.num_trajectories": 2, "train.batch_size": 2}
    st = build_stage(tiny("ode-init", dirs, **over), tmp_path / "a")
    batch, rnd = st.data.batch(0), StepRandom(0, 1, "generator", 0, 0)
    loss, logs = st.loss(batch, rnd)
    bank = {"states": batch.extra["states"], "x0": batch.extra["x0"], "prompt_embeds": batch.prompt_embeds}
    want, per_block = ode_regression(st.trainables["generator"], bank, torch.arange(2), st.schedule, st.block,
                                     rnd.local("steps"))
    assert torch.equal(loss, want) and logs["ode_loss"] == want.item()
    assert [logs[f"ode_block{b}"] for b in range(2)] == [float(v.detach()) for v in per_block]
    noisy = build_stage(tiny("ode-init", dirs, **over, **{"ode.context": "noisy"}), tmp_path / "a")
    other, nlogs = noisy.loss(batch, rnd)
    assert torch.isfinite(other) and "t_mean" in nlogs and not torch.equal(other, loss)
    with pytest.raises(ValueError, match="ode.context = 'mixed' is invalid: expected clean .* or noisy"):
        tiny("ode-init", dirs, **{"ode.context": "mixed"})


def test_ode_init_resume_is_exact(dirs, tmp_path):
    over = {"train.max_steps": 4, "train.save_every": 100, "data.num_samples": 3, "ode.num_trajectories": 3,
            "train.ema_decay": 0.5, "train.ema_start_step": 2}
    train(tiny("ode-init", dirs, **over), tmp_path / "straight")
    train(tiny("ode-init", dirs, **over), tmp_path / "stopped", max_steps=2)
    train(tiny("ode-init", dirs, **over), tmp_path / "stopped", resume=True)
    a, b = rows(tmp_path / "straight"), rows(tmp_path / "stopped")
    assert [r["step"] for r in b] == [1, 2, 3, 4] and all(np.isfinite(r["ode_loss"]) for r in b)
    assert [strip_times(r) for r in a] == [strip_times(r) for r in b]
    for name in ("generator", "generator_raw"):
        sa = param_checksums(Engine.from_pretrained(tmp_path / "straight" / name).transformer)
        sb = param_checksums(Engine.from_pretrained(tmp_path / "stopped" / name).transformer)
        assert torch.equal(sa, sb), name


@pytest.fixture(scope="module")
def ode_bank(dirs, tmp_path_factory):
    """A 3-trajectory bank of the tiny teacher, written by an ode-init run."""
    out = tmp_path_factory.mktemp("ode-bank")
    train(tiny("ode-init", dirs, **{"ode.num_trajectories": 3, "train.max_steps": 1, "data.num_samples": 3}), out)
    return out


def test_dmd_regression_term_adds_weight_times_the_ode_loss_gradient(dirs, ode_bank, tmp_path):
    """dmd.regression_weight w: the generator's gradient is exactly today's DMD gradient + w x the gradient of the
    ODE-init loss on a bank batch (closed form on the tiny model); w = 0 is today's step bit for bit."""
    base = {"models.base": str(dirs / "teacher")}

    def grads(st, fn):
        st.trainables["generator"].zero_grad(set_to_none=True)
        loss, logs = fn(st.data.batch(0), StepRandom(0, 1, "generator", 0, 0))
        loss.backward()
        return loss.detach(), logs, [p.grad.clone() for p in st.trainables["generator"].parameters()]

    today = build_stage(tiny("dmd", dirs, **base), tmp_path)
    l0, logs0, g0 = grads(today, today.generator_step)
    off = build_stage(tiny("dmd", dirs, **base, **{"models.ode_bank": str(ode_bank)}), tmp_path)
    l_off, logs_off, g_off = grads(off, off.generator_step)
    assert torch.equal(l0, l_off) and all(torch.equal(a, b) for a, b in zip(g0, g_off)) and "ode_loss" not in logs_off
    w = 0.7
    on = build_stage(tiny("dmd", dirs, **base, **{"models.ode_bank": str(ode_bank / "trajectories"),
                                                  "dmd.regression_weight": w}), tmp_path)
    lw, logs_w, gw = grads(on, on.generator_step)
    reg, _, gr = grads(on, lambda batch, rnd: (on.regression_loss(rnd), {}))
    assert logs_w["ode_loss"] == reg.item() and torch.allclose(lw, l0 + w * reg)
    assert sum(float(g.abs().sum()) for g in gr) > 0
    for a, b, r in zip(gw, g0, gr):
        torch.testing.assert_close(a, b + w * r, rtol=1e-5, atol=1e-7)


def test_dmd_regression_term_checks_its_bank(dirs, ode_bank, tmp_path):
    with pytest.raises(ValueError, match="models.ode_bank = None is invalid: expected a trajectory bank directory"):
        tiny("dmd", dirs, **{"dmd.regression_weight": 0.5})
    with pytest.raises(ValueError, match=r"dmd.regression_weight = -1.0 is invalid: expected a finite number >= 0"):
        tiny("dmd", dirs, **{"dmd.regression_weight": -1, "models.ode_bank": str(ode_bank)})
    over = {"dmd.regression_weight": 0.5, "models.base": str(dirs / "teacher")}
    with pytest.raises(FileNotFoundError, match="models.ode_bank = .*nowhere does not exist"):
        build_stage(tiny("dmd", dirs, **over, **{"models.ode_bank": str(tmp_path / "nowhere")}), tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no trajectory bank"):
        build_stage(tiny("dmd", dirs, **over, **{"models.ode_bank": str(dirs)}), tmp_path)
    with pytest.raises(ValueError, match="was made for other settings"):
        build_stage(tiny("dmd", dirs, **over, **{"models.ode_bank": str(ode_bank), "engine.shift": 3.0}), tmp_path)


def test_dmd_with_the_regression_term_resumes_exactly(dirs, ode_bank, tmp_path):
    over = {"train.max_steps": 3, "dmd.dfake_gen_update_ratio": 1, "train.save_every": 100, "data.num_samples": 3,
            "dmd.regression_weight": 0.5, "models.ode_bank": str(ode_bank)}
    train(tiny("dmd", dirs, **over), tmp_path / "straight")
    train(tiny("dmd", dirs, **over), tmp_path / "stopped", max_steps=2)
    train(tiny("dmd", dirs, **over), tmp_path / "stopped", resume=True)
    a, b = rows(tmp_path / "straight"), rows(tmp_path / "stopped")
    assert all(np.isfinite(r["ode_loss"]) for r in a)
    assert [strip_times(r) for r in a] == [strip_times(r) for r in b]


def test_teacher_trains_its_text_encoder_saves_the_ema_and_resumes_exactly(dirs, tmp_path):
    """flow_matching.train_text_encoder: the UMT5 encoder learns with the teacher (one AdamW, one EMA), teacher/
    holds the EMA encoder and teacher_raw/ the raw one, resume is exact; later stages read it as their base."""
    from engine.training.stages import TeacherWithText

    over = {"models.base": str(dirs / "teacher"), "data.source": "shapes", "data.num_samples": 4,
            "train.max_steps": 4, "train.save_every": 100, "train.ema_decay": 0.5, "train.ema_start_step": 2,
            "flow_matching.train_text_encoder": True}
    train(tiny("teacher", None, **over), tmp_path / "straight")
    train(tiny("teacher", None, **over), tmp_path / "stopped", max_steps=2)
    r = train(tiny("teacher", None, **over), tmp_path / "stopped", resume=True)
    assert isinstance(r.stage.trainables["teacher"], TeacherWithText)
    a, b = rows(tmp_path / "straight"), rows(tmp_path / "stopped")
    assert [strip_times(x) for x in a] == [strip_times(x) for x in b]
    base_te = Engine.from_pretrained(dirs / "teacher").text_encoder
    ema_te, raw_te = (Engine.from_pretrained(tmp_path / "straight" / n).text_encoder for n in ("teacher", "teacher_raw"))
    for name in ("teacher", "teacher_raw"):
        for part in ("transformer", "text_encoder"):
            sa = param_checksums(getattr(Engine.from_pretrained(tmp_path / "straight" / name), part))
            sb = param_checksums(getattr(Engine.from_pretrained(tmp_path / "stopped" / name), part))
            assert torch.equal(sa, sb), (name, part)
    assert not torch.equal(param_checksums(raw_te), param_checksums(base_te))  # the encoder learned
    assert not torch.equal(param_checksums(ema_te), param_checksums(raw_te))  # teacher/ holds the EMA
    # the EMA shadow of the last checkpoint is what teacher/ holds
    state = torch.load(sorted((tmp_path / "stopped" / "checkpoints").glob("step-*"))[-1] / "accelerate" /
                       "custom_checkpoint_0.pkl", weights_only=False)["shadow"]
    for n, p in ema_te.named_parameters():
        assert torch.equal(p, state[f"text_encoder.{n}"]), n
    ema_tr = Engine.from_pretrained(tmp_path / "stopped" / "teacher").transformer  # (a CPU run once saved the raw
    for n, p in ema_tr.named_parameters():                                          # weights here: regression test)
        assert torch.equal(p, state[f"transformer.{n}"]), n
    # later stages: the teacher's directory is their base, its trained encoder their (frozen) text encoder
    cfg = tiny("ode-init", None, **{"models.teacher": str(tmp_path / "straight" / "teacher")})
    comps = load_components(cfg, "ode-init", torch.device("cpu"))
    assert torch.equal(param_checksums(comps.text_encoder), param_checksums(ema_te))
    # off: the teacher is the plain transformer and its text encoder the base's
    off = train(tiny("teacher", None, **{**over, "flow_matching.train_text_encoder": False, "train.max_steps": 1}),
                tmp_path / "off")
    assert not isinstance(off.stage.trainables["teacher"], TeacherWithText)
    assert torch.equal(param_checksums(Engine.from_pretrained(tmp_path / "off" / "teacher").text_encoder),
                       param_checksums(base_te))
    with pytest.raises(ValueError, match="data.source = 'synthetic' is invalid: expected shapes .*train_text_encoder"):
        tiny("teacher", None, **{"flow_matching.train_text_encoder": True})


def test_resume_is_exact(dirs, tmp_path):
    over = {"train.max_steps": 5, "dmd.dfake_gen_update_ratio": 2, "train.ema_decay": 0.5, "train.ema_start_step": 2,
            "train.save_every": 100, "data.num_samples": 3, "train.grad_accum": 2}
    train(tiny("dmd", dirs, **over), tmp_path / "straight")
    train(tiny("dmd", dirs, **over), tmp_path / "stopped", max_steps=3)
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume"):
        train(tiny("dmd", dirs, **over), tmp_path / "stopped")
    train(tiny("dmd", dirs, **over), tmp_path / "stopped", resume=True)
    a, b = rows(tmp_path / "straight"), rows(tmp_path / "stopped")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    assert [strip_times(r) for r in a] == [strip_times(r) for r in b]
    for name in ("generator", "generator_raw", "critic"):
        sa = param_checksums(Engine.from_pretrained(tmp_path / "straight" / name).transformer)
        sb = param_checksums(Engine.from_pretrained(tmp_path / "stopped" / name).transformer)
        assert torch.equal(sa, sb), name


def test_wall_clock_budget_stops_with_a_checkpoint_and_resume_is_exact(dirs, tmp_path, monkeypatch):
    """--minutes: the run stops when the budget is spent, with a checkpoint at the step it reached; resuming goes
    on to the same weights as an uninterrupted run. The clock is a fake one that advances 1 s per reading."""
    import engine.training.trainer as trainer

    over = {"train.max_steps": 5, "train.save_every": 100, "data.num_samples": 3}
    train(tiny("teacher", dirs, **over), tmp_path / "straight")
    clock = iter(range(10**6))
    monkeypatch.setattr(trainer.time, "monotonic", lambda: float(next(clock)))
    r = train(tiny("teacher", dirs, **over), tmp_path / "budget", minutes=2.5 / 60)
    assert (r.stopped, r.step) == ("time", 2)  # readings at 0 (start), 1, 2, 3 s: two steps within 2.5 s
    assert sorted(p.name for p in (tmp_path / "budget" / "checkpoints").glob("step-*")) == ["step-00000002"]
    monkeypatch.undo()
    r = train(tiny("teacher", dirs, **over), tmp_path / "budget", resume=True)
    assert (r.stopped, r.step) == ("done", 5)
    a, b = rows(tmp_path / "straight"), rows(tmp_path / "budget")
    assert [strip_times(x) for x in a] == [strip_times(x) for x in b]
    sa = param_checksums(Engine.from_pretrained(tmp_path / "straight" / "teacher").transformer)
    sb = param_checksums(Engine.from_pretrained(tmp_path / "budget" / "teacher").transformer)
    assert torch.equal(sa, sb)


def test_resume_with_a_changed_config_is_refused_naming_the_keys(dirs, tmp_path):
    over = {"train.max_steps": 2, "data.num_samples": 3}
    train(tiny("teacher", dirs, **over), tmp_path / "run")
    with pytest.raises(ValueError, match=r"changed config: optim.lr .*only train.max_steps"):
        train(tiny("teacher", dirs, **{**over, "optim.lr": 3e-3}), tmp_path / "run", resume=True)
    r = train(tiny("teacher", dirs, **{**over, "train.max_steps": 3}), tmp_path / "run", resume=True)  # allowed
    assert r.step == 3


@pytest.mark.parametrize("minutes", ["0", "-1", "inf", "soon"])
def test_minutes_must_be_positive(minutes, capsys):
    with pytest.raises(SystemExit):  # argparse's exit 2 with the message, after the stage or before it
        train_cli.parse(_ns("teacher", "--config", "tiny-teacher", "--minutes", minutes))
    assert "--minutes must be a number of minutes > 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="train.max_minutes .* > 0"):
        tiny("teacher", None, **{"train.max_minutes": 0}).validate()


def test_nonfinite_losses_skip_steps_then_stop_keeping_the_last_good_checkpoint(dirs, tmp_path, monkeypatch):
    cls = STAGES["teacher"]
    original = cls.loss
    bad_steps = {3, 5, 6, 7}

    def loss(self, batch, rnd):
        value, logs = original(self, batch, rnd)
        return (value * float("nan") if rnd.key[1] in bad_steps else value), logs

    monkeypatch.setattr(cls, "loss", loss)
    cfg = tiny("teacher", None, **{"models.base": str(dirs / "teacher"), "train.max_steps": 10,
                                   "train.save_every": 1, "train.max_nonfinite_steps": 3})
    result = train(cfg, tmp_path / "run")
    assert result.stopped == "nonfinite" and result.step == 7
    r = rows(tmp_path / "run")
    assert [x["skipped/teacher"] for x in r] == [0, 0, 1, 0, 1, 1, 1]
    assert [x["nonfinite_skipped"] for x in r] == [0, 0, 1, 1, 2, 3, 4]
    assert "fm_loss" not in r[2] and r[2]["grad_norm/teacher"] is None
    # checkpoints at good steps only; the engine directory points at the last good one
    assert (tmp_path / "run" / "teacher").resolve().parent.name == "step-00000004"
    assert train_cli.EXIT_NONFINITE == 3


def test_bad_inputs_fail_before_training(dirs, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(FileNotFoundError, match="models.teacher = .*missing does not exist"):
        train(tiny("dmd", dirs, **{"models.teacher": str(tmp_path / "missing")}), out)
    with pytest.raises(ValueError, match="models.generator is required"):
        train(tiny("dmd", None, **{"models.teacher": str(dirs / "teacher"), "models.generator": None}), out)
    with pytest.raises(FileNotFoundError, match="not a latent directory"):
        train(tiny("teacher", None, **{"models.base": str(dirs / "teacher"), "data.source": "latents",
                                       "data.path": str(tmp_path)}), out)
    with pytest.raises(FileNotFoundError, match="prompt file .* does not exist"):
        train(tiny("ode-init", dirs, **{"data.source": "prompts", "data.path": str(tmp_path / "p.txt")}), out)
    with pytest.raises(ValueError, match="incompatible: text_dim: teacher 32 vs generator 48"):
        train(tiny("dmd", dirs, **{"models.generator": str(dirs / "odd")}), out)
    with pytest.raises(ValueError, match=r"does not know the word\(s\) \['zebra'\]"):
        train(tiny("dmd", dirs, **{"sample.prompts": ["a zebra moving left"]}), out)
    with pytest.raises(ValueError, match="not reachable by whole blocks"):
        train(tiny("dmd", dirs, **{"engine.num_frames": 17}), out)
    with pytest.raises(ValueError, match="unknown data.shapes key"):
        train(tiny("teacher", None, **{"models.base": "tiny", "data.source": "shapes",
                                       "data.shapes": {"speed": 2}}), out)
    assert not (out / "metrics.jsonl").exists()


def test_ema_follows_then_averages():
    m = torch.nn.Linear(2, 2)
    ema = EMA(m, decay=0.5, start_step=2)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema.update(m, step=1)  # before the start: a copy
    assert torch.equal(ema.shadow["weight"], m.weight)
    with torch.no_grad():
        m.weight.fill_(3.0)
    ema.update(m, step=2)
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 2), 2.0))
    with ema.swapped(m):
        assert torch.allclose(m.weight, torch.full((2, 2), 2.0))
    assert torch.equal(m.weight, torch.full((2, 2), 3.0))


def test_param_checksums_see_one_ulp():
    m = torch.nn.Linear(3, 3)
    a = param_checksums(m)
    with torch.no_grad():
        m.weight[1, 2] = torch.nextafter(m.weight[1, 2], torch.tensor(10.0))
    assert not torch.equal(a, param_checksums(m))


def test_learning_rate_schedules_warm_up_then_hold_or_decay_by_step_alone():
    from engine.training.config import OptimConfig
    from engine.training.trainer import lr_at

    const = OptimConfig(lr=1e-3, warmup_steps=10)
    assert [lr_at(const, s, 100) for s in (0, 5, 10, 99)] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])
    cos = OptimConfig(lr=1e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(cos, 10, 110) == pytest.approx(1e-3)  # the peak at the end of the warm-up
    assert lr_at(cos, 60, 110) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way: the mean of peak and floor
    assert lr_at(cos, 110, 110) == pytest.approx(1e-4) and lr_at(cos, 500, 110) == pytest.approx(1e-4)
    lrs = [lr_at(cos, s, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # never rises after the warm-up
    with pytest.raises(ValueError, match="schedule"):
        from_dict(Config, {"optim": {"schedule": "linear"}}).validate()


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path, mask):
    """Results, cards and shipped directories are readable by whoever a plain open() / mkdir() would let read them
    (mkstemp / mkdtemp alone make them private to their writer)."""
    from engine.atomic import atomic_directory, write_text

    old = os.umask(mask)
    try:
        write_text(tmp_path / "card.md", "x")
        atomic_directory(tmp_path / "model", lambda d: (d / "w.txt").write_text("y"))
        (tmp_path / "plain.md").write_text("x")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    mode = lambda p: (tmp_path / p).stat().st_mode & 0o777  # noqa: E731
    assert mode("card.md") == mode("plain.md") == 0o666 & ~mask
    assert mode("model") == mode("plain") == 0o777 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.md", "model", "plain", "plain.md"]
