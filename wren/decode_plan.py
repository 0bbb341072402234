"""Gemma 3 decoding one layer a call: the compiled kernels' `decode_layer` (`_native.c`) instead of the
layer's modules.

At batch 1 and one new token, a decoder layer is some seventy small PyTorch ops and Python calls around
seven matmuls; on a 270M model that overhead was a third of a decode step. The plan lists, per layer, the
addresses the kernel reads and writes (the int8 levels of the seven TurboQuant projections, the norms, the
cache's buffers) once, at the first decoded token of a cache; every later token is one call per layer.

It is built only where it computes what the modules compute: a Gemma 3 model in float32 with TurboQuant
projections the compiled kernels take, and a cache of one sequence that is dense (f32, f16 or bf16) or
TurboQuant-coded in a layout the kernel reads (it then codes the new key and value itself, as the codec
does, and attends from the codes). Anything else returns None and the modules run. A plan belongs to its cache and the model it was built for (a cache handed
to another model gets a new one); like the cache's contents, it assumes that model's weights are not changed
while the cache is in use (the tensors it points to are kept alive either way).
"""

from __future__ import annotations

import weakref

import torch

from . import native
from .cache import KVCache
from .quant.linear import TQWeight

ENABLED = True  # tests turn it off to compare with the modules


class DecodePlan:
    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor, str]], keep: list):
        self.layers = [(p.data_ptr(), f.data_ptr(), kind) for p, f, kind in layers]
        self._keep = (layers, keep)  # what the addresses point into

    def run(self, x: torch.Tensor, rope: dict, position: int) -> torch.Tensor:
        """Every layer for one token: x [1, 1, hidden] float32, updated in place and returned."""
        x = x.contiguous()
        tables = {kind: (cos.contiguous(), sin.contiguous()) for kind, (cos, sin) in rope.items()}
        pointers = {kind: (cos.data_ptr(), sin.data_ptr()) for kind, (cos, sin) in tables.items()}
        threads = torch.get_num_threads()
        for p, f, kind in self.layers:
            native._native.decode_layer(p, f, x.data_ptr(), *pointers[kind], position, threads)
        return x


def plan_for(model, cache, ids: torch.Tensor) -> DecodePlan | None:
    """The plan for one decoded token with this cache (built at its first such token), or None where the
    modules must run."""
    if (not ENABLED or cache is None or ids.shape != (1, 1) or ids.device.type != "cpu" or torch.is_grad_enabled()
            or not native.available() or getattr(cache, "step_position", None) is not None):
        return None
    built = getattr(cache, "_decode_plan", None)  # (the model it was built for, the plan or None)
    if built is None or built[0]() is not model:  # a cache handed to another model gets a plan of its own
        built = (weakref.ref(model), _build(model, cache))
        cache._decode_plan = built
    return built[1]


def _cache_fields(cache, layer: int, head_dim: int) -> dict | None:
    """The plan's fields for one layer's cache: a dense cache (KVCache, or a CompressedKVCache of dense
    types), or a TurboQuant one whose codes the kernel reads (both halves); None for anything else."""
    from .kv.codecs import TQ, Dense

    if type(cache) is KVCache:
        keys, values = cache.keys.get(layer), cache.values.get(layer)
        parts = None
    else:  # a CompressedKVCache
        codecs = cache.codecs.get(layer, ())
        if all(isinstance(c, Dense) for c in codecs):
            if cache.key_scale.get(layer) is not None:
                return None
            keys, values = cache.keys[layer][0], cache.values[layer][0]
            parts = None
        elif all(isinstance(c, TQ) and c.cfg.dim == head_dim and c.cfg.seed == codecs[0].cfg.seed
                 and native.reads_cache_codes(c.cfg) for c in codecs):
            parts = cache.keys[layer], cache.values[layer]
            keys, values = parts[0][0], parts[1][0]
        else:
            return None
    if keys is None or keys.shape[0] != 1 or keys.stride(-1) != 1 or values.stride(-1) != 1:
        return None
    fields = {"keys": keys, "values": values, "slots": keys.shape[2], "slot_pos": cache.slot_pos[layer],
              "ring": int(cache.ring[layer]), "head_stride": keys.stride(1), "slot_stride": keys.stride(2),
              "value_head_stride": values.stride(1), "value_slot_stride": values.stride(2)}
    if parts is None:
        if keys.dtype not in native._KV_DTYPES or keys.stride() != values.stride() or values.dtype != keys.dtype:
            return None
        return {**fields, "kv_dtype": native._KV_DTYPES[keys.dtype]}
    (_, key_scales), (_, value_scales) = parts
    if key_scales.stride() != value_scales.stride() or key_scales.stride(-1) != 1:
        return None
    kc, vc = cache.codecs[layer]
    channel = cache.key_scale.get(layer)
    fields.update(kv_dtype=native.KV_CODES, key_scales=key_scales, value_scales=value_scales,
                  scale_head_stride=key_scales.stride(1), kv_signs=native._signs(head_dim, kc.cfg.seed),
                  key_channel_scale=None if channel is None else channel.float().contiguous())
    for name, codec in (("key", kc), ("value", vc)):
        layout, centroids, midpoints = native._kv_layout(codec.cfg)
        fields.update({f"{name}_layout": layout, f"{name}_centroids": centroids, f"{name}_midpoints": midpoints})
    return fields


def _projection(modules, x_width: int) -> list | None:
    """[group, column scale, signs, then format, data, scale, extra per matrix (native.Weight.fields)] for projections that share
    their input (one quantized input for all), or None."""
    cpu_input = torch.empty(0)  # takes_native asks where the input is: here on the CPU
    if not all(isinstance(m, TQWeight) and m.in_features == x_width and m.takes_native(cpu_input) for m in modules):
        return None
    first = modules[0]
    column, column_bytes = first.column_scale()
    if any((m.cfg.dim, m.cfg.seed, m.column_scale()[1]) != (first.cfg.dim, first.cfg.seed, column_bytes)
           for m in modules):
        return None  # not one quantized input for all
    fields = [first.cfg.dim, column, native._signs(first.cfg.dim, first.cfg.seed)]
    for m in modules:
        w = m.native_weight()
        fields += list(w.fields())
    return fields


def _build(model, cache) -> DecodePlan | None:
    cfg = model.config
    if getattr(model, "family", None) != "gemma3" or model.norm.weight.dtype != torch.float32:
        return None
    from .kv.cache import CompressedKVCache  # here: wren.kv imports the models, which import this module

    if type(cache) not in (KVCache, CompressedKVCache) or cache.batch != 1 or not bool(cache.valid.all()):
        return None  # a cache of one sequence without padding (not the server's slot caches)
    layout = native._native.plan_layout()
    hidden = cfg.hidden_size
    if hidden > native.MAX_WIDTH:
        return None  # the kernel's norms keep a row on the stack (Gemma 3 27B's 5376 runs the modules)
    scratch_size = 0
    layers, keep = [], []
    for spec, layer in zip(model.specs, model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        d, h, hkv, width = spec.head_dim, cfg.num_attention_heads, spec.num_kv_heads, spec.mlp_width
        cache_fields = _cache_fields(cache, attn.index, d)
        projections = [_projection((attn.q_proj, attn.k_proj, attn.v_proj), hidden), _projection((attn.o_proj,), h * d),
                       _projection((mlp.gate_proj, mlp.up_proj), hidden), _projection((mlp.down_proj,), width)]
        norms = [layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                 layer.post_feedforward_layernorm, attn.q_norm, attn.k_norm]
        if (cache_fields is None or None in projections or d % 16 or d > native.MAX_WIDTH
                or any(n.weight is None or n.weight.dtype != torch.float32 or not n.weight.is_contiguous() for n in norms)):
            return None
        p = torch.zeros(layout["fields"], dtype=torch.int64)
        fields = {**cache_fields, "hidden": hidden, "heads": h, "kv_heads": hkv, "head_dim": d, "width": width,
                  "window": attn.window or 0, "input_norm": norms[0].weight, "post_attention_norm": norms[1].weight,
                  "pre_feedforward_norm": norms[2].weight, "post_feedforward_norm": norms[3].weight,
                  "q_norm": norms[4].weight, "k_norm": norms[5].weight}
        for name, value in fields.items():
            p[layout[name]] = _address(value, keep)
        for name, values_ in zip(("qkv", "o", "gate_up", "down"), projections):
            for i, value in enumerate(values_):
                p[layout[name] + i] = _address(value, keep)
        scratch_size = max(scratch_size, native._native.scratch_floats(hidden, h, hkv, d, width))
        f = torch.zeros(layout["float_fields"], dtype=torch.float64)
        f[layout["eps"]], f[layout["offset"]] = layer.input_layernorm.eps, layer.input_layernorm.offset
        f[layout["scale"]], f[layout["softcap"]] = attn.scale, attn.softcap or 0.0
        if any(n.eps != layer.input_layernorm.eps or n.offset != layer.input_layernorm.offset for n in norms):
            return None
        layers.append((p, f, spec.kind))
    scratch = torch.zeros(scratch_size, dtype=torch.float32)
    keep.append(scratch)
    for p, _, _ in layers:
        p[layout["scratch"]], p[layout["scratch_bytes"]] = scratch.data_ptr(), scratch.numel() * 4
    return DecodePlan(layers, keep)


def _address(value, keep: list) -> int:
    """An int field as it is, a (contiguous) tensor as its data's address, None as 0."""
    if value is None:
        return 0
    if isinstance(value, torch.Tensor):
        if not value.is_contiguous():
            raise ValueError("the decode plan points into contiguous tensors only")
        keep.append(value)
        return value.data_ptr()
    return int(value)
