"""Shapes-video dataset and evaluator: determinism, formats, grammar, errors, and an evaluator that is right on
ground truth and not trivially so."""

import numpy as np
import pytest
import torch

from engine.data.evaluate import EVAL_PROMPTS, evaluate, evaluate_video, flicker, format_table, mean_and_se
from engine.data.shapes import (COLORS, DIRECTIONS, SHAPES, VOCABULARY, ShapesConfig, ShapesDataset, caption,
                                frames_to_tensor, parse_prompt, render, sample_spec, spec_from_prompt,
                                tensor_to_frames, trajectory)

CFG = ShapesConfig()


def video(prompt, seed=0, cfg=CFG):
    return render(spec_from_prompt(prompt, seed, cfg), cfg)


def vae_like(frames, seed=0, sigma=8.0):
    """3x3 box blur, 20% desaturation and Gaussian noise: roughly what a small VAE does to a clip."""
    x = frames.astype(np.float32)
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    x = sum(p[:, i:i + x.shape[1], j:j + x.shape[2]] for i in range(3) for j in range(3)) / 9
    grey = x.mean(-1, keepdims=True)
    x = grey + 0.8 * (x - grey) + np.random.default_rng(seed).normal(0, sigma, x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def test_vocabulary_covers_every_caption():
    assert VOCABULARY == sorted(set(VOCABULARY))
    assert {"red", "green", "blue", "yellow", "white", "purple"} <= set(COLORS)
    assert {"circle", "square", "triangle"} <= set(SHAPES)
    assert len(DIRECTIONS) == 8
    for i in range(300):
        assert set(caption(sample_spec(i, CFG)).split()) <= set(VOCABULARY)


def test_determinism_by_seed():
    ds = ShapesDataset(CFG, seed=3, length=10)
    a, b = ds[5], ds[5]
    assert torch.equal(a["video"], b["video"]) and a["caption"] == b["caption"]
    assert not torch.equal(a["video"], ds[6]["video"])
    assert not torch.equal(a["video"], ShapesDataset(CFG, seed=4, length=10)[5]["video"])
    assert sample_spec(11, CFG) == sample_spec(11, CFG)
    np.testing.assert_array_equal(video("a red circle moving left", 2), video("a red circle moving left", 2))
    with pytest.raises(IndexError):
        ds[10]


def test_formats_and_frame_counts():
    frames = render(sample_spec(0, CFG), CFG)
    assert frames.dtype == np.uint8 and frames.shape == (33, 64, 64, 3)
    item = ShapesDataset(CFG, length=4)[0]
    v = item["video"]
    assert v.dtype == torch.float32 and v.shape == (3, 33, 64, 64) and isinstance(item["caption"], str)
    assert v.min() >= -1 and v.max() <= 1
    np.testing.assert_array_equal(tensor_to_frames(frames_to_tensor(frames)), frames)
    small = ShapesConfig(height=64, width=96, num_frames=17)
    assert render(sample_spec(0, small), small).shape == (17, 64, 96, 3)
    batch = next(iter(torch.utils.data.DataLoader(ShapesDataset(small, length=4), batch_size=2)))
    assert batch["video"].shape == (2, 3, 17, 64, 96) and len(batch["caption"]) == 2
    for bad in (32, 34, 1):
        with pytest.raises(ValueError, match="1 \\+ 4k"):
            ShapesConfig(num_frames=bad)
    with pytest.raises(ValueError, match="multiples of 8"):
        ShapesConfig(height=60)


def test_objects_p_sets_the_share_of_two_object_clips():
    """`objects_p` draws the object count from the given distribution (within 4 binomial standard errors over
    1000 clips), for plain clips and for switch clips; the default stays uniform; bad input names the range."""
    from engine.data.shapes import sample_switch_spec
    n = 1000
    for p2 in (0.25, 0.75):
        cfg = ShapesConfig(objects_p=(1 - p2, p2))
        share = np.mean([len(sample_spec(i, cfg).objects) == 2 for i in range(n)])
        assert abs(share - p2) < 4 * np.sqrt(p2 * (1 - p2) / n), (p2, share)
    only_two = ShapesConfig(objects_p=[0.0, 1.0], switch_prob=0.5, switch_kinds=("color", "direction"))
    for i in range(50):
        assert len(sample_spec(i, only_two).objects) == 2
        assert len(sample_switch_spec(i, only_two).timeline[0][1].objects) == 2
    with pytest.raises(ValueError, match="switch kind 'object' adds an object"):
        ShapesConfig(objects_p=[0.0, 1.0], switch_prob=0.5)
    uniform = np.mean([len(sample_spec(i, CFG).objects) == 2 for i in range(n)])
    assert abs(uniform - 0.5) < 4 * np.sqrt(0.25 / n)
    for bad in ((0.5,), (0.7, 0.7), (-0.1, 1.1)):
        with pytest.raises(ValueError, match="objects_p must be 2 probabilities"):
            ShapesConfig(objects_p=bad)


def test_objects_move_freely_then_bounce_inside_the_frame():
    rng = np.random.default_rng(0)
    for i in range(200):
        spec = sample_spec(rng, CFG)
        t = np.arange(CFG.free_frames + 1)
        tracks = []
        for o in spec.objects:
            x, y = trajectory(o, CFG)
            np.testing.assert_allclose(x[t], o.x + o.vx * t, atol=1e-9)   # no bounce in the free part
            np.testing.assert_allclose(y[t], o.y + o.vy * t, atol=1e-9)
            assert (x >= o.size - 1e-9).all() and (x <= CFG.width - o.size + 1e-9).all()
            assert (y >= o.size - 1e-9).all() and (y <= CFG.height - o.size + 1e-9).all()
            assert 7 <= o.size <= 11 and 0.9 <= np.hypot(o.vx, o.vy) <= 1.6
            tracks.append((x[t], y[t], o.size))
        if len(tracks) == 2:  # boxes never overlap while the objects move freely
            (x1, y1, r1), (x2, y2, r2) = tracks
            assert (np.maximum(abs(x1 - x2), abs(y1 - y2)) >= r1 + r2).all()


def test_caption_grammar_round_trip():
    for i in range(300):
        spec = sample_spec(i, CFG)
        p = parse_prompt(caption(spec))
        assert p.objects == tuple((o.color, o.shape) for o in spec.objects)
        assert p.direction == spec.direction
        assert str(p) == caption(spec)
    p = parse_prompt("  A Blue Square and a yellow TRIANGLE moving up   right ")
    assert p.objects == (("blue", "square"), ("yellow", "triangle")) and p.direction == "up right"
    spec = spec_from_prompt("a blue square and a yellow triangle moving up right", seed=1)
    assert caption(spec) == "a blue square and a yellow triangle moving up right"


def test_bad_prompts_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown word.*'dog'.*'fast'") as e:
        parse_prompt("a red dog moving fast")
    assert ", ".join(VOCABULARY) in str(e.value)
    for empty in ("", "   "):
        with pytest.raises(ValueError, match="empty prompt"):
            parse_prompt(empty)
    with pytest.raises(ValueError, match="3 objects but at most 2"):
        parse_prompt("a red circle and a blue square and a green triangle moving up")
    assert len(parse_prompt("a red circle and a blue square and a green triangle moving up", None).objects) == 3
    for bad in ("red circle moving left", "a red circle left", "a red circle moving", "a circle red moving up",
                "a red circle moving left up", "a red circle and moving up", "moving up",
                "a red circle moving up moving down", "a red circle and and a blue square moving up"):
        with pytest.raises(ValueError, match="ungrammatical"):
            parse_prompt(bad)
    with pytest.raises(ValueError, match="did you mean 'up left'"):
        parse_prompt("a red circle moving left up")
    with pytest.raises(ValueError, match="different colours"):
        parse_prompt("a red circle and a red square moving up")


def test_eval_prompts_cover_the_vocabulary():
    assert len(EVAL_PROMPTS) >= 64 and len(set(EVAL_PROMPTS)) == len(EVAL_PROMPTS)
    specs = [parse_prompt(p) for p in EVAL_PROMPTS]
    assert {c for s in specs for c, _ in s.objects} == set(COLORS)
    assert {sh for s in specs for _, sh in s.objects} == set(SHAPES)
    assert {s.direction for s in specs} == set(DIRECTIONS)
    assert sum(len(s.objects) == 2 for s in specs) >= 8


def test_evaluator_on_ground_truth():
    prompts = [p for p in EVAL_PROMPTS for _ in range(2)]
    clean = [video(p, seed) for p in EVAL_PROMPTS for seed in range(2)]
    res = evaluate(prompts, clean)
    assert res["n"] == 2 * len(EVAL_PROMPTS)
    for key in ("color", "shape", "direction"):
        assert res[key] >= 0.98, format_table(res)
    assert res["flicker"] < 1e-3
    noisy = evaluate(prompts[::2], [vae_like(v, i) for i, v in enumerate(clean[::2])])
    for key in ("color", "shape", "direction"):
        assert noisy[key] >= 0.95, format_table(noisy)
    table = format_table({"ground truth": res, "blur + noise": noisy})
    assert table.startswith("| model |") and "| ground truth | 128 | " in table


def test_evaluator_detects_wrong_colour():
    frames = video("a red circle moving left")
    assert evaluate_video("a red circle moving left", frames)["color"] == 1.0
    for c in COLORS:
        if c != "red":
            r = evaluate_video(f"a {c} circle moving left", frames)
            assert r["color"] == 0.0 and r["correct"] == 0.0
    two = video("a red circle and a blue square moving left")
    r = evaluate_video("a red circle moving left", two)   # an object that was not asked for
    assert r["color"] == 0.0 and r["extra_colors"] == ["blue"]
    r = evaluate_video("a red circle and a green square moving left", two)
    assert [o["color_ok"] for o in r["objects"]] == [False, False] and r["shape"] == 0.5


def test_evaluator_detects_wrong_shape():
    for seed in range(3):
        for true in SHAPES:
            frames = vae_like(video(f"a white {true} moving down right", seed), seed)
            for other in SHAPES:
                r = evaluate_video(f"a white {other} moving down right", frames)
                assert r["shape"] == float(other == true), (true, other, r["objects"])
                assert r["color"] == 1.0 and r["direction"] == 1.0


def test_evaluator_detects_wrong_direction():
    for d in DIRECTIONS:
        frames = video(f"a green square moving {d}", seed=1)
        for other in DIRECTIONS:
            r = evaluate_video(f"a green square moving {other}", frames)
            assert r["direction"] == float(other == d), (d, other, r["objects"])
    still = np.repeat(video("a green square moving up")[:1], 33, axis=0)   # a frozen first frame
    r = evaluate_video("a green square moving up", still)
    assert r["objects"][0]["predicted_direction"] is None and r["direction"] == 0.0
    rolled = EVAL_PROMPTS[1:] + EVAL_PROMPTS[:1]   # every video judged against another prompt
    res = evaluate(rolled, [video(p) for p in EVAL_PROMPTS])
    assert res["correct"] < 0.1 and res["direction"] < 0.3


def test_flicker_score():
    clean = video("a yellow triangle moving up left")
    rng = np.random.default_rng(0)
    noisy = np.clip(clean + rng.normal(0, 10, clean.shape), 0, 255).astype(np.uint8)
    pulse = np.clip(clean.astype(int) + 25 * (np.arange(33) % 2)[:, None, None, None], 0, 255).astype(np.uint8)
    f_clean, f_noisy, f_pulse = flicker(clean), flicker(noisy), flicker(pulse)
    assert 0.0 <= f_clean < 1e-3
    assert f_noisy > f_clean + 0.01 and f_pulse > f_clean + 0.05 and max(f_noisy, f_pulse) <= 1.0
    with pytest.raises(ValueError, match="uint8 frames"):
        flicker(clean.astype(np.float32))


def test_standard_error_one_object_per_video_is_that_of_a_mean():
    x = [1, 0, 1, 1, 1, 0, 1]
    p, se = mean_and_se([[v] for v in x])
    assert p == pytest.approx(np.mean(x)) and se == pytest.approx(np.std(x, ddof=1) / np.sqrt(len(x)))
    assert np.isnan(mean_and_se([[1, 0]])[1])  # one video: no estimate


def test_standard_error_matches_the_spread_of_accuracy_over_repeated_sets():
    """Monte Carlo: 128 videos (a quarter with two objects whose outcomes are strongly correlated, as when a
    video fails as a whole); the cluster standard error matches the standard deviation of the accuracy over
    4000 repeated sets, where a binomial error over objects would be too small."""
    rng = np.random.default_rng(0)
    ps, ses = [], []
    for _ in range(4000):
        groups = []
        for v in range(128):
            if v % 4 == 3:  # two objects: both right (0.6), both wrong (0.2), one of two (0.2)
                u = rng.random()
                groups.append([1, 1] if u < 0.6 else [0, 0] if u < 0.8 else [1, 0])
            else:
                groups.append([int(rng.random() < 0.9)])
        p, se = mean_and_se(groups)
        ps.append(p), ses.append(se)
    spread = np.std(ps)
    assert np.mean(ses) == pytest.approx(spread, rel=0.05)
    n_obj = 96 + 2 * 32
    binomial = np.sqrt(np.mean(ps) * (1 - np.mean(ps)) / n_obj)
    assert binomial < 0.93 * spread  # objects are not independent: the cluster error is the right one


def test_table_shows_standard_errors():
    res = evaluate(["a red circle moving left"] * 2, [video("a red circle moving left", s) for s in range(2)])
    assert res["color_se"] == 0.0 and res["correct_se"] == 0.0
    assert "| video | 2 | 100.0% ± 0.0 |" in format_table(res)
    one = evaluate(["a red circle moving left"], [video("a red circle moving left")])
    assert "| video | 1 | 100.0% | 100.0% |" in format_table(one)  # no error from a single video
