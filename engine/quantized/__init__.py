"""The quantized generator variant: presets, codebook analysis, command line (`python -m engine.quantized`).

The model itself is `engine.models.quantized_wan.QuantizedCausalWanTransformer3DModel`; DDPM / DDIM schedules
are in `engine.sampling.ddpm`; training in `engine.training.vq`. See docs/quantized.md.
"""

from .presets import PRESETS, QuantizedPreset, QuantizedTrainSettings, get_preset, tiny_quantized_transformer

__all__ = ["PRESETS", "QuantizedPreset", "QuantizedTrainSettings", "get_preset", "tiny_quantized_transformer"]
