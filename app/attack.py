"""The Noise-attack tab: optimise the sampler noise of one video against an objective, with live curves.

The handler runs `Engine.attack` (engine/attack/optimize.py) in a worker thread and turns its per-iteration
callback into UI updates: the loss curve (a matplotlib figure in `gr.Plot`) and a status line after every iteration, the
current iterate's video every few seconds, and at the end the baseline and attacked videos side by side,
perturbation and Gaussianity statistics, the optimised noise (safetensors) and a report (zip of the result
directory `AttackResult.save` writes).

Ownership: the handler takes the device lock and hands it to the worker, which releases it when the attack
really ends. So a Stop, a cancel or a closed browser (which close the handler between updates, on Gradio's
event loop) never wait for an iteration to finish, and the next job cannot start while the old iteration is
still computing. Stop is passed to the attack through its callback (return True) and takes effect after the
current iteration; the best point found so far is still returned.
"""

from __future__ import annotations

import math
import queue
import random
import re
import shutil
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np
import torch

from engine.attack.budget import KINDS as BUDGETS
from engine.attack.optimize import LEARNABLE, OPTIMIZERS, AttackSettings, resolve_budget
from engine.sampling.noise import MODES
from engine.models.text import check_prompts
from engine.video import write_mp4

from .serving import (MAX_SEED, InputError, Serving, check_choice, check_float, check_frames, check_int,
                      check_prompt, check_seed, user_errors, valid_frames)

OBJECTIVES = {"untargeted": "Untargeted: push the video away from the baseline",
              "targeted": "Targeted: pull the video toward a colour"}
PREVIEW_EVERY = 3.0  # seconds between previews of the current iterate's video
HEARTBEAT = 1.0  # seconds between no-op updates while an iteration runs


def parse_colour(value) -> tuple[float, float, float]:
    """'#rrggbb', '#rgb', 'rgb(r, g, b)' or 'rgba(r, g, b, a)' -> RGB in [0, 1]."""
    s = str(value or "").strip().lower()
    m = re.fullmatch(r"#([0-9a-f]{6})|#([0-9a-f]{3})", s)
    if m:
        h = m.group(1) or "".join(c * 2 for c in m.group(2))
        return tuple(int(h[i:i + 2], 16) / 255 for i in (0, 2, 4))
    m = re.fullmatch(r"rgba?\(\s*([\d.]+)\s*,\s*([\d.]+)\s*,\s*([\d.]+)\s*(?:,\s*[\d.]+\s*)?\)", s)
    if m and all(float(g) <= 255 for g in m.groups()):
        return tuple(float(g) / 255 for g in m.groups())
    raise InputError(f"target colour must look like '#ff0000' or 'rgb(255, 0, 0)', got {value!r}")


@dataclass
class AttackRequest:
    """A checked attack request: what Engine.attack receives."""

    prompt: str
    seed: int
    num_frames: int
    objective: str
    target: tuple | None
    budget: dict | None
    steps: int
    lr: float
    learn: tuple
    step_noise_mode: str
    optimizer: str

    def kwargs(self) -> dict:
        kw = dict(seed=self.seed, num_frames=self.num_frames, objective=self.objective, budget=self.budget,
                  steps=self.steps, lr=self.lr, learn=self.learn, step_noise_mode=self.step_noise_mode,
                  optimizer=self.optimizer)
        if self.target is not None:
            kw["target"] = torch.tensor(self.target, dtype=torch.float32)  # (3,): broadcast over (T, H, W, 3)
        return kw


def check_request(serving: Serving, prompt, seed, num_frames, objective, target_colour, budget_kind, eps,
                  iterations, lr, learn, step_noise_mode, optimizer) -> AttackRequest:
    """Every value against the limits and the attack's own settings check, before any model call."""
    limits, eng = serving.limits, serving.engine
    prompt = check_prompt(prompt, limits)
    if eng.tokenizer is not None:
        check_prompts(eng.tokenizer, [prompt])
    objective = check_choice(objective, "objective", tuple(OBJECTIVES))
    budget_kind = check_choice(budget_kind, "budget", BUDGETS)
    budget = None
    if budget_kind != "none":
        eps = check_float(eps, "budget eps", 0.0, limits.max_budget, lo_open=True)
        budget = dict(kind=budget_kind, eps=eps)
    if isinstance(learn, str):
        learn = [learn]
    learn = tuple(check_choice(x, "learned noise", LEARNABLE) for x in (learn or []))
    if not learn:
        raise InputError("choose what the attack learns: z0, the step noise, or both")
    req = AttackRequest(
        prompt=prompt, seed=check_seed(seed),
        num_frames=check_frames(eng, num_frames, limits.max_attack_frames),
        objective=objective, target=parse_colour(target_colour) if objective == "targeted" else None,
        budget=budget, steps=check_int(iterations, "iterations", 1, limits.max_iterations),
        lr=check_float(lr, "learning rate", 0.0, limits.max_lr, lo_open=True), learn=learn,
        step_noise_mode=check_choice(step_noise_mode, "step-noise mode", MODES),
        optimizer=check_choice(optimizer, "optimizer", OPTIMIZERS))
    AttackSettings(steps=req.steps, lr=req.lr, learn=req.learn, step_noise_mode=req.step_noise_mode,
                   optimizer=req.optimizer)  # the engine's own consistency rules (e.g. 'step' needs independent)
    resolve_budget(req.budget)
    return req


# ------------------------------------------------------------------------------------------------ worker

@dataclass
class _Job:
    """State shared by the handler and the worker thread of one attack."""

    run_dir: Path
    stop: threading.Event
    events: queue.Queue = field(default_factory=queue.Queue)
    done: threading.Event = field(default_factory=threading.Event)
    abandoned: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def finish(self) -> None:
        """Worker side: the attack is over; clean up if the handler has gone."""
        with self.lock:
            self.done.set()
            if self.abandoned:
                shutil.rmtree(self.run_dir, ignore_errors=True)

    def abandon(self) -> None:
        """Handler side: stop the attack; the run directory goes with whichever side ends last."""
        self.stop.set()
        with self.lock:
            self.abandoned = True
            if self.done.is_set():
                shutil.rmtree(self.run_dir, ignore_errors=True)


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    return (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def _work(serving: Serving, req: AttackRequest, job: _Job) -> None:
    """The worker thread: baseline, attack, result files. Holds the device lock (taken by the handler)."""
    eng, put = serving.engine, job.events.put
    try:
        with torch.no_grad():  # the baseline first, so the user sees it while the attack runs
            noise = eng.make_noise(req.num_frames, req.seed, mode=req.step_noise_mode)
            base = eng.generate(req.prompt, noise=noise)
        put(("baseline", write_mp4(job.run_dir / "baseline.mp4", base.frames, eng.config.fps)))
        last_preview = [0.0]

        def callback(info: dict) -> bool:
            entry = {k: v for k, v in info.items() if k not in ("video", "latents", "noise")}
            preview = None
            now = time.monotonic()
            if info.get("video") is not None and now - last_preview[0] >= PREVIEW_EVERY and not job.stop.is_set():
                last_preview[0] = now
                preview = write_mp4(job.run_dir / f"iterate-{entry['iteration']:05d}.mp4",
                                    _to_uint8(info["video"]), eng.config.fps)
            put(("iteration", (entry, preview)))
            return job.stop.is_set()

        result = eng.attack(req.prompt, callback=callback, **req.kwargs())
        out = job.run_dir / "result"
        result.save(out)
        noise_path = job.run_dir / f"noise-seed{req.seed}.safetensors"
        shutil.copyfile(out / "noise.safetensors", noise_path)
        report = job.run_dir / f"attack-report-seed{req.seed}.zip"
        with zipfile.ZipFile(report, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(out.iterdir()):
                z.write(f, f"attack-seed{req.seed}/{f.name}")
        attacked = write_mp4(job.run_dir / "attacked.mp4", _to_uint8(result.attacked_video), result.fps)
        put(("done", (result, attacked, str(noise_path), str(report))))
    except BaseException as e:  # reported to the handler, which turns it into a gr.Error
        put(("error", e))
    finally:
        serving.device_lock.release()
        job.finish()


# ------------------------------------------------------------------------------------------------ handler

def _curve(history: list[dict]):
    """The loss curve as a matplotlib Figure: 'loss' and 'best so far' against the iteration, integer ticks; None
    (an empty plot) when there is no finite point yet. (Gradio's LinePlot put fractional ticks on the integer
    axis of short runs and clipped its title; it offers no tick control.)"""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    its, losses, bests, best = [], [], [], math.inf
    for h in history:
        loss = h.get("loss")
        if loss is None or not math.isfinite(loss):
            continue
        best = min(best, loss)
        its.append(h["iteration"])
        losses.append(loss)
        bests.append(best)
    if not its:
        return None
    fig = Figure(figsize=(6.4, 2.6), dpi=100, layout="constrained")  # no pyplot: nothing global to leak
    ax = fig.add_subplot()
    ax.plot(its, losses, marker="o" if len(its) < 30 else None, ms=3, label="loss")
    ax.plot(its, bests, ls="--", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useMathText=True)  # "x10^-6", not "-6"
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title("Loss (minimised)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.loss_history = {"iteration": its, "loss": losses, "best": bests}  # the numbers, for tests
    return fig


def _fmt(x, spec=".4g") -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def _status(entry: dict, req: AttackRequest, elapsed: float, head: str = "Attacking") -> str:
    it = entry["iteration"] + 1
    return (f"**{head}** · iteration {it} of {req.steps} · objective {_fmt(entry.get('objective'))} "
            f"(best {_fmt(entry.get('best_value'))}) · PSNR to baseline {_fmt(entry.get('psnr'), '.2f')} dB · "
            f"perturbation RMS {_fmt(entry.get('delta_rms'), '.3g')} · {elapsed / it:.2f} s per iteration")


def stats_markdown(result) -> str:
    """Perturbation, video change and Gaussianity of the optimised noise, as a Markdown report."""
    m, s = result.metrics, result.summary()
    lines = [f"**{result.stop_reason}** · best objective {_fmt(result.best_value)} at iteration "
             f"{result.best_iteration} (baseline {_fmt(result.baseline_value)}) · {result.seconds:.1f} s",
             "",
             "| video and perturbation | value |", "|---|---|",
             f"| MSE to baseline | {_fmt(m.get('mse'))} |",
             f"| PSNR to baseline (dB) | {_fmt(m.get('psnr'), '.2f')} |",
             f"| SSIM to baseline | {_fmt(m.get('ssim'))} |",
             f"| latent MSE | {_fmt(m.get('latent_mse'))} |",
             f"| perturbation RMS (noise std) | {_fmt(m.get('delta_rms'))} |",
             f"| perturbation L-inf (noise std) | {_fmt(m.get('delta_linf'))} |",
             "",
             "| Gaussianity | mean | std | norm / sqrt(d) | KS statistic | KS p-value |", "|---|---|---|---|---|---|"]
    for name, g in result.gaussianity.items():
        g0 = result.gaussianity_initial.get(name, {})
        for label, d in ((f"{name} initial", g0), (f"{name} attacked", g)):
            lines.append(f"| {label} | {_fmt(d.get('mean'), '.3g')} | {_fmt(d.get('std'), '.4f')} | "
                         f"{_fmt(d.get('norm_ratio'), '.4f')} | {_fmt(d.get('ks'), '.4f')} | "
                         f"{_fmt(d.get('ks_pvalue'), '.3g')} |")
    eps = "" if s["eps"] is None else f" eps {s['eps']:g}"
    lines += ["", f"Learned: {s['learn']} · step-noise mode {s['mode']} · budget {s['budget']}{eps} · "
                  f"optimizer {result.settings.get('optimizer')}"]
    return "\n".join(lines)


def attack_stream(serving: Serving, prompt, seed, num_frames, objective, target_colour, budget_kind, eps,
                  iterations, lr, learn, step_noise_mode, optimizer, stop: threading.Event | None = None):
    """Generator of (curve, status, baseline video, attacked video, statistics, noise file, report file).

    gr.skip() leaves an output as it is. The curve and status change every iteration; the attacked video
    shows the current iterate every few seconds and the best point at the end.
    """
    stop = stop or threading.Event()
    skip = gr.skip
    with user_errors(serving.device):
        req = check_request(serving, prompt, seed, num_frames, objective, target_colour, budget_kind, eps,
                            iterations, lr, learn, step_noise_mode, optimizer)
    empty = None  # clears the plot
    if stop.is_set():
        yield empty, "**Stopped** before it started.", skip(), skip(), skip(), skip(), skip()
        return
    while not serving.device_lock.acquire(timeout=0.25):  # released by the worker
        if stop.is_set():
            yield empty, "**Stopped** while waiting for the device.", skip(), skip(), skip(), skip(), skip()
            return
    try:
        run_dir = serving.new_run_dir()
    except BaseException:
        serving.device_lock.release()
        raise
    job = _Job(run_dir, stop)
    t0 = time.perf_counter()
    worker = threading.Thread(target=_work, args=(serving, req, job), name="attack-worker", daemon=True)
    try:
        worker.start()
    except BaseException:
        serving.device_lock.release()
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    history: list[dict] = []
    baseline = None
    try:
        yield (empty, f"**Generating the baseline** ({req.num_frames} frames, seed {req.seed})…", None, None,
               "", None, None)
        while True:
            try:
                kind, payload = job.events.get(timeout=HEARTBEAT)
            except queue.Empty:  # a no-op update: lets Gradio close this handler promptly on a cancel
                yield skip(), skip(), skip(), skip(), skip(), skip(), skip()
                continue
            if kind == "baseline":
                baseline = payload
                yield skip(), f"**Attacking** · {req.steps} iterations…", baseline, skip(), skip(), skip(), skip()
            elif kind == "iteration":
                entry, preview = payload
                history.append(entry)
                yield (_curve(history), _status(entry, req, time.perf_counter() - t0), skip(),
                       preview if preview is not None else skip(), skip(), skip(), skip())
            elif kind == "error":
                with user_errors(serving.device):
                    raise payload
            else:
                result, attacked, noise_file, report = payload
                head = "Stopped" if stop.is_set() else "Done"
                status = (f"**{head}** · {result.iterations} iterations in {result.seconds:.1f} s · best objective "
                          f"{_fmt(result.best_value)} at iteration {result.best_iteration} · PSNR to baseline "
                          f"{_fmt(result.metrics.get('psnr'), '.2f')} dB")
                # everything again in the final update: a client reading only the final result gets it all
                yield (_curve(result.history), status, baseline, attacked, stats_markdown(result), noise_file, report)
                return
    finally:
        job.abandon()


def build_tab(serving: Serving) -> None:
    """The tab's components and events (called inside the Blocks context of ui.build_app)."""
    eng, limits = serving.engine, serving.limits
    from .examples import example_prompts
    from .ui import server_checked

    examples = example_prompts(eng)
    valid = valid_frames(eng, limits.max_attack_frames) or [eng.config.num_frames]
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", value=examples[0] if examples else "", lines=2,
                                max_length=limits.max_prompt_chars, elem_id="attack-prompt")
            with gr.Row(equal_height=True):
                seed = server_checked(gr.Number(0, label="Seed", precision=None, scale=4,
                                                info=f"an integer in [0, {MAX_SEED}]"))
                seed_btn = gr.Button("Random seed", scale=1, size="sm")
            frames = server_checked(gr.Slider(valid[0], valid[-1], value=valid[0], step=(valid[1] - valid[0]) if len(valid) > 1
                               else 1, label="Frames", info="Attacks back-propagate through the whole video: "
                               f"keep it short (at most {valid[-1]} here)"))
            objective = gr.Radio([(v, k) for k, v in OBJECTIVES.items()], value="untargeted", label="Objective")
            target = gr.ColorPicker("#ff0000", label="Target colour", visible=False)
            with gr.Row():
                budget = gr.Radio(list(BUDGETS), value="l2", label="Budget",
                                  info="l2: RMS change <= eps; linf: every element changes <= eps; none: unbounded")
                eps = server_checked(gr.Number(0.1, label=f"eps (noise std units, at most {limits.max_budget:g})"))
            with gr.Row():
                iterations = server_checked(gr.Slider(1, limits.max_iterations, value=min(10, limits.max_iterations),
                                                      step=1, label="Iterations"))
                lr = server_checked(gr.Number(0.05, label=f"Learning rate (at most {limits.max_lr:g})"))
            learn = gr.CheckboxGroup(list(LEARNABLE), value=["z0"], label="Learned noise",
                                     info="z0: the initial noise; step: the noise re-injected between steps")
            mode = gr.Radio(list(MODES), value="independent", label="Step-noise mode",
                            info="independent: its own tensors; derived: permutations of z0; frozen: fixed")
            with gr.Accordion("Optimizer", open=False):
                optimizer = gr.Radio(list(OPTIMIZERS), value="adam", label="Optimizer",
                                     info="pgd: signed (linf) or normalised (l2) steps, as Madry et al.")
            with gr.Row():
                run_btn = gr.Button("Run attack", variant="primary", elem_id="attack-btn")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="attack-stop-btn")
        with gr.Column(scale=3):
            curve = gr.Plot(label="Loss (minimised)", show_label=False, format="png", elem_id="attack-curve")
            status = gr.Markdown("Ready.", label="Status", elem_id="attack-status")
            with gr.Row():
                baseline = gr.Video(label="Baseline", interactive=False, autoplay=True, loop=True)
                attacked = gr.Video(label="Attacked (current iterate while running)", interactive=False,
                                    autoplay=True, loop=True)
            stats = gr.Markdown(label="Statistics")
            with gr.Row():
                noise_file = gr.File(label="Optimised noise (safetensors)", interactive=False, height=90)
                report_file = gr.File(label="Report (zip)", interactive=False, height=90)

    def arm(request: gr.Request):
        serving.stops.arm(getattr(request, "session_hash", None), "attack")
        return "Waiting for the device…"

    def attack(prompt: str, seed: int, frames: int, objective: str, target_colour: str, budget: str, eps: float,
               iterations: int, lr: float, learn: list[str], step_noise_mode: str, optimizer: str,
               request: gr.Request):
        """Optimise the sampler noise against an objective; live curve, both videos, statistics and files."""
        session = getattr(request, "session_hash", None)
        flag = serving.stops.take(session, "attack")
        from .ui import refused_in_status

        try:
            yield from refused_in_status(attack_stream(
                serving, prompt, seed, frames, objective, target_colour, budget, eps, iterations, lr, learn,
                step_noise_mode, optimizer, stop=flag), status_index=1, outputs=7)
        finally:
            serving.stops.release(session, "attack", flag)

    def stop(request: gr.Request):
        if serving.stops.stop(getattr(request, "session_hash", None), "attack"):
            return "**Stopping** · the attack ends after the current iteration and keeps the best point so far."
        return gr.skip()

    armed = run_btn.click(arm, None, status, queue=False, api_visibility="private")
    armed.then(attack, [prompt, seed, frames, objective, target, budget, eps, iterations, lr, learn, mode,
                        optimizer], [curve, status, baseline, attacked, stats, noise_file, report_file],
               api_name="attack", concurrency_id=serving.concurrency_id, concurrency_limit=1,
               show_progress="minimal", show_progress_on=[status])
    stop_btn.click(stop, None, status, queue=False, api_visibility="private")
    seed_btn.click(lambda: random.randint(0, MAX_SEED), None, seed, queue=False,
                   api_visibility="private")
    objective.change(lambda o: gr.update(visible=o == "targeted"), objective, target, queue=False,
                     api_visibility="private")
    budget.change(lambda b: gr.update(interactive=b != "none"), budget, eps, queue=False, api_visibility="private")
