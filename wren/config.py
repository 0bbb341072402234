"""Model configs: dataclasses built from an HF config.json dict or GGUF metadata.

`from_dict` keeps the keys it knows and ignores the rest, so newer checkpoints with extra fields load.
Each config resolves to a list of `LayerSpec`s: everything a decoder layer needs to know about itself.
"""

from __future__ import annotations

import dataclasses
import reprlib
from dataclasses import dataclass, field
from typing import Any

from .errors import ModelFormatError, UnsupportedModelError

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer, fully resolved."""

    kind: str  # SLIDING or FULL
    head_dim: int
    num_kv_heads: int
    rope_theta: float
    rope_dims: int  # how many of head_dim's dims are rotated (the rest pass through)
    rope_factor: float  # linear position scaling (1.0 = none)
    kv_source: int  # index of the layer whose K/V this layer attends to (itself unless KV-shared)
    mlp_width: int
    k_eq_v: bool = False  # V comes from k_proj (Gemma 4 "attention_k_eq_v" full layers)


def _pick(cls, d: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in known and v is not None}


def _layer_types(layer_types, n_layers: int, pattern: int) -> list[str]:
    if layer_types:
        if len(layer_types) != n_layers:
            raise ModelFormatError(f"config lists {len(layer_types)} layer_types for {n_layers} layers")
        return list(layer_types)
    return [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]


def _first_token_id(value):
    return value[0] if isinstance(value, list) and value else value


@dataclass
class Gemma3Config:
    model_type: str = "gemma3"
    vocab_size: int = 262_144
    hidden_size: int = 640
    intermediate_size: int = 2048
    num_hidden_layers: int = 18
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 256
    max_position_embeddings: int = 32_768
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256
    sliding_window: int = 512
    sliding_window_pattern: int = 6
    layer_types: list[str] | None = None
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_scaling_factor: float = 1.0
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: Any = 1
    pad_token_id: int | None = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Gemma3Config":
        d = dict(d.get("text_config") or d)
        rope = d.get("rope_parameters") or {}
        if rope.get("full_attention"):
            d.setdefault("rope_theta", rope["full_attention"].get("rope_theta"))
            d["rope_scaling_factor"] = float(rope["full_attention"].get("factor", 1.0))
        if rope.get("sliding_attention"):
            d.setdefault("rope_local_base_freq", rope["sliding_attention"].get("rope_theta"))
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling_factor"] = float(d["rope_scaling"].get("factor", 1.0))
        return cls(**_pick(cls, d))

    def layer_specs(self) -> list[LayerSpec]:
        kinds = _layer_types(self.layer_types, self.num_hidden_layers, self.sliding_window_pattern)
        specs = []
        for i, kind in enumerate(kinds):
            full = kind == FULL
            specs.append(LayerSpec(
                kind=kind, head_dim=self.head_dim, num_kv_heads=self.num_key_value_heads,
                rope_theta=self.rope_theta if full else self.rope_local_base_freq,
                rope_dims=self.head_dim, rope_factor=self.rope_scaling_factor if full else 1.0,
                kv_source=i, mlp_width=self.intermediate_size))
        return specs


@dataclass
class Gemma4Config:
    model_type: str = "gemma4"
    vocab_size: int = 262_144
    hidden_size: int = 1536
    intermediate_size: int = 6144
    num_hidden_layers: int = 35
    num_attention_heads: int = 8
    num_key_value_heads: int = 1
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512
    layer_types: list[str] | None = None
    rope_parameters: dict[str, Any] = field(default_factory=dict)
    per_layer_config: dict[str, Any] = field(default_factory=dict)
    final_logit_softcapping: float | None = None
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int = 0
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    enable_moe_block: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: Any = 1
    pad_token_id: int | None = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Gemma4Config":
        d = dict(d.get("text_config") or d)
        cfg = cls(**_pick(cls, d))
        if cfg.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise UnsupportedModelError(f"Gemma 4 activation {cfg.hidden_activation!r} is not supported")
        if cfg.enable_moe_block and not (cfg.num_experts and cfg.top_k_experts and cfg.moe_intermediate_size):
            raise ModelFormatError("MoE config needs num_experts, top_k_experts and moe_intermediate_size")
        return cfg

    def _rope(self, kind: str) -> dict[str, Any]:
        default = ({"rope_theta": 10_000.0} if kind == SLIDING
                   else {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0})
        return self.rope_parameters.get(kind) or default

    def _overrides(self, i: int, kind: str) -> dict[str, Any]:
        # Saved configs carry per_layer_config (keys are strings in JSON); raw ones carry the top-level
        # global_head_dim / num_global_key_value_heads that apply to every full layer.
        if self.per_layer_config:
            return self.per_layer_config.get(str(i)) or self.per_layer_config.get(i) or {}
        if kind != FULL:
            return {}
        out = {"head_dim": self.global_head_dim}
        if self.attention_k_eq_v and self.num_global_key_value_heads:
            out["num_key_value_heads"] = self.num_global_key_value_heads
        return out

    def kv_sources(self, kinds: list[str]) -> list[int]:
        """The last `num_kv_shared_layers` layers read the K/V of the last earlier layer of their type."""
        n = self.num_hidden_layers
        first_shared = n - self.num_kv_shared_layers
        sources = list(range(n))
        for i in range(first_shared, n):
            producers = [j for j in range(first_shared) if kinds[j] == kinds[i]]
            if not producers:
                raise ModelFormatError(f"KV-shared layer {i} ({kinds[i]}) has no earlier layer of its type")
            sources[i] = producers[-1]
        return sources

    def layer_specs(self) -> list[LayerSpec]:
        kinds = _layer_types(self.layer_types, self.num_hidden_layers, 6)
        kinds[-1] = FULL  # Gemma 4 always ends on a full-attention layer
        sources = self.kv_sources(kinds)
        first_shared = self.num_hidden_layers - self.num_kv_shared_layers
        specs = []
        for i, kind in enumerate(kinds):
            over = self._overrides(i, kind)
            head_dim = int(over.get("head_dim", self.head_dim))
            rope = self._rope(kind)
            fraction = float(rope.get("partial_rotary_factor", 1.0)) if rope.get("rope_type") == "proportional" else 1.0
            wide = self.use_double_wide_mlp and i >= first_shared
            specs.append(LayerSpec(
                kind=kind, head_dim=head_dim,
                num_kv_heads=int(over.get("num_key_value_heads", self.num_key_value_heads)),
                rope_theta=float(rope.get("rope_theta", 10_000.0)),
                rope_dims=2 * int(fraction * head_dim // 2), rope_factor=float(rope.get("factor", 1.0)),
                kv_source=sources[i], mlp_width=self.intermediate_size * (2 if wide else 1),
                k_eq_v=self.attention_k_eq_v and kind == FULL))
        return specs


CONFIGS = {"gemma3": Gemma3Config, "gemma3_text": Gemma3Config, "gemma4": Gemma4Config, "gemma4_text": Gemma4Config}


def config_from_dict(d: dict[str, Any]):
    """Pick the config class by model_type (the text sub-config's when there is one)."""
    if not isinstance(d, dict):
        raise ModelFormatError("config.json must hold a JSON object")
    model_type = (d.get("text_config") or {}).get("model_type") or d.get("model_type")
    if model_type not in CONFIGS:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; wren runs {sorted(set(CONFIGS))}")
    try:
        cfg = CONFIGS[model_type].from_dict(d)
    except TypeError as exc:
        raise ModelFormatError(f"config.json has a field of the wrong type: {exc}") from None
    cfg.model_type = model_type.removesuffix("_text")
    _check_sizes(cfg)
    return cfg


def _check_sizes(cfg) -> None:
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or not 0 < value < 1 << 24:
            raise ModelFormatError(f"config field {name}={value!r} is not a sane positive integer")


def validate_config(cfg, specs: list[LayerSpec]) -> None:
    """Reject config values that would only fail (or allocate wildly) later, while the model runs."""
    def bad(name, value, want):
        raise ModelFormatError(f"config {name}={reprlib.repr(value)} is not {want}; the config is corrupt")

    def number(v):  # what torch takes as a scalar: a float, or an int that fits int64
        return type(v) is float or (type(v) is int and -(1 << 63) <= v < 1 << 63)

    for name in ("rms_norm_eps", "final_logit_softcapping", "attn_logit_softcapping", "query_pre_attn_scalar"):
        value = getattr(cfg, name, None)
        if value is not None and not number(value):
            bad(name, value, "a number")
    if getattr(cfg, "query_pre_attn_scalar", 1) <= 0:
        bad("query_pre_attn_scalar", cfg.query_pre_attn_scalar, "positive")
    for name in ("sliding_window", "max_position_embeddings"):
        if type(getattr(cfg, name)) is not int or not 0 < getattr(cfg, name) < 1 << 31:
            bad(name, getattr(cfg, name), "a positive integer below 2**31")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(cfg, name)
        ids = value if isinstance(value, list) and name == "eos_token_id" else [value]
        if value is not None and not all(type(i) is int and 0 <= i < cfg.vocab_size for i in ids):
            bad(name, value, f"a token id below vocab_size={cfg.vocab_size}")
    if getattr(cfg, "enable_moe_block", False):
        k, e = cfg.top_k_experts, cfg.num_experts
        if not (type(k) is int and type(e) is int and 0 < k <= e):
            bad("top_k_experts", k, f"between 1 and num_experts={e!r}")
    heads = cfg.num_attention_heads
    for i, s in enumerate(specs):
        if s.kind not in (SLIDING, FULL):
            bad(f"layer_types[{i}]", s.kind, f"{SLIDING!r} or {FULL!r}")
        if type(s.head_dim) is not int or s.head_dim <= 0 or s.head_dim % 2:
            bad(f"head_dim (layer {i})", s.head_dim, "a positive even integer")
        if type(s.num_kv_heads) is not int or s.num_kv_heads <= 0 or heads % s.num_kv_heads:
            bad(f"num_key_value_heads (layer {i})", s.num_kv_heads, f"a divisor of num_attention_heads={heads}")
        if not 0 <= s.rope_dims <= s.head_dim:
            bad(f"rotary dims (layer {i})", s.rope_dims, f"between 0 and head_dim={s.head_dim}")
        if not (number(s.rope_theta) and number(s.rope_factor)):
            bad(f"rope theta/factor (layer {i})", (s.rope_theta, s.rope_factor), "a number")
