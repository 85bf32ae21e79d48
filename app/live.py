"""The Live tab: an open-ended stream pushed to the browser frame by frame over a WebSocket on Gradio's server.

Gradio's streaming gr.Video plays HLS chunks of >= 1 s, so its first frame shows about a second after the click.
Here every decoded latent frame goes out at once as raw RGB bytes (64x64x3 bytes a video frame), and a few lines
of JS draw the frames on a pixel-sharp <canvas>, paced by requestAnimationFrame at the video's fps. The page opens
its WebSocket when it loads, so a click costs no connection set-up.

Protocol on /live/ws (JSON text from the client; JSON text and binary from the server):

    client: {"type": "start", "prompt", "seed"[, "decoder": "fast" | "vae"]} | {"type": "prompt", "text"} | {"type": "stop"} | {"type": "save"}
    server: {"type": "ready", "fps", "height", "width", "max_seconds", "decoders"}   once, when the socket opens
            {"type": "queued", "position": n}    while every live slot is taken (admission control)
            {"type": "frames", "block", "n", "height", "width", "prompt"} then one binary message of
                n x height x width x 3 bytes (uint8 RGB), as soon as a latent frame is decoded
            {"type": "block", "block", "stats"}  after each block: fps, real-time factor, latency
            {"type": "prompt_ok", "block", "prompt"} | {"type": "error", "message"} (refused; the stream goes on)
            {"type": "started", "id", "mp4", "json"}   where the recording will be (the page remembers it)
            {"type": "saved", "mp4", "json"} | {"type": "end", "reason"}   reason: stopped, limit, error

One scheduler thread advances all live streams together (engine.live.LiveGroup): each round every stream that
pacing lets go computes its block, in turns, and the round's blocks are decoded in one batched VAE call, which on
this CPU serves about twice the streams that taking turns does. At most Limits.max_live_streams run at once; the
others wait, shown their position. A closed tab ends its stream after the block being computed (the receive loop
sees the disconnect and closes the LiveStream; the next round drops it). Generate and Attack jobs use the device
lock of serving.py and run beside live streams, not between their blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
import time
import uuid

from engine.live import LiveGroup

from .serving import InputError, Serving, check_choice, check_prompt, check_seed

log = logging.getLogger("app")


class LiveHub:
    """Admission control and the scheduler of all live streams of one server: one thread advances them together
    (engine.live.LiveGroup: blocks in turns, decoded in one batch), handing each stream's chunks to its socket."""

    def __init__(self, serving: Serving):
        self.serving = serving
        self.group = LiveGroup()
        self._sinks: dict[int, object] = {}
        self._thread: threading.Thread | None = None
        self.running = 0
        self.waiting: list[object] = []
        self.saved: dict[str, object] = {}  # stream id -> its run directory (live.mp4, live.json)
        self.closed_at: dict[str, float] = {}  # stream id -> when its page went away
        self._cond: asyncio.Condition | None = None  # made on the server's event loop

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    def attach(self, live, sink) -> None:
        """Schedule a stream; sink(item) is called in the scheduler thread with each StreamChunk, then None when
        it ends (closed or at its limit) or the exception it failed with."""
        self._sinks[id(live)] = sink
        self.group.add(live)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="live-scheduler", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        g, stop = self.group, self.serving._closed
        while not stop.is_set():
            with g.cond:
                if not g.streams:
                    g.cond.wait(0.5)
                    continue
            made = False
            for stream, item in g.step():
                sink = self._sinks.get(id(stream)) if item is not None and not isinstance(item, BaseException) \
                    else self._sinks.pop(id(stream), None)
                made |= item is not None and not isinstance(item, BaseException)
                if sink is not None:
                    sink(item)
            if not made:  # nobody was due: sleep until the next is (short naps, so a close is seen soon)
                due = g.next_due()
                stop.wait(0.02 if due is None else min(0.02, max(0.002, due)))

    def sweep(self, max_age: float | None = None) -> None:
        """Delete the recordings of pages that went away more than max_age (default cache_max_age) seconds ago: a
        page that lost its connection can still fetch its recording after a reload, and a long server keeps none."""
        max_age = self.serving.cache_max_age if max_age is None else max_age
        now = time.monotonic()
        for sid, t in list(self.closed_at.items()):
            if now - t >= max_age:
                del self.closed_at[sid]
                shutil.rmtree(self.saved.pop(sid), ignore_errors=True)

    async def admit(self, ticket, on_position) -> None:
        """Wait for a live slot (FIFO); on_position(n) is awaited whenever the waiting position changes."""
        cond, shown = self._condition(), None
        async with cond:
            self.waiting.append(ticket)
            try:
                while self.running >= self.serving.limits.max_live_streams or self.waiting[0] is not ticket:
                    pos = self.waiting.index(ticket) + 1
                    if pos != shown:
                        await on_position(pos)
                        shown = pos
                    await cond.wait()
            finally:
                self.waiting.remove(ticket)
                cond.notify_all()
            self.running += 1

    async def leave(self) -> None:
        cond = self._condition()
        async with cond:
            self.running -= 1
            cond.notify_all()


def decoders(engine) -> list[str]:
    """The decoders a live stream of this engine can use, the default first (the fast one where there is one)."""
    return ["fast", "vae"] if engine.fast_decoder is not None else ["vae"]


def check_start(serving: Serving, msg: dict) -> tuple[str, int, str]:
    if not isinstance(msg, dict) or msg.get("type") != "start":
        raise InputError("send {'type': 'start', 'prompt': ..., 'seed': ...} to start a stream")
    prompt = check_prompt(msg.get("prompt"), serving.limits)
    seed = check_seed(msg.get("seed", 0))
    have = decoders(serving.engine)
    decoder = check_choice(msg.get("decoder", have[0]), "decoder", have)
    tok = serving.engine.tokenizer
    if tok is not None:
        from engine.models.text import check_prompts

        check_prompts(tok, [prompt])
    return prompt, seed, decoder


def _authorised(conn) -> bool:
    """The app's login (demo.launch(auth=...)) covers the live routes too: Gradio's access-token cookie."""
    app = conn.scope.get("app")
    if getattr(app, "auth", None) is None and getattr(app, "auth_dependency", None) is None:
        return True
    cid = getattr(app, "cookie_id", "")
    token = conn.cookies.get(f"access-token-{cid}") or conn.cookies.get(f"access-token-unsecure-{cid}")
    return token in getattr(app, "tokens", {})


def routes(serving: Serving, hub: LiveHub):
    """The Starlette routes of the live page: the WebSocket and the recording's downloads."""
    from starlette.responses import FileResponse, PlainTextResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocketDisconnect

    async def ws_endpoint(ws):
        if not _authorised(ws):
            await ws.close(code=4401)
            return
        await ws.accept()
        cfg = serving.engine.config
        await ws.send_text(json.dumps({"type": "ready", "fps": int(cfg.fps), "height": cfg.height,
                                       "width": cfg.width, "max_seconds": serving.limits.live_seconds,
                                       "decoders": decoders(serving.engine)}))
        hub.sweep()
        mine: list[str] = []  # this socket's recordings: kept for cache_max_age after the page goes away
        try:
            while True:  # one stream at a time per socket; the page reuses its socket for the next Start
                try:
                    msg = json.loads(await ws.receive_text())
                    prompt, seed, decoder = check_start(serving, msg)
                except (InputError, ValueError) as e:  # JSONDecodeError is a ValueError
                    await ws.send_text(json.dumps({"type": "error", "message": str(e), "fatal": True}))
                    continue
                if not await _wait_for_slot(hub, ws):
                    continue
                try:
                    if await _stream(serving, hub, ws, prompt, seed, decoder, mine) == "disconnected":
                        return
                finally:
                    await hub.leave()
        except (WebSocketDisconnect, RuntimeError):
            return
        finally:
            now = time.monotonic()
            hub.closed_at.update((sid, now) for sid in mine)

    async def download(request):
        run = hub.saved.get(request.path_params["id"])
        ext = request.path_params["ext"]
        if run is None or ext not in ("mp4", "json") or not _authorised(request):
            return PlainTextResponse("not found", status_code=404)
        path = run / f"live.{ext}"
        if not path.exists():
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(path, filename=f"live-{request.path_params['id']}.{ext}")

    return [WebSocketRoute("/live/ws", ws_endpoint), Route("/live/download/{id}.{ext}", download)]


async def _wait_for_slot(hub: LiveHub, ws) -> bool:
    """Admission: wait in line for a live slot, showing the position; Stop (or a closed tab) leaves the line."""
    admit = asyncio.create_task(
        hub.admit(object(), lambda n: ws.send_text(json.dumps({"type": "queued", "position": n}))))
    while not admit.done():
        recv = asyncio.create_task(ws.receive_text())
        done, _ = await asyncio.wait({admit, recv}, return_when=asyncio.FIRST_COMPLETED)
        if recv not in done:
            recv.cancel()
            break
        exc = recv.exception()
        try:
            msg = None if exc is not None else json.loads(recv.result())
        except ValueError:
            msg = None
        if exc is not None or (isinstance(msg, dict) and msg.get("type") == "stop"):
            admit.cancel()
            try:
                await admit
                await hub.leave()  # admitted in the same instant: give the slot back
            except asyncio.CancelledError:
                pass
            if exc is not None:
                raise exc
            await ws.send_text(json.dumps({"type": "end", "reason": "stopped"}))
            return False
    await admit
    return True


async def _stream(serving: Serving, hub: LiveHub, ws, prompt: str, seed: int, decoder: str, mine: list[str]) -> str:
    """Run one live stream on this socket until Stop, the server's limit, an error or a disconnect; returns why."""
    from starlette.websockets import WebSocketDisconnect

    limits, loop = serving.limits, asyncio.get_running_loop()
    outbox: asyncio.Queue = asyncio.Queue()  # what the generating thread hands to this loop, in order

    def on_frames(block, frames):  # in the generating thread, during block `block`: hand over, never block it
        loop.call_soon_threadsafe(outbox.put_nowait, ("frames", block, frames, live.prompt))

    live = serving.engine.live(prompt, seed=seed, lookahead_blocks=1, pace=True, decoder=decoder,
                               max_seconds=limits.live_seconds, record=True, on_frames=on_frames)
    sid = uuid.uuid4().hex[:12]
    run = serving.runs_dir / f"live-{sid}"
    run.mkdir(parents=True, exist_ok=True)
    hub.saved[sid] = run
    mine.append(sid)
    links = {"mp4": f"live/download/{sid}.mp4", "json": f"live/download/{sid}.json"}
    await ws.send_text(json.dumps({"type": "started", "id": sid, **links}))
    reason = ["limit"]

    async def save():
        await asyncio.to_thread(live.save, run / "live.mp4")
        await ws.send_text(json.dumps({"type": "saved", **links}))

    async def receive():
        try:
            while True:
                msg = json.loads(await ws.receive_text())
                kind = msg.get("type") if isinstance(msg, dict) else None
                if kind == "prompt":
                    try:
                        text = check_prompt(msg.get("text"), limits)
                        block = live.set_prompt(text)  # validated first; takes effect at the next unstarted block
                        await ws.send_text(json.dumps({"type": "prompt_ok", "block": block, "prompt": text}))
                    except ValueError as e:
                        await ws.send_text(json.dumps({"type": "error", "message": str(e)}))
                elif kind == "stop":
                    reason[0] = "stopped"
                    live.close()
                    return
                elif kind == "save":
                    if live.recorder.num_frames:
                        await save()
                else:
                    await ws.send_text(json.dumps({"type": "error", "message": f"unknown message {msg!r:.80}"}))
        except (WebSocketDisconnect, RuntimeError, ValueError):
            reason[0] = "disconnected"
            live.close()  # the stream ends after its current block
            outbox.put_nowait(None)

    def sink(item):  # in the scheduler thread: a StreamChunk, None (ended) or an exception (failed)
        loop.call_soon_threadsafe(outbox.put_nowait, ("chunk", item))

    receiver = asyncio.create_task(receive())
    hub.attach(live, sink)
    try:
        while True:
            item = await outbox.get()
            if item is None:  # the page went away: the stream ends after its block in flight
                reason[0] = "disconnected"
                continue
            if item[0] == "chunk":
                chunk = item[1]
                if chunk is None:
                    break
                if isinstance(chunk, BaseException):
                    log.error("live stream %s failed: %s", sid, chunk)
                    reason[0] = "error" if reason[0] != "disconnected" else reason[0]
                    if reason[0] == "error":
                        await ws.send_text(json.dumps({"type": "error", "message": str(chunk)}))
                    break
                if reason[0] != "disconnected":
                    st = live.stats
                    await ws.send_text(json.dumps({"type": "block", "block": chunk.block, "stats": {
                        "fps": st["fps"], "realtime_factor": st["realtime_factor"], "block_p50": st["block_p50"],
                        "seconds_video": st["seconds_video"], "recaches": st["recaches"], "decoder": decoder}}))
            elif item[0] == "frames" and reason[0] != "disconnected":
                _, block, frames, shown_prompt = item
                await ws.send_text(json.dumps({"type": "frames", "block": block, "n": int(frames.shape[0]),
                                               "height": int(frames.shape[1]), "width": int(frames.shape[2]),
                                               "prompt": shown_prompt}))
                await ws.send_bytes(frames.tobytes())
    except (WebSocketDisconnect, RuntimeError):
        reason[0] = "disconnected"
        live.close()
        while True:  # the slot is free once the scheduler has let the stream go (after its block in flight)
            item = await outbox.get()
            if item is not None and item[0] == "chunk" and (item[1] is None or isinstance(item[1], BaseException)):
                break
    finally:
        live.close()
        receiver.cancel()
    if reason[0] == "disconnected":
        if live.recorder.num_frames:
            await asyncio.to_thread(live.save, run / "live.mp4")
        return reason[0]
    if live.recorder.num_frames:
        await save()
    await ws.send_text(json.dumps({"type": "end", "reason": reason[0]}))
    return reason[0]


LIVE_JS = r"""
const $ = (s) => element.querySelector(s);
const canvas = $('canvas'), ctx = canvas.getContext('2d'), status = $('.live-status');
let ws = null, running = false, pending = null, queue = [], fps = 16, clock = null, meta = null, info = {};
window.liveStats = {ready: false, click: null, firstPaint: null, painted: 0, stalls: 0, gaps: []};
function show() {
  const s = info.stats || {};
  status.textContent = (info.state || 'Ready.') + (info.block !== undefined ? ` · block ${info.block}` : '') +
    (s.fps ? ` · ${s.fps.toFixed(1)} frames/s generated · ${s.realtime_factor.toFixed(2)}x real time` : '') +
    (s.decoder ? ` · ${s.decoder} decoder` : '') +
    (info.prompt ? ` · prompt: ${info.prompt}` : '');
  $('.live-note').textContent = info.note || '';
}
function draw(t) {
  // one frame per 1/fps; a frame that arrives late starts a new clock (counted as a stall), never a burst
  if (queue.length && (clock === null || t >= clock)) {
    const [img, p, b] = queue.shift(); ctx.putImageData(img, 0, 0);
    const L = window.liveStats; L.painted += 1;
    if (L.firstPaint === null) L.firstPaint = performance.now();
    if (clock !== null && t - clock > 1000 / fps) { L.stalls += 1; L.gaps.push(t - clock); }
    clock = (clock === null || t - clock > 1000 / fps) ? t + 1000 / fps : clock + 1000 / fps;
    if (p !== info.prompt || b !== info.block) { info.prompt = p; info.block = b; show(); }
  }
  if (running || queue.length) requestAnimationFrame(draw);
}
function links(m, what) {
  $('.live-downloads').innerHTML = `${what}: <a class="live-mp4" href="${m.mp4}" download>mp4</a> · ` +
    `<a class="live-json" href="${m.json}" download>timeline JSON</a>`;
}
function lastRecording() {  // the page was reloaded or lost its connection: its last stream is still on the server
  let m = null; try { m = JSON.parse(localStorage.getItem('liveLast')); } catch (e) {}
  if (m && m.json) fetch(new URL(m.json, document.baseURI), {method: 'HEAD'})
    .then((r) => { if (r.ok && !running) links(m, 'Last recording'); }).catch(() => {});
}
function connect() {
  const url = new URL('live/ws', document.baseURI); url.protocol = url.protocol.replace('http', 'ws');
  ws = new WebSocket(url); ws.binaryType = 'arraybuffer';
  ws.onopen = () => { if (pending) { ws.send(pending); pending = null; } };
  ws.onmessage = (ev) => {
    if (typeof ev.data !== 'string') {
      if (!running) return;  // the tail of a stopped stream: not shown (it is in the recording)
      // frame 0 goes out alone, as soon as it exists; the clock of the rest starts when the next frames come
      if (window.liveStats.painted === 1 && queue.length === 0) clock = null;
      const n = meta.height * meta.width, src = new Uint8Array(ev.data);
      for (let f = 0; f < meta.n; f++) {
        const img = ctx.createImageData(meta.width, meta.height), d = img.data;
        for (let i = 0, j = f * n * 3; i < 4 * n; i += 4, j += 3) {
          d[i] = src[j]; d[i + 1] = src[j + 1]; d[i + 2] = src[j + 2]; d[i + 3] = 255; }
        queue.push([img, meta.prompt, meta.block]);
      }
      if (clock === null) requestAnimationFrame(draw);
      return;
    }
    const m = JSON.parse(ev.data);
    if (m.type === 'ready') { fps = m.fps; window.liveStats.ready = true; }
    else if (m.type === 'frames') {
      meta = m;
      if (canvas.width !== m.width) { canvas.width = m.width; canvas.height = m.height; }
      if (info.state !== 'Live') { info.state = 'Live'; show(); }
      return;
    } else if (m.type === 'block') { info.stats = m.stats; }
    else if (m.type === 'queued') { info.state = `Queued: position ${m.position} for a live slot`; }
    else if (m.type === 'prompt_ok') { info.note = `New prompt from block ${m.block}: ${m.prompt}`; }
    else if (m.type === 'error') { info.note = 'Refused: ' + m.message; if (m.fatal) { running = false; info.state = 'Not started'; } }
    else if (m.type === 'started') { try { localStorage.setItem('liveLast', JSON.stringify(m)); } catch (e) {} }
    else if (m.type === 'saved') { links(m, 'Recording'); }
    else if (m.type === 'end') {
      running = false;
      info.state = {stopped: 'Stopped', limit: 'Ended: the server limit of one stream', error: 'Ended by an error'}[m.reason] || 'Ended';
    }
    show();
  };
  ws.onclose = () => { ws = null; window.liveStats.ready = false; if (running) { running = false; info.state = 'Disconnected'; show(); } };
}
function send(obj) {
  const text = JSON.stringify(obj);
  if (ws && ws.readyState === 1) ws.send(text); else { pending = text; if (!ws) connect(); }
}
function start() {
  if (running) return;
  const L = window.liveStats; L.click = performance.now(); L.firstPaint = null; L.painted = 0; L.stalls = 0; L.gaps = [];
  running = true; queue = []; clock = null; info = {state: 'Starting…'}; show();
  $('.live-downloads').innerHTML = '';
  const msg = {type: 'start', prompt: $('.live-prompt').value, seed: Number($('.live-seed').value)};
  if ($('.live-decoder')) msg.decoder = $('.live-decoder').value;
  send(msg);
}
$('.live-start').addEventListener('click', start);
$('.live-stop').addEventListener('click', () => {
  if (!running) return;
  running = false; queue = []; info.state = 'Stopping…'; show(); send({type: 'stop'});
});
$('.live-save').addEventListener('click', () => running && send({type: 'save'}));
$('.live-prompt').addEventListener('keydown', (e) => {
  if (e.key !== 'Enter') return;
  e.preventDefault();
  if (running) send({type: 'prompt', text: e.target.value}); else start();
});
connect(); show(); lastRecording();
"""


def live_html(prompt: str, width: int, height: int, decoder_names: list[str]) -> str:
    import html

    choose = ""
    if len(decoder_names) > 1:  # the fast decoder first (the default): the full VAE is the slower, exact one
        options = "".join(f'<option value="{d}">{ {"fast": "fast decoder", "vae": "full VAE"}[d]}</option>'
                          for d in decoder_names)
        choose = f'<label>decoder <select class="live-decoder" id="live-decoder">{options}</select></label>'

    return f"""
<div class="live-box">
  <div class="live-row">
    <input class="live-prompt" id="live-prompt" type="text" value="{html.escape(prompt)}"
           aria-label="prompt (Enter applies it while the stream runs)">
    <label>seed <input class="live-seed" id="live-seed" type="number" value="0" min="0" step="1"></label>
    {choose}
    <button class="live-start" id="live-start">Start</button>
    <button class="live-stop" id="live-stop">Stop</button>
    <button class="live-save" id="live-save">Record: save so far</button>
  </div>
  <canvas class="live-canvas" id="live-canvas" width="{width}" height="{height}"></canvas>
  <div class="live-status" id="live-status"></div>
  <div class="live-note" id="live-note"></div>
  <div class="live-downloads" id="live-downloads"></div>
</div>"""


LIVE_CSS = """
.live-row { display: flex; gap: 0.5em; align-items: center; flex-wrap: wrap; margin-bottom: 0.5em; }
.live-prompt { flex: 1 1 20em; padding: 0.4em; }
.live-seed { width: 7em; }
.live-canvas { width: 384px; height: 384px; background: #000; display: block; }
.live-status, .live-note { min-height: 1.5em; }
.live-row button { padding: 0.4em 1.2em; border-radius: var(--button-large-radius); font-weight: 600;
                   border: 1px solid var(--button-secondary-border-color);
                   background: var(--button-secondary-background-fill); color: var(--button-secondary-text-color); }
.live-row button.live-start { background: var(--button-primary-background-fill);
                              color: var(--button-primary-text-color); border-color: transparent; }
.live-row button.live-stop { background: var(--button-cancel-background-fill);
                             color: var(--button-cancel-text-color); border-color: transparent; }
"""


def warm_up(serving: Serving) -> float:
    """Run one block of a live stream, so the first viewer does not pay the first call's one-time costs (memory
    pools, kernels' first use); returns its seconds."""
    import time

    from .examples import example_prompts

    t0 = time.perf_counter()
    prompts = example_prompts(serving.engine) or ["a red circle moving left"]
    for decoder in decoders(serving.engine):
        with serving.engine.live(prompts[0], seed=0, pace=False, record=False, max_blocks=1, decoder=decoder) as live:
            for _ in live:
                pass
    return time.perf_counter() - t0


def build_tab(serving: Serving, demo) -> None:
    """The Live tab inside ui.build_app's Blocks; its routes go to demo.live_routes (see ui.launch_kwargs)."""
    import gradio as gr

    from .examples import example_prompts

    hub = LiveHub(serving)
    serving.live_hub = hub
    demo.live_routes = routes(serving, hub)
    examples = example_prompts(serving.engine)
    cfg = serving.engine.config
    gr.Markdown("Frames are pushed to the page as they are decoded. While it runs, Enter in the prompt box applies "
                f"a new prompt from the next block. At most {serving.limits.max_live_streams} live streams run at "
                f"once (later ones wait in line), each up to {serving.limits.live_seconds:g} s of video.")
    gr.HTML(live_html(examples[0] if examples else "", cfg.width, cfg.height, decoders(serving.engine)),
            js_on_load=LIVE_JS,
            elem_id="live")
