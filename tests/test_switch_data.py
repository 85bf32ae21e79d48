"""Shapes clips with a prompt switch at a latent-block boundary: rendering, timeline, determinism, config errors."""

import numpy as np
import pytest

from engine.data.evaluate import evaluate_video
from engine.data.long_eval import score_stream
from engine.data.shapes import (SWITCH_KINDS, ShapesConfig, ShapesDataset, block_frame, parse_prompt, render,
                                sample_spec, sample_switch_spec, switch_blocks, timeline_of)
from engine.live import block_start_frame, check_timeline


def _judged(clip, cfg):
    """(evaluator before the switch, evaluator after it, switch frame) of a switch clip."""
    (_, old), (b, new) = timeline_of(clip)
    frames, s = render(clip, cfg), block_frame(b, cfg)
    return evaluate_video(old, frames[:s]), evaluate_video(new, frames[s:]), s


@pytest.mark.parametrize("num_frames", [33, 45, 57])
def test_switch_clips_show_the_old_prompt_before_and_the_new_one_after(num_frames):
    """The project's own evaluator judges colour, shape and direction on each side of the switch frame; its
    colour check also refuses a colour the prompt does not name, so the old colour is gone after the switch and
    an added object is absent before it."""
    cfg = ShapesConfig(num_frames=num_frames, switch_prob=1.0, free_frames=16)
    ds = ShapesDataset(cfg, seed=11, length=24)
    kinds = set()
    for i in range(len(ds)):
        clip = ds.spec(i)
        before, after, s = _judged(clip, cfg)
        assert before["correct"] == 1.0 and after["correct"] == 1.0, (i, timeline_of(clip))
        old, new = clip.timeline[0][1], clip.timeline[1][1]
        kinds.add("object" if len(new.objects) > len(old.objects) else
                  ("both" if old.direction != new.direction and old.objects != new.objects else
                   "direction" if old.direction != new.direction else "color"))
    assert kinds == set(SWITCH_KINDS)


@pytest.mark.parametrize("kind", SWITCH_KINDS)
def test_the_switch_happens_at_the_first_frame_of_the_block(kind):
    """The frame before the block's first frame looks like the old prompt, the first frame like the new one:
    latent block b starts at video frame 1 + 4 (k b - 1) (the live stream's and long_eval's alignment)."""
    cfg = ShapesConfig(num_frames=45, switch_prob=1.0)
    clip = sample_switch_spec(3, cfg, first="a red circle moving right", kind=kind, block=2)
    s = block_frame(2, cfg)
    assert s == block_start_frame(2, 3, 4) == 21
    frames = render(clip, cfg)
    same = render(sample_switch_spec(3, cfg, first="a red circle moving right", kind=kind, block=2), cfg)
    assert np.array_equal(frames, same)  # deterministic from the seed
    # colours change exactly at s; a direction change shows from s + 1 (the first step along the new direction)
    step = np.abs(frames[1:].astype(int) - frames[:-1].astype(int)).sum((1, 2, 3))  # (F-1,)
    if kind in ("color", "both", "object"):
        assert step[s - 1] > 3 * np.median(step)
    timeline = timeline_of(clip)
    assert check_timeline(timeline) == timeline and timeline[1][0] == 2


def test_score_stream_sees_the_switch_of_a_long_clip():
    """long_eval's model-free scorer, run on a rendered switch clip with its timeline, finds the switch reached."""
    cfg = ShapesConfig(num_frames=57, switch_prob=1.0, free_frames=16)
    clip = sample_switch_spec(5, cfg, first="a blue square moving up", kind="color", block=1)
    res = score_stream(render(clip, cfg), timeline_of(clip), reach_blocks=0)
    assert res["switches"][0]["color"] == 1.0 and not res["switches"][0]["skipped"]


def test_dataset_items_carry_their_timeline_and_are_deterministic():
    cfg = ShapesConfig(num_frames=45, switch_prob=0.5)
    a, b = ShapesDataset(cfg, seed=4, length=16), ShapesDataset(cfg, seed=4, length=16)
    n_switch = 0
    for i in range(16):
        x, y = a[i], b[i]
        assert np.array_equal(x["video"].numpy(), y["video"].numpy()) and x["timeline"] == y["timeline"]
        assert x["timeline"][0] == (0, x["caption"])
        n_switch += len(x["timeline"]) > 1
    assert 0 < n_switch < 16
    # a clip that does not switch is the clip of switch_prob 0 (the switch decision has a seed stream of its own)
    plain = ShapesDataset(ShapesConfig(num_frames=45), seed=4, length=16)
    for i in range(16):
        if len(a[i]["timeline"]) == 1:
            assert np.array_equal(a[i]["video"].numpy(), plain[i]["video"].numpy())
            assert plain[i]["timeline"] == [(0, plain[i]["caption"])]


def test_switch_blocks_leave_enough_frames_each_side():
    assert switch_blocks(ShapesConfig(num_frames=33)) == [1, 2]          # frames 9, 21 of 33
    assert switch_blocks(ShapesConfig(num_frames=45)) == [1, 2, 3]
    assert switch_blocks(ShapesConfig(num_frames=45, frames_per_block=1)) == list(range(3, 10))


@pytest.mark.parametrize("kw, match", [
    ({"switch_prob": 1.5}, r"switch_prob must be a number in \[0, 1\], got 1.5"),
    ({"switch_kinds": ("colour",)}, r"switch_kinds must be distinct kinds among \['color', 'direction', 'both', "
                                    r"'object'\]"),
    ({"switch_kinds": ()}, r"at least one"),
    ({"frames_per_block": 0}, r"frames_per_block must be an int >= 1, got 0"),
    ({"switch_prob": 0.5, "num_frames": 13}, r"accepted num_frames >= 21 \(1 \+ 4k\)"),
    ({"switch_prob": 0.5, "min_objects": 2, "max_objects": 2}, r"'object' adds an object: it needs min_objects"),
])
def test_bad_switch_settings_are_refused_naming_the_range(kw, match):
    with pytest.raises(ValueError, match=match):
        ShapesConfig(**kw)


def test_a_switch_at_a_block_that_cannot_hold_one_is_refused():
    cfg = ShapesConfig(num_frames=33, switch_prob=1.0)
    with pytest.raises(ValueError, match=r"block 3 cannot hold a switch in a 33-frame clip; blocks: \[1, 2\]"):
        sample_switch_spec(0, cfg, first=parse_prompt("a red circle moving left"), block=3)
    # the one-prompt path is untouched
    assert timeline_of(sample_spec(0, cfg))[0][0] == 0
