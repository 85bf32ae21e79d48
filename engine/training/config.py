"""Typed training configuration: nested dataclasses, YAML presets, dotted command-line overrides.

A run is described by one `Config`:

    stage            vae | teacher | ode-init | dmd | vq | vq-dmd (also given on the command line; they must agree)
    models           where the networks come from (engine directories)
    engine           the generator's sampler settings (EngineConfig, written to engine_config.json)
    data             what the batches are made of (shapes / latents / prompts / synthetic)
    train            the loop: batch size, steps, precision, EMA, checkpoints, non-finite guard
    optim            AdamW of the trained model (teacher / generator)
    critic_optim     AdamW of the critic (dmd)
    flow_matching    teacher stage       ode       ode-init stage       dmd, rollout    dmd stage
    sample           sample videos written every N steps
    vq               the quantized generator's stages (engine/training/vq.py, docs/quantized.md)
    vae              the vae stage: the codec's architecture and loss (engine/training/vae.py)

Presets are YAML files in `configs/` (a name such as `tiny-dmd` or a path). A preset may start from another
with `extends: other.yaml` (relative to the preset, or a preset name; mappings are merged key by key).
Unknown keys are an error that lists the valid ones. Overrides from the command line use dotted keys, `--dmd.loss sid
--optim.lr 1e-5 --engine.denoising_steps "[1000, 500]"`; values are parsed as YAML and checked against the
field's type (hyphens in keys are read as underscores).

Classifier-free guidance scales in this file use the standard convention `uncond + w * (cond - uncond)`;
Self-Forcing's configs write `cond + g * (cond - uncond)`, so their `guidance_scale: 3.0` is `w = 4.0` here.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.pipeline import EngineConfig

from .vq_config import VQTrainConfig

# vae: the codec (engine/training/vae.py); vq, vq-dmd: the quantized generator (engine/training/vq.py)
STAGES = ("vae", "teacher", "ode-init", "dmd", "vq", "vq-dmd")
DATA_SOURCES = ("shapes", "latents", "prompts", "synthetic")
ROLLOUT_WINDOWS = ("uniform", "last")  # rollout.window: the loss window's place in a long rollout
PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs"
TINY_BASE = "tiny"  # models.base value: engine.testing.tiny_engine() components, built in memory


@dataclass
class ModelsConfig:
    """Where the networks come from (see docs/training.md for the stage chain).

    teacher, generator, critic and init take an engine directory (its transformer/ is used) or a transformer
    directory (a diffusers save_pretrained folder, e.g. a teacher saved without VAE / text encoder); base must be
    an engine directory with the VAE (and text encoder / tokenizer for captions).

    base: vae, text encoder and tokenizer (and, for a new teacher, the transformer architecture); "tiny" builds
        engine.testing.tiny_engine() in memory. Defaults to `teacher` for ode-init and dmd. A base without
        transformer/ (the vae stage's product) is accepted: a new teacher then takes its whole architecture from
        `transformer`.
    teacher: the bidirectional teacher (ode-init: the ODE solver's network; dmd: the frozen real score).
    generator: initial generator weights (dmd: the ode-init output, required; ode-init: default = teacher).
    critic: initial critic (fake score) weights for dmd; default = teacher.
    init: teacher stage: start from this directory's transformer instead of a random initialisation; vae stage:
        from this directory's vae/ (an earlier vae run's base, e.g. the previous phase).
    ode_bank: dmd stage with dmd.regression_weight > 0: a trajectory bank written by an ode-init run with
        ode.num_trajectories > 0 (that run's output directory, or its trajectories/ directory).
    transformer: teacher stage, random init: overrides of the base transformer config (e.g. num_layers).
    init_layers: deepen the network a stage starts from (teacher: init's transformer, ode-init / dmd: the
        generator) to this many blocks before training (`engine.models.causal_wan.deepened`: copies with zeroed
        output projections, so training starts from the function it computes); null keeps its depth.
    vae: every stage but vae: an engine directory (e.g. a later VAE phase's base) whose vae/ replaces the base's,
        the text encoder and tokenizer staying the base's (how the default model moved to the phase-5 VAE).
    text_encoder: vae stage: a new text encoder for the base it writes, a tiny UMT5 (`engine.models.text.tiny_umt5`
        settings d_model, num_layers, num_heads, d_ff) at its random initialisation seeded by train.seed, with a
        word tokenizer over the shapes grammar's words; {} = the base gets no text encoder.
    """

    base: str | None = None
    teacher: str | None = None
    generator: str | None = None
    critic: str | None = None
    init: str | None = None
    transformer: dict = field(default_factory=dict)
    init_layers: int | None = None
    ode_bank: str | None = None
    vae: str | None = None
    text_encoder: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    """Training data. Every source yields prompt embeddings; teacher training also needs latents.

    source:
      shapes     procedural videos (engine.data.shapes) at engine.height x width x num_frames, VAE-encoded on the
                 fly; with `path`, the first run encodes `num_samples` clips (latents + prompt embeddings) into
                 that directory, later runs read it.
      latents    a directory of cached latents + prompt embeddings (safetensors shards, see data.py).
      prompts    a text file, one prompt per line (ode-init / dmd need prompts only).
      synthetic  random latents and random prompt embeddings (tests, benchmarks).
    num_samples: dataset size for shapes / synthetic (the shapes cache encodes this many clips).
    seed: content seed of shapes / synthetic data (the order of batches comes from train.seed).
    shapes: overrides of engine.data.shapes.ShapesConfig (not its size fields: those come from `engine`).
    stream_frames: teacher stage, shapes source: render clips of this many video frames (1 + 4k, longer than
        engine.num_frames), encode each whole (the causal VAE, as a stream's frames are), and train on a random
        block-aligned window of the engine clip's latent length from each, drawn per sample. A window that starts
        after block 0 begins mid-stream: a first latent frame of four video frames, objects that may have bounced,
        a prompt switch before or inside it. Long-horizon DMD shows the teacher such windows (docs/training.md).
        null: the clip itself.
    """

    source: str = "synthetic"
    path: str | None = None
    num_samples: int = 1024
    seed: int = 0
    shapes: dict = field(default_factory=dict)
    stream_frames: int | None = None


@dataclass
class TrainLoopConfig:
    """The loop. batch_size is per process and per micro-batch; global batch = batch_size * grad_accum * world.

    mixed_precision: auto (bf16 on CUDA, none on CPU, or what `accelerate launch` was told) | no | bf16 | fp16.
    ema_decay: 0 disables the EMA of the trained model; otherwise the EMA copy follows the raw weights exactly
        until ema_start_step and averages after it (Self-Forcing: 0.99 from step 200).
    max_nonfinite_steps: a NaN / inf loss or gradient norm skips the update; this many skipped steps in a row
        stop the run (the last good checkpoint stays).
    cpu: train on the CPU even when CUDA is present. cpu_threads: torch threads on the CPU (0 = torch's default);
        tiny models are dominated by per-operation overhead, and one thread avoids OpenMP contention on a busy
        machine (measured here: 2.6 ms vs 930 ms per tiny forward with 2 threads under load).
    """

    seed: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    max_steps: int = 1000
    max_minutes: float | None = None  # wall-clock budget of one invocation (--minutes); a checkpoint at the end
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0
    ema_start_step: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    tensorboard: bool = True
    max_nonfinite_steps: int = 5
    cpu: bool = False
    cpu_threads: int = 0


@dataclass
class OptimConfig:
    """AdamW. grad_clip: max global gradient norm (0 = no clipping). Linear warm-up over warmup_steps.

    schedule: constant | cosine (from lr down to min_lr_ratio x lr at train.max_steps, a function of the step
        alone, so a resumed run repeats it exactly).
    """

    lr: float = 2e-6
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    grad_clip: float = 10.0
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.1


@dataclass
class FlowMatchingConfig:
    """Teacher stage. Timesteps: uniform u, shifted by engine.shift, clamped to [min_frac T, max_frac T].

    guidance_scale: written into the teacher's engine directory and used for its sample videos (standard
    convention; Self-Forcing's g = w - 1). sample_steps: Euler steps of the teacher's sample videos.
    train_text_encoder: the base's UMT5 text encoder trains with the teacher (the same AdamW, gradient clip and
        EMA: one module), from the batch's captions; saved as text_encoder/ of the teacher's engine directory
        (EMA weights in teacher/, raw in teacher_raw/), which ode-init and dmd then read as their base (frozen).
        Needs one caption per clip: data.source shapes (without prompt switches) or latents with captions.
    causal_fraction: the share of steps (drawn per step and process) whose whole batch is denoised under the
        block-causal mask of engine.num_frame_per_block (each block sees itself and the earlier ones), the rest
        bidirectionally: a teacher that can also make trajectories block by block, nearer the causal student.
    stream_history: with data.stream_frames, this many latent blocks of the stream before each window go with it
        clean (timestep 0, the engine's context timestep) and outside the loss, so the teacher sees where the stream
        came from (which way the objects move after a bounce, what the frame before the window's first latent
        frame was); a sample that starts within the first blocks has only those (at the clip's start, none: its
        F + history frames are all noised). 0: the window alone.
    """

    caption_dropout: float = 0.1
    causal_fraction: float = 0.0
    stream_history: int = 0
    min_frac: float = 0.0
    max_frac: float = 1.0
    guidance_scale: float = 4.0
    sample_steps: int = 20
    train_text_encoder: bool = False


@dataclass
class ODEConfig:
    """ode-init stage: Euler ODE trajectories of the teacher with CFG, states kept at the few-step timesteps.

    num_steps: Euler steps of the teacher (the few-step timesteps are inserted into the shifted Euler grid, so
        the kept states are exact). guidance_scale: standard convention (Self-Forcing 3.0 = 4.0 here).
    num_trajectories: 0 = fresh trajectories every step; N > 0 = a fixed bank of N trajectories generated once
        into <output_dir>/trajectories (sharded over processes, reused on resume) and cycled through.
    context: clean (default; the recipe's algorithm, `ode.ode_regression`): per block, the x0 prediction from
        the trajectory's state at a random few-step timestep (per sample), with the earlier blocks' clean x0 of
        the trajectory in the KV cache, as inference fills it. noisy: one call over the whole clip under the
        block-causal mask, every block at its own noisy state (Self-Forcing's original ODE init).
    causal_teacher: solve the teacher's ODE under the block-causal mask of engine.num_frame_per_block, so that each
        block's x0 depends on its own and the earlier blocks' noise only (the floor of benchmarks/
        bench_ode_causality.py is then 0). Needs a teacher trained for it (flow_matching.causal_fraction > 0).
    """

    num_steps: int = 48
    guidance_scale: float = 4.0
    num_trajectories: int = 0
    context: str = "clean"
    causal_teacher: bool = False


@dataclass
class DMDConfig:
    """dmd stage: Self-Forcing distribution matching distillation.

    loss: dmd | sid | fgm (fgm = sid with alpha 0.5); sid_alpha: SiD's alpha (1.0-1.2 recommended).
    guidance_scale: CFG of the real score (teacher), standard convention uncond + w (cond - uncond);
        Self-Forcing's guidance_scale 3.0 (cond + g (cond - uncond)) is w = 4.0.
    critic_target: flow (eps - x0) | eps.
    dfake_gen_update_ratio: the critic updates every step, the generator every this many steps.
    min_frac, max_frac: loss timesteps (shifted by engine.shift) clamped to [min_frac T, max_frac T].
    timesteps_from_rollout: draw the generator-loss timesteps inside the denoised-timestep range of the rollout
        (Self-Forcing's ts_schedule) instead of over [min_frac, max_frac].

    DMD2's GAN term (off by default; Self-Forcing's model/gan.py): a classifier head on the critic's features,
    trained in the critic step to tell real clips (the data's latents, so data.source must have them) from
    generator samples, both noised to one random t; the generator adds its non-saturating GAN loss.
    gan_weight: weight of the generator's GAN loss (Self-Forcing's gan_g_weight: 1e-2); needs
        gan_critic_weight > 0 (an untrained head would only add noise).
    gan_critic_weight: weight of the classifier loss added to the critic's denoising loss (gan_d_weight: 1e-2).
    gan_layers: the critic blocks whose outputs the head reads (0-based; negative counts from the end;
        Self-Forcing taps blocks 13, 21 and 29 of Wan-1.3B's 30).
    gan_head_dim: the head's MLP width (0 = the critic's width). The head trains with critic_optim.

    regression_weight: DMD (v1)'s regression term (the recipe's dmd_regression_weight; 0 = off): each generator
        step adds weight x the ODE-init loss (`ode.ode_regression`, clean context) on train.batch_size random
        trajectories of the teacher's ODE bank models.ode_bank; logged as ode_loss.
    teacher_history: a long rollout (rollout.num_frames): up to this many blocks of the rollout before the loss
        window go with it to the real score and the critic (both steps), clean at timestep 0 (the engine's context
        timestep) and cut from their outputs: the stream the window continues, as a teacher trained with
        flow_matching.stream_history saw it. A window at the rollout's start has none. 0: the window alone.
    """

    loss: str = "dmd"
    sid_alpha: float = 1.0
    guidance_scale: float = 4.0
    critic_target: str = "flow"
    dfake_gen_update_ratio: int = 5
    min_frac: float = 0.02
    max_frac: float = 0.98
    timesteps_from_rollout: bool = False
    gan_weight: float = 0.0
    gan_critic_weight: float = 0.0
    gan_layers: list[int] = field(default_factory=lambda: [-1])
    gan_head_dim: int = 0
    regression_weight: float = 0.0
    teacher_history: int = 0

    @property
    def gan(self) -> bool:
        return self.gan_weight > 0 or self.gan_critic_weight > 0


@dataclass
class RolloutConfig:
    """The Self-Forcing rollout of the generator (dmd stage); the context noise is engine.context_t.

    same_step_across_blocks: one random exit step shared by all blocks (Self-Forcing's configs set it) instead of
        an independent one per block (the default).
    last_step_only: always exit at the last few-step timestep.
    grad_first_block: False runs the first block without gradient and masks it out of the generator loss.

    Long-horizon distillation (docs/training.md, "Long-horizon DMD"):
    num_frames: latent frames of the long rollout (whole blocks, >= the clip's; null = the clip: today's rollout).
        The generator rolls out with its rolling window and sinks (engine.local_attn_frames / sink_frames, required
        when longer than the clip); the losses apply to a window of the clip's length, the blocks before it run
        without gradient and the rollout stops at the window's end.
    window: which block-aligned window: uniform (Self-Forcing++) or last (always the end of the long rollout).
    recache: at a prompt switch of a timeline inside the rollout, re-cache the window's KV under the new prompt
        (LongLive's KV re-cache, the live stream's default) instead of only switching the cross-attention prompt.
    """

    same_step_across_blocks: bool = False
    last_step_only: bool = False
    grad_first_block: bool = True
    num_frames: int | None = None
    window: str = "uniform"
    recache: bool = True


@dataclass
class VAEConfig:
    """vae stage: an AutoencoderKLWan trained on random windows of shapes clips (engine/training/vae.py).

    Architecture: base_dim (encoder width), decoder_base_dim (decoder width: the streaming bottleneck on a CPU),
    z_dim, dim_mult (len - 1 spatial halvings), num_res_blocks, temperal_downsample (diffusers' spelling).
    clip_frames: training window, 1 + 4k frames cut at random from the engine.num_frames clips.
    deterministic: decode the posterior mode (true) or a sample of the posterior.
    Loss: object-weighted L1 + MSE on pixels, + kl_weight x KL, + align_weight x MSE(latent channels 0-2, the
    mean RGB of each latent cell) (colour alignment; docs/default-model.md). object_weight: extra weight of
    object pixels.
    eval_clips: held-out full-length clips whose posterior-mode statistics become the VAE's latents_mean /
    latents_std in every saved base (so codec.normalize_latents gives ~unit-variance latents).
    """

    base_dim: int = 12
    decoder_base_dim: int = 8
    z_dim: int = 16
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 1
    temperal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])
    clip_frames: int = 17
    deterministic: bool = True
    kl_weight: float = 1e-6
    object_weight: float = 4.0
    align_weight: float = 0.0
    eval_clips: int = 64


@dataclass
class SampleConfig:
    """Sample videos (mp4 in <output_dir>/samples) every `every` steps (0 = never) and at the end of a run."""

    every: int = 0
    prompts: list[str] = field(default_factory=lambda: ["a red circle moving right"])
    seed: int = 0
    num_frames: int | None = None


@dataclass
class Config:
    stage: str | None = None
    models: ModelsConfig = field(default_factory=ModelsConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=4e-7))
    flow_matching: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    ode: ODEConfig = field(default_factory=ODEConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    vq: VQTrainConfig = field(default_factory=VQTrainConfig)  # vq and vq-dmd stages (docs/quantized.md)
    vae: VAEConfig = field(default_factory=VAEConfig)  # vae stage (engine/training/vae.py)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def validate(self) -> None:
        """Value checks that need no files (files are checked when the stage is built)."""
        _check(self.stage is None or self.stage in STAGES, "stage", self.stage, f"one of {', '.join(STAGES)}")
        _check(self.data.source in DATA_SOURCES, "data.source", self.data.source, f"one of {', '.join(DATA_SOURCES)}")
        _check(self.data.num_samples >= 1, "data.num_samples", self.data.num_samples, ">= 1")
        n, e = self.data.stream_frames, self.engine
        if n is not None:
            _check(self.stage == "teacher" and self.data.source == "shapes", "data.stream_frames", n,
                   "null unless stage is teacher and data.source is shapes (the windows are of encoded shapes clips)")
            k = 4 * e.num_frame_per_block  # video frames per latent block
            _check(isinstance(n, int) and not isinstance(n, bool) and n > e.num_frames and (n - e.num_frames) % k == 0,
                   "data.stream_frames", n, f"engine.num_frames ({e.num_frames}) plus whole latent blocks of {k} video "
                   f"frames: {e.num_frames + k}, {e.num_frames + 2 * k}, ...")
        h = self.flow_matching.stream_history
        _check(isinstance(h, int) and not isinstance(h, bool) and h >= 0 and (h == 0 or (
            n is not None and h * 4 * e.num_frame_per_block <= n - e.num_frames
            and not self.flow_matching.train_text_encoder)), "flow_matching.stream_history", h,
            "an int >= 0; > 0 needs data.stream_frames at least that many blocks longer than engine.num_frames "
            "(and flow_matching.train_text_encoder false)")
        t = self.train
        for key in ("batch_size", "grad_accum", "save_every", "keep_checkpoints", "max_nonfinite_steps"):
            _check(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), ">= 1")
        _check(t.max_steps >= 0, "train.max_steps", t.max_steps, ">= 0")
        _check(t.max_minutes is None or (isinstance(t.max_minutes, (int, float)) and not isinstance(t.max_minutes, bool)
                                         and 0 < t.max_minutes < float("inf")),
               "train.max_minutes", t.max_minutes, "a number of minutes > 0 (--minutes), or null for no limit")
        _check(t.cpu_threads >= 0, "train.cpu_threads", t.cpu_threads, ">= 0 (0 = torch's default)")
        _check(t.mixed_precision in ("auto", "no", "bf16", "fp16"), "train.mixed_precision", t.mixed_precision,
               "one of auto, no, bf16, fp16")
        _check(0 <= t.ema_decay < 1, "train.ema_decay", t.ema_decay, "in [0, 1)")
        _check(t.ema_start_step >= 0, "train.ema_start_step", t.ema_start_step, ">= 0")
        for name in ("optim", "critic_optim"):
            o: OptimConfig = getattr(self, name)
            _check(o.lr > 0, f"{name}.lr", o.lr, "> 0")
            _check(all(0 <= b < 1 for b in o.betas), f"{name}.betas", o.betas, "two numbers in [0, 1)")
            _check(o.weight_decay >= 0, f"{name}.weight_decay", o.weight_decay, ">= 0")
            _check(o.grad_clip >= 0, f"{name}.grad_clip", o.grad_clip, ">= 0 (0 = off)")
            _check(o.warmup_steps >= 0, f"{name}.warmup_steps", o.warmup_steps, ">= 0")
            _check(o.schedule in ("constant", "cosine"), f"{name}.schedule", o.schedule, "constant or cosine")
            _check(0 <= o.min_lr_ratio <= 1, f"{name}.min_lr_ratio", o.min_lr_ratio, "in [0, 1]")
        fm = self.flow_matching
        _check(0 <= fm.caption_dropout <= 1, "flow_matching.caption_dropout", fm.caption_dropout, "in [0, 1]")
        _check(0 <= fm.causal_fraction <= 1, "flow_matching.causal_fraction", fm.causal_fraction, "in [0, 1]")
        _check(0 <= fm.min_frac < fm.max_frac <= 1, "flow_matching.min_frac/max_frac", (fm.min_frac, fm.max_frac),
               "0 <= min_frac < max_frac <= 1")
        _check(fm.sample_steps >= 1, "flow_matching.sample_steps", fm.sample_steps, ">= 1")
        _check(not fm.train_text_encoder or (self.data.source in ("shapes", "latents")
                                             and not self.data.shapes.get("switch_prob")),
               "data.source", self.data.source, "shapes (without switch_prob) or latents with captions when "
               "flow_matching.train_text_encoder is true (the encoder trains on one caption per clip)")
        _check(self.ode.num_steps >= 1, "ode.num_steps", self.ode.num_steps, ">= 1")
        _check(self.ode.num_trajectories >= 0, "ode.num_trajectories", self.ode.num_trajectories, ">= 0")
        _check(self.ode.context in ("clean", "noisy"), "ode.context", self.ode.context,
               "clean (per block, the earlier blocks' clean x0 in the KV cache, as at inference) or noisy (one "
               "call under the block-causal mask, the earlier blocks at their noisy states)")
        d = self.dmd
        _check(d.loss in ("dmd", "sid", "fgm"), "dmd.loss", d.loss, "one of dmd, sid, fgm")
        _check(d.critic_target in ("flow", "eps"), "dmd.critic_target", d.critic_target, "flow or eps")
        _check(d.dfake_gen_update_ratio >= 1, "dmd.dfake_gen_update_ratio", d.dfake_gen_update_ratio, ">= 1")
        _check(0 <= d.min_frac < d.max_frac <= 1, "dmd.min_frac/max_frac", (d.min_frac, d.max_frac),
               "0 <= min_frac < max_frac <= 1")
        for key in ("gan_weight", "gan_critic_weight"):
            v = getattr(d, key)
            _check(math.isfinite(v) and v >= 0, f"dmd.{key}", v, "a finite number >= 0 (0 = off)")
        _check(not d.gan_weight or d.gan_critic_weight > 0, "dmd.gan_critic_weight", d.gan_critic_weight,
               "> 0 when dmd.gan_weight > 0 (the generator's GAN loss needs a classifier that learns)")
        _check(len(d.gan_layers) >= 1 and len(set(d.gan_layers)) == len(d.gan_layers), "dmd.gan_layers",
               d.gan_layers, "one or more distinct critic block indices")
        _check(math.isfinite(d.regression_weight) and d.regression_weight >= 0, "dmd.regression_weight",
               d.regression_weight, "a finite number >= 0 (0 = off)")
        _check(not d.regression_weight or bool(self.models.ode_bank), "models.ode_bank", self.models.ode_bank,
               "a trajectory bank directory (an ode-init run's output with ode.num_trajectories > 0) when "
               "dmd.regression_weight > 0")
        _check(d.gan_head_dim >= 0, "dmd.gan_head_dim", d.gan_head_dim, ">= 0 (0 = the critic's width)")
        h = d.teacher_history
        _check(isinstance(h, int) and not isinstance(h, bool) and h >= 0 and (
            h == 0 or (self.rollout.num_frames is not None and not d.gan)), "dmd.teacher_history", h,
            "an int >= 0; > 0 needs a long rollout (rollout.num_frames) and no GAN term")
        _check(not d.gan or self.data.source != "prompts", "data.source", self.data.source,
               "shapes, latents or synthetic with dmd.gan_weight / gan_critic_weight > 0 (the GAN term needs real "
               "clips; a prompt file has none)")
        r = self.rollout
        _check(r.num_frames is None or r.num_frames >= 1, "rollout.num_frames", r.num_frames,
               "latent frames of the long rollout, >= 1 (whole blocks, at least the clip's), or null for the clip")
        _check(r.window in ROLLOUT_WINDOWS, "rollout.window", r.window,
               "uniform (a block-aligned window of the long rollout, uniformly) or last (its last window)")
        _check(self.sample.every >= 0, "sample.every", self.sample.every, ">= 0 (0 = never)")
        _check(len(self.sample.prompts) >= 1, "sample.prompts", self.sample.prompts, "at least one prompt")
        if self.stage == "vae":  # checked where it is read (engine.num_frames may be short for other stages)
            self.validate_vae()
        il = self.models.init_layers
        _check(il is None or (isinstance(il, int) and il >= 1 and (self.stage in ("ode-init", "dmd") or (
            self.models.init and self.stage in (None, "teacher")))), "models.init_layers", il,
               "null, or a number of blocks >= 1 for ode-init / dmd (the generator) or the teacher stage with "
               "models.init")
        _check(not self.models.text_encoder or self.stage in (None, "vae"), "models.text_encoder",
               self.models.text_encoder, "{} outside the vae stage (a new text encoder is part of the base the "
               "vae stage writes)")
        self.engine.schedule()  # raises on a bad step list / shift / context_t
        _check(self.engine.num_frame_per_block >= 1, "engine.num_frame_per_block", self.engine.num_frame_per_block,
               ">= 1")


    def validate_vae(self) -> None:
        v = self.vae
        for key in ("base_dim", "decoder_base_dim", "z_dim", "num_res_blocks", "eval_clips"):
            _check(getattr(v, key) >= 1, f"vae.{key}", getattr(v, key), ">= 1")
        _check(len(v.dim_mult) >= 2 and len(v.temperal_downsample) == len(v.dim_mult) - 1, "vae.temperal_downsample",
               v.temperal_downsample, f"one flag per spatial halving: len(vae.dim_mult) - 1 = {len(v.dim_mult) - 1}")
        tf = 2 ** sum(bool(d) for d in v.temperal_downsample)
        _check(v.clip_frames >= 1 and (v.clip_frames - 1) % tf == 0 and v.clip_frames <= self.engine.num_frames,
               "vae.clip_frames", v.clip_frames, f"1 + {tf}k frames, at most engine.num_frames = "
               f"{self.engine.num_frames}")
        for key in ("kl_weight", "object_weight", "align_weight"):
            _check(math.isfinite(getattr(v, key)) and getattr(v, key) >= 0, f"vae.{key}", getattr(v, key),
                   "a finite number >= 0")
        _check(self.data.source == "shapes", "data.source", self.data.source, "shapes for the vae stage (it trains "
               "on rendered clips)")


def positive_minutes(text: str) -> float:
    """argparse type of --minutes: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--minutes must be a number of minutes > 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"--minutes must be a number of minutes > 0, got {text}")
    return value


def _check(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"config key {key} = {value!r} is invalid: expected {expected}")


def _plain(x):
    """Tuples -> lists, recursively (YAML / JSON friendly)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# ------------------------------------------------------------------------------------------------ building


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_FLOAT_LITERAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value, hint, key: str):
    """Check (and gently convert: int -> float, list -> tuple) a value against a type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ValueError:
                pass
        raise ValueError(f"config key {key}: {value!r} is not a {_type_name(hint)}")
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(hint) or (Any,)
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    raise ValueError(f"config key {key}: {value!r} is not a {_type_name(hint)}")


def from_dict(cls, data: dict | None, prefix: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys raise a ValueError listing the valid ones."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ValueError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)} at {where}; "
                         f"valid keys: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        hint, value = hints[name], data[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    """Deep merge of mappings: `over` wins; nested mappings merge key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_preset(name_or_path: str | Path) -> Path:
    """A preset name (configs/<name>.yaml) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (PRESETS_DIR / f"{name_or_path}", PRESETS_DIR / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"config {name_or_path} not found (neither a file nor a preset); presets: "
                            f"{', '.join(list_presets()) or '(none)'}")


def list_presets() -> list[str]:
    """Training presets in configs/: YAML files with a `stage` (accelerate and other tools' files are skipped)."""
    if not PRESETS_DIR.is_dir():
        return []
    names = []
    for p in sorted(PRESETS_DIR.glob("*.yaml")):
        if p.stem.startswith("_"):
            continue
        try:
            if (yaml.safe_load(p.read_text()) or {}).get("stage") in STAGES:
                names.append(p.stem)
        except (yaml.YAMLError, AttributeError):
            continue
    return names


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a preset, following `extends:` (relative to the file) with a deep merge."""
    path = resolve_preset(path).resolve()
    if path in _seen:
        raise ValueError(f"config {path} extends itself (cycle: {' -> '.join(map(str, _seen + (path,)))})")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a YAML mapping, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is not None:
        beside = path.parent / parent  # relative to this file, else a preset name or a path
        data = _merge(read_yaml(beside if beside.is_file() else parent, _seen + (path,)), data)
    return data


def parse_overrides(items: list[str]) -> dict:
    """["--a.b", "1", "--c=x"] -> {"a": {"b": 1}, "c": "x"}; values parsed as YAML."""
    out: dict = {}
    i = 0
    while i < len(items):
        tok = items[i]
        if not tok.startswith("--") or len(tok) <= 2:
            raise ValueError(f"expected an override --key value, got {tok!r}")
        key = tok[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise ValueError(f"override --{key} needs a value")
            raw = items[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        parts = [p.replace("-", "_") for p in key.split(".")]
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override --{key} conflicts with another override")
        node[parts[-1]] = value
    return out


def load_config(preset: str | Path | None = None, overrides: dict | list[str] | None = None) -> Config:
    """Preset (name or path; None = defaults) + overrides (a nested dict or a --key value list) -> Config."""
    data = read_yaml(preset) if preset is not None else {}
    if overrides:
        data = _merge(data, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    cfg = from_dict(Config, data)
    cfg.validate()
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def diff_configs(a: Config, b: Config, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ."""
    da, db = a.to_dict(), b.to_dict()

    def walk(x, y, p):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                yield from walk(x.get(k), y.get(k), f"{p}{k}.")
        elif x != y:
            yield p.rstrip(".")

    return list(walk(da, db, prefix))
