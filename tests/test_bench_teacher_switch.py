"""benchmarks/bench_teacher_switch.py runs end to end (a shipped transformer standing in for a teacher, 2 steps)."""

import importlib.util
import json
from pathlib import Path

import engine

ROOT = Path(__file__).resolve().parents[1]


def test_bench_teacher_switch_runs_and_judges_both_sides(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_teacher_switch", ROOT / "benchmarks" / "bench_teacher_switch.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    res = bench.main(["--teacher", str(engine.default_checkpoint()), "--limit", "1", "--seeds", "0", "--steps", "2",
                      "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows == res["rows"] and len(rows) == 6  # 1 prompt x 3 kinds x (switch, none)
    for r in rows:
        assert r["block"] in (1, 2) and all(0 <= r[f"{side}_{m}"] <= 1 for side in ("before", "after")
                                            for m in bench.METRICS)
        assert (r["new"] == r["prompt"]) == (r["case"] == "none")
