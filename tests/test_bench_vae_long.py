"""benchmarks/bench_vae_long.py: a VAE's round trip of long procedural streams, scored per 33-frame window."""

import importlib.util
from pathlib import Path

import pytest

import engine

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_vae_long", ROOT / "benchmarks" / "bench_vae_long.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_vae_long_scores_every_window_against_the_render(capsys):
    bench = load_bench()
    assert bench.main([str(engine.default_checkpoint()), "--limit", "1", "--frames", "69"]) == 0
    out = capsys.readouterr().out
    table = [ln for ln in out.splitlines() if ln.startswith("| ")]
    assert table[0].count("window ") == 2  # 69 frames: two whole windows
    assert table[1].startswith("| render | 100.0 / 100.0 / 100.0 / - | 100.0 / 100.0 / 100.0 / -")  # the ceiling
    psnrs = [float(c.split("/")[3]) for c in table[2].split("|")[2:4]]
    assert all(15 < p < 60 for p in psnrs)


@pytest.mark.parametrize("args, message", [
    (["--frames", "50"], "--frames must be 1 + 4k"), (["--frames", "33"], "at least 66"),
    (["--limit", "0"], "--limit must be in"), (["/nonexistent"], "no vae/ inside"),
])
def test_bench_vae_long_bad_input(capsys, args, message):
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.main(([str(engine.default_checkpoint())] if args[0].startswith("--") else []) + args)
    assert message in capsys.readouterr().err
