"""Models: pure nn.Modules, no sampling loop, no I/O."""

from .causal_wan import CausalWanTransformer3DModel
from .kv_cache import KVCache
from .quantized_wan import QuantizedCausalWanTransformer3DModel, transformer_class_for

__all__ = ["CausalWanTransformer3DModel", "KVCache", "QuantizedCausalWanTransformer3DModel", "transformer_class_for"]
