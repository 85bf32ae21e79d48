"""Long-horizon DMD (issue 15, item 6): Self-Forcing rollouts past the clip with the live stream's rolling window,
sinks and prompt switches (KV re-cache), the losses on a clip-length window of the rollout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.pipeline import Engine
from engine.sampling.block_sampler import num_renoise
from engine.sampling.noise import SamplerNoise
from engine.testing import tiny_engine
from engine.training.config import load_config
from engine.training.rollout import self_forcing_rollout
from engine.training.stages import STAGES, Runtime, StepRandom, load_components
from engine.training.trainer import param_checksums, train

RED, BLUE = "a red circle moving left", "a blue square moving up"
K, SINK, WINDOW = 3, 3, 9  # frames per block; sink frames; rolling window (latent frames, current block included)


@pytest.fixture(scope="module")
def eng():
    return tiny_engine(local_attn_frames=WINDOW, sink_frames=SINK)


@pytest.fixture(scope="module")
def dirs(tiny_engine_dirs):
    return tiny_engine_dirs


def config(dirs: Path, preset: str = "tiny-dmd-long", **over):
    items = {"train.tensorboard": False, "sample.every": 0, "train.max_steps": 2, "data.num_samples": 4,
             "models.teacher": str(dirs / "teacher"), "models.generator": str(dirs / "generator"), **over}
    return load_config(preset, [a for k, v in items.items() for a in (f"--{k}", json.dumps(v))])


def build(cfg, tmp_path: Path):
    st = STAGES["dmd"](cfg, Runtime(torch.device("cpu"), output_dir=tmp_path),
                       load_components(cfg, "dmd", torch.device("cpu")))
    st.bind(st.trainables, st.trainables)
    return st


# ------------------------------------------------------------------------------------- the rollout vs inference


def live_latents(eng, seed: int, timeline, num_blocks: int, recache: bool = True) -> torch.Tensor:
    return eng.replay(seed, timeline, num_blocks, output_type="latent", recache=recache).latents  # (1, C, F, h, w)


def rollout(eng, cond, seeds, num_blocks: int, window_start: int, *, recache: bool = True, grad: bool = False,
            exits=None, model=None):
    """The training rollout of `num_blocks` blocks with the engine's window and sinks, all blocks exiting at the last
    step (what inference does), on the live streams' noise of `seeds` (one per batch item)."""
    k, h, w = eng.config.num_frame_per_block, 32 // 8, 32 // 8
    parts = [SamplerNoise.from_seed(s, (1, 4, num_blocks * k, h, w), num_renoise(eng.schedule)) for s in seeds]
    noise = SamplerNoise(torch.cat([p.z0 for p in parts]), [torch.cat(s) for s in zip(*[p.step_noise for p in parts])])
    model = model or eng.transformer
    make = lambda: eng.transformer.make_cache(h, w, max_frames=WINDOW - k, sink_frames=SINK, differentiable=grad)
    exits = exits or [len(eng.schedule) - 1] * num_blocks
    with torch.set_grad_enabled(grad):
        return self_forcing_rollout(model, cond, noise, eng.schedule, make, num_frame_per_block=k, exit_steps=exits,
                                    grad=grad, window_start=window_start, recache=recache, dtype=torch.float32)


def timeline_cond(eng, prompts_of_blocks: list[str]) -> torch.Tensor:
    """(1, F, L, D): each block's prompt for its frames."""
    k = eng.config.num_frame_per_block
    return torch.stack([eng.encode_prompt(p)[0] for p in prompts_of_blocks for _ in range(k)])[None]


@torch.no_grad()
def test_a_long_rollouts_window_is_what_the_live_stream_shows(eng):
    """5 blocks (the window of 9 frames evicts from block 3 on), the loss window = blocks 3-4: the rollout's window
    equals the live stream's blocks 3-4 with the same seed, window and sinks; the history is not returned."""
    res = rollout(eng, eng.encode_prompt(RED), [7], 5, 3)
    live = live_latents(eng, 7, [(0, RED)], 5)
    assert res.x0.shape[2] == 6 and res.window_start == 3 and res.grad_frames.tolist() == [False] * 6
    assert (res.x0 - live[:, :, 9:]).abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("recache", [True, False])
def test_a_switch_inside_the_rollout_is_the_live_streams_switch(eng, recache):
    """A timeline switching at block 3 (after the window evicted): the rollout's re-cache (or its absence) is the
    live stream's, block for block; and in a batch only the item that switches is re-cached."""
    blocks = [RED, RED, RED, BLUE, BLUE]
    res = rollout(eng, timeline_cond(eng, blocks), [5], 5, 2, recache=recache)
    live = live_latents(eng, 5, [(0, RED), (3, BLUE)], 5, recache=recache)
    assert (res.x0 - live[:, :, 6:]).abs().max() <= 1e-5
    other = live_latents(eng, 5, [(0, RED), (3, BLUE)], 5, recache=not recache)
    assert (other[:, :, 9:] - live[:, :, 9:]).abs().max() > 1e-4  # the test sees the re-cache
    # a batch: item 0 switches, item 1 keeps its prompt; each equals its own live stream
    cond = torch.cat([timeline_cond(eng, blocks), timeline_cond(eng, [RED] * 5)])
    both = rollout(eng, cond, [5, 9], 5, 2, recache=recache)
    assert (both.x0[:1] - live[:, :, 6:]).abs().max() <= 1e-5
    assert (both.x0[1:] - live_latents(eng, 9, [(0, RED)], 5)[:, :, 6:]).abs().max() <= 1e-5


def test_gradient_reaches_only_the_windows_blocks(eng):
    """History blocks and every context pass run without gradient; the window's exit steps carry it (one network
    call per window block in the graph), and nothing is generated after the window."""
    calls = []

    class Recording(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t, c, **kw):
            calls.append((x.shape[2], torch.is_grad_enabled(), kw.get("update_cache", False)))
            return self.net(x, t, c, **kw)

    net = tiny_engine(seed=3).transformer.train()
    res = rollout(eng, eng.encode_prompt(RED), [1], 4, 2, grad=True, exits=[3, 1, 0, 2], model=Recording(net))
    assert res.exit_steps == [0, 2] and res.grad_frames.all() and res.x0.shape[2] == 6
    denoise = [g for _, g, update in calls if not update]
    assert len(denoise) == 4 + 2 + 1 + 3  # exit + 1 steps per block, blocks 0-3 only
    assert sum(denoise) == 2 and denoise[6] and denoise[-1]  # the exit steps of blocks 2 and 3
    assert sum(1 for _, _, update in calls if update) == 3 and not any(g for _, g, u in calls if u)
    res.x0.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


# ------------------------------------------------------------------------------------------------ the stage


def test_default_is_the_clip_rollout_bit_for_bit(dirs, tmp_path):
    """rollout.num_frames null (the default) and the clip's own length give the same step, bit for bit (and
    against the commit before long rollouts: checked by hand, the same loss and gradient hashes)."""
    def step(**over):
        st = build(config(dirs, "tiny-dmd", **{"data.num_samples": 4, **over}), tmp_path)
        assert st.rollout_blocks == st.num_blocks == 2
        batch = st.data.batch(0)
        loss, logs = st.generator_step(batch, StepRandom(0, 1, "generator", 0, 0))
        loss.backward()
        assert "window_start" not in logs
        return loss.detach(), [p.grad for p in st.trainables["generator"].parameters()]
    (la, ga), (lb, gb) = step(), step(**{"rollout.num_frames": 6})
    assert torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(ga, gb))


def test_windows_are_shared_across_processes_and_cover_the_rollout(dirs, tmp_path):
    st = build(config(dirs), tmp_path)
    assert (st.rollout_blocks, st.num_blocks) == (4, 2)
    starts = [st.window_start(StepRandom(0, s, "generator", 0, 0)) for s in range(40)]
    assert set(starts) == {0, 1, 2}  # uniform over the 3 block-aligned windows
    assert starts == [st.window_start(StepRandom(0, s, "generator", 0, 1)) for s in range(40)]  # rank 1: the same
    st.cfg.rollout.window = "last"
    assert {st.window_start(StepRandom(0, s, "generator", 0, 0)) for s in range(10)} == {2}


def test_the_rollout_runs_the_timeline_over_the_long_rollout(dirs, tmp_path, monkeypatch):
    """Switch clips: the window runs under the clip's timeline, the history before it under its first prompt; the
    teacher and critic see the window as the clip with the clip's timeline."""
    st = build(config(dirs, **{"data.shapes": {"switch_prob": 1.0}, "rollout.window": "last"}), tmp_path)
    batch = st.data.batch(0)
    assert batch.prompt_embeds.shape[:2] == (2, 6)  # (B, F, L, D): the clip's timeline
    assert not torch.equal(batch.prompt_embeds[:, 0], batch.prompt_embeds[:, 5])  # it switches
    import engine.training.stages as stages

    seen = {}
    real = stages.self_forcing_rollout

    def spy(model, cond, noise, *a, **kw):
        seen.update(cond=cond, frames=noise.shape[2], start=kw["window_start"])
        return real(model, cond, noise, *a, **kw)
    monkeypatch.setattr(stages, "self_forcing_rollout", spy)
    res, _ = st.rollout(batch.prompt_embeds, StepRandom(0, 1, "generator", 0, 0), grad=False)
    assert seen["start"] == 2 and seen["frames"] == 12 and res.x0.shape[2] == 6
    emb = batch.prompt_embeds
    assert torch.equal(seen["cond"][:, :6], emb[:, :1].expand(-1, 6, -1, -1)) and torch.equal(seen["cond"][:, 6:], emb)


def test_bad_long_rollout_settings_are_refused_with_the_accepted_range(dirs, tmp_path):
    with pytest.raises(ValueError, match=r"rollout.num_frames = 7 is invalid: expected whole blocks .* = 3 latent "
                                         r"frames, at least the clip's 6 .*: 6, 9, 12"):
        build(config(dirs, **{"rollout.num_frames": 7}), tmp_path)
    with pytest.raises(ValueError, match=r"rollout.num_frames = 3 is invalid: .*at least the clip's 6"):
        build(config(dirs, **{"rollout.num_frames": 3}), tmp_path)
    with pytest.raises(ValueError, match=r"rollout.num_frames = 12 latent frames is longer than the clip's 6 and "
                                         r"needs the rolling window .*engine.local_attn_frames.*live default: 9 and 3"):
        build(config(dirs, **{"engine.local_attn_frames": None, "engine.sink_frames": 0}), tmp_path)
    with pytest.raises(ValueError, match=r"rollout.num_frames = 0 is invalid: expected .* >= 1"):
        config(dirs, **{"rollout.num_frames": 0})
    with pytest.raises(ValueError, match=r"rollout.window = 'end' is invalid: expected uniform .* or last"):
        config(dirs, **{"rollout.window": "end"})
    e = tiny_engine()
    cond = timeline_cond(e, [RED, BLUE])
    with pytest.raises(ValueError, match="switch at block boundaries only"):
        rollout(e, torch.cat([cond[:, :1], cond[:, 2:], cond[:, 2:3]], 1), [0], 2, 0)
    with pytest.raises(ValueError, match=r"a timeline \(B, F, L, D\) over the rollout's 9 latent frames"):
        rollout(e, cond, [0], 3, 0)
    with pytest.raises(ValueError, match=r"window_start must be a block in \[0, 2\)"):
        rollout(e, cond, [0], 2, 2)


def test_the_tiny_long_preset_trains_and_resumes_exactly(dirs, tmp_path):
    """configs/tiny-dmd-long.yaml (switch clips, re-cache) through the trainer: finite losses, windows logged, and a
    run stopped at step 2 and resumed equals the straight run (metrics and weights)."""
    over = {"train.max_steps": 3, "dmd.dfake_gen_update_ratio": 1, "train.save_every": 100, "data.num_samples": 3,
            "models.base": str(dirs / "teacher")}
    train(config(dirs, **over), tmp_path / "straight")
    train(config(dirs, **over), tmp_path / "stopped", max_steps=2)
    train(config(dirs, **over), tmp_path / "stopped", resume=True)
    rows = [[json.loads(ln) for ln in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("straight", "stopped")]
    a, b = ([{k: v for k, v in r.items() if "time" not in k} for r in rs] for rs in rows)
    assert [r["step"] for r in b] == [1, 2, 3] and a == b
    assert all(np.isfinite(r["dmd_loss"]) and r["generator/window_start"] in (0, 1, 2) for r in a)
    for name in ("generator", "critic"):
        sa = param_checksums(Engine.from_pretrained(tmp_path / "straight" / name).transformer)
        sb = param_checksums(Engine.from_pretrained(tmp_path / "stopped" / name).transformer)
        assert torch.equal(sa, sb), name
    assert Engine.from_pretrained(tmp_path / "straight" / "generator").config.local_attn_frames == 9


@torch.no_grad()
def test_the_rollout_returns_the_blocks_before_the_window_as_history(eng):
    """history_blocks: the x0 of up to that many blocks before the window, which are the live stream's frames there."""
    cond, live = eng.encode_prompt(RED), live_latents(eng, 7, [(0, RED)], 5)
    res = rollout(eng, cond, [7], 5, 3)
    assert res.history is None
    for h, frames in [(1, slice(6, 9)), (2, slice(3, 9)), (5, slice(0, 9))]:
        res = rollout_h(eng, cond, 5, 3, h)
        assert (res.history - live[:, :, frames]).abs().max() <= 1e-5
    assert rollout_h(eng, cond, 5, 0, 2).history is None  # a window at the start has none


def rollout_h(eng, cond, num_blocks, start, history_blocks):
    k, h, w = eng.config.num_frame_per_block, 32 // 8, 32 // 8
    noise = SamplerNoise.from_seed(7, (1, 4, num_blocks * k, h, w), num_renoise(eng.schedule))
    make = lambda: eng.transformer.make_cache(h, w, max_frames=WINDOW - k, sink_frames=SINK)
    return self_forcing_rollout(eng.transformer, cond, noise, eng.schedule, make, num_frame_per_block=k,
                                exit_steps=[len(eng.schedule) - 1] * num_blocks, grad=False, window_start=start,
                                dtype=torch.float32, history_blocks=history_blocks)


def test_teacher_history_puts_the_stream_before_the_window_for_the_real_score_and_the_critic(dirs, tmp_path,
                                                                                          monkeypatch):
    """dmd.teacher_history 1: the teacher (real score, with CFG) and the critic (both steps) get the block before
    the window clean at timestep 0 under the timeline's first prompt, then the window at the loss's t; the scores
    are cut back to the window; a window at the rollout's start goes alone; bad settings are refused."""
    st = build(config(dirs, **{"dmd.teacher_history": 1, "data.shapes": {"switch_prob": 1.0}}), tmp_path)
    seen = []
    for name, net in (("teacher", st.teacher), ("critic", st.trainables["critic"])):
        fwd = net.forward
        monkeypatch.setattr(net, "forward", lambda x, t, c, *a, _f=fwd, _n=name, **kw:
                            seen.append((_n, x, t, c)) or _f(x, t, c, *a, **kw))
    batch = st.data.batch(0)
    k, F = st.block, st.shape[1]
    starts = [st.window_start(StepRandom(0, s, "generator", 0, 0)) for s in range(12)]
    assert 0 in starts and max(starts) > 0
    for s, start in enumerate(starts):
        rnd = StepRandom(0, s, "generator", 0, 0)
        res, _ = st.rollout(batch.prompt_embeds, rnd, grad=False)
        seen.clear()
        x_t, t = torch.randn(res.x0.shape), torch.full((res.x0.shape[0],), 500.0)
        out = st.real_score(batch.prompt_embeds, res)(x_t, t)
        assert out.shape == x_t.shape
        (_, x_in, t_in, c_in), = seen  # one call: cond and uncond batched
        H = k if start else 0
        assert x_in.shape[2] == H + F and torch.all(t_in == 500.0 if not H else t_in[:, H:] == 500.0)
        if H:
            assert t_in.shape == (2 * x_t.shape[0], H + F) and torch.all(t_in[:, :H] == 0)
            assert torch.equal(x_in[: x_t.shape[0], :, :H], res.history)
            first = batch.prompt_embeds[:, :1].expand(-1, H, -1, -1)
            assert torch.equal(c_in[: x_t.shape[0], :H], first) and torch.equal(c_in[: x_t.shape[0], H:],
                                                                                batch.prompt_embeds)
    seen.clear()
    loss, logs = st.critic_step(batch, StepRandom(0, 5, "critic", 0, 0))
    (name, x_in, t_in, _), = seen
    H = k if logs["window_start"] else 0
    assert name == "critic" and x_in.shape[2] == H + F and torch.isfinite(loss)
    loss, _ = st.generator_step(batch, StepRandom(0, 5, "generator", 0, 0))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"dmd.teacher_history.*needs a long rollout"):
        config(dirs, "tiny-dmd", **{"dmd.teacher_history": 1})
