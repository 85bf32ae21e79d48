"""LiveGroup: several live streams advanced together (blocks in turns, decoded in one batched VAE call) make the
same streams as iterating each alone; the batched decode equals separate decodes; ended streams leave the group."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from engine.live import LiveGroup
from engine.sampling.codec import StreamingDecoder, decode_together
from engine.testing import tiny_engine

PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle moving right"]


@pytest.fixture(scope="module")
def eng():
    return tiny_engine(local_attn_frames=6, sink_frames=0)


def test_decode_together_equals_separate_decodes(eng):
    torch.manual_seed(0)
    C = eng.vae.config.z_dim
    lat = [torch.randn(1, C, 4, 8, 8) for _ in range(3)]
    alone = [StreamingDecoder(eng.vae) for _ in lat]
    joint = [StreamingDecoder(eng.vae) for _ in lat]
    with torch.no_grad():
        for i in range(4):
            ref = [d.decode(z[:, :, i:i + 1]) for d, z in zip(alone, lat)]
            got = decode_together(joint, [z[:, :, i:i + 1] for z in lat])
            for r, g in zip(ref, got):
                assert g.shape == r.shape
                torch.testing.assert_close(g, r, atol=1e-5, rtol=0)
    # every cache went back to its own stream: a stream decoded alone afterwards continues correctly
    z = torch.randn(1, C, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(joint[1].decode(z), alone[1].decode(z), atol=1e-5, rtol=0)


def test_group_makes_the_streams_each_makes_alone(eng):
    blocks = 4
    alone = []
    for i, p in enumerate(PROMPTS):
        with eng.live(p, seed=i, pace=False, record=False, max_blocks=blocks) as live:
            alone.append(list(live))
    group = LiveGroup()
    streams = [eng.live(p, seed=i, pace=False, record=False, max_blocks=blocks) for i, p in enumerate(PROMPTS)]
    for s in streams:
        group.add(s)
    made: dict[int, list] = {id(s): [] for s in streams}
    ended = []
    for _ in range(blocks + 2):
        for s, item in group.step():
            assert not isinstance(item, BaseException), item
            (ended.append(s) if item is None else made[id(s)].append(item))
    assert group.streams == [] and {id(s) for s in ended} == {id(s) for s in streams}
    for s, ref in zip(streams, alone):
        got = made[id(s)]
        assert [c.block for c in got] == list(range(blocks))
        for g, r in zip(got, ref):
            assert torch.equal(g.latents, r.latents)  # the transformer runs per stream: exactly the same
            assert g.frames.shape == r.frames.shape
            assert np.abs(g.frames.astype(int) - r.frames.astype(int)).max() <= 1  # batched decode: rounding


def test_a_closed_stream_leaves_after_the_round_and_the_others_go_on(eng):
    group = LiveGroup()
    a, b = (eng.live(PROMPTS[0], seed=i, pace=False, record=False) for i in range(2))
    group.add(a)
    group.add(b)
    assert len(group.step()) == 2
    a.close()
    out = group.step()
    assert (a, None) in out and any(s is b and item is not None for s, item in out)
    assert group.streams == [b]
    b.close()


def test_pacing_holds_a_stream_that_is_ahead(eng):
    group = LiveGroup(align_seconds=0.0)
    s = eng.live(PROMPTS[0], seed=0, pace=True, record=False, lookahead_blocks=1)
    group.add(s)
    assert [c.block for _, c in group.step()] == [0]
    assert [c.block for _, c in group.step()] == [1]  # one block ahead of the viewer is allowed
    s._t_first = time.perf_counter()  # the viewer has seen frame 0 only (whatever this machine's load)
    assert group.step() == [] and group.next_due() > 0  # 20 unseen frames, more than a block: it waits
    s.close()
