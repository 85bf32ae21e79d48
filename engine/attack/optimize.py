"""The noise-attack loop: optimise the noise a streaming few-step sampler consumes against an objective.

    result = engine.attack("a red circle moving left", seed=3, objective="untargeted",
                           budget=Budget("l2", eps=0.1), steps=50, lr=0.02)
    result.save("runs/attack-3")

What happens, once per iteration:

    noise (leaves: z0 and / or step noises)
      -> Engine.stream(noise=..., decode=False)     # differentiable: KV cache in its non-in-place mode,
                                                     # per-layer checkpointing inside every transformer call
      -> CheckpointedDecoder.decode(block)           # causal VAE decode, checkpointed per latent frame
      -> objective(video, latents) -> loss (+ ReNO chi-shell regulariser)
      -> torch.autograd.grad(loss, learned noise)    # only the paths that reach the noise: no weight gradients
      -> Adam / SGD step or a PGD step, then projection onto the budget around the initial noise

Memory. Without checkpointing, autograd keeps every activation of every transformer call (blocks x (steps + 1)
calls) and of every decoder frame until the backward pass. With `checkpointing=True` (default) only the
inputs of each transformer layer call and of each decoded latent frame are kept and the rest is recomputed
during backward: one extra forward for a much smaller footprint. The decoder's forward is most of an iteration's
cost on a small model, so `decoder_checkpoint="auto"` (default) keeps the stream's last latent frames without a
checkpoint (never recomputed) as far as what they save stays within the baseline generation's memory: all of them
on the default model, a part on large ones; the last frame is never recomputed (its backward comes first, so
recomputing it would save no peak memory). What still grows with the stream is what the forward needs anyway: the
KV cache and the per-call inputs (benchmarks/bench_attack.py, benchmarks/bench_attack_cost.py measure it).

Cost. The engine's weights are frozen (requires_grad off) for the duration of the loop and the gradient is taken
with `torch.autograd.grad` with respect to the learned noise alone: no backward node computes a weight gradient,
no parameter accumulates a `.grad` (as much memory as the weights), and the forward saves only what the noise's
gradient needs (a linear or convolution layer with a frozen weight keeps nothing of its input).

Gradient paths through the KV cache. Later blocks attend to earlier blocks' cached K/V, so the loss on a late
frame reaches early noise through the cache as well as directly. `detach_cache=True` cuts those paths (faster;
the gradient of the last block's own noise is unchanged, the earlier blocks' gradients become partial).

Papers: projected gradient descent with sign steps and random start (Madry et al. 2018, "Towards Deep Learning
Models Resistant to Adversarial Attacks"); the chi-shell norm regulariser and noise optimisation through a
few-step generator (Eyring et al. 2024, "ReNO: Enhancing One-step Text-to-Image Models through Reward-based
Noise Optimization"); Adam (Kingma & Ba 2015); activation checkpointing (Chen et al. 2016, "Training Deep Nets
with Sublinear Memory Cost").
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from ..sampling.block_sampler import Conditioning
from ..sampling.codec import CheckpointedDecoder, count_saved, num_video_frames, spatial_compression
from ..sampling.noise import MODES, SamplerNoise
from .budget import Budget, gaussianity, sample_norms
from .metrics import mse, psnr, ssim
from .objectives import CallableObjective, Objective, Untargeted, make_objective
from .result import AttackResult

OPTIMIZERS = ("adam", "sgd", "pgd")
LR_SCHEDULES = ("constant", "cosine", "linear")
LEARNABLE = ("z0", "step")
DECODER_CHECKPOINTS = ("auto", "frame", "block", "off")
TRANSFORMER_CHECKPOINTS = ("auto", "layer", "off")
DEFAULT_START_SCALE = 0.05  # random-start radius (noise std units) when the budget has no eps


# ------------------------------------------------------------------------------------------------ settings
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class AttackSettings:
    """How the loop optimises. Every field is validated on construction (ValueError with the accepted values).

    steps: iterations (gradient evaluations), > 0.
    lr: step size in noise standard deviations, finite > 0. Adam: about the per-element change per step;
        SGD: multiplies the raw gradient; PGD: ``lr * sign(grad)`` under L-inf (or no budget), ``lr`` RMS per
        step along ``grad / ||grad||`` under L2 (Madry et al. 2018).
    optimizer: ``adam`` (default), ``sgd`` (with ``momentum``), ``pgd`` (steepest-descent steps of the budget's norm).
    lr_schedule: ``constant``, ``cosine`` (to 0 at the last step) or ``linear`` (likewise), after ``warmup``
        iterations of linear warm-up.
    grad_clip: clip the global gradient norm (all learned tensors together) to this value; None = off.
    learn: which noise is optimised: ``("z0",)``, ``("step",)`` or both. ``step`` needs ``step_noise_mode``
        ``independent``; in ``derived`` mode the step noise is a permutation of z0 and learns through it.
    step_noise_mode: ``independent``, ``derived`` or ``frozen`` (see engine.sampling.noise).
    random_start: start from a random point of the budget (Madry et al.); None = only for untargeted
        objectives, whose gradient at the seeded noise is exactly 0. ``start_scale`` (noise std units) defaults
        to the budget's eps, else 0.05.
    patience / min_delta: stop after ``patience`` iterations without the best loss improving by ``min_delta``.
    stop_value: stop once the objective reaches this value (>= when maximising, <= when minimising).
    detach_cache: cut the gradient paths from later blocks through the KV cache to earlier noise.
    checkpointing: activation checkpointing in the transformer and the VAE decoder (False: neither).
    transformer_checkpoint: with ``checkpointing``: ``layer`` (every transformer layer call, recomputed during
        backward), ``off``, or ``auto`` (default): ``off`` when what the rollout's transformer calls would keep for
        backward (estimated from one probe call, see `_transformer_saved_bytes`) is within half the baseline
        generation's memory, else ``layer``; the default model's small transformer is then never recomputed.
    decoder_checkpoint: the decoder's checkpoint segments when ``checkpointing`` is on. ``frame``: one latent
        frame each (the least memory; the stream's last frame is never recomputed). ``block``: one generated
        block each (the last block not recomputed). ``off``: the decoder keeps its activations (no recompute,
        the most memory). ``auto`` (default): per latent frame, but the stream's last frames are kept without
        a checkpoint as far as what they save for backward stays within the memory of the baseline generation
        (less what the transformer keeps, see transformer_checkpoint; the attack's peak then stays within about
        3x of it), sized in the first iteration; on the default model that is every frame.
    """

    steps: int = 20
    lr: float = 0.05
    optimizer: str = "adam"
    lr_schedule: str = "constant"
    warmup: int = 0
    momentum: float = 0.9
    grad_clip: float | None = None
    learn: tuple = ("z0",)
    step_noise_mode: str = "independent"
    random_start: bool | None = None
    start_scale: float | None = None
    patience: int | None = None
    min_delta: float = 0.0
    stop_value: float | None = None
    detach_cache: bool = False
    checkpointing: bool = True
    transformer_checkpoint: str = "auto"
    decoder_checkpoint: str = "auto"

    def __post_init__(self):
        if not _is_int(self.steps) or self.steps <= 0:
            raise ValueError(f"steps must be an int > 0, got {self.steps!r}")
        if not _is_real(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a finite float > 0, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; accepted: {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; accepted: {', '.join(LR_SCHEDULES)}")
        if not _is_int(self.warmup) or not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be an int in [0, steps - 1 = {self.steps - 1}], got {self.warmup!r}")
        if not _is_real(self.momentum) or not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be a float in [0, 1), got {self.momentum!r}")
        if self.grad_clip is not None and (not _is_real(self.grad_clip) or self.grad_clip <= 0):
            raise ValueError(f"grad_clip must be None or a finite float > 0, got {self.grad_clip!r}")
        learn = (self.learn,) if isinstance(self.learn, str) else tuple(self.learn)
        learn = tuple(x.strip() for s in learn for x in str(s).split(",") if x.strip())
        bad = [x for x in learn if x not in LEARNABLE]
        if bad or not learn or len(set(learn)) != len(learn):
            raise ValueError(f"learn must name each of {', '.join(map(repr, LEARNABLE))} at most once, "
                             f"e.g. ('z0',), ('step',) or ('z0', 'step'); got {self.learn!r}")
        self.learn = learn
        if self.step_noise_mode not in MODES:
            raise ValueError(f"unknown step_noise_mode {self.step_noise_mode!r}; accepted: {', '.join(MODES)}")
        if "step" in learn and self.step_noise_mode != "independent":
            why = ("it is a permutation of z0: learn 'z0' and the gradient of the step noise reaches it"
                   if self.step_noise_mode == "derived" else "frozen step noise never learns")
            raise ValueError(f"learn={learn} includes 'step' but step_noise_mode={self.step_noise_mode!r}: {why}; "
                             f"use step_noise_mode='independent' to learn the step noise")
        if self.random_start not in (None, True, False):
            raise ValueError(f"random_start must be None, True or False, got {self.random_start!r}")
        if self.start_scale is not None and (not _is_real(self.start_scale) or self.start_scale <= 0):
            raise ValueError(f"start_scale must be None or a finite float > 0, got {self.start_scale!r}")
        if self.patience is not None and (not _is_int(self.patience) or self.patience < 1):
            raise ValueError(f"patience must be None or an int >= 1, got {self.patience!r}")
        if not _is_real(self.min_delta) or self.min_delta < 0:
            raise ValueError(f"min_delta must be a finite float >= 0, got {self.min_delta!r}")
        if self.stop_value is not None and not _is_real(self.stop_value):
            raise ValueError(f"stop_value must be None or a finite float, got {self.stop_value!r}")
        for name in ("detach_cache", "checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.decoder_checkpoint not in DECODER_CHECKPOINTS:
            raise ValueError(f"unknown decoder_checkpoint {self.decoder_checkpoint!r}; accepted: "
                             f"{', '.join(DECODER_CHECKPOINTS)}")
        if self.transformer_checkpoint not in TRANSFORMER_CHECKPOINTS:
            raise ValueError(f"unknown transformer_checkpoint {self.transformer_checkpoint!r}; accepted: "
                             f"{', '.join(TRANSFORMER_CHECKPOINTS)}")

    def decoder_plan(self, block_frames: int) -> tuple[bool, int | None, int]:
        """render()'s (checkpoint_decoder, segment_frames, keep_frames) for the first iteration; "auto" widens
        keep_frames after it (attack)."""
        if not self.checkpointing or self.decoder_checkpoint == "off":
            return False, None, 0
        if self.decoder_checkpoint == "block":
            return True, None, block_frames
        return True, 1, 1

    def lr_at(self, iteration: int) -> float:
        """Learning rate of iteration 0 .. steps - 1: linear warm-up, then the schedule down from lr."""
        if iteration < self.warmup:
            return self.lr * (iteration + 1) / self.warmup
        progress = (iteration - self.warmup) / max(1, self.steps - self.warmup)  # in [0, 1)
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * progress))
        if self.lr_schedule == "linear":
            return self.lr * (1 - progress)
        return self.lr


SETTING_NAMES = tuple(f.name for f in dataclasses.fields(AttackSettings))
OBJECTIVE_OPTIONS = ("target", "space", "frames", "mask", "maximize")


def resolve_objective(objective, *, target=None, space: str | None = None, frames=None, mask=None,
                      maximize: bool | None = None) -> Objective:
    """An Objective from a name ('untargeted', 'targeted'), an Objective, or a callable f(video) -> scalar.

    Objective instances are shallow-copied, so setting the baseline of an untargeted objective never changes the
    caller's object (one objective can serve many seeds). A plain callable must say its direction (``maximize=``).
    """
    given = {k: v for k, v in dict(target=target, space=space, frames=frames, mask=mask).items() if v is not None}
    if isinstance(objective, Objective):
        if given or maximize is not None:
            raise ValueError(f"options {sorted(given) + (['maximize'] if maximize is not None else [])} apply "
                             f"to named objectives; set them on the {type(objective).__name__} you pass")
        return copy.copy(objective)
    if isinstance(objective, str):
        if maximize is not None:
            raise ValueError(f"objective {objective!r} fixes its direction; maximize= is for callables")
        if objective == "untargeted" and target is not None:
            raise ValueError("the untargeted objective moves away from the baseline; it takes no target "
                             "(did you mean objective='targeted'?)")
        if objective == "targeted" and target is None:
            raise ValueError("objective 'targeted' needs target= (a video (T, H, W, 3) or image (H, W, 3) in "
                             "[0, 1], or latents (B, C, F, h, w) with space='latent')")
        return make_objective(objective, **given)
    if callable(objective):
        if maximize is None:
            raise ValueError("a plain callable does not say whether it is maximised or minimised: pass "
                             "maximize=True / False, or a CallableObjective")
        if target is not None or frames is not None or mask is not None:
            raise ValueError("target / frames / mask apply to named objectives, not to a callable")
        if space not in (None, "pixel", "latent"):
            raise ValueError(f"unknown space {space!r}; accepted: 'pixel', 'latent'")
        return CallableObjective(objective, maximize=maximize, needs_pixels=(space or "pixel") == "pixel")
    raise ValueError(f"objective must be 'untargeted', 'targeted', an Objective or a callable, got "
                     f"{type(objective).__name__}")


def resolve_budget(budget) -> Budget:
    """None -> no constraint; a Budget; or a dict of Budget fields."""
    if budget is None:
        return Budget("none")
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, dict):
        return Budget(**budget)
    raise ValueError(f"budget must be None, a Budget or a dict of its fields, got {type(budget).__name__}")


# ---------------------------------------------------------------------------------------- differentiable decode
def render(engine, cond: Conditioning, noise: SamplerNoise, *, decode: bool = True, detach_cache: bool = False,
           checkpoint_decoder: bool = True, segment_frames: int | None = None, keep_frames: int = 0,
           stats: dict | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The sampler + decoder forward an attack differentiates: (frames (T, H, W, 3) in [0, 1] or None, latents).

    Runs Engine.stream (differentiable when the noise requires grad) without its own decoder and decodes each
    block with a CheckpointedDecoder (segments of `segment_frames` latent frames; those within the stream's last
    `keep_frames` latent frames are not checkpointed). Transformer checkpointing is the model's
    ``gradient_checkpointing`` flag. stats: if given, receives the decoder's ``kept_bytes`` / ``kept_frames``.
    """
    decoder = CheckpointedDecoder(engine.vae, checkpoint=checkpoint_decoder, segment_frames=segment_frames) \
        if decode else None
    latents, video = [], []
    for chunk in engine.stream(prompt_embeds=cond.cond, negative_prompt_embeds=cond.uncond, noise=noise,
                               output_type="pt", detach_cache=detach_cache, decode=False):
        latents.append(chunk.latents)
        if decoder is not None:
            # how many of this block's latent frames lie within the stream's last keep_frames
            k = chunk.latents.shape[2]
            keep = max(0, min(k, keep_frames - (chunk.num_blocks - 1 - chunk.block) * k))
            video.append(decoder.decode(chunk.latents, keep=keep))  # (B, 3, T_b, H, W)
    if stats is not None and decoder is not None:
        stats.update(kept_bytes=decoder.kept_bytes, kept_frames=decoder.kept_frames)
    lat = torch.cat(latents, dim=2)  # (B, C, F, h, w)
    if decoder is None:
        return None, lat
    v = torch.cat(video, dim=2)
    v = v if v.dtype == torch.float64 else v.float()
    return (v[0].permute(1, 2, 3, 0) + 1) / 2, lat  # (T, H, W, 3) in [0, 1], as Engine.generate


# ------------------------------------------------------------------------------------------------ the loop
def _transformer_saved_bytes(engine, cond: Conditioning, noise: SamplerNoise) -> float:
    """An upper estimate of what the transformer calls of one differentiable rollout keep for backward without
    checkpointing, from one probe call (the first block at the first step, attending to itself) measured with
    count_saved. A call attending to a cached context of c frames is counted (c + k) / k times the probe (k frames
    per block): only the attention's K/V grow with the context, so this overestimates; the cache window and
    classifier-free guidance (two calls per step) are taken into account."""
    tr, c, k = engine.transformer, engine.config, engine.config.num_frame_per_block
    x = noise.z0[:, :, :k].detach().to(tr.dtype).requires_grad_(True)  # (B, C, k, h, w)
    t = torch.full((x.shape[0], k), float(engine.schedule.timesteps[0]), device=x.device)
    total = [0]
    saved = tr.gradient_checkpointing
    try:
        tr.gradient_checkpointing = False
        with torch.enable_grad(), count_saved(tr, lambda n: total.__setitem__(0, total[0] + n)):
            tr(x, t, cond.cond.to(tr.dtype))
    finally:
        tr.gradient_checkpointing = saved
    n_blocks = noise.shape[2] // k
    window = noise.shape[2] if c.local_attn_frames is None else c.local_attn_frames
    calls = len(engine.schedule.timesteps)
    est = sum((calls + (b + 1 < n_blocks)) * min(window, (b + 1) * k) / k for b in range(n_blocks))
    return est * total[0] * (2 if cond.uses_cfg else 1)


def _memory_in_use(device: torch.device) -> int | None:
    """Bytes in use after a generation, the budget of decoder_checkpoint="auto": the peak allocated since the
    last reset on CUDA, the process's resident memory on a CPU (Linux /proc); None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _leaf_names(noise: SamplerNoise, learn: tuple) -> list[str]:
    names = ["z0"] if "z0" in learn else []
    if "step" in learn:
        names += [f"step.{i}" for i in range(len(noise.step_noise))]
    return names


def _noise_tensors(noise: SamplerNoise, names: list[str]) -> list[torch.Tensor]:
    return [noise.z0 if n == "z0" else noise.step_noise[int(n.split(".")[1])] for n in names]


def _point_stats(noise: SamplerNoise, leaves: list[torch.Tensor], inits: list[torch.Tensor]) -> dict:
    """Perturbation size of the current point and the norm of its z0 against sqrt(d) (1 for a typical draw)."""
    delta_rms, delta_linf = _delta_stats(leaves, inits)
    z0 = noise.z0.detach()
    return {"delta_rms": delta_rms, "delta_linf": delta_linf,
            "z0_norm_ratio": float(sample_norms(z0).mean()) / math.sqrt(z0[0].numel())}


def _delta_stats(leaves: list[torch.Tensor], inits: list[torch.Tensor]) -> tuple[float, float]:
    """RMS and max-abs change of all learned tensors together, in noise standard deviations."""
    sq, n, linf = 0.0, 0, 0.0
    for z, z0 in zip(leaves, inits):
        d = (z.detach() - z0).double()
        sq += float(d.pow(2).sum())
        n += d.numel()
        linf = max(linf, float(d.abs().max()))
    return math.sqrt(sq / max(n, 1)), linf


def _video_metrics(frames: torch.Tensor | None, baseline: torch.Tensor, latents: torch.Tensor,
                   baseline_latents: torch.Tensor) -> dict:
    out = {"latent_mse": float((latents.detach().double() - baseline_latents.double()).pow(2).mean())}
    if frames is None:
        return dict(out, mse=None, psnr=None, ssim=None)
    f = frames.detach()
    out.update(mse=float(mse(f, baseline)), psnr=float(psnr(f, baseline)))
    out["ssim"] = float(ssim(f, baseline)) if min(f.shape[1:3]) >= 11 else None
    return out


def check_attack(engine, *, objective: Objective, num_frames: int | None = None, height: int | None = None,
                 width: int | None = None, noise: SamplerNoise | None = None) -> tuple[tuple, tuple]:
    """Shape checks before any work: returns (latent shape, video shape) and lets the objective raise."""
    if noise is not None:
        if not isinstance(noise, SamplerNoise):
            raise ValueError(f"noise must be a SamplerNoise, got {type(noise).__name__}")
        if num_frames is not None and engine.latent_frames(num_frames) != noise.shape[2]:
            raise ValueError(f"noise has {noise.shape[2]} latent frames but num_frames={num_frames} needs "
                             f"{engine.latent_frames(num_frames)}")
        latent_shape = noise.shape
    else:
        latent_shape = engine.latent_shape(num_frames or engine.config.num_frames, height, width)
    if latent_shape[0] != 1:
        raise ValueError(f"attacks run on one video at a time (batch 1); the noise has batch {latent_shape[0]}")
    sc = spatial_compression(engine.vae)
    video_shape = (num_video_frames(engine.vae, latent_shape[2]), latent_shape[3] * sc, latent_shape[4] * sc, 3)
    objective.check(video_shape=video_shape, latent_shape=latent_shape)
    return tuple(latent_shape), video_shape


def attack(engine, prompt: str | None = None, *, seed: int = 0, objective="untargeted", budget=None,
           steps: int = 20, lr: float = 0.05, learn=("z0",), step_noise_mode: str | None = None,
           callback: Callable[[dict], bool | None] | None = None, prompt_embeds=None,
           negative_prompt_embeds=None, num_frames: int | None = None, height: int | None = None,
           width: int | None = None, noise: SamplerNoise | None = None, progress: bool = False,
           **options) -> AttackResult:
    """Optimise the sampler noise of `engine` for `prompt` against an objective; return an AttackResult.

    seed: draws the initial noise (engine.make_noise) and the random start. noise: start from this SamplerNoise
        instead (its mode is the step-noise mode).
    objective: ``"untargeted"`` (maximise MSE to the baseline video of the same noise), ``"targeted"``
        (minimise MSE to ``target=``), an Objective (engine.attack.objectives), or a callable f(video) -> scalar
        with ``maximize=``. Options for named objectives: ``target``, ``space`` ('pixel' | 'latent'),
        ``frames`` ((start, stop) or slice), ``mask`` ((H, W) / (T, H, W) weights).
    budget: a Budget (L2 ball, L-inf box, chi-shell weight, renormalisation), a dict of its fields, or None (no
        constraint). Every learned tensor is projected onto it after every step.
    steps, lr, learn, step_noise_mode and ``**options`` (optimizer, lr_schedule, warmup, momentum, grad_clip,
        random_start, start_scale, patience, min_delta, stop_value, detach_cache, checkpointing): see
        AttackSettings.
    callback(info): after each iteration, with the history entry plus ``video``, ``latents`` (detached) and
        ``noise`` (a detached copy); return True to stop.

    Everything is validated before any model call (ValueError). A non-finite objective or gradient stops the run
    with a warning; the result then holds the best point found so far (``stop_reason`` says why). The best point
    is the evaluated one with the lowest loss (objective.loss(value) + regulariser); its video is regenerated
    with Engine.generate, so saving result.noise and generating from it reproduces result.attacked_video exactly.
    """
    t_start = time.perf_counter()
    unknown = sorted(set(options) - set(SETTING_NAMES) - set(OBJECTIVE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown attack options {unknown}; accepted: "
                         f"{', '.join(sorted(SETTING_NAMES + OBJECTIVE_OPTIONS))}")
    if step_noise_mode is None:
        step_noise_mode = noise.mode if isinstance(noise, SamplerNoise) else "independent"
    elif isinstance(noise, SamplerNoise) and noise.mode != step_noise_mode:
        raise ValueError(f"noise has step-noise mode {noise.mode!r} but step_noise_mode={step_noise_mode!r}")
    settings = AttackSettings(steps=steps, lr=lr, learn=learn, step_noise_mode=step_noise_mode,
                              **{k: v for k, v in options.items() if k in SETTING_NAMES})
    obj = resolve_objective(objective, **{k: v for k, v in options.items() if k in OBJECTIVE_OPTIONS})
    budget = resolve_budget(budget)
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None, got {type(callback).__name__}")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    check_attack(engine, objective=obj, num_frames=num_frames, height=height, width=width, noise=noise)

    # -- the work starts here ----------------------------------------------------------------------------
    with torch.no_grad():
        cond = engine.conditioning(prompt, prompt_embeds, negative_prompt_embeds)
        if noise is None:
            if seed is None:
                raise ValueError("pass a seed or a noise")
            initial = engine.make_noise(num_frames, seed, mode=step_noise_mode, height=height, width=width)
        else:
            initial = noise.detach().to(engine.device)
        initial.prompt = prompt
        if engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(engine.device)
        base = engine.generate(prompt_embeds=cond.cond, negative_prompt_embeds=cond.uncond, noise=initial,
                               output_type="pt")
        generation_bytes = _memory_in_use(engine.device)
    if isinstance(obj, Untargeted) and obj.baseline is None:
        obj.set_baseline(base.frames, base.latents)
    with torch.no_grad():
        baseline_value = float(obj(video=base.frames if obj.needs_pixels else None, latents=base.latents))

    work = initial.detach()
    names = _leaf_names(work, settings.learn)
    leaves = work.leaves(settings.learn)
    inits = [z.detach().clone() for z in leaves]
    random_start = settings.random_start if settings.random_start is not None else isinstance(obj, Untargeted)
    if random_start:
        gen = torch.Generator("cpu").manual_seed(initial.seed if initial.seed is not None else 0)
        scale = settings.start_scale or budget.eps or DEFAULT_START_SCALE
        with torch.no_grad():
            for z, z_init in zip(leaves, inits):
                z.copy_(budget.random_start(z_init, gen, scale))
    opt = None
    if settings.optimizer == "adam":
        opt = torch.optim.Adam(leaves, lr=settings.lr)
    elif settings.optimizer == "sgd":
        opt = torch.optim.SGD(leaves, lr=settings.lr, momentum=settings.momentum)

    def regularizer() -> torch.Tensor:
        return sum((budget.regularizer(z) for z in leaves),
                   torch.zeros((), dtype=leaves[0].dtype, device=leaves[0].device))

    history: list[dict] = []
    best = {"loss": math.inf}
    stop_reason, since_best, evaluated = f"completed {settings.steps} steps", 0, True
    stop = False

    def consider(entry: dict, frames, latents, exact: bool) -> bool:
        """Keep the point just evaluated if it is the best so far; `exact`: its video came from Engine.generate."""
        if entry["loss"] < best["loss"]:
            improved = entry["loss"] < best["loss"] - settings.min_delta
            best.update(loss=entry["loss"], value=entry["objective"], iteration=entry["iteration"],
                        noise=work.detach(), frames=None if frames is None else frames.detach().clone(),
                        latents=latents.detach().clone(), exact=exact)
            return improved
        return False

    ckpt_decoder, segment, keep = settings.decoder_plan(engine.config.num_frame_per_block)
    auto_keep = settings.checkpointing and settings.decoder_checkpoint == "auto" and generation_bytes is not None
    memory_left = generation_bytes  # what may run without a checkpoint under the auto settings
    transformer = engine.transformer
    saved_ckpt = getattr(transformer, "gradient_checkpointing", False)
    # frozen weights: the forward then saves only what the noise's gradient needs (restored below)
    frozen = [p for m in (transformer, engine.vae, engine.text_encoder, engine.fast_decoder) if m is not None
              for p in m.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    bar = None
    try:
        ckpt_transformer = settings.checkpointing and settings.transformer_checkpoint != "off"
        if ckpt_transformer and settings.transformer_checkpoint == "auto" and generation_bytes is not None:
            need = _transformer_saved_bytes(engine, cond, work)
            if need <= generation_bytes / 2:
                ckpt_transformer, memory_left = False, generation_bytes - need
        transformer.gradient_checkpointing = ckpt_transformer
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=settings.steps, desc="attack", unit="it", leave=False)
        for it in range(settings.steps):
            t0 = time.perf_counter()
            lr_now = settings.lr_at(it)
            for z in leaves:
                z.grad = None
            kept: dict = {}
            frames, latents = render(engine, cond, work, decode=obj.needs_pixels, detach_cache=settings.detach_cache,
                                     checkpoint_decoder=ckpt_decoder, segment_frames=segment, keep_frames=keep,
                                     stats=kept)
            if auto_keep and kept.get("kept_frames"):  # keep as many trailing frames as the budget holds
                per_frame = kept["kept_bytes"] / kept["kept_frames"]
                keep = max(keep, min(latents.shape[2], int(memory_left // max(per_frame, 1.0))))
                auto_keep = False
            value = obj(video=frames, latents=latents)
            reg = regularizer()
            loss = obj.loss(value) + reg
            evaluated = True
            if not torch.isfinite(value.detach()):
                stop_reason = f"non-finite objective value ({float(value.detach())}) at iteration {it}"
                warnings.warn(f"attack stopped: {stop_reason}; keeping the best point so far", RuntimeWarning)
                break
            # the learned noise's gradient alone (an objective may hold parameters of its own)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            grads = [torch.zeros_like(z) if g is None else g for z, g in zip(leaves, grads)]
            for z, g in zip(leaves, grads):
                z.grad = g
            gnorm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
            entry = {"iteration": it, "objective": float(value.detach()), "loss": float(loss.detach()),
                     "regularizer": float(reg.detach()), "grad_norm": gnorm, **_point_stats(work, leaves, inits),
                     "lr": lr_now, **_video_metrics(frames, base.frames, latents, base.latents)}
            improved = consider(entry, frames, latents, exact=False)
            since_best = 0 if improved else since_best + 1
            if not math.isfinite(gnorm):
                entry["seconds"] = time.perf_counter() - t0
                history.append(entry)
                stop_reason = f"non-finite gradient at iteration {it}"
                warnings.warn(f"attack stopped: {stop_reason}; keeping the best point so far", RuntimeWarning)
                break
            v = entry["objective"]
            if settings.stop_value is not None and (v >= settings.stop_value if obj.maximize
                                                    else v <= settings.stop_value):
                stop, stop_reason = True, f"objective reached stop_value {settings.stop_value} at iteration {it}"
            elif settings.patience is not None and since_best >= settings.patience:
                stop, stop_reason = True, f"no improvement for {settings.patience} iterations (stopped at {it})"
            else:  # take the step
                if settings.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(leaves, settings.grad_clip)
                if opt is not None:
                    for group in opt.param_groups:
                        group["lr"] = lr_now
                    opt.step()
                    with torch.no_grad():
                        for z, z_init in zip(leaves, inits):
                            budget.project_(z, z_init)
                else:
                    with torch.no_grad():
                        for z, z_init in zip(leaves, inits):
                            z.copy_(budget.pgd_step(z, z.grad, lr_now, z_init))
                evaluated = False
            entry["seconds"] = time.perf_counter() - t0
            history.append(entry)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(objective=f"{entry['objective']:.4g}", best=f"{best.get('value', math.nan):.4g}")
            if callback is not None and not stop:
                if callback(dict(entry, video=None if frames is None else frames.detach(), latents=latents.detach(),
                                 noise=work.detach(), best_value=best.get("value", math.nan))):
                    stop, stop_reason = True, f"stopped by callback at iteration {it}"
            if stop:
                break
    finally:
        transformer.gradient_checkpointing = saved_ckpt
        for p in frozen:
            p.requires_grad_(True)
        if bar is not None:
            bar.close()

    # -- the final point (after the last step) and the exact video of the best one ----------------------
    def generate(n: SamplerNoise):
        with torch.no_grad():
            return engine.generate(prompt_embeds=cond.cond, negative_prompt_embeds=cond.uncond, noise=n,
                                   output_type="pt")

    if not evaluated:
        t0 = time.perf_counter()
        final = generate(work.detach())
        with torch.no_grad():
            value = obj(video=final.frames if obj.needs_pixels else None, latents=final.latents)
            loss = obj.loss(value) + regularizer()
        entry = {"iteration": len(history), "objective": float(value), "loss": float(loss),
                 "regularizer": float(loss - obj.loss(value)), "grad_norm": None,
                 **_point_stats(work, leaves, inits), "lr": None,
                 **_video_metrics(final.frames, base.frames, final.latents, base.latents),
                 "seconds": time.perf_counter() - t0, "final": True}
        if math.isfinite(entry["loss"]):
            consider(entry, final.frames, final.latents, exact=True)
        history.append(entry)
    if "noise" not in best:  # nothing finite was ever evaluated: the result is the start point
        best.update(loss=math.nan, value=math.nan, iteration=-1, noise=work.detach(), exact=False)
    attacked_noise: SamplerNoise = best["noise"]
    if best["exact"]:
        att_frames, att_latents = best["frames"], best["latents"]
    else:
        att = generate(attacked_noise)
        att_frames, att_latents = att.frames, att.latents

    learned = _noise_tensors(attacked_noise, names)
    return AttackResult(
        prompt=prompt, seed=initial.seed, noise=attacked_noise, initial_noise=initial,
        baseline_video=base.frames.detach(), attacked_video=att_frames.detach(),
        baseline_latents=base.latents.detach(), attacked_latents=att_latents.detach(), history=history,
        best_iteration=best["iteration"], best_value=best["value"], baseline_value=baseline_value,
        objective={"name": obj.name, "maximize": obj.maximize, "space": obj.space},
        budget=dataclasses.asdict(budget),
        settings=dataclasses.asdict(settings) | {"random_start": random_start, "transformer_checkpointed":
                                                  ckpt_transformer, "decoder_kept_frames":
                                                  keep if ckpt_decoder else initial.shape[2]},
        gaussianity={n: gaussianity(z) for n, z in zip(names, learned)},
        gaussianity_initial={n: gaussianity(z) for n, z in zip(names, _noise_tensors(initial, names))},
        stop_reason=stop_reason, seconds=time.perf_counter() - t_start, fps=engine.config.fps,
        metrics=dict(_video_metrics(att_frames, base.frames, att_latents, base.latents),
                     **dict(zip(("delta_rms", "delta_linf"),
                                _delta_stats(learned, _noise_tensors(initial, names))))),
    )
