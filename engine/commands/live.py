"""python -m engine live "PROMPT" --seconds 60 --switch 20:"a blue square moving up" --out live.mp4

An open-ended live stream (Engine.live) cut at --seconds, with prompt switches at given times, written as mp4
plus its timeline (live.json beside it: seed, timeline, settings; `--timeline live.json` replays it exactly).
A progress line shows generated frames/s, per-block latency and the real-time factor. Ctrl-C ends the stream and
still writes what was made.
"""

from __future__ import annotations

import argparse
import math
import sys


def parse_switch(text: str) -> tuple[float, str]:
    """'20:a blue square moving up' -> (20.0, 'a blue square moving up')."""
    sec, sep, prompt = text.partition(":")
    try:
        t = float(sec)
    except ValueError:
        t = None
    if not sep or t is None or not math.isfinite(t) or t <= 0 or not prompt.strip():
        raise ValueError(f"--switch must look like SECONDS:PROMPT with SECONDS > 0, e.g. 20:\"a blue square moving "
                         f"up\"; got {text!r}")
    return t, prompt.strip()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default=None, help="the first prompt (or --timeline FILE)")
    p.add_argument("--seconds", type=float, default=None,
                   help="video seconds to stream (default 60; with --timeline: the saved stream's length)")
    p.add_argument("--switch", action="append", default=[], metavar="SECONDS:PROMPT",
                   help="switch the prompt at this time of the video (repeatable)")
    p.add_argument("--timeline", default=None, help="replay a saved stream: its .json (seed, timeline, settings)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default 0, or the timeline file's)")
    p.add_argument("--out", default="live.mp4", help="mp4 path; the timeline goes beside it as .json")
    p.add_argument("--checkpoint", default=None, help="engine directory (default: the shipped model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--window", type=int, default=None, help="attention window in latent frames (default: the "
                   "checkpoint's, else the live default engine.live.live_default_window: the model's training clip)")
    p.add_argument("--sink", type=int, default=None, help="sink frames kept in the window")
    p.add_argument("--rope-positions", choices=["window", "absolute"], default=None)
    p.add_argument("--no-recache", action="store_true", help="on a switch, swap only the cross-attention")
    p.add_argument("--realtime", action="store_true", help="pace generation at the video's fps (as a viewer "
                   "would watch it) instead of as fast as possible")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--decoder", choices=["vae", "fast"], default=None, help="vae: the full VAE decoder (default); "
                   "fast: the checkpoint's fast streaming decoder (fast_decoder/); default with --timeline: the saved one")


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from engine import Engine, default_checkpoint
    from engine.live import block_at_seconds, check_timeline, read_timeline

    if args.seconds is not None and (not math.isfinite(args.seconds) or args.seconds <= 0):
        raise ValueError(f"--seconds must be > 0, got {args.seconds:g}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    saved = read_timeline(args.timeline) if args.timeline else {}
    if args.timeline and (args.prompt or args.switch):
        raise ValueError("--timeline replays a saved stream: give no PROMPT or --switch with it")
    if not args.timeline and not args.prompt:
        raise ValueError("give a PROMPT (or --timeline FILE)")
    settings = {k: saved[k] for k in ("num_frame_per_block", "local_attn_frames", "sink_frames", "rope_positions",
                                      "denoising_steps", "guidance_scale") if k in saved}
    for key, value in (("local_attn_frames", args.window), ("sink_frames", args.sink),
                       ("rope_positions", args.rope_positions)):
        if value is not None:
            settings[key] = value
    decoder = args.decoder or saved.get("decoder", "vae")
    eng = Engine.from_pretrained(args.checkpoint or default_checkpoint(), device=args.device, dtype=args.dtype,
                                 decoder=decoder)
    fps, k = eng.config.fps, settings.get("num_frame_per_block", eng.config.num_frame_per_block)
    if args.timeline:
        timeline = saved["timeline"]
        seconds = args.seconds or saved.get("num_frames", 0) / fps or 60.0
    else:
        seconds = args.seconds or 60.0
        timeline = [(0, args.prompt)]
        for t, prompt in sorted(parse_switch(s) for s in args.switch):
            if t >= seconds:
                raise ValueError(f"--switch at {t:g} s is past the end of the stream (--seconds {seconds:g}); "
                                 f"accepted: 0 < SECONDS < {seconds:g}")
            timeline.append((block_at_seconds(t, fps, k), prompt))
    timeline = check_timeline(timeline)
    seed = args.seed if args.seed is not None else saved.get("seed", 0)
    live = eng.live(timeline=timeline, seed=seed, max_seconds=seconds, pace=args.realtime,
                    recache=saved.get("recache", True) and not args.no_recache, **settings)
    total = math.ceil(seconds * fps)
    bar = tqdm(total=total, unit="frame", desc="live", file=sys.stderr)
    try:
        for chunk in live:
            st = live.stats
            bar.update(len(chunk.frames))
            bar.set_postfix_str(f"block {chunk.block} | {st['fps']:.0f} fps | block {1000 * st['block_p50']:.0f} ms "
                                f"p50 / {1000 * st['block_p99']:.0f} ms p99 | {st['realtime_factor']:.1f}x real time")
    except KeyboardInterrupt:
        print("\ninterrupted: writing what was streamed", file=sys.stderr)
    finally:
        live.close()
        bar.close()
    if live.frames == 0:
        raise ValueError("nothing was streamed")
    path = live.save(args.out)
    st = live.stats
    print(f"wrote {path} and {path.with_suffix('.json')}: {live.frames} frames ({st['seconds_video']:.1f} s), "
          f"{len(live.timeline)} prompt(s); {st['fps']:.1f} frames/s generated = {st['realtime_factor']:.1f}x real "
          f"time at {fps} fps; block latency p50 {1000 * st['block_p50']:.0f} ms, p99 {1000 * st['block_p99']:.0f} ms")
    return 0
