"""Benchmark of the default model (checkpoints/shapes-sf): evaluator accuracy of the 4-step student and of its
teacher, their NFE and wall-time ratio, and streaming speed on this CPU.

    python benchmarks/bench_default_model.py --threads 1       # student beside the shipped teacher
    python benchmarks/bench_default_model.py --teacher none    # student only

Student: `Engine.generate` of the shipped checkpoint, exactly what users run, over EVAL_PROMPTS x seeds.
Teacher: the bidirectional transformer from the same z0 (the Engine's noise for the seed), Euler with
`--teacher-steps` steps and classifier-free guidance w (standard convention uncond + w (cond - uncond)), decoded
by the same VAE. Wall times are measured side by side in one process (the machine is shared and noisy).

--threads 1 is the right setting on a loaded 2-core machine: with 2 torch threads and other processes on
the cores, OpenMP threads spin-wait and small models run 10-100x slower.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import engine
from engine.data.evaluate import EVAL_PROMPTS, evaluate, format_table, teacher_video


def student_videos(eng, prompts, seeds):
    videos, times = [], []
    for s in seeds:
        for p in prompts:
            v = eng.generate(p, seed=s)
            videos.append(v.frames)
            times.append(v.timings)
    return videos, times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(engine.default_checkpoint()))
    ap.add_argument("--teacher", default="checkpoints/shapes-teacher",
                    help="teacher engine directory or its transformer/ folder ('none': the student only)")
    ap.add_argument("--teacher-steps", type=int, default=32)
    ap.add_argument("--guidance", type=float, default=3.0, help="teacher CFG w, standard convention")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--limit", type=int, default=0, help="first N prompts only (0: all 64)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--speed-runs", type=int, default=5)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    prompts = EVAL_PROMPTS[: a.limit] if a.limit else EVAL_PROMPTS
    eng = engine.Engine.from_pretrained(a.checkpoint)
    n_steps = len(eng.schedule)
    print(f"checkpoint {a.checkpoint}; {len(prompts)} prompts x seeds {a.seeds}; torch threads {a.threads}")

    eng.generate(prompts[0], seed=0)  # warm-up
    t0 = time.perf_counter()
    s_videos, s_times = student_videos(eng, prompts, a.seeds)
    s_wall = (time.perf_counter() - t0) / len(s_videos)
    rows = {f"student ({n_steps} steps)": evaluate([p for _ in a.seeds for p in prompts], s_videos)}

    lines = []
    if a.teacher.lower() != "none":
        from engine.models.causal_wan import CausalWanTransformer3DModel

        if (Path(a.teacher) / "transformer" / "config.json").is_file():
            a.teacher = str(Path(a.teacher) / "transformer")
        if not (Path(a.teacher) / "config.json").is_file():
            raise SystemExit(f"--teacher {a.teacher}: not an engine directory or a transformer folder "
                             "(no config.json); 'none' skips the teacher")

        teacher_eng = engine.Engine.from_pretrained(a.checkpoint)  # the student's VAE, text encoder and noise
        teacher_eng.transformer = CausalWanTransformer3DModel.from_pretrained(a.teacher).eval()
        t0 = time.perf_counter()
        t_videos = [teacher_video(teacher_eng, p, s, a.teacher_steps, a.guidance) for s in a.seeds for p in prompts]
        t_wall = (time.perf_counter() - t0) / len(t_videos)
        rows[f"teacher ({a.teacher_steps} steps, CFG w={a.guidance})"] = evaluate(
            [p for _ in a.seeds for p in prompts], t_videos)
        # network evaluations per video: teacher 2 per step (CFG); student (steps + 1 cache write) per block,
        # minus the last block's cache write
        blocks = s_times[0]["num_blocks"]
        nfe_t = 2 * a.teacher_steps
        nfe_s_calls = blocks * (n_steps + 1) - 1
        lines += [f"NFE per video: teacher {nfe_t} full-sequence calls; student {nfe_s_calls} block calls "
                  f"({blocks} blocks x ({n_steps} steps + cache write) - 1), i.e. {n_steps} denoising steps; "
                  f"ratio teacher/student denoising steps = {nfe_t / n_steps:.0f} (with CFG), calls = "
                  f"{nfe_t / nfe_s_calls:.1f}",
                  f"wall time per video (generation + decode, measured in this run): teacher {t_wall:.2f} s, "
                  f"student {s_wall:.2f} s, ratio {t_wall / s_wall:.1f}x"]
    print(format_table(rows))
    for line in lines:
        print(line)

    # streaming speed: repeated single-prompt generations
    fps, first = [], []
    for i in range(a.speed_runs):
        v = eng.generate(prompts[i % len(prompts)], seed=100 + i)
        fps.append(v.timings["fps"])
        first.append(v.timings["first_block_seconds"])
    print(f"streaming ({eng.config.num_frames} frames of {eng.config.height}x{eng.config.width}, "
          f"{a.speed_runs} runs): generated fps median {statistics.median(fps):.1f} (target >= "
          f"{2 * eng.config.fps}), first block median {statistics.median(first):.3f} s (target <= 0.5 s); "
          f"over the accuracy run: fps median {statistics.median(t['fps'] for t in s_times):.1f}")


if __name__ == "__main__":
    main()
