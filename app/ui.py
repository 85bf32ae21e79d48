"""The Gradio Blocks app: Generate, Noise attack and Model tabs around one loaded engine.

    demo = build_app(Serving(engine))
    demo.queue(...) is applied here already; launch with demo.launch(css=CSS, app_kwargs=...) as
    app/__main__.py does (launch_kwargs(demo)).

Events that run the model share one concurrency id per device with a limit of 1, so a generation and an attack
never run at the same time on a device; everything else (random seed, Stop, block-size changes) runs outside
the queue, so it never waits behind a model run and never takes a queue place. API names for programmatic
clients: "generate" and "attack".
"""

from __future__ import annotations

import random

import gradio as gr

from . import attack as attack_tab
from . import live as live_tab
from .examples import example_prompts, model_card, summary_json, vocabulary
from .generate import generate_stream
from .serving import MAX_SEED, SamplerSettings, Serving, fmt_step, valid_frames, with_settings


def _session(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


def refused_in_status(updates, status_index: int, outputs: int):
    """Pass a handler's updates on; if it raises gr.Error, first show the message in the status line (which
    "Waiting for the device…" would otherwise keep), then re-raise it for the pop-up and API clients."""
    try:
        yield from updates
    except gr.Error as e:
        update = [gr.skip()] * outputs
        update[status_index] = f"**{e.title or 'Refused'}** · {e.message}"
        yield tuple(update)
        raise


def server_checked(component):
    """Skip Gradio's own range check (and rounding) of a slider or number: its message names no field ("Value -1
    is less than minimum value 0."), and the handler checks every value with a message that does."""
    component.preprocess = lambda payload: payload
    return component


def launch_kwargs(demo: gr.Blocks) -> dict:
    """What demo.launch needs besides host and port: the page styles and the live page's routes."""
    return dict(css=CSS, app_kwargs={"routes": list(getattr(demo, "live_routes", []))})


def quiet_queue(demo: gr.Blocks, poll_seconds: float = 0.02, progress_seconds: float = 0.1) -> None:
    """Slow down the idle polling of Gradio's queue: it checks for new events every 1 ms and for progress every
    10 ms (about 1,100 wake-ups a second, 6-7% of a core on an idle server). 20 ms delays the start of a queued
    event by at most 20 ms; the app reports progress through its own status updates, not gr.Progress."""
    q = demo._queue
    if hasattr(q, "sleep_when_free"):
        q.sleep_when_free = max(q.sleep_when_free, poll_seconds)
    if hasattr(q, "progress_update_sleep_when_free"):
        q.progress_update_sleep_when_free = max(q.progress_update_sleep_when_free, progress_seconds)


# Page styles (pass to launch: demo.launch(css=CSS)): pixel-sharp upscaling of the small videos; room for the
# queue position Gradio shows in the status line's progress overlay.
CSS = """
video, canvas, #video video, .live-canvas { image-rendering: crisp-edges; image-rendering: pixelated; }
#status, #attack-status { min-height: 100px !important; overflow: visible !important; }
""" + live_tab.LIVE_CSS


def _frames_slider_update(serving: Serving, block_size, frames):
    """Re-range the frames slider so that it only offers lengths made of whole blocks of `block_size`."""
    try:
        k = int(block_size)
    except (TypeError, ValueError):
        return gr.skip()
    if not 1 <= k <= serving.limits.max_block_size:
        return gr.skip()
    base = serving.engine.config
    eng = with_settings(serving.engine, SamplerSettings(tuple(base.denoising_steps), k, base.local_attn_frames,
                                                        base.sink_frames))
    valid = valid_frames(eng, serving.limits.max_frames)
    if not valid:
        return gr.skip()
    try:
        current = float(frames)
    except (TypeError, ValueError):
        current = base.num_frames
    nearest = min(valid, key=lambda n: abs(n - current))
    step = valid[1] - valid[0] if len(valid) > 1 else 1
    return gr.update(minimum=valid[0], maximum=valid[-1], step=step, value=nearest)


def _frames_slider(serving: Serving, label: str, limit: int, elem_id: str | None = None) -> gr.Slider:
    eng = serving.engine
    valid = valid_frames(eng, limit) or [eng.config.num_frames]
    default = eng.config.num_frames if eng.config.num_frames in valid else valid[-1]
    step = valid[1] - valid[0] if len(valid) > 1 else 1
    return server_checked(gr.Slider(valid[0], valid[-1], value=default, step=step, label=label,
                                    info=f"{eng.config.fps} frames per second; at most {valid[-1]} on this server",
                                    elem_id=elem_id))


def build_app(serving: Serving, *, title: str = "Self-Forcing streaming video") -> gr.Blocks:
    eng, limits = serving.engine, serving.limits
    words = vocabulary(eng)
    examples = example_prompts(eng)
    cfg = eng.config

    serving.use_as_gradio_cache()  # before any component exists: they read GRADIO_TEMP_DIR when created
    age = int(serving.cache_max_age)
    with gr.Blocks(title=title, delete_cache=(max(60, age // 4), age)) as demo:
        gr.Markdown(f"## {title}\nCheckpoint `{eng.source}` on `{serving.device}` · "
                    f"{cfg.width}x{cfg.height} at {cfg.fps} fps · one run at a time per device; "
                    f"your place in the queue shows on the outputs while you wait.")
        with gr.Tabs():
            # ------------------------------------------------------------------------------- Generate
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=2):
                        prompt = gr.Textbox(label="Prompt", value=examples[0] if examples else "",
                                            max_length=limits.max_prompt_chars, lines=2, elem_id="prompt",
                                            info=("Words the model knows: " + ", ".join(words)) if words else None)
                        frames = _frames_slider(serving, "Frames", limits.max_frames, elem_id="frames")
                        with gr.Row(equal_height=True):
                            seed = server_checked(gr.Number(0, label="Seed", precision=None, scale=4, elem_id="seed",
                                             info=f"an integer in [0, {MAX_SEED}]"))
                            seed_btn = gr.Button("Random seed", scale=1, size="sm")
                        with gr.Accordion("Advanced settings", open=False):
                            step_choices = [fmt_step(t) for t in cfg.denoising_steps]
                            steps = gr.CheckboxGroup(step_choices, value=step_choices, label="Denoising steps",
                                                     info="The few-step list; the first step must stay selected. "
                                                          "Fewer steps: faster, blurrier.")
                            block = server_checked(gr.Slider(
                                1, limits.max_block_size, value=cfg.num_frame_per_block, step=1,
                                label="Block size (latent frames denoised together)"))
                            with gr.Row():
                                # No minimum / maximum / precision on the numbers: Gradio's own checks would
                                # round (1.5 -> 2) or refuse without naming the field; the handler checks.
                                window = server_checked(gr.Number(
                                    cfg.local_attn_frames or 0, precision=None,
                                    label="Attention window (latent frames, 0 = whole video)"))
                                sink = server_checked(gr.Number(cfg.sink_frames, precision=None,
                                                                label="Sink frames (kept in the window)"))
                        with gr.Row():
                            gen_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
                        if examples:
                            gr.Examples([[p] for p in examples], inputs=[prompt], label="Examples")
                    with gr.Column(scale=3):
                        video = gr.Video(label="Video (plays while it is generated)", streaming=True, autoplay=True,
                                         interactive=False, elem_id="video", height=420)
                        status = gr.Markdown("Ready.", label="Status", elem_id="status")
                        download = gr.File(label="Download mp4", interactive=False, elem_id="download", height=120)

                def arm_generate(request: gr.Request):
                    serving.stops.arm(_session(request), "generate")
                    return None, "Waiting for the device…"

                def generate(prompt: str, frames: int, seed: int, steps: list[str], block_size: int,
                             attention_window: int, sink_frames: int, request: gr.Request):
                    """Generate a video, streamed as H.264 chunks while it is made; returns (stream, status, mp4)."""
                    session = _session(request)
                    stop = serving.stops.take(session, "generate")
                    try:
                        yield from refused_in_status(generate_stream(
                            serving, prompt, frames, seed, steps, block_size, attention_window, sink_frames,
                            stop=stop), status_index=1, outputs=3)
                    finally:
                        serving.stops.release(session, "generate", stop)

                def stop_generate(request: gr.Request):
                    if serving.stops.stop(_session(request), "generate"):
                        return "**Stopping** · the run ends after the current block (a queued run as soon as its " \
                               "turn comes)."
                    return gr.skip()

                armed = gr.on([gen_btn.click, prompt.submit], arm_generate, None, [download, status],
                              queue=False, api_visibility="private")
                armed.then(generate, [prompt, frames, seed, steps, block, window, sink], [video, status, download],
                           api_name="generate", concurrency_id=serving.concurrency_id, concurrency_limit=1,
                           show_progress="minimal", show_progress_on=[status])
                stop_btn.click(stop_generate, None, status, queue=False, api_visibility="private")
                seed_btn.click(lambda: random.randint(0, MAX_SEED), None, seed, queue=False,
                               api_visibility="private")
                block.change(lambda b, f: _frames_slider_update(serving, b, f), [block, frames], frames,
                             queue=False, api_visibility="private")

            # ------------------------------------------------------------------------------- Live
            with gr.Tab("Live", id="live"):
                live_tab.build_tab(serving, demo)

            # ------------------------------------------------------------------------------- Noise attack
            with gr.Tab("Noise attack", id="attack"):
                attack_tab.build_tab(serving)

            # ------------------------------------------------------------------------------- Model
            with gr.Tab("Model", id="model"):
                with gr.Row():
                    with gr.Column(scale=3):
                        gr.Markdown(model_card(eng))
                    with gr.Column(scale=2):
                        gr.Code(summary_json(eng, limits), language="json", label="Configuration", interactive=False)
                codebook = _codebook_summary(serving)
                if codebook is not None:  # quantized checkpoints: codebook usage, perplexity, dead codes, code maps
                    gr.Markdown(codebook[0])
                    gr.Gallery(codebook[1], label="Codebook analysis", columns=2, height="auto")

    demo.queue(max_size=limits.queue_size, default_concurrency_limit=1)
    quiet_queue(demo)
    return demo


def _codebook_summary(serving: Serving):
    """Codebook analysis of a quantized engine, computed once at start-up; None for unquantized engines."""
    from engine.models.quantized_wan import QuantizedCausalWanTransformer3DModel

    if not isinstance(serving.engine.transformer, QuantizedCausalWanTransformer3DModel):
        return None
    from engine.quantized.analysis import model_tab_summary

    with serving.device_lock:
        return model_tab_summary(serving.engine, serving.workdir / "codebook")
