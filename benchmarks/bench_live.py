"""A long live stream on the default model: throughput, block latency, real-time factor, and flat memory.

    python benchmarks/bench_live.py [--minutes 10] [--switch-every 20] [--threads 1] [--json out.json]

One LiveStream (Engine.live, the live default window, recording to disk, no pacing: as fast as it goes) of
`minutes` of video (9,600 frames for 10 minutes at 16 fps) with a prompt switch every `switch_every` seconds
(KV re-cache on). Prints generated frames/s, block latency p50 / p99, the real-time factor, and the process RSS
and KV-cache bytes averaged over the first and the last minute of video, with their growth (target <= 5%).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle moving right",
           "a yellow circle moving down"]


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--switch-every", type=float, default=20.0, help="seconds of video between prompt switches")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.switch_every <= 0:
        raise SystemExit("--minutes and --switch-every must be > 0")
    torch.set_num_threads(args.threads)
    import engine
    from engine.live import block_at_seconds

    eng = engine.Engine.from_pretrained(args.checkpoint or engine.default_checkpoint())
    fps, k = eng.config.fps, eng.config.num_frame_per_block
    seconds = args.minutes * 60
    timeline, t, i = [(0, PROMPTS[0])], args.switch_every, 1
    while t < seconds:
        timeline.append((block_at_seconds(t, fps, k), PROMPTS[i % len(PROMPTS)]))
        t, i = t + args.switch_every, i + 1
    live = eng.live(timeline=timeline, seed=0, pace=False, max_seconds=seconds)
    lat, rss, kv, video_s = [], [], [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for chunk in live:
            lat.append(chunk.seconds_generate + chunk.seconds_decode)
            video_s.append(live.frames / fps)
            rss.append(rss_bytes())
            kv.append(live.stats["kv_bytes"])
    wall = time.perf_counter() - t0
    lat, video_s = np.array(lat), np.array(video_s)
    first, last = video_s <= 60, video_s > video_s[-1] - 60
    first[:2] = False  # block 0 allocates the buffers: measure from the first full block on

    def growth(x):
        x = np.array(x, dtype=float)
        return x[first].mean(), x[last].mean(), x[last].mean() / x[first].mean() - 1
    r0, r1, rg = growth(rss)
    k0, k1, kg = growth(kv)
    out = {"frames": live.frames, "seconds_video": live.frames / fps, "blocks": live.block, "switches": len(timeline) - 1,
           "recaches": live.recaches, "wall_seconds": wall, "generated_fps": live.frames / wall,
           "realtime_factor": live.frames / wall / fps, "block_p50_ms": 1000 * float(np.median(lat)),
           "block_p99_ms": 1000 * float(np.quantile(lat, 0.99)), "rss_first_minute_mb": r0 / 2**20,
           "rss_last_minute_mb": r1 / 2**20, "rss_growth": rg, "kv_first_minute_bytes": k0,
           "kv_last_minute_bytes": k1, "kv_growth": kg, "threads": args.threads,
           "window": live.settings()["local_attn_frames"], "sink": live.settings()["sink_frames"]}
    live.close()
    print(f"| frames | switches | generated fps | real-time factor | block p50 / p99 | RSS first / last minute | "
          f"KV bytes first / last minute |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {out['frames']} | {out['switches']} | {out['generated_fps']:.1f} | {out['realtime_factor']:.2f}x | "
          f"{out['block_p50_ms']:.0f} / {out['block_p99_ms']:.0f} ms | {out['rss_first_minute_mb']:.1f} / "
          f"{out['rss_last_minute_mb']:.1f} MB ({100 * rg:+.1f}%) | {k0:.0f} / {k1:.0f} ({100 * kg:+.1f}%) |")
    if args.json:
        from engine.atomic import write_text

        write_text(args.json, json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
