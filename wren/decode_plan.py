"""Gemma 3 and 4 decoding one layer a call: the compiled kernels' `decode_layer` / `decode_layer_rows`
(`_native.c`) instead of the layer's modules.

At batch 1 and one new token, a decoder layer is some seventy small PyTorch ops and Python calls around
seven matmuls; on a 270M model that overhead was a third of a decode step. The plan lists, per layer, the
addresses the kernel reads and writes (the int8 levels of the seven TurboQuant projections, the norms, the
cache's buffers) once, at the first decoded token of a cache; every later token is one call per layer.
The server's slot cache has a plan per row (on the row's buffers); a step that decodes a token in each of
several rows runs them together (RowsPlan): one call a layer, whose matmuls read each weight once. A short
chunk of a prompt runs through its sequence's plan the same way (ChunkPlan: its tokens as rows, in order).

It is built only where it computes what the modules compute: a Gemma 3 or dense Gemma 4 model (KV sharing,
K=V layers and per-layer inputs included; not MoE) in float32 with TurboQuant projections the compiled
kernels take, and a cache of one sequence (or a slot cache's rows) that is dense (f32, f16 or bf16) or
TurboQuant-coded in a layout the kernel reads (it then codes the new key and value itself, as the codec
does, and attends from the codes). Anything else returns None and the modules run. A plan belongs to its
cache and the model it was built for (a cache handed to another model gets a new one); like the cache's
contents, it assumes that model's weights are not changed while the cache is in use (the tensors it points
to are kept alive either way)."""

from __future__ import annotations

import weakref

import torch

from . import native
from .cache import KVCache, SlotCache
from .quant.linear import TQWeight

ENABLED = True  # tests turn it off to compare with the modules


class DecodePlan:
    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor, object]], keep: list,
                 ple: torch.Tensor | None = None, scratch_floats: int = 0, chunk_end: int | None = None):
        self.layers = [(p.data_ptr(), f.data_ptr(), rope_key) for p, f, rope_key in layers]
        self.fields = torch.stack([p for p, _, _ in layers])  # [layers, fields] (ChunkPlan copies them)
        self.ple = ple  # Gemma 4: the per-layer inputs of the token [layers, ple_dim], which the layers point into
        self.scratch_floats = scratch_floats  # what a row needs (RowsPlan allocates that times its rows)
        # A chunk of a prompt must end by this position (None: anywhere): a KV-shared layer reading a sliding
        # ring sees the ring after the whole chunk was written, which must not have dropped anything yet.
        self.chunk_end = chunk_end
        self._chunk_scratch = torch.empty(0)
        self._keep = (layers, keep)  # what the addresses point into

    def run(self, x: torch.Tensor, rope: dict, pos: torch.Tensor, ple: torch.Tensor | None = None) -> torch.Tensor:
        """Every layer for one token: x [1, 1, hidden] float32, updated in place and returned; `rope` maps
        each layer's rope key to its (cos, sin), pos [1, 1] is the token's position, `ple` Gemma 4's per-layer
        inputs of the token."""
        x = x.contiguous()
        if self.ple is not None:
            self.ple.copy_(ple.reshape(self.ple.shape))
        position = int(pos[0, 0])
        tables = _contiguous(rope)
        threads = torch.get_num_threads()
        for p, f, key in self.layers:
            cos, sin = tables[key]
            native._native.decode_layer(p, f, x.data_ptr(), cos.data_ptr(), sin.data_ptr(), position, threads)
        return x


class RowsPlan:
    """Rows of the server's slot cache that each decode one token, in one step: a `decode_layer_rows` call a
    layer over the rows' own plans (the same weights; each its row's cache), so that every weight is read once
    for all of them and no PyTorch op runs between the layers."""

    def __init__(self, plans: list[DecodePlan], scratch: torch.Tensor):
        self.plans = plans
        # [layers, rows]: each layer's plan address in every row, the array decode_layer_rows takes
        self.addresses = torch.tensor([[plan.layers[i][0] for plan in plans] for i in range(len(plans[0].layers))],
                                      dtype=torch.int64)
        self.scratch = scratch  # rows times a row's scratch (the kernel checks)

    def run(self, x: torch.Tensor, rope: dict, pos: torch.Tensor, ple: torch.Tensor | None = None) -> torch.Tensor:
        """As DecodePlan.run, for x [rows, 1, hidden], pos [rows, 1] and ple [rows, 1, layers, ple_dim]."""
        x = x.contiguous()
        for r, plan in enumerate(self.plans):
            if plan.ple is not None:
                plan.ple.copy_(ple[r].reshape(plan.ple.shape))
        positions = pos[:, 0].to(torch.int64).contiguous()
        tables = _contiguous(rope)
        threads, rows = torch.get_num_threads(), len(self.plans)
        scratch, scratch_bytes = self.scratch.data_ptr(), self.scratch.numel() * 4
        for (_, f, key), addresses in zip(self.plans[0].layers, self.addresses):
            cos, sin = tables[key]
            native._native.decode_layer_rows(addresses.data_ptr(), rows, f, x.data_ptr(), cos.data_ptr(),
                                             sin.data_ptr(), positions.data_ptr(), scratch, scratch_bytes, 0, threads)
        return x


class ChunkPlan:
    """A prompt's chunk of n tokens of one sequence through that sequence's plan: a `decode_layer_rows` call a
    layer over n rows in order (each token writes its key and value, then attends over the cache), so that a
    short prompt reads every weight once and runs no PyTorch op between the layers, as a decoded token does.
    (Long chunks run the modules: their attention is a matmul there, here a row at a time.)"""

    def __init__(self, plan: DecodePlan, n: int):
        self.plan, self.n = plan, n
        layers = len(plan.layers)
        if plan.ple is None:  # every token reads the layer's plan as it is
            self.addresses = torch.tensor([p for p, _, _ in plan.layers])[:, None].repeat(1, n)
            self.ple, self._copies = None, None
        else:  # each token its own per-layer inputs: copies of the plan's fields pointing into ple [n, layers, ple]
            self.ple = torch.empty(n, layers, plan.ple.shape[1])
            self._copies = plan.fields.expand(n, *plan.fields.shape).clone()
            cell = torch.arange(n)[:, None] * layers + torch.arange(layers)[None, :]  # [n, layers]
            self._copies[:, :, _layout()["ple_input"]] = self.ple.data_ptr() + cell * plan.ple.shape[1] * 4
            self.addresses = (self._copies.data_ptr() + cell * plan.fields.shape[1] * 8).T.contiguous()
        floats = n * plan.scratch_floats
        if plan._chunk_scratch.numel() < floats:  # kept for the next chunk: the largest so far
            plan._chunk_scratch = torch.empty(floats)
        self.scratch = plan._chunk_scratch

    def run(self, x: torch.Tensor, rope: dict, pos: torch.Tensor, ple: torch.Tensor | None = None) -> torch.Tensor:
        """As DecodePlan.run, for x [1, n, hidden], pos [1, n] and ple [1, n, layers, ple_dim]."""
        x = x.contiguous()
        if self.ple is not None:
            self.ple.copy_(ple.reshape(self.ple.shape))
        positions = pos[0].to(torch.int64).contiguous()
        tables = _contiguous(rope)
        threads = torch.get_num_threads()
        scratch, scratch_bytes = self.scratch.data_ptr(), self.scratch.numel() * 4
        for (_, f, key), addresses in zip(self.plan.layers, self.addresses):
            cos, sin = tables[key]
            native._native.decode_layer_rows(addresses.data_ptr(), self.n, f, x.data_ptr(), cos.data_ptr(),
                                             sin.data_ptr(), positions.data_ptr(), scratch, scratch_bytes, 1, threads)
        return x


def _layout() -> dict:
    return native._native.plan_layout()


def _contiguous(rope: dict) -> dict:
    return {key: (cos.contiguous(), sin.contiguous()) for key, (cos, sin) in rope.items()}


CHUNK_PLAN_MAX = 128  # longer chunks run the modules (bench/prefill_chunks.py: 1.0-1.4x at 128, below 1x from ~192)


def plan_for(model, cache, ids: torch.Tensor) -> DecodePlan | RowsPlan | ChunkPlan | None:
    """The plan for one decoded token with this cache (built at its first use), or None where the modules must
    run. A server slot cache gets one for a step that decodes one token in each of its rows; a chunk of up to
    CHUNK_PLAN_MAX tokens of one sequence gets a ChunkPlan."""
    if (not ENABLED or cache is None or ids.device.type != "cpu" or torch.is_grad_enabled()
            or not native.available() or getattr(cache, "step_position", None) is not None):
        return None
    n = ids.shape[1]
    if n > 1:
        if ids.shape[0] != 1 or n > CHUNK_PLAN_MAX:
            return None
        if isinstance(cache, SlotCache):
            if len(cache.rows) != 1:
                return None
            plan, start = _row_plan(model, cache, cache.rows[0]), cache.lengths[cache.rows[0]]
        else:
            plan, start = _sequence_plan(model, cache), cache.length
        if plan is None or (plan.chunk_end is not None and start + n > plan.chunk_end):
            return None
        return ChunkPlan(plan, n)
    if isinstance(cache, SlotCache):  # the server's: a plan per row, on that row's buffers
        if ids.shape[0] != len(cache.rows):
            return None
        plans = [_row_plan(model, cache, row) for row in cache.rows]
        if None in plans:
            return None
        return plans[0] if len(plans) == 1 else _rows_plan(cache, plans)
    return _sequence_plan(model, cache) if ids.shape[0] == 1 else None


def _sequence_plan(model, cache) -> DecodePlan | None:
    """The plan of a cache of one sequence (a KVCache, or wren.kv's CompressedKVCache)."""
    built = getattr(cache, "_decode_plan", None)  # (the model it was built for, the plan or None)
    if built is None or built[0]() is not model:  # a cache handed to another model gets a plan of its own
        built = (weakref.ref(model), _build(model, cache))
        cache._decode_plan = built
    return built[1]


def _row_plan(model, cache: SlotCache, row: int) -> DecodePlan | None:
    plans = cache.__dict__.setdefault("_row_plans", {})  # row -> (model, plan)
    built = plans.get(row)
    if built is None or built[0]() is not model:
        built = plans[row] = (weakref.ref(model), _build(model, SlotRow(cache, row)))
    return built[1]


def _rows_plan(cache: SlotCache, plans: list[DecodePlan]) -> RowsPlan:
    """The RowsPlan of these rows' plans: the last one made, while the rows and their plans are the same."""
    last = cache.__dict__.get("_rows_plan")
    if last is not None and len(last.plans) == len(plans) and all(a is b for a, b in zip(last.plans, plans)):
        return last
    floats = len(plans) * max(plan.scratch_floats for plan in plans)
    scratch = last.scratch if last is not None and last.scratch.numel() >= floats else torch.zeros(floats)
    cache._rows_plan = RowsPlan(plans, scratch)
    return cache._rows_plan


class SlotRow:
    """One row of a server slot cache (`cache.SlotCache`, or wren.kv's CompressedSlotCache) as a cache of one
    sequence: [1, ...] views of the row's buffers, which the kernel writes and reads in place. A row's empty
    and truncated slots hold position -1 (`SlotCache.truncate`), which attention skips as it does a
    KVCache's."""

    def __init__(self, cache: SlotCache, row: int):
        def of_row(t):
            return tuple(part[row:row + 1] for part in t) if isinstance(t, tuple) else t[row:row + 1]

        self.batch = 1
        self.keys = {layer: of_row(t) for layer, t in cache.keys.items()}
        self.values = {layer: of_row(t) for layer, t in cache.values.items()}
        self.slot_pos = {layer: p[row] for layer, p in cache.slot_pos.items()}
        self.ring = cache.ring
        self.codecs = getattr(cache, "codecs", None)  # (a compressed cache's)
        self.key_scale = getattr(cache, "key_scale", None)


def _cache_fields(cache, layer: int, head_dim: int) -> dict | None:
    """The plan's fields for one layer's cache: a dense cache (KVCache, or a CompressedKVCache of dense
    types), or a TurboQuant one whose codes the kernel reads (both halves); None for anything else."""
    from .kv.codecs import TQ, Dense

    if getattr(cache, "codecs", None) is None:  # a KVCache, or a SlotCache's row
        keys, values = cache.keys.get(layer), cache.values.get(layer)
        parts = None
    else:  # a CompressedKVCache, or a CompressedSlotCache's row
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
    if any((m.cfg.dim, m.cfg.seed, m.column_scale()[1], m.input_rotated)
           != (first.cfg.dim, first.cfg.seed, column_bytes, first.input_rotated) for m in modules):
        return None  # not one quantized input for all
    signs = native._signs(first.cfg.dim, first.cfg.seed) if first.input_rotated else None  # None: GGUF blocks
    fields = [first.cfg.dim, column, signs]
    for m in modules:
        w = m.native_weight()
        fields += list(w.fields())
    return fields


def rope_key(model, spec):
    """What a layer's RoPE tables are keyed by in its model's forward (Gemma 3: the layer kind; Gemma 4:
    head size, base and rotated dimensions)."""
    return spec.kind if model.family == "gemma3" else (spec.head_dim, spec.rope_theta, spec.rope_dims)


def _build(model, cache) -> DecodePlan | None:
    cfg = model.config
    family = getattr(model, "family", None)
    if (family not in ("gemma3", "gemma4") or getattr(cfg, "enable_moe_block", False)
            or model.norm.weight.dtype != torch.float32):
        return None
    from .kv.cache import CompressedKVCache  # here: wren.kv imports the models, which import this module

    if not isinstance(cache, SlotRow) and (type(cache) not in (KVCache, CompressedKVCache) or cache.batch != 1
                                           or not bool(cache.valid.all())):
        return None  # a cache of one sequence without padding, or one row of the server's
    layout = native._native.plan_layout()
    hidden = cfg.hidden_size
    if hidden > native.MAX_WIDTH:
        return None  # the kernel's norms keep a row on the stack (Gemma 3 27B's 5376 runs the modules)
    ple_dim = getattr(model, "ple_dim", 0) or 0
    ple = torch.zeros(len(model.layers), ple_dim, dtype=torch.float32) if ple_dim else None
    scratch_size, chunk_end = 0, None
    layers, keep = [], [] if ple is None else [ple]  # (the per-layer inputs the layers point into)
    for i, (spec, layer) in enumerate(zip(model.specs, model.layers)):
        fields = _layer_fields(model, cache, spec, layer, i, ple)
        if fields is None:
            return None
        ints, projections, floats = fields
        if spec.kv_source != i and ints["ring"]:
            chunk_end = min(chunk_end or ints["slots"], ints["slots"])
        p = torch.zeros(layout["fields"], dtype=torch.int64)
        for name, value in ints.items():
            p[layout[name]] = _address(value, keep)
        for name, values_ in projections.items():
            for j, value in enumerate(values_):
                p[layout[name] + j] = _address(value, keep)
        f = torch.zeros(layout["float_fields"], dtype=torch.float64)
        for name, value in floats.items():
            f[layout[name]] = value
        scratch_size = max(scratch_size, native._native.scratch_floats(hidden, ints["heads"], ints["kv_heads"],
                                                                       ints["head_dim"], ints["width"]))
        layers.append((p, f, rope_key(model, spec)))
    scratch = torch.zeros(scratch_size, dtype=torch.float32)
    keep.append(scratch)
    for p, _, _ in layers:
        p[layout["scratch"]], p[layout["scratch_bytes"]] = scratch.data_ptr(), scratch.numel() * 4
    return DecodePlan(layers, keep, ple, scratch_size, chunk_end)


def _layer_fields(model, cache, spec, layer, index: int, ple: torch.Tensor | None):
    """(int fields, projection fields, float fields) of one layer's plan, or None where the kernel does not
    compute what its modules do."""
    cfg = model.config
    hidden = cfg.hidden_size
    attn, mlp = layer.self_attn, layer.mlp
    d, h, hkv, width = spec.head_dim, cfg.num_attention_heads, spec.num_kv_heads, spec.mlp_width
    owns_kv = spec.kv_source == index
    cache_fields = _cache_fields(cache, spec.kv_source, d)  # a KV-shared layer reads its source's cache
    qkv = (attn.q_proj,) if not owns_kv else tuple(m for m in (attn.q_proj, attn.k_proj, attn.v_proj) if m is not None)
    projections = {"qkv": _projection(qkv, hidden), "o": _projection((attn.o_proj,), h * d),
                   "gate_up": _projection((mlp.gate_proj, mlp.up_proj), hidden),
                   "down": _projection((mlp.down_proj,), width)}
    norms = [layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
             layer.post_feedforward_layernorm, attn.q_norm] + ([attn.k_norm] if owns_kv else [])
    ple_dim = getattr(model, "ple_dim", 0) or 0
    if ple_dim:
        projections["ple_gate"] = _projection((layer.per_layer_input_gate,), hidden)
        projections["ple_proj"] = _projection((layer.per_layer_projection,), ple_dim)
        norms.append(layer.post_per_layer_input_norm)
    v_norm = getattr(attn, "v_norm", None) if owns_kv else None
    if (cache_fields is None or None in projections.values() or d % 16 or d > native.MAX_WIDTH or ple_dim > width
            or any(n.weight is None or n.weight.dtype != torch.float32 or not n.weight.is_contiguous() for n in norms)
            or any(n.eps != norms[0].eps or n.offset != norms[0].offset for n in norms)
            or (v_norm is not None and (v_norm.weight is not None or v_norm.eps != norms[0].eps))):
        return None
    ints = {**cache_fields, "hidden": hidden, "heads": h, "kv_heads": hkv, "head_dim": d, "width": width,
            "window": attn.window or 0, "input_norm": norms[0].weight, "post_attention_norm": norms[1].weight,
            "pre_feedforward_norm": norms[2].weight, "post_feedforward_norm": norms[3].weight,
            "q_norm": attn.q_norm.weight, "k_norm": attn.k_norm.weight if owns_kv else None,
            "qkv_count": len(qkv), "v_from_k": int(owns_kv and len(qkv) == 2), "v_norm": int(v_norm is not None)}
    if ple_dim:
        ints.update(ple_dim=ple_dim, ple_input=ple[index].data_ptr(), ple_norm=layer.post_per_layer_input_norm.weight)
    scalar = getattr(layer, "layer_scalar", None)
    floats = {"eps": norms[0].eps, "offset": norms[0].offset, "scale": getattr(attn, "scale", 1.0),
              "softcap": getattr(attn, "softcap", None) or 0.0,
              "layer_scalar": float(scalar) if scalar is not None else 1.0}
    return ints, projections, floats


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
