"""The live page's endpoint (/live/ws) on the launched app, driven by a real WebSocket client over the loopback:
frames as raw RGB as soon as they are decoded, a prompt change mid-stream, a refused prompt (the stream goes on),
Stop + the recording, admission control with the queue position, a closed tab freeing its slot."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
import torch
import websocket

from app.serving import Limits
from app.testing import running_app, tiny_app_engine

PROMPT = "a red circle moving left"


@pytest.fixture(scope="module")
def app():
    eng = tiny_app_engine()
    with running_app(eng, Limits.for_engine(eng, max_live_streams=1, live_seconds=4.0)) as a:
        yield a


def connect(app) -> websocket.WebSocket:
    ws = websocket.create_connection(app.url.replace("http", "ws") + "live/ws", timeout=60)
    ready = json.loads(ws.recv())
    assert ready["type"] == "ready" and ready["fps"] == 16
    return ws


def send(ws, **msg):
    ws.send(json.dumps(msg))


def next_message(ws):
    """The next JSON message; a 'frames' message comes with its frames (n, H, W, 3) uint8."""
    m = json.loads(ws.recv())
    if m["type"] == "frames":
        data = ws.recv()
        assert isinstance(data, bytes)
        return m, np.frombuffer(data, np.uint8).reshape(m["n"], m["height"], m["width"], 3)
    return m, None


def start(ws, **msg):
    """Start a stream and wait for its first frames (a stream of the previous test may still be ending its last
    block: the slot is free after that block)."""
    send(ws, type="start", prompt=PROMPT, **msg)
    m, f = next_message(ws)
    while m["type"] in ("queued", "started"):
        m, f = next_message(ws)
    assert m["type"] == "frames", m
    return m, f


def frames_until_end(ws, limit=400):
    """All frames until 'end', and the messages seen."""
    frames, seen = [], []
    for _ in range(limit):
        m, f = next_message(ws)
        seen.append(m)
        if f is not None:
            frames.append(f)
        if m["type"] == "end":
            return frames, seen
    raise AssertionError("no end message")


def test_stream_frames_prompt_change_stop_and_record(app):
    ws = connect(app)
    try:
        m, first = start(ws, seed=3)
        assert m["block"] == 0 and m["prompt"] == PROMPT
        assert first.shape == (1, 32, 32, 3)  # the first video frame goes out alone, before the block is done
        got = [first]
        while sum(len(f) for f in got) < 9:  # the rest of block 0 (1 + 4 (3 - 1) frames)
            m, f = next_message(ws)
            if f is not None:
                got.append(f)
        ref = app.serving.engine.live(PROMPT, seed=3, pace=False, record=False, max_blocks=1)
        assert np.array_equal(np.concatenate(got), next(iter(ref)).frames)  # the engine's frames, bit for bit
        send(ws, type="prompt", text="a dragon")
        send(ws, type="prompt", text="a blue square moving up")
        seen = []
        while not any(m["type"] == "frames" and m["prompt"] == "a blue square moving up" for m in seen):
            seen.append(next_message(ws)[0])
            assert len(seen) < 200
        err = next(m for m in seen if m["type"] == "error")
        assert "dragon" in err["message"]
        ok = next(m for m in seen if m["type"] == "prompt_ok")
        switched = next(m for m in seen if m["type"] == "frames" and m["prompt"] == "a blue square moving up")
        assert switched["block"] == ok["block"]  # the block the server named is the one that changes
        blocks = [m for m in seen if m["type"] == "block"]
        assert blocks and {"fps", "realtime_factor", "block_p50"} <= set(blocks[-1]["stats"])
        send(ws, type="stop")
        _, seen = frames_until_end(ws)
        assert seen[-1] == {"type": "end", "reason": "stopped"}
        saved = next(m for m in seen if m["type"] == "saved")
        meta = httpx.get(app.url + saved["json"]).json()
        assert meta["seed"] == 3 and [p for _, p in meta["timeline"]] == [PROMPT, "a blue square moving up"]
        assert meta["timeline"][1][0] == ok["block"]
        assert httpx.get(app.url + saved["mp4"]).content[4:8] == b"ftyp"
        assert httpx.get(app.url + "live/download/nothere.mp4").status_code == 404
    finally:
        ws.close()
    time.sleep(0.5)  # the page is gone: its recording stays (a reloaded page offers it) until the sweep
    assert httpx.get(app.url + saved["mp4"]).status_code == 200
    app.serving.live_hub.sweep(max_age=0)
    assert httpx.get(app.url + saved["mp4"]).status_code == 404
    assert not any(p.name.startswith("live-") for p in app.serving.runs_dir.iterdir())


def test_server_limit_ends_the_stream_with_every_frame_recorded(app):
    ws = connect(app)
    try:
        m, first = start(ws, seed=0)
        frames, seen = frames_until_end(ws)
        frames.insert(0, first)
        assert seen[-1]["reason"] == "limit"
        n = sum(len(f) for f in frames)
        assert 4.0 * 16 <= n < 4.0 * 16 + 12  # ends with the block that reaches the limit
        saved = next(m for m in seen if m["type"] == "saved")
        assert httpx.get(app.url + saved["json"]).json()["num_frames"] == n
    finally:
        ws.close()


def test_bad_start_is_refused_and_the_socket_stays_usable(app):
    ws = connect(app)
    try:
        for msg, words in [(dict(type="start", prompt="", seed=0), "prompt is empty"),
                           (dict(type="start", prompt=PROMPT, seed=1.5), "seed must be an integer"),
                           (dict(type="start", prompt=PROMPT, seed=-1), "seed must be in [0, 2147483647]"),
                           (dict(type="start", prompt="a purple dragon", seed=0), "dragon"),
                           (dict(type="go"), "type': 'start'")]:
            send(ws, **msg)
            m = json.loads(ws.recv())
            assert m["type"] == "error" and m["fatal"] and words in m["message"], (msg, m)
        ws.send("not json")
        assert json.loads(ws.recv())["type"] == "error"
        start(ws, seed=0)
    finally:
        ws.close()


def test_admission_queues_the_second_viewer_and_a_closed_tab_frees_its_slot(app):
    a = connect(app)
    b = connect(app)
    try:
        start(a, seed=0)
        send(b, type="start", prompt=PROMPT, seed=1)
        assert json.loads(b.recv()) == {"type": "queued", "position": 1}
        t0 = time.perf_counter()
        a.close()  # the tab closes: the waiting viewer starts after the block in flight
        m, f = next_message(b)
        while f is None:
            m, f = next_message(b)
        assert m["block"] == 0 and time.perf_counter() - t0 < 10
        send(b, type="stop")
        frames_until_end(b)
    finally:
        a.close()
        b.close()


def test_stop_while_queued_leaves_the_line(app):
    a, b = connect(app), connect(app)
    try:
        start(a, seed=0)
        send(b, type="start", prompt=PROMPT, seed=1)
        assert json.loads(b.recv())["type"] == "queued"
        send(b, type="stop")
        assert json.loads(b.recv()) == {"type": "end", "reason": "stopped"}
        assert app.serving.live_hub.waiting == []
        send(a, type="stop")
        frames_until_end(a)
    finally:
        a.close()
        b.close()


def test_login_covers_the_live_socket():
    with running_app(tiny_app_engine(), auth=[("alice", "secret")]) as a:
        url = a.url.replace("http", "ws") + "live/ws"
        with pytest.raises(websocket.WebSocketBadStatusException, match="403"):
            websocket.create_connection(url, timeout=10)
        with httpx.Client() as c:
            assert c.post(a.url + "login", data={"username": "alice", "password": "secret"}).status_code == 200
            cookie = "; ".join(f"{k}={v}" for k, v in c.cookies.items())
            assert httpx.get(a.url + "live/download/x.mp4").status_code == 404
        ws = websocket.create_connection(url, timeout=10, cookie=cookie)
        try:
            assert json.loads(ws.recv())["type"] == "ready"
        finally:
            ws.close()


def test_decoder_choice_fast_by_default_where_the_checkpoint_has_one(app):
    from engine.models.fast_decoder import FastVideoDecoder
    from engine.pipeline import Engine

    ws = connect(app)  # the tiny engine has no fast decoder: only the VAE is offered, "fast" is refused
    try:
        send(ws, type="start", prompt=PROMPT, seed=0, decoder="fast")
        m = json.loads(ws.recv())
        assert m["type"] == "error" and "decoder must be one of 'vae'" in m["message"], m
    finally:
        ws.close()
    base = tiny_app_engine()
    torch.manual_seed(0)
    fast = FastVideoDecoder(latent_channels=base.vae.config.z_dim, channels=(8, 8, 6, 4), blocks_per_stage=2)
    eng = Engine(base.transformer, base.vae, base.text_encoder, base.tokenizer, fast_decoder=fast,
                 **base.config.__dict__)
    with running_app(eng, Limits.for_engine(eng, live_seconds=2.0)) as a:
        for decoder in (None, "vae"):
            ws = websocket.create_connection(a.url.replace("http", "ws") + "live/ws", timeout=60)
            try:
                assert json.loads(ws.recv())["decoders"] == ["fast", "vae"]
                send(ws, type="start", prompt=PROMPT, seed=2, **({} if decoder is None else {"decoder": decoder}))
                frames, seen = frames_until_end(ws)
            finally:
                ws.close()
            used = decoder or "fast"
            assert next(m for m in seen if m["type"] == "block")["stats"]["decoder"] == used
            ref = eng.live(PROMPT, seed=2, pace=False, record=False, max_blocks=1, decoder=used)
            assert np.array_equal(np.concatenate(frames)[:9], next(iter(ref)).frames)
