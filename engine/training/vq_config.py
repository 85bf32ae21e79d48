"""The `vq:` section of the training config (imported by config.py; no training imports, so no cycle)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class VQTrainConfig:
    """The `vq:` config section.

    preset: an engine.quantized preset whose transformer a new quantized model starts from (vq stage without
        models.init), and whose quantizer settings convert an unquantized model; None = the base's architecture.
    quantizer: quantizer config keys on top of the preset (quantizer, codebook_size, codebook_dim,
        commitment_weight, ema_decay, kmeans_init, kmeans_iters, dead_code_threshold, fsq_levels).
    quantization_weight: loss = denoising + quantization_weight * VQ loss.
    noise_schedule: flow | linear | cosine (vq stage; vq-dmd is flow matching, as the few-step sampler).
    min_step, max_step: inclusive range of loss timesteps, model timesteps of engine.num_train_timesteps.
    denoising_target: "output" = MSE of the network output (flow or eps, the usual diffusion loss; quantization
        residuals are divided by sigma there) | "x0" = MSE of the quantized x0 against the clean latents.
    """

    preset: str | None = None
    quantizer: dict = field(default_factory=dict)
    quantization_weight: float = 0.1
    noise_schedule: str = "flow"
    min_step: int = 20
    max_step: int = 980
    denoising_target: str = "output"

    def validate(self, num_train_timesteps: int = 1000) -> None:
        if self.quantization_weight < 0:
            raise ValueError(f"config key vq.quantization_weight = {self.quantization_weight!r} is invalid: >= 0")
        if self.noise_schedule not in ("flow", "linear", "cosine"):
            raise ValueError(f"config key vq.noise_schedule = {self.noise_schedule!r} is invalid: expected one of "
                             f"flow, linear, cosine")
        if self.denoising_target not in ("output", "x0"):
            raise ValueError(f"config key vq.denoising_target = {self.denoising_target!r} is invalid: expected "
                             f"output or x0")
        if not 0 <= self.min_step < self.max_step <= num_train_timesteps:
            raise ValueError(f"config keys vq.min_step / vq.max_step = {self.min_step}, {self.max_step} are "
                             f"invalid: expected 0 <= min_step < max_step <= {num_train_timesteps}")
