"""Training on timeline clips: per-frame prompt embeddings from switch data, through the teacher stage."""

from __future__ import annotations

import json

import pytest
import torch

from engine.data.shapes import ShapesConfig
from engine.testing import tiny_engine
from engine.training.config import load_config
from engine.training.data import PromptEncoder, ShapesSource, TrainData, build_latent_cache, frame_prompts
from engine.training.stages import STAGES, Runtime, StepRandom, load_components, shapes_config


def test_frame_prompts_follow_the_blocks_of_the_timeline():
    assert frame_prompts([(0, "a"), (1, "b")], 6, 3) == ["a"] * 3 + ["b"] * 3
    assert frame_prompts([(0, "a")], 4, 3) == ["a"] * 4
    with pytest.raises(ValueError, match="timeline blocks must increase"):
        frame_prompts([(0, "a"), (2, "b"), (1, "c")], 9, 3)
    with pytest.raises(ValueError, match="must start at block 0"):
        frame_prompts([(1, "a")], 6, 3)


@pytest.fixture(scope="module")
def switch_source():
    eng = tiny_engine()
    cfg = ShapesConfig(height=32, width=32, num_frames=21, switch_prob=1.0)
    enc = PromptEncoder(eng.text_encoder, eng.tokenizer, 16, "cpu")
    return ShapesSource(cfg, seed=0, num_samples=4, vae=eng.vae), enc


def test_switch_batches_carry_one_prompt_embedding_per_latent_frame(switch_source, tmp_path):
    src, enc = switch_source
    data = TrainData(src, enc, batch_size=2, seed=0, need_latents=True)
    batch = data.batch(0)
    assert batch.latents.shape[:3] == (2, 4, 6) and batch.prompt_embeds.shape == (2, 6, 16, 32)  # (B, F, L, D)
    for j, i in enumerate(batch.indices):
        timeline = src.dataset[i]["timeline"]
        assert len(timeline) == 2 and timeline[1][0] == 1  # 21 frames, 2 blocks: the switch is at block 1
        want = enc([p for _, p in timeline])  # (2, L, D)
        assert torch.equal(batch.prompt_embeds[j, :3], want[0].expand(3, -1, -1))
        assert torch.equal(batch.prompt_embeds[j, 3:], want[1].expand(3, -1, -1))
    # the latent cache keeps the per-frame embeddings
    kw = dict(rank=0, world=1, barrier=lambda: None, is_main=True)
    cache = build_latent_cache(tmp_path / "cache", src, enc, description={"v": 1}, **kw)
    assert cache.embed_shape == (6, 16, 32)
    cached = TrainData(cache, enc, batch_size=2, seed=0, need_latents=True).batch(0)
    assert torch.equal(cached.prompt_embeds, batch.prompt_embeds)


def _teacher(tmp_path, **over):
    root = tmp_path / "base"
    tiny_engine(seed=0).save_pretrained(root)
    items = {"data.source": "shapes", "data.num_samples": 4, "train.tensorboard": False, "sample.every": 0,
             "models.base": str(root), "data.shapes": {"switch_prob": 1.0}, **over}
    args = [a for k, v in items.items() for a in (f"--{k}", json.dumps(v))]
    cfg = load_config("tiny-teacher", args)
    st = STAGES["teacher"](cfg, Runtime(torch.device("cpu"), output_dir=tmp_path), load_components(cfg, "teacher",
                                                                                                  torch.device("cpu")))
    st.bind(st.trainables, st.trainables)
    return cfg, st


@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_teacher_trains_on_timeline_clips_with_caption_dropout_per_clip(tmp_path, dropout):
    cfg, st = _teacher(tmp_path, **{"flow_matching.caption_dropout": dropout})
    assert shapes_config(cfg).frames_per_block == cfg.engine.num_frame_per_block
    batch = st.data.batch(0)
    assert batch.prompt_embeds.ndim == 4
    seen = []
    net = st.nets["teacher"]
    forward = net.forward
    net.forward = lambda x, t, emb, **kw: (seen.append(emb), forward(x, t, emb, **kw))[1]
    loss, logs = st.loss(batch, StepRandom(0, 1, "teacher", 0, 0))
    loss.backward()
    assert torch.isfinite(loss) and logs["caption_dropout"] == dropout
    want = torch.zeros_like(batch.prompt_embeds) if dropout else batch.prompt_embeds  # the whole timeline dropped
    assert torch.equal(seen[0], want)
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_frames_per_block_comes_from_the_engine(tmp_path):
    with pytest.raises(ValueError, match=r"must not set \['frames_per_block'\].*num_frame_per_block"):
        _teacher(tmp_path, **{"data.shapes": {"frames_per_block": 2}})


def test_teacher_causal_fraction_trains_steps_under_the_block_causal_mask(tmp_path):
    """flow_matching.causal_fraction: that share of steps calls the transformer with the engine's block size (its
    block-causal mask), the others bidirectionally; the step's choice is logged; out of range is refused."""
    seen = []

    def run(p, steps):
        cfg, st = _teacher(tmp_path / str(p), **{"flow_matching.causal_fraction": p})
        net = st.nets["teacher"]
        forward = net.forward
        net.forward = lambda x, t, emb, **kw: (seen.append(kw), forward(x, t, emb, **kw))[1]
        batch = st.data.batch(0)
        logs = [st.loss(batch, StepRandom(0, 1, "teacher", s, 0))[1]["causal"] for s in range(steps)]
        return cfg, logs

    cfg, logs = run(1.0, 2)
    assert logs == [1.0, 1.0] and seen == [{"num_frame_per_block": cfg.engine.num_frame_per_block}] * 2
    seen.clear()
    assert run(0.0, 2)[1] == [0.0, 0.0] and seen == [{}, {}]
    seen.clear()
    _, logs = run(0.5, 40)
    assert 10 <= sum(logs) <= 30 and [bool(k) for k in seen] == [bool(c) for c in logs]
    with pytest.raises(ValueError, match=r"flow_matching.causal_fraction.*in \[0, 1\]"):
        _teacher(tmp_path / "bad", **{"flow_matching.causal_fraction": 1.5})


def test_stream_windows_are_block_aligned_cuts_of_whole_encoded_long_clips(tmp_path):
    """data.stream_frames: the teacher trains on windows of the clip's latent length cut at a block boundary from
    a long clip encoded whole (as a stream's frames are), with the timeline cut the same way; the window is drawn
    per sample number (a resumed run draws the same), and every block boundary is drawn."""
    from engine.training.data import encode_video

    cfg, st = _teacher(tmp_path, **{"data.stream_frames": 45})  # 21 frames = 6 latent frames; 45 = 12 (4 blocks)
    src, F, k = st.data.source, 6, cfg.engine.num_frame_per_block
    assert src.dataset.cfg.num_frames == 45 and st.data.window == (F, k, 0)
    starts = []
    for b in range(6):
        batch = st.data.batch(b)
        assert batch.latents.shape[2] == F and batch.prompt_embeds.shape[1] == F
        for j, i in enumerate(batch.indices):
            item = src.dataset[i]
            whole = encode_video(src.vae, item["video"][None])[0]
            s = next(s for s in range(0, 12 - F + 1, k) if torch.allclose(whole[:, s : s + F], batch.latents[j]))
            want = st.data.prompts(frame_prompts(item["timeline"], 12, k)[s : s + F])
            assert torch.equal(batch.prompt_embeds[j], want)
            starts.append(s)
        assert torch.equal(st.data.batch(b).latents, batch.latents)  # a pure function of the sample number
    assert set(starts) == {0, 3, 6}
    with pytest.raises(ValueError, match=r"data.stream_frames.*33, 45"):
        _teacher(tmp_path / "bad", **{"data.stream_frames": 41})
    with pytest.raises(ValueError, match=r"data.stream_frames.*unless stage is teacher"):
        load_config("tiny-dmd", ["--data.stream_frames", "45"])


def test_stream_history_goes_clean_at_timestep_zero_and_outside_the_loss(tmp_path):
    """flow_matching.stream_history 1: a cut is the window behind one block of its stream (F + k frames; at the
    clip's start the first F + k frames, all noised); the teacher gets the history frames clean at t = 0 and the
    loss is the MEAN over the noised frames, computed here from the formula; without history frames it is the
    plain flow-matching loss with the same draws."""
    from engine.training.losses import FlowMatchingLoss

    cfg, st = _teacher(tmp_path, **{"data.stream_frames": 45, "flow_matching.stream_history": 1})
    F, k = 6, cfg.engine.num_frame_per_block
    batches = [st.data.batch(b) for b in range(12)]
    hist = torch.cat([b.extra["history_frames"] for b in batches])
    assert all(b.latents.shape[2] == F + k for b in batches) and set(hist.tolist()) == {0, k}
    batch = next(b for b in batches if set(b.extra["history_frames"].tolist()) == {0, k})
    net, seen = st.nets["teacher"], []
    forward = net.forward
    net.forward = lambda x, t, emb, **kw: seen.append((x, t, emb)) or forward(x, t, emb, **kw)
    rnd = StepRandom(0, 1, "teacher", 3, 0)
    loss, logs = st.loss(batch, rnd)
    x_in, t_in, emb_in = seen[-1]
    x = batch.latents
    g = rnd.local("fm")
    t = st.flow.sample_timesteps(x.shape[0], generator=g, min_frac=0.0, max_frac=1.0)
    eps = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        pred = forward(x_in, t_in, emb_in).sample
    want, n = 0.0, 0
    for i, h in enumerate(batch.extra["history_frames"].tolist()):
        assert torch.equal(t_in[i, :h], torch.zeros(h)) and torch.allclose(t_in[i, h:], t[i].expand(F + k - h))
        assert torch.equal(x_in[i, :, :h], x[i, :, :h])  # clean history
        s = t[i] / 1000
        assert torch.allclose(x_in[i, :, h:], (1 - s) * x[i, :, h:] + s * eps[i, :, h:], atol=1e-6)
        want += (pred[i, :, h:] - (eps[i, :, h:] - x[i, :, h:])).square().sum()
        n += pred[i, :, h:].numel()
    assert torch.allclose(loss, want / n, rtol=1e-5) and logs["history_frames"] == hist_mean(batch)
    # no history frames: the plain loss, the same draws
    batch.extra["history_frames"] = torch.zeros_like(batch.extra["history_frames"])
    plain = FlowMatchingLoss(st.flow)(x, lambda x_t, tt: forward(x_t, tt, emb_in).sample,
                                      generator=rnd.local("fm"))[0]
    assert torch.allclose(st.loss(batch, rnd)[0], plain, rtol=1e-5)
    with pytest.raises(ValueError, match=r"flow_matching.stream_history.*needs data.stream_frames"):
        _teacher(tmp_path / "bad", **{"flow_matching.stream_history": 1})


def hist_mean(batch):
    return batch.extra["history_frames"].float().mean().item()
