"""Compressed KV caches: the cache types, their byte formulas, and the cache that stores them.

    kv_cache_types("tq4/tq3")          # ("tq4", "tq3"): keys at 4 bits per channel, values at 3
    make_kv_cache(model, batch, max_len, "q8")

Types: `f32`, `f16`, `bf16` (dense), `q8` (int8 + one fp16 absmax scale per head vector), `tq4`, `tq3.5`,
`tq3`, `tq2.5`, `tq2` (TurboQuant MSE codes of the Hadamard-rotated head vector + one fp16 scale), and
`auto`, today's dense cache in the model's dtype. A spec is one type or `KEYS/VALUES`.
"""

from .cache import CompressedKVCache, context_for_budget, kv_cache_bytes, make_kv_cache
from .codecs import TYPES, codec_for, vector_nbytes
from .slots import CompressedSlotCache, make_slot_cache
from .types import kv_bytes_per_token, kv_cache_types, resolve_types, spec_name

__all__ = ["CompressedKVCache", "CompressedSlotCache", "make_kv_cache", "make_slot_cache", "context_for_budget",
           "kv_cache_bytes", "kv_bytes_per_token", "kv_cache_types", "resolve_types", "spec_name", "codec_for",
           "vector_nbytes", "TYPES"]
