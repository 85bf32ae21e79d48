"""benchmarks/bench_two_objects.py: its measures against the data generator's own layout, and an end-to-end run."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.data.shapes import ShapesConfig, render, spec_from_prompt

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_two_objects", ROOT / "benchmarks" / "bench_two_objects.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

PROMPT = "a red circle and a blue square moving left"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_centre_distance_is_the_rendered_objects_distance(seed):
    cfg = ShapesConfig()
    s = spec_from_prompt(PROMPT, seed, cfg)
    a, b = s.objects  # same velocity: the distance is the frame-0 distance (no bounce before free_frames)
    assert bench.centre_distance(PROMPT, render(s, cfg)) == pytest.approx(np.hypot(a.x - b.x, a.y - b.y), abs=0.75)
    assert bench.presence(PROMPT, render(s, cfg)).all()


def test_a_missing_object_is_absent():
    cfg = ShapesConfig()
    s = spec_from_prompt(PROMPT, 0, cfg)
    alone = render(dataclasses.replace(s, objects=s.objects[:1]), cfg)  # the blue square not drawn
    assert bench.centre_distance(PROMPT, alone) is None
    pres = bench.presence(PROMPT, alone)
    assert pres[0].all() and not pres[1].any()


def test_bench_runs_on_the_shipped_model(tmp_path):
    out = tmp_path / "r.json"
    res = bench.main([str(engine.default_checkpoint()), "--limit", "1", "--seeds", "0", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    assert res["spans"] == [(0, 1), (1, 9), (9, 21), (21, 33)]
    data = res["rows"]["data"]
    assert data["both_present"] == [1.0] * 4 and data["absent_at_start"] == 0.0
    model = res["rows"][str(engine.default_checkpoint())]
    assert model["videos"] == 1 and all(0 <= x <= 1 for x in model["both_present"])
