"""The live page as a viewer sees it: time to first frame in a real browser, playback gaps, app vs engine throughput,
and how many concurrent live streams this machine holds at real time.

    python benchmarks/bench_app_live.py [--checkpoint checkpoints/shapes-sf] [--threads 1] [--runs 5]
                                        [--seconds 15] [--max-streams 4] [--json out.json]

1. Time to first frame: headless Chromium loads the app, opens the Live tab, waits for the page's WebSocket, clicks
   Start, and reads the page's own clock (performance.now() at the click and at the first putImageData on the
   canvas). `runs` fresh page loads; p50 and max. Each run then plays for a few seconds and the page counts
   stalls: frames painted later than their slot at the video's fps.
2. Engine throughput: K LiveStreams computed round-robin in this process without pacing (what the server does
   for K viewers, minus the server), and app throughput: K WebSocket clients on the server at once, each counting
   the frames it receives. With K large enough that the streams cannot be real time, pacing never waits, so the
   ratio app / engine is what the server (threads, WebSocket, JSON, recording) costs.
3. Concurrent streams at real time: K = 1, 2, ... WebSocket clients for `seconds` each; a client plays the frames
   as the page does (one per 1/fps from the first; a frame that arrives after its slot is a stall and restarts
   the clock). K streams are "at real time" when every client receives >= 97% of 16 frames/s and none stalls.

The browser, the server and the clients share this machine's cores; the engine uses `threads` torch threads.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "a red circle moving left"


# ------------------------------------------------------------------------------------------------ browser

def browser_ttff(url: str, runs: int, play_seconds: float, decoder: str) -> list[dict]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    out = []
    try:
        for _ in range(runs):
            driver.get(url)
            wait = WebDriverWait(driver, 60)
            wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "button[role=tab]")))
            tab = next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == "Live")
            tab.click()
            wait.until(lambda d: d.execute_script("return window.liveStats && window.liveStats.ready"))
            driver.execute_script("const s = arguments[0] && document.querySelector('#live .live-decoder');"
                                  "if (s) s.value = arguments[0];", decoder)
            time.sleep(0.5)  # the page settles (fonts, layout); the click below is what is timed
            driver.find_element(By.CSS_SELECTOR, "#live .live-start").click()
            wait.until(lambda d: d.execute_script("return window.liveStats.firstPaint !== null"))
            time.sleep(play_seconds)
            s = driver.execute_script("return window.liveStats")
            driver.find_element(By.CSS_SELECTOR, "#live .live-stop").click()
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#live .live-status").text.startswith("Stopped"))
            out.append({"ttff_s": (s["firstPaint"] - s["click"]) / 1000, "painted": s["painted"],
                        "stalls": s["stalls"], "max_gap_ms": max(s["gaps"], default=0.0)})
            print(f"  browser run: first frame {out[-1]['ttff_s'] * 1000:.0f} ms after the click; "
                  f"{s['painted']} frames painted in {play_seconds:g} s, {s['stalls']} stalls", flush=True)
    finally:
        driver.quit()
    return out


# ------------------------------------------------------------------------------------------------ clients

def client(url: str, seed: int, seconds: float, fps: int, result: dict, start_barrier: threading.Barrier,
           decoder: str) -> None:
    """One viewer over WebSocket: receive frames for `seconds` after the first one; count late frames."""
    import websocket

    ws = websocket.create_connection(url, timeout=120)
    try:
        json.loads(ws.recv())  # ready
        start_barrier.wait()
        ws.send(json.dumps({"type": "start", "prompt": PROMPT, "seed": seed, "decoder": decoder}))
        t_first, due, n, stalls, worst = None, None, 0, 0, 0.0
        while True:
            m = json.loads(ws.recv())
            if m["type"] != "frames":
                continue
            ws.recv()
            now = time.perf_counter()
            if t_first is None:
                t_first = due = now
            elif n == 1:  # as the page: frame 0 shows at once, the clock of the rest starts with the next frames
                due = now
            for _ in range(m["n"]):  # played as the page does: one frame per 1/fps, a late one restarts the clock
                if now > due + 0.5 / fps:
                    stalls += 1
                    worst = max(worst, now - due)
                    due = now
                due += 1 / fps
            n += m["n"]
            if now - t_first >= seconds:
                break
        elapsed = time.perf_counter() - t_first
        ws.send(json.dumps({"type": "stop"}))
        while True:  # drain: the block in flight, the recording, the end
            msg = ws.recv()
            if isinstance(msg, str) and json.loads(msg)["type"] == "end":
                break
        result.update(frames=n, seconds=elapsed, received_fps=n / elapsed, stalls=stalls, worst_stall_s=worst)
    finally:
        ws.close()


def run_clients(url: str, k: int, seconds: float, fps: int, decoder: str) -> list[dict]:
    results = [{} for _ in range(k)]
    barrier = threading.Barrier(k)
    threads = [threading.Thread(target=client, args=(url, i, seconds, fps, results[i], barrier, decoder))
               for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def engine_group(engine, k: int, blocks: int, decoder: str | None = None) -> float:
    """Frames/s of k LiveStreams advanced together by a LiveGroup (what the server runs), without pacing or a
    server."""
    from engine.live import LiveGroup

    group = LiveGroup()
    streams = [engine.live(PROMPT, seed=i, pace=False, record=True, decoder=decoder) for i in range(k)]
    for s in streams:
        group.add(s)
    t0, frames = time.perf_counter(), 0
    for _ in range(blocks):
        frames += sum(len(c.frames) for _, c in group.step() if c is not None)
    dt = time.perf_counter() - t0
    for s in streams:
        s.close()
    return frames / dt


def engine_turns(engine, k: int, blocks: int, decoder: str | None = None) -> float:
    """Frames/s of k LiveStreams iterated in turns, one block each (the server before LiveGroup)."""
    streams = [engine.live(PROMPT, seed=i, pace=False, record=True, decoder=decoder) for i in range(k)]
    t0, frames = time.perf_counter(), 0
    for _ in range(blocks):
        for s in streams:
            frames += len(next(s).frames)
    dt = time.perf_counter() - t0
    for s in streams:
        s.close()
    return frames / dt


def batched_vs_turns(engine, k: int, blocks: int, repeats: int = 3) -> dict:
    """Seconds for `blocks` blocks of k streams: in turns (k batch-1 streams, as the server runs them) against one
    batch-k forward (k prompts stacked; what a batched scheduler would do). Generation and decode, no server."""
    from engine.live import live_default_window
    from engine.sampling.block_sampler import Conditioning, context_pass, denoise_block, num_renoise
    from engine.sampling.codec import StreamingDecoder
    from engine.sampling.noise import block_noise

    window, sink = live_default_window(engine.config)
    eng = engine.with_settings(local_attn_frames=engine.config.local_attn_frames or window,
                               sink_frames=engine.config.sink_frames or sink)
    nb = eng.config.num_frame_per_block
    shape = eng.latent_shape(1 + 4 * (nb - 1))
    frame = (1, shape[1], 1, *shape[3:])
    conds = [eng.conditioning(PROMPT) for _ in range(k)]

    def run(batch: int) -> float:
        groups = [list(range(i, i + batch)) for i in range(0, k, batch)]
        states = []
        for g in groups:
            cond = Conditioning(torch.cat([conds[i].cond for i in g]))
            states.append((g, cond, eng._caches(cond, (len(g), *shape[1:]), differentiable=False),
                           StreamingDecoder(eng.vae)))
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in range(blocks):
                for g, cond, caches, dec in states:
                    noise = [block_noise(i, b * nb, (b + 1) * nb, frame, num_renoise(eng.schedule)) for i in g]
                    x = torch.cat([z for z, _ in noise])
                    steps = [torch.cat([st[j] for _, st in noise]) for j in range(len(noise[0][1]))]
                    x0 = denoise_block(eng.transformer, cond, x, steps, eng.schedule, caches)
                    dec.decode(x0)
                    context_pass(eng.transformer, cond, x0, steps, eng.schedule, caches)
        return time.perf_counter() - t0

    turns, batched = [], []
    for _ in range(repeats):  # interleaved, so a change of load hits both
        turns.append(run(1))
        batched.append(run(k))
    t, bt = statistics.median(turns), statistics.median(batched)
    return {"streams": k, "blocks": blocks, "turns_s": t, "batched_s": bt, "batched_over_turns": bt / t}


# ------------------------------------------------------------------------------------------------ main

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "shapes-sf"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=5, help="browser page loads for the time to first frame")
    p.add_argument("--play-seconds", type=float, default=6.0, help="playback watched per browser run")
    p.add_argument("--seconds", type=float, default=15.0, help="seconds per concurrency trial")
    p.add_argument("--max-streams", type=int, default=4)
    p.add_argument("--no-browser", action="store_true")
    p.add_argument("--decoder", default=None, choices=["vae", "fast"],
                   help="the live page's decoder (default: the page's default, fast where the checkpoint has one)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from app.live import decoders, warm_up
    from app.serving import Limits
    from app.testing import running_app
    from engine.pipeline import Engine

    engine = Engine.from_pretrained(args.checkpoint)
    fps = int(engine.config.fps)
    decoder = args.decoder or decoders(engine)[0]
    info: dict = {"checkpoint": args.checkpoint, "threads": args.threads, "fps": fps, "decoder": decoder}
    limits = Limits.for_engine(engine, max_live_streams=64)  # admission is not what is measured here
    with running_app(engine, limits) as app:
        info["warm_up_s"] = warm_up(app.serving)
        ws_url = app.url.replace("http", "ws") + "live/ws"

        if not args.no_browser:
            print("time to first frame, headless Chromium:", flush=True)
            runs = browser_ttff(app.url, args.runs, args.play_seconds, decoder)
            t = sorted(r["ttff_s"] for r in runs)
            info["browser"] = {"runs": runs, "ttff_p50_s": statistics.median(t), "ttff_max_s": t[-1],
                               "stalls": sum(r["stalls"] for r in runs)}

        print("engine alone vs the app, and concurrent streams:", flush=True)
        single = engine_group(engine, 1, 12, decoder)
        info["engine_fps_1"] = single
        k_sat = max(2, math.ceil(single / fps) + 1)  # enough streams that none can be real time
        eng_sat = engine_group(engine, k_sat, 6, decoder)
        app_sat = run_clients(ws_url, k_sat, args.seconds, fps, decoder)
        app_fps = sum(r["received_fps"] for r in app_sat)
        info["saturated"] = {"streams": k_sat, "engine_fps": eng_sat, "app_fps": app_fps,
                             "ratio": app_fps / eng_sat}
        print(f"  {k_sat} streams, no waiting: engine {eng_sat:.1f} frames/s, app {app_fps:.1f} frames/s "
              f"delivered (ratio {app_fps / eng_sat:.2f})", flush=True)

        trials = []
        for k in range(1, args.max_streams + 1):
            res = run_clients(ws_url, k, args.seconds, fps, decoder)
            ok = all(r["received_fps"] >= 0.97 * fps and r["stalls"] == 0 for r in res)
            trials.append({"streams": k, "clients": res, "real_time": ok})
            print(f"  {k} stream(s): received " + ", ".join(f"{r['received_fps']:.1f}" for r in res)
                  + f" frames/s; stalls {[r['stalls'] for r in res]}, longest "
                  f"{max(r['worst_stall_s'] for r in res):.2f} s -> {'real time' if ok else 'NOT real time'}",
                  flush=True)
            if not ok:
                break
        info["concurrency"] = trials
        info["group_vs_turns"] = []
        for k in (2, 4):  # interleaved pairs, so a change of load hits both
            pairs = [(engine_turns(engine, k, 6, decoder), engine_group(engine, k, 6, decoder)) for _ in range(2)]
            t, g = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
            info["group_vs_turns"].append({"streams": k, "turns_fps": t, "group_fps": g, "ratio": g / t})
            print(f"  {k} streams, no pacing: in turns {t:.1f} frames/s, LiveGroup {g:.1f} frames/s "
                  f"({g / t:.2f}x)", flush=True)
        info["batching"] = [batched_vs_turns(engine, k, 6) for k in (2, 4)]
        for r in info["batching"]:
            print(f"  {r['streams']} streams x {r['blocks']} blocks: in turns {r['turns_s']:.2f} s, batched "
                  f"{r['batched_s']:.2f} s (batched / turns {r['batched_over_turns']:.2f})", flush=True)
        info["streams_at_real_time"] = max([t["streams"] for t in trials if t["real_time"]], default=0)

    print()
    print("| figure | value |")
    print("|---|---|")
    if "browser" in info:
        b = info["browser"]
        print(f"| time to first frame in Chromium, p50 / max of {len(b['runs'])} | "
              f"{b['ttff_p50_s'] * 1000:.0f} / {b['ttff_max_s'] * 1000:.0f} ms |")
        print(f"| playback stalls over {len(b['runs'])} x {args.play_seconds:g} s | {b['stalls']} |")
    s = info["saturated"]
    print(f"| engine alone, 1 stream | {single:.1f} frames/s |")
    print(f"| app / engine throughput, {s['streams']} streams | {s['app_fps']:.1f} / {s['engine_fps']:.1f} = "
          f"{s['ratio']:.2f} |")
    print(f"| concurrent live streams at real time ({fps} fps each) | {info['streams_at_real_time']} |")
    for r in info["group_vs_turns"]:
        print(f"| {r['streams']} streams: LiveGroup (batched decode) / turns, frames/s | {r['group_fps']:.1f} / "
              f"{r['turns_fps']:.1f} = {r['ratio']:.2f}x |")
    for r in info["batching"]:
        print(f"| one batch-{r['streams']} forward / {r['streams']} streams in turns (generate + decode) | "
              f"{r['batched_over_turns']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))
    return info


if __name__ == "__main__":
    main()
