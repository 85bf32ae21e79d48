"""The Live tab: an open-ended stream pushed to the browser block by block over a WebSocket on Gradio's server.

Gradio's streaming gr.Video plays HLS chunks of >= 1 s, so its first frame shows about a second after the click.
Here every decoded block goes out at once as raw RGB bytes (64x64x3 bytes a frame) and a few lines of JS draw
the frames on a pixel-sharp <canvas>, paced by requestAnimationFrame at the video's fps.

Protocol on /live/ws (JSON text from the client, JSON text + binary from the server):

    client: {"type": "start", "prompt": ..., "seed": ...} | {"type": "prompt", "text": ...} | {"type": "stop"}
            | {"type": "save"}
    server: {"type": "queued", "position": n}   while every live slot is taken (admission control)
            {"type": "block", "block", "frames", "height", "width", "fps", "prompt", "stats"} then one binary
            message of frames x height x width x 3 bytes (uint8 RGB)
            {"type": "prompt_ok", "block"} | {"type": "error", "message"} (a refused prompt: the stream goes on)
            {"type": "saved", "mp4", "json"} | {"type": "end", "reason"}

Streams share the device per block through a FIFO lock (a bare threading.Lock lets one thread take it again and
again); at most Limits.max_live_streams run at once, the others wait with their position shown; a closed tab
ends its stream within one block (the receive loop sees the disconnect and closes the LiveStream).
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import uuid

from .serving import InputError, Serving, check_prompt, check_seed


class FairLock:
    """A FIFO lock: threads get it in the order they asked (each block of each stream waits its turn)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._held = False

    def __enter__(self):
        me = object()
        with self._cond:
            self._queue.append(me)
            while self._held or self._queue[0] is not me:
                self._cond.wait()
            self._queue.popleft()
            self._held = True
        return self

    def __exit__(self, *exc):
        with self._cond:
            self._held = False
            self._cond.notify_all()


class LiveHub:
    """Admission control and the shared per-block lock of all live streams of one server."""

    def __init__(self, serving: Serving):
        self.serving = serving
        self.lock = FairLock()
        self._cond = asyncio.Condition()
        self.running = 0
        self.waiting: list[object] = []
        self.saved: dict[str, object] = {}  # id -> run directory holding live.mp4 / live.json

    async def admit(self, ticket, on_position) -> None:
        async with self._cond:
            self.waiting.append(ticket)
            try:
                while self.running >= self.serving.limits.max_live_streams or self.waiting[0] is not ticket:
                    await on_position(self.waiting.index(ticket) + 1)
                    await self._cond.wait()
            finally:
                self.waiting.remove(ticket)
                self._cond.notify_all()
            self.running += 1

    async def leave(self) -> None:
        async with self._cond:
            self.running -= 1
            self._cond.notify_all()


def check_start(serving: Serving, msg: dict) -> tuple[str, int]:
    prompt = check_prompt(msg.get("prompt"), serving.limits)
    seed = check_seed(msg.get("seed", 0))
    eng = serving.engine
    if eng.tokenizer is not None:
        from engine.models.text import check_prompts

        check_prompts(eng.tokenizer, [prompt])
    return prompt, seed


def routes(serving: Serving, hub: LiveHub):
    """The Starlette routes of the live page: the WebSocket and the recording's downloads."""
    from starlette.responses import FileResponse, PlainTextResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocketDisconnect

    def authorised(conn) -> bool:
        app = conn.scope.get("app")
        if getattr(app, "auth", None) is None and getattr(app, "auth_dependency", None) is None:
            return True
        cid = getattr(app, "cookie_id", "")
        token = conn.cookies.get(f"access-token-{cid}") or conn.cookies.get(f"access-token-unsecure-{cid}")
        return token in getattr(app, "tokens", {})

    async def ws_endpoint(ws):
        if not authorised(ws):
            await ws.close(code=4401)
            return
        await ws.accept()
        send = ws.send_text
        try:
            msg = json.loads(await ws.receive_text())
            try:
                prompt, seed = check_start(serving, msg)
            except (InputError, ValueError) as e:
                await send(json.dumps({"type": "error", "message": str(e), "fatal": True}))
                await ws.close()
                return
            ticket = object()
            await hub.admit(ticket, lambda n: send(json.dumps({"type": "queued", "position": n})))
        except WebSocketDisconnect:
            return
        try:
            await _stream(serving, hub, ws, prompt, seed)
        finally:
            await hub.leave()

    async def download(request):
        run = hub.saved.get(request.path_params["id"])
        ext = request.path_params["ext"]
        if run is None or ext not in ("mp4", "json") or not authorised(request):
            return PlainTextResponse("not found", status_code=404)
        path = run / f"live.{ext}"
        if not path.exists():
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(path, filename=f"live-{request.path_params['id']}.{ext}")

    return [WebSocketRoute("/live/ws", ws_endpoint), Route("/live/download/{id}.{ext}", download)]


def _switch(live, lock, text: str) -> int:
    """set_prompt at a block no computation has started yet: LiveStream.set_prompt(text) targets live.block, which
    the block being computed in the worker thread may already have passed (its switch would then never apply).
    Under the device lock no block is being computed; live.block + 1 is then the next block or the one after."""
    with lock:
        return live.set_prompt(text, at_block=live.block + 1)


async def _stream(serving: Serving, hub: LiveHub, ws, prompt: str, seed: int) -> None:
    from starlette.websockets import WebSocketDisconnect

    limits = serving.limits
    live = serving.engine.live(prompt, seed=seed, lookahead_blocks=1, pace=True, lock=hub.lock,
                               max_seconds=limits.live_seconds, record=True)
    sid = uuid.uuid4().hex[:12]
    run = serving.runs_dir / f"live-{sid}"
    run.mkdir(parents=True, exist_ok=True)
    hub.saved[sid] = run
    reason = ["limit"]

    async def save():
        await asyncio.to_thread(live.save, run / "live.mp4")
        await ws.send_text(json.dumps({"type": "saved", "mp4": f"live/download/{sid}.mp4",
                                       "json": f"live/download/{sid}.json"}))

    async def receive():
        try:
            while True:
                msg = json.loads(await ws.receive_text())
                kind = msg.get("type")
                if kind == "prompt":
                    try:
                        text = check_prompt(msg.get("text"), limits)
                        block = await asyncio.to_thread(_switch, live, hub.lock, text)
                        await ws.send_text(json.dumps({"type": "prompt_ok", "block": block, "prompt": text}))
                    except ValueError as e:
                        await ws.send_text(json.dumps({"type": "error", "message": str(e)}))
                elif kind == "stop":
                    reason[0] = "stopped"
                    live.close()
                    return
                elif kind == "save":
                    await save()
        except (WebSocketDisconnect, RuntimeError):
            reason[0] = "disconnected"
            live.close()  # the stream ends after its current block

    receiver = asyncio.create_task(receive())
    it = iter(live)
    try:
        while True:
            chunk = await asyncio.to_thread(next, it, None)
            if chunk is None:
                break
            f = chunk.frames  # (T, H, W, 3) uint8
            s = live.stats
            await ws.send_text(json.dumps({
                "type": "block", "block": chunk.block, "frames": int(f.shape[0]), "height": int(f.shape[1]),
                "width": int(f.shape[2]), "fps": live.fps, "prompt": chunk.prompt,
                "stats": {"fps": s["fps"], "realtime_factor": s["realtime_factor"], "block_p50": s["block_p50"],
                          "seconds_video": s["seconds_video"]}}))
            await ws.send_bytes(f.tobytes())
    except (WebSocketDisconnect, RuntimeError):
        reason[0] = "disconnected"
    finally:
        live.close()
        receiver.cancel()
    if reason[0] != "disconnected":
        try:
            await save()
            await ws.send_text(json.dumps({"type": "end", "reason": reason[0]}))
            await ws.close()
        except Exception:  # the client went away meanwhile; the recording is saved
            pass
    else:
        await asyncio.to_thread(live.save, run / "live.mp4")


LIVE_JS = r"""
const $ = (s) => element.querySelector(s);
const canvas = $('canvas'), ctx = canvas.getContext('2d'), status = $('.live-status');
let ws = null, queue = [], fps = 16, last = null, meta = null, info = {};
window.liveFirstPaint = null; window.liveClickTime = null; window.livePainted = 0;
function show() {
  const s = info.stats || {};
  status.textContent = (info.state || 'Ready.') + (info.block !== undefined ? ` · block ${info.block}` : '') +
    (s.fps ? ` · ${s.fps.toFixed(1)} frames/s generated · ${s.realtime_factor.toFixed(2)}x real time` : '') +
    (info.prompt ? ` · prompt: ${info.prompt}` : '') + (info.note ? ` · ${info.note}` : '');
}
function draw(t) {
  if (ws === null && queue.length === 0) return;
  if (queue.length && (last === null || t - last >= 1000 / fps - 1)) {
    const img = queue.shift(); ctx.putImageData(img, 0, 0); window.livePainted += 1;
    if (window.liveFirstPaint === null) window.liveFirstPaint = performance.now();
    last = (last === null || t - last > 2000 / fps) ? t : last + 1000 / fps;
  }
  requestAnimationFrame(draw);
}
function start() {
  if (ws) return;
  window.liveClickTime = performance.now(); window.liveFirstPaint = null; window.livePainted = 0;
  queue = []; last = null; info = {state: 'Connecting…'}; show();
  $('.live-downloads').innerHTML = '';
  const url = new URL('live/ws', document.baseURI); url.protocol = url.protocol.replace('http', 'ws');
  ws = new WebSocket(url); ws.binaryType = 'arraybuffer';
  ws.onopen = () => ws.send(JSON.stringify({type: 'start', prompt: $('.live-prompt').value,
                                            seed: Number($('.live-seed').value)}));
  ws.onmessage = (ev) => {
    if (typeof ev.data !== 'string') {
      const n = meta.height * meta.width * 4, src = new Uint8Array(ev.data);
      for (let f = 0; f < meta.frames; f++) {
        const img = ctx.createImageData(meta.width, meta.height), d = img.data;
        for (let i = 0, j = f * meta.height * meta.width * 3; i < n; i += 4, j += 3) {
          d[i] = src[j]; d[i + 1] = src[j + 1]; d[i + 2] = src[j + 2]; d[i + 3] = 255; }
        queue.push(img);
      }
      return;
    }
    const m = JSON.parse(ev.data);
    if (m.type === 'block') {
      meta = m; fps = m.fps;
      if (canvas.width !== m.width) { canvas.width = m.width; canvas.height = m.height; }
      info = {state: 'Live', block: m.block, stats: m.stats, prompt: m.prompt};
      if (m.block === 0) requestAnimationFrame(draw);
    } else if (m.type === 'queued') { info = {state: `Queued: position ${m.position} for a live slot`}; }
    else if (m.type === 'prompt_ok') { info.note = `prompt applies from block ${m.block}`; }
    else if (m.type === 'error') { info.note = 'Refused: ' + m.message; }
    else if (m.type === 'saved') {
      $('.live-downloads').innerHTML = `<a class="live-mp4" href="${m.mp4}" download>mp4</a> · ` +
        `<a class="live-json" href="${m.json}" download>timeline JSON</a>`;
    } else if (m.type === 'end') { info.state = m.reason === 'stopped' ? 'Stopped' : 'Ended (server limit)'; }
    show();
  };
  ws.onclose = () => { ws = null; if (info.state === 'Live' || info.state === 'Connecting…') info.state = 'Closed'; show(); };
}
$('.live-start').addEventListener('click', start);
$('.live-stop').addEventListener('click', () => ws && ws.send(JSON.stringify({type: 'stop'})));
$('.live-save').addEventListener('click', () => ws && ws.send(JSON.stringify({type: 'save'})));
$('.live-prompt').addEventListener('keydown', (e) => {
  if (e.key === 'Enter') { e.preventDefault(); if (ws) ws.send(JSON.stringify({type: 'prompt', text: e.target.value})); else start(); }
});
show();
"""


def live_html(prompt: str, width: int, height: int) -> str:
    import html

    return f"""
<div class="live-box">
  <input class="live-prompt" id="live-prompt" type="text" value="{html.escape(prompt)}" style="width:60%">
  seed <input class="live-seed" id="live-seed" type="number" value="0" step="1" style="width:7em">
  <button class="live-start" id="live-start">Start</button> <button class="live-stop" id="live-stop">Stop</button>
  <button class="live-save" id="live-save">Record: save so far</button>
  <div><canvas class="live-canvas" id="live-canvas" width="{width}" height="{height}"
        style="width:384px;height:384px;image-rendering:pixelated;background:#000"></canvas></div>
  <div class="live-status" id="live-status" style="min-height:3em"></div>
  <div class="live-downloads" id="live-downloads"></div>
</div>"""


def build_tab(serving: Serving, demo) -> None:
    """The Live tab inside ui.build_app's Blocks; its routes go to demo.live_routes (see ui.launch_kwargs)."""
    import gradio as gr

    from .examples import example_prompts

    hub = LiveHub(serving)
    serving.live_hub = hub
    demo.live_routes = routes(serving, hub)
    examples = example_prompts(serving.engine)
    cfg = serving.engine.config
    gr.Markdown("Frames are pushed to the page as each block is decoded. Enter in the prompt box applies a new "
                f"prompt from the next block; at most {serving.limits.max_live_streams} live streams at once, "
                f"each up to {serving.limits.live_seconds:g} s.")
    gr.HTML(live_html(examples[0] if examples else "", cfg.width, cfg.height), js_on_load=LIVE_JS,
            elem_id="live")
