"""Cache type specs (`q8`, `tq4/tq3`, ...) and the bytes they cost per cached token."""

from __future__ import annotations

import os

from ..errors import BadOptionError
from .codecs import DENSE, TYPES, vector_nbytes

ENV = "WREN_KV_CACHE"
AUTO = "auto"  # today's dense cache in the model's dtype


def kv_cache_types(spec: str | None = None) -> tuple[str, str]:
    """(key type, value type) of a spec: one type for both, or `KEYS/VALUES`. None takes $WREN_KV_CACHE,
    else `auto` (the dense cache in the model's dtype)."""
    if spec is None:
        spec = os.environ.get(ENV) or AUTO
    if not isinstance(spec, str):
        raise BadOptionError(f"a KV cache type must be a string such as q8 or tq4/tq3, got {spec!r}")
    parts = [p.strip() for p in spec.strip().lower().split("/")]
    if len(parts) == 1:
        parts = parts * 2
    known = (AUTO, *TYPES)
    if len(parts) != 2 or any(p not in known for p in parts):
        raise BadOptionError(f"unknown KV cache type {spec!r}: use one of {', '.join(known)}, "
                             "or KEYS/VALUES such as tq4/tq3")
    return parts[0], parts[1]


def model_dtype_name(model) -> str:
    dtype = model.norm.weight.dtype  # always dense, in the model's dtype
    return next((name for name, d in DENSE.items() if d == dtype), "f32")


def resolve_types(model, spec) -> tuple[str, str]:
    """Concrete (key, value) types for a model: `auto` becomes its dtype. `spec` is a string, None (the
    default) or a (key, value) pair."""
    types = spec if isinstance(spec, tuple) else kv_cache_types(spec)
    return tuple(model_dtype_name(model) if t == AUTO else t for t in types)


def spec_name(types: tuple[str, str]) -> str:
    return types[0] if types[0] == types[1] else f"{types[0]}/{types[1]}"


def kv_bytes_per_token(model, spec=None) -> int:
    """Cache bytes one position costs where every KV-owning layer holds it (sliding rings stop growing at
    their window; KV-shared layers own nothing): sum over layers of kv_heads x (key + value vector bytes)."""
    k, v = resolve_types(model, spec)
    return sum(s.num_kv_heads * (vector_nbytes(k, s.head_dim) + vector_nbytes(v, s.head_dim))
               for i, s in enumerate(model.specs) if s.kv_source == i)
