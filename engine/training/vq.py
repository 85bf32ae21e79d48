"""Training a quantized generator: denoising + quantization_weight x VQ loss, and DMD of a quantized generator.

Two stages for the trainer (`engine.training.trainer.train`), registered through `VQ_STAGES`:

    vq       a quantized denoiser (`QuantizedCausalWanTransformer3DModel`) trained on data latents with
             loss = denoising loss + quantization_weight * VQ loss (`QuantizedDenoisingLoss`), under flow
             matching or a DDPM beta schedule (vq.noise_schedule), timesteps in [vq.min_step, vq.max_step];
    vq-dmd   Self-Forcing DMD (the dmd stage) of a quantized generator, with quantization_weight * VQ loss of
             its rollout added to the generator loss. An unquantized models.generator is converted with a fresh
             quantizer head (`vq.quantizer` settings or `vq.preset`).

Every step logs, besides the losses: codebook usage and perplexity of the batch's codes, dead codes of the
batch (codes not chosen) and of the EMA statistics (codes whose EMA cluster size is below the replacement
threshold, what the quantizer would replace).

Config: the `vq:` section (`VQTrainConfig`), e.g. configs/vq-tiny.yaml.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from engine.models.causal_wan import CausalWanTransformer3DModel
from engine.models.quantized_wan import QuantizedCausalWanTransformer3DModel, VQInfo
from engine.sampling.ddpm import DDPMSchedule
from engine.sampling.schedule import FlowSchedule

from .stages import DMDStage, TeacherStage, load_transformer, new_transformer
from .vq_config import VQTrainConfig


# ------------------------------------------------------------------------------------------------ metrics
def vq_metrics(model: QuantizedCausalWanTransformer3DModel, infos: list[VQInfo]) -> dict:
    """Codebook usage, perplexity and dead codes of the codes in `infos`, plus the EMA dead-code count."""
    K = model.vq_head.codebook_size
    idx = torch.cat([i.indices.reshape(-1) for i in infos]).cpu()
    counts = torch.bincount(idx, minlength=K).double()
    p = counts[counts > 0] / counts.sum()
    logs = {"codebook_usage": float((counts > 0).sum()) / K, "perplexity": math.exp(float(-(p * p.log()).sum())),
            "dead_codes_batch": float((counts == 0).sum()),
            "commitment": float(np.mean([float(i.commitment) for i in infos]))}
    ema = model.vq_head.ema_cluster_size()
    if ema is not None:
        logs["dead_codes"] = float((ema < max(model.config.dead_code_threshold, 1e-9)).sum())
    return logs


def _unwrap(net):
    return getattr(net, "module", net)  # DDP


# ------------------------------------------------------------------------------------------------ the loss
class QuantizedDenoisingLoss:
    """loss = E ||out(x_t, t) - target||^2 + quantization_weight * VQ loss, the quantized model's training loss.

    Flow matching (FlowSchedule): x_t = (1 - s) x + s eps, target v = eps - x, s = t / T with t uniform, shifted
    and clamped to [min_step, max_step]. DDPM (DDPMSchedule, Ho et al. 2020 eq. 14, the "simple" loss): x_t =
    sqrt(a_t) x + sqrt(1 - a_t) eps, target eps, t uniform integers in [min_step, max_step]. The model's output
    is its quantized prediction (straight-through), so the denoising loss trains the network and the
    quantizer's projections; the VQ loss (commitment) pulls the encoder side towards its codes; the codebook
    itself follows its EMA.

    target="x0" replaces the first term by E ||x0_q(x_t, t) - x||^2 (sigma^2 times the flow loss): quantization
    residuals are not amplified at low noise, at the price of a weaker signal there.

    model_fn(x_t, t) must return an output with `.sample` and `.vq` (a forward with return_vq=True).
    Returns (loss, logs): float32 scalar, logs of Python floats.
    """

    def __init__(self, schedule: FlowSchedule | DDPMSchedule, quantization_weight: float = 0.1, min_step: int = 20,
                 max_step: int = 980, target: str = "output"):
        if target not in ("output", "x0"):
            raise ValueError(f"unknown denoising target {target!r}; accepted: output, x0")
        self.schedule, self.weight, self.target = schedule, float(quantization_weight), target
        self.min_step, self.max_step = min_step, max_step

    def _draw(self, B: int, generator, device) -> torch.Tensor:
        s = self.schedule
        if isinstance(s, DDPMSchedule):
            t = torch.randint(self.min_step, self.max_step + 1, (B,), generator=generator)
            return t.float().to(device)
        T = s.num_train_timesteps
        return s.sample_timesteps(B, generator=generator, min_frac=self.min_step / T, max_frac=self.max_step / T,
                                  device=device)

    def __call__(self, x: torch.Tensor, model_fn, generator: torch.Generator | None = None):
        B = x.shape[0]
        x = x.float()
        t = self._draw(B, generator, x.device)  # (B,)
        eps = torch.randn(x.shape, generator=generator).to(x.device)
        if isinstance(self.schedule, DDPMSchedule):
            x_t, target = self.schedule.add_noise(x, eps, t), eps
        else:
            s = (t / self.schedule.num_train_timesteps).view(-1, *([1] * (x.ndim - 1)))
            x_t, target = (1 - s) * x + s * eps, eps - x
        out = model_fn(x_t, t)
        if getattr(out, "vq", None) is None:
            raise ValueError("QuantizedDenoisingLoss needs a quantized model called with return_vq=True")
        if self.target == "x0":
            denoise = (out.vq.x0_q.float() - x).pow(2).mean()
        else:
            denoise = (out.sample.float() - target).pow(2).mean()
        vq_loss = out.vq.loss.float()
        loss = denoise + self.weight * vq_loss
        logs = {"denoising_loss": denoise.item(), "vq_loss": vq_loss.item(), "timestep_mean": t.mean().item()}
        return loss, logs


# ------------------------------------------------------------------------------------------------ models
def quantizer_config(vq: VQTrainConfig) -> dict:
    """Quantizer keys of the preset (if any) with vq.quantizer on top."""
    keys = ("quantizer", "codebook_size", "codebook_dim", "commitment_weight", "ema_decay", "kmeans_init",
            "kmeans_iters", "dead_code_threshold", "fsq_levels")
    cfg = {}
    if vq.preset is not None:
        from engine.quantized.presets import get_preset

        cfg = {k: v for k, v in get_preset(vq.preset).transformer.items() if k in keys}
    unknown = sorted(set(vq.quantizer) - set(keys))
    if unknown:
        raise ValueError(f"unknown quantizer setting(s) {unknown} in vq.quantizer; valid: {', '.join(keys)}")
    return {**cfg, **vq.quantizer}


def as_quantized(model: CausalWanTransformer3DModel, vq: VQTrainConfig,
                 **extra) -> QuantizedCausalWanTransformer3DModel:
    """A quantized model as is; an unquantized one converted with the configured quantizer head."""
    if isinstance(model, QuantizedCausalWanTransformer3DModel):
        return model
    return QuantizedCausalWanTransformer3DModel.from_unquantized(model, **quantizer_config(vq), **extra)


def load_any_transformer(path: str, key: str) -> CausalWanTransformer3DModel:
    """stages.load_transformer: an engine or transformer directory, the class chosen by its config (quantized
    or not)."""
    return load_transformer(path, key)


# ------------------------------------------------------------------------------------------------ stages
class QuantizedTeacherStage(TeacherStage):
    """vq: train a quantized denoiser on data latents (denoising + quantization_weight x VQ loss)."""

    name, product = "vq", "teacher"

    def __init__(self, cfg, rt, comps):
        vq: VQTrainConfig = cfg.vq
        vq.validate(cfg.engine.num_train_timesteps)
        self._vq = vq
        super(TeacherStage, self).__init__(cfg, rt, comps)  # Stage.__init__: the model is built here
        m = cfg.models
        extra = {"noise_schedule": vq.noise_schedule, "num_train_timesteps": cfg.engine.num_train_timesteps}
        if m.init:
            if m.transformer:
                raise ValueError("models.transformer (a new architecture) and models.init (existing weights) "
                                 "exclude each other")
            model = load_any_transformer(m.init, "models.init")
            model = as_quantized(model, vq, **extra)
        elif vq.preset is not None and not m.transformer:
            from engine.quantized.presets import get_preset

            model = get_preset(vq.preset).build_transformer(cfg.train.seed, **quantizer_config(vq), **extra)
        else:
            base = new_transformer(comps.transformer_config, m.transformer, cfg.train.seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.train.seed)
                model = as_quantized(base, vq, **extra)
        self.attach_denoiser(model, cfg, comps, rt)
        T = cfg.engine.num_train_timesteps
        schedule = (FlowSchedule(T, cfg.engine.shift) if vq.noise_schedule == "flow"
                    else DDPMSchedule(vq.noise_schedule, T, min_step=vq.min_step, max_step=min(vq.max_step, T - 1)))
        self.loss_fn = QuantizedDenoisingLoss(schedule, vq.quantization_weight, vq.min_step, vq.max_step,
                                              target=vq.denoising_target)

    def loss(self, batch, rnd):
        net = self.nets["teacher"]
        x = batch.latents.to(self.rt.device)  # (B, C, F, h, w)
        emb = batch.prompt_embeds.clone()  # (B, L, D)
        drop = torch.rand(emb.shape[0], generator=rnd.local("caption_dropout")) < self.cfg.flow_matching.caption_dropout
        emb[drop] = 0.0
        emb = emb.to(self.rt.device)
        infos = []

        def model_fn(x_t, t):
            out = net(x_t, t, emb, return_vq=True)
            infos.append(out.vq)
            return out

        loss, logs = self.loss_fn(x, model_fn, generator=rnd.local("fm"))
        logs.update(vq_metrics(_unwrap(net), infos))
        logs["caption_dropout"] = drop.float().mean().item()
        return loss, logs

    @torch.no_grad()
    def sample_video(self, name, transformer, embeds):
        if self._vq.noise_schedule == "flow":
            return super().sample_video(name, transformer, embeds)
        from engine.io import to_uint8
        from engine.sampling.codec import decode_full
        from engine.sampling.ddpm import ddim_sample

        from .data import seeded

        transformer = transformer.to(self.rt.device).eval()
        C, F, h, w = self.latent_shape(transformer)
        sched = DDPMSchedule(self._vq.noise_schedule, self.cfg.engine.num_train_timesteps)
        out = []
        for i, e in enumerate(embeds):
            z = torch.randn((1, C, F, h, w), generator=seeded(self.cfg.sample.seed, i)).to(self.rt.device)
            x0 = ddim_sample(transformer, e[None], z, sched, self.cfg.flow_matching.sample_steps)
            video = decode_full(self.comps.vae, x0).clamp(-1, 1)
            out.append(to_uint8((video[0].permute(1, 2, 3, 0).float() + 1) / 2))
        return out

class QuantizedDMDStage(DMDStage):
    """vq-dmd: Self-Forcing DMD of a quantized generator, + quantization_weight x VQ loss of its rollout."""

    name = "vq-dmd"

    def __init__(self, cfg, rt, comps):
        cfg.vq.validate(cfg.engine.num_train_timesteps)
        self._vq = cfg.vq
        super().__init__(cfg, rt, comps)

    def _load_teacher_and_generator(self, generator_required: bool):
        cfg = self.cfg
        teacher = load_any_transformer(cfg.models.teacher, "models.teacher")
        if not cfg.models.generator:
            raise ValueError("config key models.generator is required for the vq-dmd stage (the ode-init "
                             "output or a quantized generator)")
        generator = load_any_transformer(cfg.models.generator, "models.generator")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            generator = as_quantized(generator, self._vq, num_train_timesteps=cfg.engine.num_train_timesteps)
        self.schedule = cfg.engine.schedule()
        self.block = cfg.engine.num_frame_per_block
        return teacher, generator

    def rollout(self, cond, rnd, grad: bool):
        net = self.nets["generator"]
        infos: list[VQInfo] = []

        class Recording:  # the generator as the rollout calls it, with the VQ results of each call kept
            def __call__(self, x, t, c, **kw):
                out = net(x, t, c, return_vq=True, **kw)
                if not kw.get("update_cache", False):
                    infos.append(out.vq)
                return out

        real, self.nets["generator"] = net, Recording()
        try:
            res, seconds = super().rollout(cond, rnd, grad)
        finally:
            self.nets["generator"] = real
        self._last_vq = infos
        return res, seconds

    def generator_step(self, batch, rnd):
        loss, logs = super().generator_step(batch, rnd)
        infos = self._last_vq
        with_grad = [i.loss for i in infos if i.loss.requires_grad]
        vq_loss = torch.stack(with_grad).mean() if with_grad else loss.new_zeros(())
        logs.update(vq_metrics(_unwrap(self.trainables["generator"]), infos))
        logs.update(vq_loss=vq_loss.item(), generator_loss=loss.item())
        return loss + self._vq.quantization_weight * vq_loss, logs


VQ_STAGES = {"vq": QuantizedTeacherStage, "vq-dmd": QuantizedDMDStage}
