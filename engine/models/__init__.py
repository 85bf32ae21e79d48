"""Models: pure nn.Modules, no sampling loop, no I/O."""

from .causal_wan import CausalWanTransformer3DModel
from .kv_cache import KVCache

__all__ = ["CausalWanTransformer3DModel", "KVCache"]
