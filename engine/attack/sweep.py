"""python -m engine sweep --prompts FILE --seeds 0-99 --out DIR [attack options]: many attacks, resumable, sharded.

Every (prompt, seed) item gets a stable id (prompt slug + prompt hash + seed) and a result directory
DIR/items/<id>/, written atomically (a temporary directory renamed into place), so an interrupted sweep never
leaves a half-written item: run the same command again and finished items are skipped.

Sharding: with N processes each runs items[rank::N] of the full, deterministic item list. The rank and the
number of processes come from --shard I/N, else from the RANK / WORLD_SIZE variables that `torchrun` and
`accelerate launch` set, else 0/1. No process group is needed (no collective can time out on a long shard):

    torchrun --standalone --nproc_per_node 2 -m engine sweep --prompts prompts.txt --seeds 0-99 --out runs/s1

(On this 2-core CPU machine `torchrun --nproc_per_node 2` gives two real processes; `accelerate launch --cpu
--num_processes 2` was measured to fall back to one.) Every process, when its shard is done, rewrites
DIR/summary.csv and DIR/summary.md from all finished items on disk, under a file lock, so the last one to
finish leaves the complete table. Other files: DIR/sweep.json (the settings; a resumed sweep must match them),
DIR/errors/<id>.txt (the traceback of a failed item; it is retried on resume), DIR/logs/rank<R>.jsonl (what each
process did).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path

from ..atomic import write_text
from .cli import add_attack_arguments, prepare, slug
from .result import RESULT_FILE, _json_safe

SUMMARY_COLUMNS = ("id", "status", "prompt", "seed", "objective", "budget", "eps", "mode", "learn", "baseline_value",
                   "best_value", "best_iteration", "iterations", "psnr", "ssim", "mse", "latent_mse", "delta_rms",
                   "delta_linf", "norm_ratio", "ks", "ks_pvalue", "seconds", "seconds_per_iteration", "rank",
                   "stop_reason")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", required=True, help="text file, one prompt a line (blank lines and # comments skipped)")
    p.add_argument("--seeds", default="0", help="seeds: 0-99, or 0,3,10-19")
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run shard I of N (default: RANK/WORLD_SIZE from torchrun or accelerate, else 0/1)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed item")
    p.add_argument("--no-progress", action="store_true")
    add_attack_arguments(p)


# ------------------------------------------------------------------------------------------------ items
def parse_seeds(spec: str) -> list[int]:
    """'0-99' / '0,3,10-19' -> sorted unique seeds."""
    seeds: set[int] = set()
    for part in (spec or "").split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"bad seed spec {spec!r}: use N, A-B or a comma-separated list of those (seeds >= 0)")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise ValueError(f"bad seed range {part!r}: end < start")
        seeds.update(range(a, b + 1))
    return sorted(seeds)


def read_prompts(path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {p} does not exist")
    prompts = [line.strip() for line in p.read_text().splitlines()]
    prompts = [x for x in prompts if x and not x.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {p} holds no prompt (one a line; blank lines and # comments are skipped)")
    if len(set(prompts)) != len(prompts):
        raise ValueError(f"prompts file {p} repeats a prompt; each (prompt, seed) must be one item")
    return prompts


def item_id(prompt: str, seed: int) -> str:
    """Stable across runs and edits of the prompts file: slug + 8 hex of the prompt's hash + seed."""
    return f"{slug(prompt, 32)}-{hashlib.sha1(prompt.encode()).hexdigest()[:8]}-s{seed}"


def make_items(prompts: list[str], seeds: list[int]) -> list[dict]:
    return [{"id": item_id(p, s), "prompt": p, "seed": s} for p in prompts for s in seeds]


def shard_of(spec: str | None) -> tuple[int, int]:
    """(rank, world) from --shard I/N, else RANK / WORLD_SIZE (torchrun, accelerate launch), else (0, 1)."""
    if spec:
        m = re.fullmatch(r"(\d+)/(\d+)", spec.strip())
        if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
            raise ValueError(f"--shard must be I/N with 0 <= I < N, got {spec!r}")
        return int(m.group(1)), int(m.group(2))
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is not None and world is not None:
        return int(rank), int(world)
    return 0, 1


# ------------------------------------------------------------------------------------------------ files
def _write_atomic(path: Path, text: str) -> None:
    write_text(path, text)


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


COST_ONLY = ("transformer_checkpoint", "decoder_checkpoint")  # settings that leave the results as they are


def _describe(args, kwargs: dict) -> dict:
    """What must match for a resumed sweep to add comparable items (not the item list, not the shard, not where
    activations are checkpointed: that changes the cost, not the results)."""
    def plain(v):
        if hasattr(v, "shape"):  # a target or mask tensor: record shape and a digest
            t = v.detach().cpu().contiguous()
            return {"shape": list(t.shape), "sha1": hashlib.sha1(t.double().numpy().tobytes()).hexdigest()}
        return v

    return _json_safe({
        "checkpoint": str(Path(args.checkpoint).resolve()) if args.checkpoint else "default",
        "dtype": args.dtype, "attack": {k: plain(v) for k, v in sorted(kwargs.items()) if k not in COST_ONLY},
        "target_file": args.target,
    })


def _check_sweep_config(out: Path, config: dict) -> None:
    path = out / "sweep.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != config:
            diff = sorted(k for k in set(old["attack"]) | set(config["attack"])
                          if old["attack"].get(k) != config["attack"].get(k))
            other = sorted(k for k in set(old) | set(config) if k != "attack" and old.get(k) != config.get(k))
            raise ValueError(f"{out} holds a sweep with different settings (differs in {diff + other}); "
                             f"resume with the same options, or use another --out")
    else:
        _write_atomic(path, json.dumps(config, indent=2))


def _done(out: Path, item: dict) -> bool:
    return (out / "items" / item["id"] / RESULT_FILE).is_file()


def _clean_stale(out: Path, shard: list[dict]) -> None:
    """Remove temporary directories a killed run left behind for this shard's items."""
    import shutil

    items_dir = out / "items"
    if not items_dir.is_dir():
        return
    ids = {it["id"] for it in shard}
    for p in items_dir.iterdir():
        m = re.fullmatch(r"\.(.+)\.(tmp|old)-.*", p.name)
        if m and m.group(1) in ids:
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ summary
def _row(out: Path, item: dict) -> dict:
    row = {"id": item["id"], "prompt": item["prompt"], "seed": item["seed"]}
    d = out / "items" / item["id"]
    if (d / RESULT_FILE).is_file():
        meta = json.loads((d / RESULT_FILE).read_text())
        row.update(meta["summary"], status="done")
        if (d / "item.json").is_file():
            row["rank"] = json.loads((d / "item.json").read_text()).get("rank")
    elif (out / "errors" / f"{item['id']}.txt").is_file():
        err = (out / "errors" / f"{item['id']}.txt").read_text().strip().splitlines()
        row.update(status="error", stop_reason=err[-1] if err else "error")
    else:
        row["status"] = "pending"
    return row


def _num(x):
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return None
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _fmt(x, spec=".4g") -> str:
    v = _num(x)
    if v is None:
        return "" if x is None else str(x).replace("|", "\\|")
    return format(v, spec) if math.isfinite(v) else str(v)


def write_summary(out: Path, items: list[dict], config: dict) -> tuple[Path, Path, dict]:
    """summary.csv (one row per item) and summary.md (aggregates + table), from what is on disk."""
    import csv
    import io

    rows = [_row(out, it) for it in items]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in SUMMARY_COLUMNS})
    _write_atomic(out / "summary.csv", buf.getvalue())

    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "error", "pending")}
    done = [r for r in rows if r["status"] == "done"]
    lines = [f"# Sweep {out.name}", "",
             f"{len(rows)} items: {counts['done']} done, {counts['error']} failed, {counts['pending']} pending. "
             f"Settings: `{json.dumps(config.get('attack', {}))}`", ""]
    stats_cols = ("best_value", "psnr", "ssim", "mse", "delta_rms", "delta_linf", "norm_ratio", "ks",
                  "seconds_per_iteration")
    if done:
        lines += ["| metric | mean | std | min | median | max |", "|---|---|---|---|---|---|"]
        for c in stats_cols:
            vals = [v for v in (_num(r.get(c)) for r in done) if v is not None and math.isfinite(v)]
            if vals:
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                lines.append(f"| {c} | {_fmt(statistics.fmean(vals))} | {_fmt(sd)} | {_fmt(min(vals))} | "
                             f"{_fmt(statistics.median(vals))} | {_fmt(max(vals))} |")
        lines.append("")
    table_cols = ("id", "status", "seed", "baseline_value", "best_value", "iterations", "psnr", "ssim", "delta_rms",
                  "norm_ratio", "ks", "seconds", "stop_reason")
    lines += ["| " + " | ".join(table_cols) + " |", "|" + "---|" * len(table_cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in table_cols) + " |")
    _write_atomic(out / "summary.md", "\n".join(lines) + "\n")
    return out / "summary.csv", out / "summary.md", counts


# ------------------------------------------------------------------------------------------------ run
def run(args) -> int:
    from tqdm import tqdm

    from ..io import atomic_directory

    items = make_items(read_prompts(args.prompts), parse_seeds(args.seeds))
    rank, world = shard_of(args.shard)
    out = Path(args.out)
    eng, kwargs = prepare(args)  # every option validated, shapes checked: no work yet
    config = _describe(args, kwargs)
    out.mkdir(parents=True, exist_ok=True)
    _check_sweep_config(out, config)
    shard = items[rank::world]
    _clean_stale(out, shard)
    log_path = out / "logs" / f"rank{rank}.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)

    def log(event: str, item: dict, **extra) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(_json_safe({"time": time.time(), "event": event, "id": item["id"], "rank": rank,
                                           "world": world, **extra})) + "\n")

    todo = [it for it in shard if not _done(out, it)]
    skipped = len(shard) - len(todo)
    for it in shard:
        if it not in todo:
            log("skipped", it)
    print(f"sweep shard {rank}/{world}: {len(shard)} of {len(items)} items, {skipped} already done, "
          f"{len(todo)} to run", file=sys.stderr)
    errors = 0
    bar = tqdm(todo, desc=f"sweep {rank}/{world}", unit="item", position=rank, disable=args.no_progress,
               dynamic_ncols=True)
    for it in bar:
        t0 = time.perf_counter()
        try:
            result = eng.attack(it["prompt"], seed=it["seed"], **kwargs)

            def write(tmp: Path, result=result, it=it):
                result.write_to(tmp, videos=not args.no_videos, plots=not args.no_plots)
                (tmp / "item.json").write_text(json.dumps({
                    **it, "rank": rank, "world": world, "host": socket.gethostname(), "pid": os.getpid(),
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))

            atomic_directory(out / "items" / it["id"], write)
            err_file = out / "errors" / f"{it['id']}.txt"
            if err_file.is_file():
                err_file.unlink()
            s = result.summary()
            log("done", it, seconds=time.perf_counter() - t0, best_value=s["best_value"], psnr=s["psnr"])
            bar.set_postfix(psnr=_fmt(s["psnr"], ".2f"), best=_fmt(s["best_value"]))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - one bad item must not end a long sweep
            errors += 1
            _write_atomic(out / "errors" / f"{it['id']}.txt", traceback.format_exc())
            log("error", it, error=f"{type(e).__name__}: {e}")
            print(f"\nitem {it['id']} failed: {type(e).__name__}: {e}", file=sys.stderr)
            if args.fail_fast:
                break
    bar.close()

    with _locked(out / ".summary.lock"):
        csv_path, md_path, counts = write_summary(out, items, config)
    print(f"shard {rank}/{world}: ran {len(todo) - errors}, skipped {skipped}, failed {errors}. "
          f"Sweep: {counts['done']} of {len(items)} done, {counts['error']} failed, {counts['pending']} pending; "
          f"{csv_path}, {md_path}")
    return 1 if errors else 0
