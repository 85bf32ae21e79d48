"""What one attack iteration costs against one no-grad generation of the same video (issue 16, part 3).

    python benchmarks/bench_attack_cost.py                      # default model, 33 frames, one thread
    python benchmarks/bench_attack_cost.py --before 9187436     # also the code of a git revision, side by side
    python benchmarks/bench_attack_cost.py --runs 3 --steps 4 --json out.json

Rows: `Engine.generate` of the video without autograd (output_type="pt"), and `Engine.attack` on it (untargeted
pixel objective, learn z0, Adam) under each decoder checkpoint setting, plus checkpointing off for reference.
With `--before REV` the same two measurements also run on that revision's `engine/` (extracted with
`git archive` into a temporary directory; the weights are this tree's), so the change is measured against the
old code in the same run.

Every measurement runs in a fresh subprocess (MALLOC_MMAP_THRESHOLD_=65536, so that freed tensors go back to the
system at once and resident memory follows live tensors), after a warm-up of the same work (a generation; for
attacks also a one-step attack). Memory: the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs after the warm-up) while the measured work runs:
- "work MB": that peak minus the resident memory just before (what the work itself needs above the loaded
  engine, its libraries and allocator);
- "peak MB": the process's whole peak (libraries, weights and work).
Seconds: generation = wall time of one `generate`; attack iteration = the median `seconds` of the attack's
history rows after the first (forward, backward, step, metrics). CPU s: the same in process CPU time (less
sensitive to other jobs taking the cores; for attacks from the callback's marks between iterations). The subprocesses run round robin `--runs` times
(the machine is shared: its load falls on every row alike) and each row keeps its fastest run and its largest
memory figures. Read ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench_attack import REPO, run_worker  # this directory is on sys.path when run as a script
PROMPT = "a red circle moving left"
DECODER_CHECKPOINTS = ("auto", "frame", "block", "off")
TRANSFORMER_CHECKPOINTS = ("auto", "layer", "off")


def _status(key: str) -> float:
    """A field of /proc/self/status in MB (VmRSS, VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _measure(fn) -> tuple[float, float, float]:
    """(result, work MB, peak MB) of fn() with the peak RSS reset just before it."""
    import gc

    gc.collect()
    rss0 = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    out = fn()
    peak = _status("VmHWM")
    return out, peak - rss0, peak


def worker(cfg: dict) -> dict:
    """One measurement in this process (the tree to import is on PYTHONPATH)."""
    import torch

    import engine

    torch.set_num_threads(cfg["threads"])
    eng = engine.Engine.from_pretrained(cfg["checkpoint"])
    weights_mb = sum(p.numel() * p.element_size() for m in (eng.transformer, eng.vae, eng.text_encoder)
                     for p in m.parameters()) / 2**20

    def generate():
        with torch.no_grad():
            t0, c0 = time.perf_counter(), time.process_time()
            eng.generate(PROMPT, seed=0, num_frames=cfg["num_frames"], output_type="pt")
            return time.perf_counter() - t0, time.process_time() - c0

    generate()  # warm-up
    if cfg["op"] == "generate":
        (seconds, cpu), work, peak = _measure(generate)
        return dict(cfg, seconds=seconds, cpu_seconds=cpu, work_mb=work, peak_mb=peak, weights_mb=weights_mb)

    options = dict(checkpointing=cfg["checkpointing"])
    for k in ("transformer_checkpoint", "decoder_checkpoint"):
        if cfg.get(k) is not None:
            options[k] = cfg[k]

    cpu_marks: list[float] = []  # process CPU time at the end of each iteration (callback)

    def attack(steps):
        cpu_marks.clear()
        return eng.attack(PROMPT, seed=0, num_frames=cfg["num_frames"], steps=steps, lr=0.05, learn=("z0",),
                          objective="untargeted", callback=lambda info: cpu_marks.append(time.process_time()),
                          **options)

    attack(1)  # warm-up
    r, work, peak = _measure(lambda: attack(cfg["steps"]))
    its = [h["seconds"] for h in r.history if not h.get("final")]
    cpu_its = [b - a for a, b in zip(cpu_marks, cpu_marks[1:])]  # iterations 1.. (0 has no start mark)
    params_with_grad = sum(p.grad is not None for m in (eng.transformer, eng.vae) for p in m.parameters())
    return dict(cfg, seconds=statistics.median(its[1:] or its), cpu_seconds=statistics.median(cpu_its or [math.nan]),
                work_mb=work, peak_mb=peak, weights_mb=weights_mb, params_with_grad=params_with_grad,
                transformer_checkpointed=r.settings.get("transformer_checkpointed"),
                decoder_kept_frames=r.settings.get("decoder_kept_frames"))


def run(cfg: dict, tree: Path) -> dict:
    return run_worker(__file__, cfg, tree)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "shapes-sf"))
    ap.add_argument("--num-frames", type=int, default=33)
    ap.add_argument("--steps", type=int, default=3, help="attack iterations per measured attack (median after the "
                                                         "first)")
    ap.add_argument("--runs", type=int, default=2, help="round-robin passes over all rows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--before", default=None, help="a git revision whose engine/ is measured too")
    ap.add_argument("--rows", default="auto/auto,layer/auto,layer/frame,layer/block,nockpt",
                    help="attack rows of this tree: TRANSFORMER/DECODER checkpoint settings, and/or nockpt "
                         "(checkpointing off)")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    base = dict(checkpoint=str(Path(args.checkpoint).resolve()), num_frames=args.num_frames, steps=args.steps,
                threads=args.threads)
    rows: list[tuple[str, str, Path, dict]] = []  # (code, setting, tree, cfg)
    tmp = None
    if args.before:
        tmp = tempfile.TemporaryDirectory(prefix="bench-before-")
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.before, "engine"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp.name], input=archive, check=True)
        before = Path(tmp.name)
        rows += [(f"before ({args.before})", "generate", before, dict(base, op="generate")),
                 (f"before ({args.before})", "attack, checkpointing on", before,
                  dict(base, op="attack", checkpointing=True))]
    rows.append(("this tree", "generate", REPO, dict(base, op="generate")))
    for name in args.rows.split(","):
        if name == "nockpt":
            rows.append(("this tree", "attack, checkpointing off", REPO,
                         dict(base, op="attack", checkpointing=False)))
        elif name.count("/") == 1 and name.split("/")[0] in TRANSFORMER_CHECKPOINTS \
                and name.split("/")[1] in DECODER_CHECKPOINTS:
            t, d = name.split("/")
            rows.append(("this tree", f"attack, checkpointing on: transformer {t}, decoder {d}", REPO,
                         dict(base, op="attack", checkpointing=True, transformer_checkpoint=t, decoder_checkpoint=d)))
        else:
            raise SystemExit(f"unknown row {name!r}; accepted: T/D with T in {', '.join(TRANSFORMER_CHECKPOINTS)} "
                             f"and D in {', '.join(DECODER_CHECKPOINTS)}, or nockpt")

    results: list[list[dict]] = [[] for _ in rows]
    for _ in range(args.runs):
        for i, (_, _, tree, cfg) in enumerate(rows):
            results[i].append(run(cfg, tree))
    best = [dict(min(rs, key=lambda r: r["seconds"]), cpu_seconds=min(r["cpu_seconds"] for r in rs),
                 work_mb=max(r["work_mb"] for r in rs), peak_mb=max(r["peak_mb"] for r in rs)) for rs in results]
    if tmp is not None:
        tmp.cleanup()

    print(f"{Path(args.checkpoint).name}, {args.num_frames} frames, {args.threads} thread(s), untargeted pixel "
          f"objective, learn z0, Adam, {args.steps} iterations per attack, best of {args.runs} runs; weights "
          f"{best[0]['weights_mb']:.1f} MB\n")
    print("| code | work | s | x gen | CPU s | x gen | work MB | x gen | peak MB | x gen | transformer ckpt | "
          "decoder frames kept | weight .grad |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    out = []
    for (code, setting, _, _), r in zip(rows, best):
        gen = next(b for (c, s, _, _), b in zip(rows, best) if c == code and s == "generate")
        extra = ["" if r.get(k) is None else str(r[k]) for k in
                 ("transformer_checkpointed", "decoder_kept_frames", "params_with_grad")]
        print(f"| {code} | {setting} | {r['seconds']:.3f} | {r['seconds'] / gen['seconds']:.2f} | "
              f"{r['cpu_seconds']:.3f} | {r['cpu_seconds'] / gen['cpu_seconds']:.2f} | "
              f"{r['work_mb']:.1f} | {r['work_mb'] / max(gen['work_mb'], 0.1):.1f} | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] / gen['peak_mb']:.2f} | {' | '.join(extra)} |")
        out.append(dict(r, code=code, setting=setting))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
