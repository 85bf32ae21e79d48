"""Live streams: one noise scheme, live == generate, replay == live, prompt switches with and without re-cache,
absolute positions against the parent model, pacing, flat memory, recording, bad input."""

import json
import threading
import time
import tracemalloc

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

from engine import SamplerNoise
from engine.live import check_timeline, read_timeline
from engine.models import CausalWanTransformer3DModel
from engine.sampling.noise import block_noise
from engine.testing import MaskedSelfAttention, tiny_engine, tiny_transformer_config, window_mask
from engine.video import read_video

RED, BLUE = "a red circle moving left", "a blue square moving up"


@pytest.fixture(scope="module")
def eng():
    return tiny_engine(local_attn_frames=9, sink_frames=3)


def frames_of(chunks):
    return np.concatenate([c.frames for c in chunks])


def test_noise_is_a_function_of_seed_and_frame():
    a = SamplerNoise.from_seed(5, (1, 4, 9, 2, 2), 3)
    b = SamplerNoise.from_seed(5, (1, 4, 15, 2, 2), 3)  # a longer stream starts with the same noise
    assert torch.equal(a.z0, b.z0[:, :, :9]) and all(torch.equal(x, y[:, :, :9])
                                                      for x, y in zip(a.step_noise, b.step_noise))
    z, steps = block_noise(5, 6, 9, (1, 4, 1, 2, 2), 3)  # any block, nothing before it drawn
    assert torch.equal(z, a.z0[:, :, 6:9]) and torch.equal(steps[2], a.step_noise[2][:, :, 6:9])
    assert not torch.equal(SamplerNoise.from_seed(6, (1, 4, 9, 2, 2), 3).z0, a.z0)
    d = SamplerNoise.from_seed(5, (1, 4, 9, 2, 2), 2, mode="derived")
    assert torch.equal(d.z0, a.z0)
    for f in range(9):  # each frame's step noise permutes that frame's elements of z0
        assert torch.equal(d.step(1)[:, :, f].flatten().sort().values, d.z0[:, :, f].flatten().sort().values)


@torch.no_grad()
def test_live_equals_generate_and_replay_equals_live(eng, tmp_path):
    n_blocks = 6
    video = eng.generate(RED, num_frames=1 + 4 * (3 * n_blocks - 1), seed=3)
    live = eng.live(RED, seed=3, pace=False)
    chunks = [next(live) for _ in range(n_blocks)]
    assert np.array_equal(frames_of(chunks), video.frames)  # bit for bit, through the window's evictions
    assert torch.equal(torch.cat([c.latents for c in chunks], 2), video.latents)
    assert [c.block for c in chunks] == list(range(n_blocks)) and chunks[0].num_blocks is None
    # switches: the next block; replay from seed + timeline gives the same frames
    assert live.set_prompt(BLUE) == n_blocks
    chunks += [next(live) for _ in range(3)]
    assert live.set_prompt(RED, at_block=11) == 11
    chunks += [next(live) for _ in range(3)]
    assert live.timeline == [(0, RED), (6, BLUE), (11, RED)]
    assert [c.prompt for c in chunks] == [RED] * 6 + [BLUE] * 5 + [RED]
    live.save(tmp_path / "mid.mp4")  # mid-stream: everything but the newest frame
    assert len(read_video(tmp_path / "mid.mp4")[0]) == live.frames - 1
    live.close()
    live.save(tmp_path / "live.mp4")
    with pytest.raises(StopIteration):
        next(live)
    meta = read_timeline(tmp_path / "live.json")
    assert meta["num_blocks"] == 12 and meta["seed"] == 3
    replay = eng.replay(meta["seed"], meta["timeline"], meta["num_blocks"])
    assert np.array_equal(replay.frames, frames_of(chunks))
    recorded, fps = read_video(tmp_path / "live.mp4")
    assert len(recorded) == len(replay.frames) == live.frames and fps == eng.config.fps


@torch.no_grad()
def test_set_prompt_takes_effect_at_the_next_block_recache_or_not(eng):
    def run(switch_at, recache):
        tl = [(0, RED)] + ([(switch_at, BLUE)] if switch_at is not None else [])
        return eng.replay(1, tl, 6, output_type="latent", recache=recache).latents
    base, recached, swapped = run(None, True), run(3, True), run(3, False)
    k = eng.config.num_frame_per_block
    for other in (recached, swapped):
        assert torch.equal(other[:, :, :3 * k], base[:, :, :3 * k])  # blocks before the switch untouched
        assert (other[:, :, 3 * k:4 * k] - base[:, :, 3 * k:4 * k]).abs().max() > 1e-3  # the switch block changes
    # the re-cache recomputes the window's K/V under the new prompt: it changes what follows
    assert (recached[:, :, 3 * k:] - swapped[:, :, 3 * k:]).abs().max() > 1e-4
    # switching to the prompt already in force changes nothing
    assert torch.equal(eng.replay(1, [(0, RED), (3, RED)], 6, output_type="latent").latents, base)


@torch.no_grad()
def test_recache_equals_a_cache_built_under_the_new_prompt():
    """After a re-cache the cache holds what it would hold had the window's frames been written under the new prompt
    (before the window evicts, with positions in either mode)."""
    eng = tiny_engine(local_attn_frames=12, sink_frames=3)
    for mode in ("window", "absolute"):
        live = eng.live(RED, seed=0, pace=False, rope_positions=mode, record=False)
        for _ in range(3):
            next(live)
        live.set_prompt(BLUE)
        live._compute_block()  # context pass of block 2, then the switch: re-cache of blocks 0-2
        ref = eng.with_settings(rope_positions=mode).live(BLUE, seed=0, pace=False, record=False)
        for f0 in range(0, 9, 3):  # write the same context inputs under BLUE, block by block
            ctx = torch.cat([t for f, t in live._ctx if f0 <= f < f0 + 3], 2)
            ref._cond = ref._conditioning(BLUE)
            from engine.sampling.block_sampler import context_pass
            context_pass(eng.transformer, ref._cond, ctx, [], eng.schedule, ref.caches, ctx=ctx)
        for layer in range(len(eng.transformer.blocks)):
            (ka, va), (kb, vb) = live.caches[0].get(layer), ref.caches[0].get(layer)
            assert (ka - kb).abs().max() <= 1e-5 and (va - vb).abs().max() <= 1e-5
        assert live.caches[0].key_positions().tolist() == ref.caches[0].key_positions().tolist()
        live.close()


@torch.no_grad()
def test_absolute_positions_equal_parent_with_sink_and_window_mask():
    torch.manual_seed(0)
    cfg = tiny_transformer_config(num_layers=2)
    parent = WanTransformer3DModel(**cfg).eval()
    ours = CausalWanTransformer3DModel(**cfg).eval()
    ours.load_state_dict(parent.state_dict())
    k, sink, window, n_blocks, H = 2, 1, 7, 6, 4  # window: latent frames a block attends to, its own included
    nF, S = k * n_blocks, (H // 2) ** 2
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(1, 4, nF, H, H, generator=g), torch.randn(1, 5, 32, generator=g)
    t = torch.tensor([350.0])
    # query frame q may see: its own block, the sinks, and the last (window - k - sink) frames before its block
    parent.set_attn_processor(MaskedSelfAttention(window_mask(nF, k, window, sink, S)))
    full = parent(x, t, c).sample
    results = {}
    for mode in ("absolute", "window"):
        cache = ours.make_cache(H, H, max_frames=window - k, sink_frames=sink, positions=mode)
        outs = [ours(x[:, :, b * k:(b + 1) * k], t.expand(1, k), c, kv_cache=cache, update_cache=True).sample
                for b in range(n_blocks)]
        results[mode] = (torch.cat(outs, 2) - full).abs().amax(dim=(0, 1, 3, 4))  # per frame
    assert results["absolute"].max() <= 1e-5, results["absolute"]
    # re-indexing agrees until the first eviction (blocks 0-2 here) and differs after it
    assert results["window"][:3 * k].max() <= 1e-5 and results["window"][3 * k:].max() > 1e-4


def test_absolute_positions_end_at_the_rope_table():
    eng = tiny_engine(local_attn_frames=9, sink_frames=3, rope_positions="absolute")
    eng.transformer.rope.max_seq_len = 12  # a small table: the check, not the arithmetic
    try:
        with pytest.raises(ValueError, match="rope_positions='window'"):
            eng.generate(RED, num_frames=1 + 4 * 14, seed=0)  # 15 latent frames
        live = eng.live(RED, pace=False, record=False)
        for _ in range(4):
            next(live)
        with pytest.raises(ValueError, match="covers 12 latent frames"):
            next(live)
        assert live.closed and live.error is not None
        w = eng.live(RED, pace=False, record=False, rope_positions="window")
        for _ in range(6):
            next(w)  # unbounded
    finally:
        eng.transformer.rope.max_seq_len = 1024


@torch.no_grad()
def test_memory_is_flat_over_many_blocks(eng):
    live = eng.live(RED, seed=0, pace=False)
    sizes, heap = [], []
    tracemalloc.start()
    try:
        for b in range(60):
            next(live)
            if b in (19, 59):
                heap.append(tracemalloc.get_traced_memory()[0])
            sizes.append(live.stats["kv_bytes"])
            if b % 10 == 5:
                live.set_prompt(BLUE if b % 20 == 5 else RED)
    finally:
        tracemalloc.stop()
    assert len(set(sizes[1:])) == 1  # preallocated at the first context pass (before block 1), then flat
    assert len(live._ctx) == eng.config.local_attn_frames - eng.config.num_frame_per_block
    assert heap[1] - heap[0] < 64 * 1024, heap  # no growing lists (the recording grows on disk)
    live.close()


def test_pacing_waits_for_the_viewer():
    eng = tiny_engine(local_attn_frames=9, sink_frames=3, fps=120)  # 12 frames a block: 0.1 s of video
    for lookahead in (1, 2):
        live = eng.live(RED, pace=True, lookahead_blocks=lookahead, record=False)
        t0 = time.perf_counter()
        next(live)
        t_first = time.perf_counter()
        for _ in range(5):
            next(live)
        waited = time.perf_counter() - t_first
        # block b may start only when at most `lookahead` blocks of yielded video are unplayed
        before_last = live.frames - 12  # yielded when the last block was started
        assert waited >= (before_last - 12 * lookahead - 1) / 120 - 0.01, (waited, lookahead)
        live.close()
        assert t0 < t_first
    # close() ends a wait at once
    live = eng.with_settings(fps=1).live(RED, pace=True, record=False)
    next(live), next(live)
    threading.Timer(0.2, live.close).start()
    t0 = time.perf_counter()
    with pytest.raises(StopIteration):
        next(live)
    assert time.perf_counter() - t0 < 5


def test_bad_input(eng, tmp_path):
    live = eng.live(RED, pace=False, record=True)
    next(live)
    for bad, match in (("", "empty"), ("a red zebra", "does not know")):
        with pytest.raises(ValueError, match=match):
            live.set_prompt(bad)
    with pytest.raises(ValueError, match="in the past"):
        live.set_prompt(BLUE, at_block=0)
    chunk = next(live)
    assert chunk.prompt == RED and live.timeline == [(0, RED)]  # the stream went on with its prompt
    with pytest.raises(ValueError, match="must end in .mp4"):
        live.save(tmp_path / "x.avi")
    live.close()
    assert read_video(live.save(tmp_path / "kept.mp4"))[0].shape[0] == live.frames  # survives close
    with pytest.raises(ValueError, match="local_attn_frames"):
        eng.live(RED, local_attn_frames=4)  # cannot hold sinks + two blocks
    with pytest.raises(ValueError, match="rolling window"):
        eng.live(RED, local_attn_frames=None)
    with pytest.raises(ValueError, match="rope_positions"):
        eng.live(RED, rope_positions="relative")
    with pytest.raises(ValueError, match="lookahead_blocks"):
        eng.live(RED, lookahead_blocks=0)
    with pytest.raises(ValueError, match="max_seconds"):
        eng.live(RED, max_seconds=0)
    with pytest.raises(ValueError, match="increase"):
        check_timeline([(0, RED), (3, BLUE), (3, RED)])
    with pytest.raises(ValueError, match="start at block 0"):
        check_timeline([(2, RED)])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_timeline(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="past the stream"):
        eng.replay(0, [(0, RED), (9, BLUE)], 4)
    # the default window when the checkpoint has none
    plain = tiny_engine()
    s = plain.live(RED, record=False).settings()
    from engine.live import live_default_window
    assert (s["local_attn_frames"], s["sink_frames"]) == live_default_window(plain.config)
    assert plain.config.local_attn_frames is None  # the engine itself is untouched
    assert json.loads(json.dumps(s)) == s


def test_live_default_window_is_the_training_clip():
    """The live default keeps the current block at the temporal positions the model was trained on: the clip's
    latent frames, the first block as the sink (docs/live.md, "The live default window")."""
    from engine import EngineConfig
    from engine.live import live_default_window

    assert live_default_window(EngineConfig(num_frames=33, num_frame_per_block=3)) == (9, 3)   # the default model
    assert live_default_window(EngineConfig(num_frames=81, num_frame_per_block=3)) == (21, 3)  # Self-Forcing Wan2.1
    assert live_default_window(EngineConfig(num_frames=37, num_frame_per_block=3)) == (9, 3)   # whole blocks only
    assert live_default_window(EngineConfig(num_frames=9, num_frame_per_block=3)) == (9, 3)    # sink + 2 blocks
    assert live_default_window(EngineConfig(num_frames=33, num_frame_per_block=1)) == (9, 1)
    for num_frames, k in ((9, 3), (33, 3), (81, 3), (33, 1), (45, 2)):
        window, sink = live_default_window(EngineConfig(num_frames=num_frames, num_frame_per_block=k))
        EngineConfig(num_frames=num_frames, num_frame_per_block=k, local_attn_frames=window, sink_frames=sink)


def test_cli_live_writes_mp4_and_timeline_and_replays_it(tmp_path, capsys):
    from engine.cli import main

    ckpt = tiny_engine().save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "live.mp4"
    args = ["live", RED, "--seconds", "3", "--switch", f"1.5:{BLUE}", "--out", str(out), "--checkpoint", str(ckpt),
            "--window", "9", "--sink", "3"]
    assert main(args) == 0
    assert "real time" in capsys.readouterr().out
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["timeline"] == [[0, RED], [3, BLUE]]  # 1.5 s = frame 24; blocks start at frames 0, 9, 21, 33
    assert meta["local_attn_frames"] == 9 and meta["num_frames"] >= 48
    again = tmp_path / "again.mp4"
    assert main(["live", "--timeline", str(out.with_suffix(".json")), "--out", str(again),
                 "--checkpoint", str(ckpt)]) == 0
    assert np.array_equal(read_video(again)[0], read_video(out)[0])
    for bad, msg in ((["--seconds", "0"], "--seconds must be > 0"), (["--switch", "9:" + BLUE], "past the end"),
                     (["--switch", "x"], "SECONDS:PROMPT"), (["--window", "4"], "local_attn_frames")):
        assert main(["live", RED, "--seconds", "3", "--checkpoint", str(ckpt), "--out", str(tmp_path / "b.mp4"),
                     *bad]) == 2
        assert msg in capsys.readouterr().err
    (tmp_path / "t.json").write_text('{"timeline": [[0, "a red circle"], [0, "a blue square"]]}')
    assert main(["live", "--timeline", str(tmp_path / "t.json"), "--checkpoint", str(ckpt)]) == 2
    assert "increase" in capsys.readouterr().err
