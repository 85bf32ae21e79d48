"""The live page's endpoint (/live/ws) on the launched app, driven by a WebSocket client: frames per block as
raw RGB, a prompt change mid-stream, a refused prompt (the stream goes on), Stop + the recording, admission."""

from __future__ import annotations

import json
import threading

import httpx
import numpy as np
import pytest

from app.live import FairLock
from app.serving import Limits
from app.testing import running_app, tiny_app_engine

from starlette.testclient import TestClient  # noqa: E402
PROMPT = "a red circle moving left"


@pytest.fixture(scope="module")
def app():
    eng = tiny_app_engine()
    with running_app(eng, Limits.for_engine(eng, max_live_streams=1)) as a:
        yield a


class _WS:
    """A WebSocket session on the launched app's own ASGI app (Starlette's test client, in process)."""

    def __init__(self, app):
        self.cm = TestClient(app.demo.app).websocket_connect("/live/ws")

    def __enter__(self):
        self.ws = self.cm.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            self.cm.__exit__(*exc)
        except Exception:
            pass

    def send(self, text):
        self.ws.send_text(text)

    def recv(self):
        m = self.ws.receive()
        if m.get("text") is not None:
            return m["text"]
        if m.get("bytes") is not None:
            return m["bytes"]
        raise ConnectionError(m)

    def close(self):
        self.ws.close()


def connect(app):
    return _WS(app)


def next_block(ws):
    while True:
        m = json.loads(ws.recv())
        if m["type"] == "block":
            data = ws.recv()
            return m, np.frombuffer(data, np.uint8).reshape(m["frames"], m["height"], m["width"], 3)
        if m["type"] in ("error", "prompt_ok", "queued"):
            return m, None


def test_live_stream_blocks_prompt_change_stop_and_record(app):
    with connect(app) as ws:
        ws.send(json.dumps({"type": "start", "prompt": PROMPT, "seed": 3}))
        m, frames = next_block(ws)
        assert m["block"] == 0 and frames.shape == (9, 32, 32, 3) and m["prompt"] == PROMPT
        ref = app.serving.engine.live(PROMPT, seed=3, pace=False, record=False, max_blocks=1)
        assert np.array_equal(frames, next(iter(ref)).frames)  # the engine's own frames, bit for bit
        ws.send(json.dumps({"type": "prompt", "text": "a dragon"}))
        ws.send(json.dumps({"type": "prompt", "text": "a blue square moving up"}))
        seen = []
        while len(seen) < 30 and not any(m.get("prompt") == "a blue square moving up" and m["type"] == "block"
                                          for m in seen):
            m, _ = next_block(ws)
            seen.append(m)
        kinds = [m["type"] for m in seen]
        assert "error" in kinds and "does not know the word" in next(m for m in seen if m["type"] == "error")["message"]
        ok = next(m for m in seen if m["type"] == "prompt_ok")
        blocks = [m for m in seen if m["type"] == "block"]
        assert any(b["prompt"] == "a blue square moving up" and b["block"] >= ok["block"] for b in blocks)
        ws.send(json.dumps({"type": "stop"}))
        saved = end = None
        while end is None:
            msg = ws.recv()
            if isinstance(msg, str):
                m = json.loads(msg)
                saved = m if m["type"] == "saved" else saved
                end = m if m["type"] == "end" else None
        assert end["reason"] == "stopped"
    meta = httpx.get(app.url + saved["json"]).json()
    assert meta["seed"] == 3 and [p for _, p in meta["timeline"]] == [PROMPT, "a blue square moving up"]
    assert httpx.get(app.url + saved["mp4"]).content[4:8] == b"ftyp"


def test_bad_start_is_refused_and_admission_queues_the_second_viewer(app):
    with connect(app) as ws:
        ws.send(json.dumps({"type": "start", "prompt": "", "seed": 0}))
        m = json.loads(ws.recv())
        assert m["type"] == "error" and "prompt is empty" in m["message"]
    with connect(app) as a:
        a.send(json.dumps({"type": "start", "prompt": PROMPT, "seed": 0}))
        assert next_block(a)[0]["type"] == "block"
        with connect(app) as b:
            b.send(json.dumps({"type": "start", "prompt": PROMPT, "seed": 1}))
            assert json.loads(b.recv()) == {"type": "queued", "position": 1}
            a.close()  # a closed tab frees its slot: the waiting viewer starts
            m, frames = next_block(b)
            while m["type"] != "block":
                m, frames = next_block(b)
            assert m["block"] == 0


def test_fair_lock_is_fifo():
    lock, order = FairLock(), []
    lock.__enter__()
    threads = [threading.Thread(target=lambda i=i: (lock.__enter__(), order.append(i), lock.__exit__()))
               for i in range(3)]
    for t in threads:
        t.start()
        import time
        time.sleep(0.05)
    lock.__exit__()
    [t.join(5) for t in threads]
    assert order == [0, 1, 2]
