"""Long-stream evaluation: stream geometry (blocks, switch blocks from seconds), the prompt cycle, window slicing
and skipped crossing windows, switch scoring on synthetic streams with known answers (procedural renders score
~100%; a colour change the timeline does not ask for fails after it), the bounce-aware direction (bouncing passes,
stopping, the wrong axis and an ignored direction switch fail), the tiny engine end to end, the CLI."""

import json

import numpy as np
import pytest

from engine.cli import main
from engine.data.evaluate import evaluate_video
from engine.data.long_eval import (ONE_OBJECT_PROMPTS, block_at_seconds, block_start_frame, bounce_aware_direction,
                                   centroid_tracks, long_eval, num_blocks_for, reference_stream, reflection_class,
                                   reflection_speeds, score_stream, stream_timeline, switch_blocks, switch_prompts)
from engine.data.shapes import (COLORS, DIRECTION_VECTORS, DIRECTIONS, Background, ShapeObject, ShapesConfig,
                                VideoSpec, parse_prompt, reflect, render, spec_from_prompt)
from engine.testing import tiny_engine

RED, BLUE = "a red circle moving left", "a blue circle moving left"
CFG = ShapesConfig()  # 33 frames, 64 x 64


def clip(prompt, seed=0):
    return render(spec_from_prompt(prompt, seed, CFG), CFG)


def clips(prompts):
    """Consecutive 33-frame clips, one per prompt: window i of the stream is clip i exactly."""
    return np.concatenate([clip(p, i) for i, p in enumerate(prompts)])


def test_block_geometry_and_switch_blocks_from_seconds():
    # k = 3 latent frames, 4x temporal: block 0 is 9 frames, then 12 each
    assert [block_start_frame(b, 3) for b in range(4)] == [0, 9, 21, 33]
    assert num_blocks_for(960, 3) == 81 and block_start_frame(81, 3) == 969  # 60 s at 16 fps, whole blocks
    assert num_blocks_for(969, 3) == 81 and num_blocks_for(970, 3) == 82
    assert block_at_seconds(10, 16, 3) == 14  # frame 160 -> block 14 starts at frame 165 (block 13 at 153)
    assert block_start_frame(13, 3) < 160 <= block_start_frame(14, 3)
    assert block_at_seconds(9 / 16, 16, 3) == 1 and block_at_seconds(0.01, 16, 3) == 1
    blocks = switch_blocks(60, 10, 16, 3)
    assert len(blocks) == 5 and blocks[0] == 14
    for j, b in enumerate(blocks, 1):  # the first block whose first frame is at or after j * 10 s
        assert block_start_frame(b - 1, 3) < 160 * j <= block_start_frame(b, 3)
    assert switch_blocks(60, 25, 16, 3) == [block_at_seconds(25, 16, 3), block_at_seconds(50, 16, 3)]
    for seconds, every in ((0, None), (-1, None), (float("nan"), None), (10, 0), (10, -2), (10, 10), (10, 12)):
        with pytest.raises(ValueError, match="--long-seconds" if every is None else "--switch-every"):
            switch_blocks(seconds, every if every is not None else 1, 16, 3)
    with pytest.raises(ValueError, match="shorter than a block"):
        switch_blocks(10, 0.3, 16, 3)


def test_prompt_cycle_is_valid_and_changes_what_it_says():
    for first in ONE_OBJECT_PROMPTS[:12]:
        for seed in (0, 1):
            out = switch_prompts(first, 9, seed)
            assert [c for _, c in out] == ["color", "direction", "both"] * 3
            prev = parse_prompt(first)
            for p, change in out:
                spec = parse_prompt(p)  # valid in the grammar
                (c0, s0), (c1, s1) = prev.objects[0], spec.objects[0]
                assert s1 == s0 and c1 in COLORS and spec.direction in DIRECTIONS
                assert (c1 != c0) == (change in ("color", "both"))
                assert (spec.direction != prev.direction) == (change in ("direction", "both"))
                # a new direction leaves the old one's reflection class (a bounce cannot fake it)
                assert (reflection_class(spec.direction) != reflection_class(prev.direction)) \
                    == (change in ("direction", "both"))
                prev = spec
    assert switch_prompts(RED, 6, 0) == switch_prompts(RED, 6, 0) != switch_prompts(RED, 6, 1)
    with pytest.raises(ValueError, match="one-object"):
        switch_prompts("a red circle and a blue square moving left", 2)
    timeline, changes = stream_timeline(RED, 60, 10, 16, 3, seed=0)
    assert [b for b, _ in timeline] == [0] + switch_blocks(60, 10, 16, 3) and len(changes) == 5
    assert stream_timeline(RED, 60, None, 16, 3) == ([(0, RED)], [])


def test_windows_of_procedural_clips_score_100_and_a_colour_change_fails_after_it():
    res = score_stream(clips([RED] * 4), [(0, RED)])
    assert [w["start_frame"] for w in res["windows"]] == [0, 33, 66, 99]
    assert all(w["color"] == w["shape"] == w["direction"] == w["correct"] == 1.0 for w in res["windows"])
    # the stream turns blue half-way but the prompt stays red: the windows after the change fail colour
    res = score_stream(clips([RED, RED, BLUE, BLUE]), [(0, RED)])
    assert [w["color"] for w in res["windows"]] == [1.0, 1.0, 0.0, 0.0]
    assert res["windows"][2]["extra_colors"] == ["blue"]
    # trailing frames that do not fill a window are not scored
    assert len(score_stream(clips([RED] * 3)[:98], [(0, RED)])["windows"]) == 2


def test_crossing_windows_are_skipped_and_switches_are_scored_from_block_plus_two():
    # block 3 starts at frame 33 = the start of window 1: no window crosses it
    res = score_stream(clips([RED, BLUE, BLUE, BLUE]), [(0, RED), (3, BLUE)])
    assert [w["skipped"] for w in res["windows"]] == [False] * 4
    assert [w["prompt"] for w in res["windows"]] == [RED, BLUE, BLUE, BLUE]
    assert all(w["correct"] == 1.0 for w in res["windows"])
    # a switch at block 4 (frame 45) falls inside window 1 [33, 66): skipped, the others judged
    frames = clips([RED] * 4)
    res = score_stream(frames, [(0, RED), (4, BLUE)])
    assert [w["skipped"] for w in res["windows"]] == [False, True, False, False]
    assert [w["prompt"] for w in res["windows"]] == [RED, None, BLUE, BLUE]
    (sw,) = res["switches"]
    a = block_start_frame(6, 3)  # block 4 + 2
    assert sw["block"] == 4 and sw["frame"] == 45 and sw["scored_frames"] == [a, a + 33] and sw["old"] == RED
    assert sw["color"] == 0.0  # the stream never turned blue
    # a stream that follows the switch: a blue clip from block 6's first frame
    followed = frames.copy()
    followed[a:a + 33] = clip(BLUE, 7)
    (sw,) = score_stream(followed, [(0, RED), (4, BLUE)])["switches"]
    assert sw["color"] == sw["shape"] == sw["direction"] == sw["correct"] == 1.0
    # the next switch limits the scored frames; fewer than 9 left: skipped
    res = score_stream(followed, [(0, RED), (4, BLUE), (8, RED)])
    assert res["switches"][0]["scored_frames"] == [a, block_start_frame(8, 3)]
    assert not res["switches"][0]["skipped"] and res["switches"][0]["color"] == 1.0
    res = score_stream(followed, [(0, RED), (4, BLUE), (6, RED)])
    assert res["switches"][0]["skipped"]
    with pytest.raises(ValueError, match="past the stream"):
        score_stream(frames[:40], [(0, RED), (4, BLUE)])


def test_reference_stream_keeps_colour_and_shape_for_a_minute():
    """A procedural stream with the dataset's bounces: colour and shape ~100% in every window; the strict direction
    is judged right only where the window's first half holds no bounce, the bounce-aware direction everywhere."""
    timeline = [(0, RED)]
    frames = reference_stream(timeline, block_start_frame(81, 3), 0)
    res = score_stream(frames, timeline)
    assert len(res["windows"]) == 29
    assert np.mean([w["color"] for w in res["windows"]]) == 1.0
    assert np.mean([w["shape"] for w in res["windows"]]) >= 0.9
    assert 0.2 < np.mean([w["direction"] for w in res["windows"]]) < 1.0  # bounces reverse "left"
    assert all(w["motion"] == 1.0 for w in res["windows"])
    assert np.mean([w["motion_correct"] for w in res["windows"]]) >= 0.9
    # with switches (colour, direction, both): the scene goes on, every switch reached at once
    timeline, changes = stream_timeline(RED, 20, 5, 16, 3, seed=0)
    assert changes == ["color", "direction", "both"]
    frames = reference_stream(timeline, block_start_frame(num_blocks_for(320, 3), 3), 0)
    res = score_stream(frames, timeline)
    assert all(s["color"] == s["motion"] == 1.0 for s in res["switches"])
    assert all(w["motion"] == 1.0 for w in res["windows"] if not w["skipped"])
    # no fresh placement: the object moves at most one step between any two frames, switches included
    colors = {parse_prompt(p).objects[0][0] for _, p in timeline}
    tracks = centroid_tracks(frames, sorted(colors))
    seen = np.sum([s for _, s in tracks], 0) == 1
    c = np.sum([np.where(s[:, None], c, 0.0) for c, s in tracks], 0)
    assert seen.all() and np.abs(np.diff(c, axis=0)).max() < 2.0
    assert np.array_equal(frames[0, 0, 0], frames[-1, 0, 0])  # one background
    # a colour-only switch changes the colour and nothing else: the object moves on as without the switch (at
    # block 6, frame 69, this one moves right, reflected, and keeps doing so)
    n, s = block_start_frame(14, 3), block_start_frame(6, 3)
    (plain, _), = centroid_tracks(reference_stream([(0, RED)], n, 0), ["red"])
    (before, _), (after, _) = centroid_tracks(reference_stream([(0, RED), (6, BLUE)], n, 0), ["red", "blue"])
    assert plain[s + 1, 0] > plain[s, 0]
    assert np.array_equal(plain[:s], before[:s]) and np.allclose(plain[s:], after[s:], atol=0.2)


def test_bounce_aware_direction_on_synthetic_tracks():
    """Triangle-wave tracks (walls at 10 and 54 px, 3.6 px a frame: two bounces or more per axis in 33 frames,
    +-0.3 px jitter) pass for every direction of their reflection class and for no other; a still track has no
    direction (min_speed 0.256 px a frame: the evaluator's at 64 px)."""
    rng = np.random.default_rng(0)
    t = np.arange(33.0)
    for d, (ux, uy) in DIRECTION_VECTORS.items():
        v = 1.2 / np.hypot(ux, uy)
        c = np.stack([reflect(30 + 3 * v * ux * t, 10, 54), reflect(40 + 3 * v * uy * t, 10, 54)], 1)
        c = c + rng.normal(0, 0.3, c.shape)
        speeds = reflection_speeds(c, np.ones(33, bool))
        for p in DIRECTIONS:
            same_class = reflection_class(p) == reflection_class(d)
            assert (bounce_aware_direction(speeds, p, 0.256) == p) == same_class, (d, p)
    still = 30 + rng.normal(0, 0.3, (33, 2))
    speeds = reflection_speeds(still, np.ones(33, bool))
    assert all(bounce_aware_direction(speeds, p, 0.256) is None for p in DIRECTIONS)
    seen = np.zeros(33, bool)
    seen[::4] = True  # never seen at both ends of a 3-frame lag
    assert reflection_speeds(still, seen) is None and bounce_aware_direction(None, "left", 0.256) is None


def bouncing_clip(x, y, vx, vy, shape="circle"):
    obj = ShapeObject("red", shape, 9.0, x, y, vx, vy)
    return render(VideoSpec((obj,), Background("plain", (20, 20, 20), (20, 20, 20))), CFG)


def test_bounce_passes_the_bounce_aware_direction_where_the_strict_one_fails():
    # "left" from 4 px off the left wall: bounces at frame ~3, then moves right for the rest of the window
    (w,) = score_stream(bouncing_clip(13.0, 32.0, -1.3, 0.0), [(0, RED)])["windows"]
    assert w["color"] == w["shape"] == 1.0 and w["direction"] == 0.0 and w["correct"] == 0.0
    assert w["motion"] == w["motion_correct"] == 1.0
    # "up left" into the top-left corner: both components flip (to down right)
    (w,) = score_stream(bouncing_clip(14.0, 14.0, -0.9, -0.9), [(0, "a red circle moving up left")])["windows"]
    assert w["direction"] == 0.0 and w["motion"] == 1.0


def test_stopping_and_the_wrong_axis_fail_the_bounce_aware_direction():
    moving = clip(RED, 1)
    (w,) = score_stream(moving, [(0, RED)])["windows"]
    assert w["motion"] == w["motion_correct"] == 1.0
    # an object that stands still: right colour and shape, no direction
    (w,) = score_stream(np.repeat(moving[:1], 33, 0), [(0, RED)])["windows"]
    assert w["color"] == w["shape"] == 1.0 and w["motion"] == w["motion_correct"] == 0.0
    # one that stops after 10 frames: the strict direction (first half) still sees it move, the whole window not
    (w,) = score_stream(np.concatenate([moving[:10], np.repeat(moving[9:10], 23, 0)]), [(0, RED)])["windows"]
    assert w["direction"] == 1.0 and w["motion"] == 0.0
    # the wrong axis: up for left, a diagonal for an axis, an axis for a diagonal
    for shown, asked in (("a red circle moving up", RED), ("a red circle moving down left", RED),
                         (RED, "a red circle moving up left"),
                         ("a red circle moving right", "a red circle moving down right")):
        (w,) = score_stream(clip(shown, 2), [(0, asked)])["windows"]
        assert w["color"] == 1.0 and w["motion"] == w["motion_correct"] == 0.0, (shown, asked)


def test_an_ignored_direction_switch_fails_the_bounce_aware_direction():
    n = block_start_frame(num_blocks_for(160, 3), 3)
    for new in ("a red circle moving up", "a blue circle moving down right"):
        timeline = [(0, RED), (5, new)]
        (sw,) = score_stream(reference_stream(timeline, n, 3), timeline)["switches"]
        assert sw["color"] == sw["motion"] == sw["motion_correct"] == 1.0
        # the same stream with the new colour but still moving left: the switch's direction is not reached
        ignored = [(0, RED), (5, new.split(" moving")[0] + " moving left")]
        (sw,) = score_stream(reference_stream(ignored, n, 3), timeline)["switches"]
        assert sw["color"] == 1.0 and sw["motion"] == sw["motion_correct"] == 0.0


@pytest.fixture(scope="module")
def eng():
    return tiny_engine()


def test_tiny_engine_end_to_end_with_switches(eng):
    res = long_eval(eng, [RED, "a green square moving up"], [0], 5, switch_every=2, window=9, sink=3)
    s = res["settings"]
    assert s["num_blocks"] == num_blocks_for(80, 3) == 7 and s["num_frames"] == 81 and (s["window"], s["sink"]) == (9, 3)
    for st in res["streams"]:
        assert [b for b, _ in st["timeline"]] == [0] + switch_blocks(5, 2, 16, 3)
        assert st["num_frames"] == 81 and len(st["windows"]) == 2 and len(st["switches"]) == 2
        # switches at blocks 3 (frame 33: window 1 starts with it) and 6 (frame 69, past the last window)
        assert [w["skipped"] for w in st["windows"]] == [False, False]
        assert st["windows"][1]["prompt"] == st["timeline"][1][1]
        # switch 1 is scored on blocks 5.. up to the next switch (frames [57, 69)); switch 2 has no frames left
        assert st["switches"][0]["scored_frames"] == [57, 69] and not st["switches"][0]["skipped"]
        assert st["switches"][1]["skipped"]
        assert all(0.0 <= w[m] <= 1.0 for w in st["windows"] if not w["skipped"] for m in ("color", "shape"))
    summ = res["summary"]
    assert summ["switches"]["n"] == 4 and summ["switches"]["scored"] == 2 and len(summ["positions"]) == 2 and summ["cost"]["fps"] > 0


def test_live_defaults_are_used_and_bad_window_names_the_flags(eng):
    from engine.live import live_default_window

    res = long_eval(eng, [RED], [0], 1)
    assert (res["settings"]["window"], res["settings"]["sink"]) == live_default_window(eng.config)
    assert res["streams"][0]["switches"] == [] and len(res["streams"][0]["windows"]) == 0
    for window, sink in ((5, 0), (9, 4), (12, -1)):
        with pytest.raises(ValueError, match=r"--window .* --sink .*--window >= --sink \+ 2 x 3"):
            long_eval(eng, [RED], [0], 2, window=window, sink=sink)
    with pytest.raises(ValueError, match="--switch-every must be at least one block"):
        long_eval(eng, [RED], [0], 2, switch_every=0.5)


def test_cli_errors_name_the_flag_with_exit_code_2(capsys, tmp_path):
    for argv, flag in ((["--long-seconds", "0"], "--long-seconds"), (["--long-seconds", "-3"], "--long-seconds"),
                       (["--long-seconds", "10", "--switch-every", "0"], "--switch-every"),
                       (["--long-seconds", "10", "--switch-every", "10"], "--switch-every"),
                       (["--switch-every", "5"], "--switch-every"), (["--window", "12"], "--window"),
                       (["--long-seconds", "10", "--window", "5", "--sink", "0"], "--window"),
                       (["--long-seconds", "10", "--switch-every", "2", "--limit", "49"], "--limit")):
        assert main(["eval", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and flag in err and "Traceback" not in err, (argv, err)


def test_cli_reference_run_writes_json_atomically(capsys, tmp_path):
    out = tmp_path / "long.json"
    assert main(["eval", "--long-seconds", "5", "--switch-every", "2", "--reference", "--limit", "2", "--seeds", "0",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| window | start (s) |" in text and "switches: 4 (2 scored)" in text and "worst window" in text
    assert "direction (bounce-aware)" in text and "worst window (all correct, bounce-aware)" in text
    data = json.loads(out.read_text())
    (res,) = data.values()
    assert res["settings"]["reference"] and len(res["streams"]) == 2
    st = res["streams"][0]
    assert {"windows", "switches", "timeline", "changes"} <= set(st) and st["switches"][0]["color"] == 1.0
    assert st["switches"][0]["motion"] == st["windows"][0]["motion"] == 1.0
    assert res["summary"]["parts"][0]["motion"] == res["summary"]["switches"]["motion"] == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["long.json"]  # no temporary left behind


def test_evaluate_video_is_what_windows_use():
    frames = clip(RED, 3)
    (w,) = score_stream(frames, [(0, RED)])["windows"]
    r = evaluate_video(RED, frames)
    assert all(w[m] == r[m] for m in ("color", "shape", "direction", "correct"))
