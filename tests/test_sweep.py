"""Command line: `python -m engine attack` and `python -m engine sweep` (resume after a kill, 2-process sharding under
torchrun, bad input). A tiny random engine saved to a temporary checkpoint; 9-frame videos, 1-3 steps."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import Engine, SamplerNoise
from engine.attack.sweep import item_id, parse_seeds, shard_of
from engine.cli import main
from engine.testing import tiny_engine

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a red circle moving left"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_engine().save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny"))


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text(f"# prompts\n{PROMPT}\n\na blue square moving up\n")
    return p


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


FAST = ["--frames", "9", "--no-videos", "--no-plots"]


def _rows(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "summary.csv").open()))


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((out / "logs").glob("rank*.jsonl")) for line in f.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ attack
def test_cli_attack_writes_a_result_that_regenerates_exactly(ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["attack", PROMPT, "--checkpoint", ckpt, "--frames", "9", "--seed", "3", "--steps", "2", "--budget",
               "linf", "--eps", "0.05", "--optimizer", "pgd", "--learn", "z0,step", "--out", str(out),
               "--no-progress"])
    assert rc == 0 and "PSNR" in capsys.readouterr().out
    assert {"noise.safetensors", "result.json", "history.csv", "baseline.mp4", "attacked.mp4", "curves.png",
            "frames.png"} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / "result.json").read_text())
    assert meta["budget"] == {"kind": "linf", "eps": 0.05, "chi_weight": 0.0, "renormalize": False}
    assert meta["settings"]["optimizer"] == "pgd" and meta["settings"]["learn"] == ["z0", "step"]
    eng = Engine.from_pretrained(ckpt)
    noise = SamplerNoise.load(out / "noise.safetensors")
    with torch.no_grad():
        frames = eng.generate(PROMPT, noise=noise, output_type="pt").frames
    init = eng.make_noise(9, 3)
    assert (noise.z0 - init.z0).abs().max() <= 0.05 + 1e-6 and not torch.equal(noise.z0, init.z0)
    assert meta["metrics"]["mse"] == pytest.approx(float((frames - eng.generate(PROMPT, noise=init, output_type="pt")
                                                          .frames).pow(2).mean()), rel=1e-5)


def test_cli_targeted_with_a_target_file_frame_range_and_region(ckpt, tmp_path):
    target = tmp_path / "target.pt"
    torch.save(torch.full((9, 32, 32, 3), 0.5), target)
    out = tmp_path / "run"
    rc = main(["attack", PROMPT, "--checkpoint", ckpt, *FAST, "--steps", "2", "--lr", "0.3", "--objective", "targeted",
               "--target", str(target), "--frame-range", "2:6", "--region", "0:16,8:24", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    meta = json.loads((out / "result.json").read_text())
    assert meta["objective"] == {"name": "targeted", "maximize": False, "space": "pixel"}
    assert meta["best_value"] < meta["baseline_value"]


@pytest.mark.parametrize("argv, match", [
    (["--steps", "0"], "steps must be an int > 0"),
    (["--lr", "nan"], "lr must be a finite"),
    (["--budget", "l2", "--eps", "-1"], r"\(0, inf\)"),
    (["--budget", "linf"], "needs eps"),
    (["--learn", "step", "--step-noise", "frozen"], "frozen step noise"),
    (["--objective", "targeted"], "needs target"),
    (["--region", "3,4"], "START:STOP"),
    (["--frames", "10"], "not reachable"),
])
def test_cli_attack_bad_input(ckpt, tmp_path, capsys, argv, match):
    rc = main(["attack", PROMPT, "--checkpoint", ckpt, "--out", str(tmp_path / "x"), *argv])
    assert rc == 2 and re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_cli_target_of_the_wrong_shape(ckpt, tmp_path, capsys):
    target = tmp_path / "t.pt"
    torch.save(torch.zeros(5, 32, 32, 3), target)
    rc = main(["attack", PROMPT, "--checkpoint", ckpt, *FAST, "--objective", "targeted", "--target", str(target),
               "--out", str(tmp_path / "x")])
    assert rc == 2 and "does not fit pixel data of shape (9, 32, 32, 3)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ sweep
def test_seed_specs_ids_and_shards(monkeypatch):
    assert parse_seeds("0-3,7,5-5") == [0, 1, 2, 3, 5, 7]
    for bad in ("", "3-1", "a", "-1"):
        with pytest.raises(ValueError):
            parse_seeds(bad)
    assert item_id(PROMPT, 7) == item_id(PROMPT, 7) != item_id(PROMPT + " ", 7)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert shard_of(None) == (1, 2) and shard_of("0/3") == (0, 3)
    with pytest.raises(ValueError, match="I/N"):
        shard_of("3/3")


def test_sweep_resumes_after_a_kill(ckpt, prompts, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--prompts", str(prompts), "--seeds", "0-2", "--out", str(out), "--checkpoint", ckpt, *FAST,
            "--steps", "3", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "engine", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not list(out.glob("items/*/result.json")):
            assert proc.poll() is None and time.time() < deadline, "the sweep ended or hung before its first item"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("items/*/result.json")}
    visible = [p for p in (out / "items").iterdir() if not p.name.startswith(".")]
    assert {p.name for p in visible} == set(finished)  # no half-written item is visible
    assert 1 <= len(finished) < 6

    assert main(args) == 0
    all_ids = {item_id(p, s) for p in (PROMPT, "a blue square moving up") for s in range(3)}
    assert {p.parent.name for p in out.glob("items/*/result.json")} == all_ids
    assert all(p.name in all_ids for p in (out / "items").iterdir())  # temporary leftovers cleaned
    assert all((out / "items" / i / "result.json").stat().st_mtime_ns == t for i, t in finished.items())
    skipped = {e["id"] for e in _events(out) if e["event"] == "skipped"}
    assert skipped == set(finished)
    rows = _rows(out)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"done"}
    assert "| psnr |" in (out / "summary.md").read_text()

    # a second resume runs nothing; different settings in the same directory are refused before any work
    capsys.readouterr()
    assert main(args) == 0 and "ran 0, skipped 6" in capsys.readouterr().out
    assert main([*args, "--lr", "0.5"]) == 2 and "different settings" in capsys.readouterr().err


def test_sweep_two_processes_under_torchrun_cover_disjoint_items(ckpt, prompts, tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "engine",
           "sweep", "--prompts", str(prompts), "--seeds", "0-1", "--out", str(out), "--checkpoint", ckpt, *FAST,
           "--steps", "1", "--no-progress"]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    done = [e for e in _events(out) if e["event"] == "done"]
    by_rank = {r: {e["id"] for e in done if e["rank"] == r} for r in (0, 1)}
    assert all(e["world"] == 2 for e in done) and len(done) == 4
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]
    rows = _rows(out)
    assert {r["id"] for r in rows} == by_rank[0] | by_rank[1] and {r["status"] for r in rows} == {"done"}
    assert {r["rank"] for r in rows} == {"0", "1"}
