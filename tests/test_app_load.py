"""Load: 8 concurrent clients on loopback against a small queue.

Every request must complete or be refused with a clear queue-full error; the server must answer other requests
meanwhile; no two model runs may overlap on the device (generation and attack share it); and no temporary file
may be left behind, neither the app's own nor (after shutdown) Gradio's cache.
"""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest

pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from gradio_client.utils import QueueError  # noqa: E402

from app.serving import Limits  # noqa: E402
from app.testing import SlowEngine, decode_frames, fetch_stream, running_app, tiny_app_engine  # noqa: E402
from engine.video import read_video  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
                                reason="Gradio's streaming gr.Video needs ffmpeg and ffprobe on PATH")

STEPS = ["1000", "750", "500", "250"]
PROMPT = "a red circle moving left"
CLIENTS = 8
QUEUE_SIZE = 3


class ProbedEngine(SlowEngine):
    """Counts the model runs in progress (every generation and every attack iteration goes through stream)."""

    block_delay = 0.3
    lock = threading.Lock()
    active = 0
    most = 0

    def stream(self, *args, **kwargs):
        cls = ProbedEngine
        with cls.lock:
            cls.active += 1
            cls.most = max(cls.most, cls.active)
        try:
            yield from super().stream(*args, **kwargs)
        finally:
            with cls.lock:
                cls.active -= 1


def test_eight_concurrent_clients(tmp_path, monkeypatch):
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)  # the app then keeps Gradio's cache in its workdir
    eng = tiny_app_engine()
    eng.__class__ = ProbedEngine
    limits = Limits.for_engine(eng, queue_size=QUEUE_SIZE)
    outcomes: dict[int, object] = {}
    start = threading.Barrier(CLIENTS, timeout=60)  # all clients connected, then all submit at once

    with running_app(eng, limits) as app:
        def one(i: int) -> None:
            try:
                client = Client(app.url, verbose=False, download_files=False)
                start.wait()
                if i % 4 == 3:  # a quarter of the clients attack: they share the device with generation
                    job = client.submit(PROMPT, i, 9, "untargeted", "#ff0000", "l2", 0.1, 2, 0.05, ["z0"],
                                        "independent", "adam", api_name="/attack")
                else:
                    job = client.submit(PROMPT, 21, i, STEPS, 3, 0, 0, api_name="/generate")
                outcomes[i] = job.result(timeout=150)
            except Exception as e:  # noqa: BLE001 - every outcome is checked below
                outcomes[i] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        latencies = []
        while any(t.is_alive() for t in threads):  # the server keeps answering while it is busy
            t0 = time.perf_counter()
            assert httpx.get(app.url + "config", timeout=10).status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.2)
        for t in threads:
            t.join()

        done = {i: r for i, r in outcomes.items() if not isinstance(r, Exception)}
        refused = {i: r for i, r in outcomes.items() if isinstance(r, Exception)}
        print(f"{len(done)} completed, {len(refused)} refused (queue full); /config answered in at most "
              f"{max(latencies):.2f} s during the burst")
        assert len(outcomes) == CLIENTS
        for i, e in refused.items():
            assert isinstance(e, QueueError) and "queue is full" in str(e).lower(), (i, repr(e))
        assert len(done) >= 2 and len(refused) >= 1, outcomes
        for i, r in done.items():
            if i % 4 == 3:
                curve, status, base, att, stats, noise, report = r
                assert "Done" in status and base is not None and att is not None
            else:
                stream, status, download = r
                assert "Done" in status
                assert decode_frames(fetch_stream(stream)[0], "mpegts").shape[0] == 21
                assert read_video(httpx.get(download["url"]).content)[0].shape[0] == 21
        assert ProbedEngine.most == 1  # one model run at a time on the device
        assert max(latencies) < 5.0, latencies

        # after the burst: a new request is served, and nothing is left in the app's working directory
        stream, status, download = Client(app.url, verbose=False, download_files=False).predict(
            PROMPT, 9, 0, STEPS, 3, 0, 0, api_name="/generate")
        assert "Done" in status
        assert list(app.serving.runs_dir.iterdir()) == []
        workdir, cache = app.serving.workdir, app.serving.cache_dir
        assert cache.is_relative_to(workdir) and any(p.is_file() for p in cache.rglob("*"))
    assert not workdir.exists()  # the served files (Gradio's cache) went with the app
