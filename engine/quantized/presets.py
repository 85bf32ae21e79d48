"""Named presets of the quantized generator: one registry, typed, no class names in strings.

The original system's scale: hidden width 1024, 6 to 24 layers, codebooks of 4096 to 16384 codes of dimension
256 to 768, 1000 training timesteps with the loss timesteps in [20, 980], AdamW lr 1e-4, batch 4 with gradient
accumulation 2, 1000 warm-up steps, quantization weight 0.1. Those four (`small`, `medium`, `large`,
`dmd_optimized`) assume Wan2.1's VAE (16 latent channels) and UMT5-XXL (4096-dimensional prompts) and a GPU;
`tiny` has engine.testing's shapes and trains on this CPU in seconds.

    preset = get_preset("small")
    model = preset.build_transformer(seed=0)         # QuantizedCausalWanTransformer3DModel
    preset.train                                      # QuantizedTrainSettings
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from engine.models.quantized_wan import QuantizedCausalWanTransformer3DModel


@dataclass(frozen=True)
class QuantizedTrainSettings:
    """Training settings of a preset (what `engine.training.vq` reads).

    quantization_weight: loss = denoising + quantization_weight * VQ loss. min_step / max_step: loss timesteps
    (model timesteps of num_train_timesteps). noise_schedule: flow | linear | cosine.
    """

    lr: float = 1e-4
    batch_size: int = 4
    grad_accum: int = 2
    warmup_steps: int = 1000
    quantization_weight: float = 0.1
    num_train_timesteps: int = 1000
    min_step: int = 20
    max_step: int = 980
    noise_schedule: str = "flow"
    max_steps: int = 100_000


@dataclass(frozen=True)
class QuantizedPreset:
    name: str
    description: str
    transformer: dict = field(default_factory=dict)  # QuantizedCausalWanTransformer3DModel config
    train: QuantizedTrainSettings = field(default_factory=QuantizedTrainSettings)

    def build_transformer(self, seed: int = 0, **overrides) -> QuantizedCausalWanTransformer3DModel:
        cfg = {**self.transformer, "num_train_timesteps": self.train.num_train_timesteps,
               "noise_schedule": self.train.noise_schedule, **overrides}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return QuantizedCausalWanTransformer3DModel(**cfg)

    def num_parameters(self) -> int:
        """Parameter count without building the model (meta device)."""
        with torch.device("meta"):
            m = QuantizedCausalWanTransformer3DModel(**self.transformer)
        return sum(p.numel() for p in m.parameters())


# Wan2.1's latent / prompt interface with a 1024-wide body (8 heads of 128)
_WAN_IO = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
               num_attention_heads=8, attention_head_dim=128, ffn_dim=4096, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def _wan(num_layers: int, codebook_size: int, codebook_dim: int, **kw) -> dict:
    return {**_WAN_IO, "num_layers": num_layers, "quantizer": "vq", "codebook_size": codebook_size,
            "codebook_dim": codebook_dim, "commitment_weight": 0.25, "ema_decay": 0.99, "kmeans_init": True,
            "kmeans_iters": 10, "dead_code_threshold": 2.0, **kw}


PRESETS: dict[str, QuantizedPreset] = {
    p.name: p
    for p in [
        QuantizedPreset("tiny", "engine.testing shapes (4 latent channels, 32-d prompts), 2 layers, 64 codes of "
                        "dimension 32: trains on a CPU in seconds",
                        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                             out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                             cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
                             quantizer="vq", codebook_size=64, codebook_dim=32, commitment_weight=0.25,
                             ema_decay=0.9, kmeans_init=True, kmeans_iters=10, dead_code_threshold=0.5),
                        QuantizedTrainSettings(lr=1e-3, batch_size=2, grad_accum=1, warmup_steps=5, max_steps=20)),
        QuantizedPreset("small", "6 layers x 1024, codebook 4096 x 256", _wan(6, 4096, 256)),
        QuantizedPreset("medium", "12 layers x 1024, codebook 8192 x 512", _wan(12, 8192, 512)),
        QuantizedPreset("large", "24 layers x 1024, codebook 16384 x 768", _wan(24, 16384, 768)),
        QuantizedPreset("dmd_optimized", "12 layers x 1024, codebook 8192 x 512, for few-step DMD distillation: "
                        "slower EMA and a higher dead-code threshold against the codebook churn of short rollouts",
                        _wan(12, 8192, 512, ema_decay=0.995, dead_code_threshold=4.0)),
    ]
}


def get_preset(name: str) -> QuantizedPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown quantized preset {name!r}; accepted: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_table() -> str:
    """Markdown table of the presets (docs/quantized.md)."""
    rows = ["| preset | layers | width | codebook | code dim | params | lr | batch x accum | warmup | q-weight |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in PRESETS.values():
        t, tr = p.transformer, p.train
        rows.append(f"| {p.name} | {t['num_layers']} | {t['num_attention_heads'] * t['attention_head_dim']} | "
                    f"{t['codebook_size']} | {t['codebook_dim']} | {p.num_parameters() / 1e6:.1f} M | {tr.lr:g} | "
                    f"{tr.batch_size} x {tr.grad_accum} | {tr.warmup_steps} | {tr.quantization_weight} |")
    return "\n".join(rows)


def tiny_quantized_transformer(seed: int = 0, **kw) -> QuantizedCausalWanTransformer3DModel:
    """The tiny preset's transformer (engine.testing shapes), in eval mode."""
    return get_preset("tiny").build_transformer(seed, **kw).eval()


def replace_train(preset: QuantizedPreset, **kw) -> QuantizedPreset:
    return dataclasses.replace(preset, train=dataclasses.replace(preset.train, **kw))
