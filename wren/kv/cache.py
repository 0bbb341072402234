"""A KV cache that stores each head vector compressed, quantized once when it is written.

Same interface and layout as wren.cache.KVCache (full layers indexed by position, sliding layers in a ring,
nothing for KV-shared layers); `update` returns what `attend` reads: dense and q8 vectors decoded to the
model's dtype, TurboQuant ones decoded to codebook values in their rotated frame (InFrame), never rotated
back: attention rotates the query in and its output out instead. (For one decoded token of one sequence,
where the compiled kernels read them, the codes come back as they are, models.layers.Coded, and attention
reads them without decoding; the decode plan goes further and writes them too.) The new chunk's own keys/values come back
decoded too, so every query attends to exactly what the cache holds, whichever way the sequence was chunked.

TurboQuant keys are stored scaled per channel (`key_scales`, kv/scales.py) and the query divided by the
scale, so the scores are exact functions of the codes while the quantization error lands where queries do
not look.
"""

from __future__ import annotations

import torch

from .. import native, triton_ops
from ..cache import KVCache, owned_layers
from ..models.layers import Coded
from ..triton_ops import guarded
from ..config import LayerSpec
from .codecs import TQ, codec_for, vector_nbytes
from .scales import key_scales
from .types import model_dtype_name, resolve_types


def encode_keys(codec, k: torch.Tensor, scale: torch.Tensor | None) -> tuple:
    return codec.encode(k if scale is None else k.float() * scale)


def layer_key_scales(codecs: dict, key_scales: dict | None, device) -> dict[int, torch.Tensor]:
    """The key scales of the layers whose keys are TurboQuant-coded (the others store keys as they are)."""
    return {i: key_scales[i].to(device=device, dtype=torch.float32) for i, (kc, _) in codecs.items()
            if isinstance(kc, TQ) and key_scales and i in key_scales}


class CompressedKVCache(KVCache):
    def __init__(self, specs: list[LayerSpec], batch: int, max_len: int, window: int, types: tuple[str, str],
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 key_scales: dict[int, torch.Tensor] | None = None):
        self.max_len, self.batch, self.types, self.dtype = max_len, batch, tuple(types), dtype
        self.length = 0  # the next position to be written
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.step_position: torch.Tensor | None = None  # as in KVCache
        self.keys: dict[int, tuple[torch.Tensor, ...]] = {}
        self.values: dict[int, tuple[torch.Tensor, ...]] = {}
        self.codecs: dict[int, tuple] = {}
        self.slot_pos: dict[int, torch.Tensor] = {}
        self.ring: dict[int, bool] = {}
        for i, spec, ring, slots in owned_layers(specs, window, max_len):
            prefix = (batch, spec.num_kv_heads, slots)
            kc, vc = codec_for(types[0], spec.head_dim), codec_for(types[1], spec.head_dim)
            self.codecs[i] = (kc, vc)
            self.keys[i], self.values[i] = kc.empty(prefix, device), vc.empty(prefix, device)
            self.slot_pos[i] = torch.full((slots,), -1, dtype=torch.long, device=device)
            self.ring[i] = ring
        self.key_scale = layer_key_scales(self.codecs, key_scales, device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for parts in (*self.keys.values(), *self.values.values())
                   for t in parts)

    def write_target(self, layer: int, k: torch.Tensor, pos: torch.Tensor) -> None:
        return None  # (coded vectors are written by `update`, which codes them)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        kc, vc = self.codecs[layer]
        K, V, slot_pos = self.keys[layer], self.values[layer], self.slot_pos[layer]
        s = self.key_scale.get(layer)
        one = k.shape[2] == 1
        if one and self._encoded(layer, k, v, pos):
            return self.written(layer, pos)
        new_k, new_v = encode_keys(kc, k, s), vc.encode(v)
        if not self.ring[layer]:
            for buf, new in (*zip(K, new_k), *zip(V, new_v)):
                buf[:, :, pos] = new
            slot_pos[pos] = pos
            if one:
                return self.written(layer, pos)
            end = int(pos[-1]) + 1
            keys = self._read(kc, tuple(b[:, :, :end] for b in K), s, False)
            values = self._read(vc, tuple(b[:, :, :end] for b in V), None, False)
            return keys, values, slot_pos[:end], self.valid[:, :end]
        window = slot_pos.numel()
        if one:  # one new token: written first, then the ring is what it attends to (KVCache)
            slot = pos % window
            for buf, new in (*zip(K, new_k), *zip(V, new_v)):
                buf[:, :, slot] = new
            slot_pos[slot] = pos
            return self.written(layer, pos)
        # Sliding ring: what the ring held before this chunk plus the chunk itself, then keep the newest
        # `window` entries (as KVCache does).
        keys = kc.read(joined(K, new_k), self.dtype, s)
        values = vc.read(joined(V, new_v), self.dtype)
        key_pos = torch.cat([slot_pos, pos])
        keep = pos[-window:]
        slots = keep % window
        for buf, new in (*zip(K, new_k), *zip(V, new_v)):
            buf[:, :, slots] = new[:, :, -window:]
        slot_pos[slots] = keep
        return keys, values, key_pos, self.valid[:, key_pos.clamp(min=0)]

    def _encoded(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> bool:
        """Whether one token's k and v went into the cache by the Triton kernel that codes and writes them in
        one launch (CUDA, TurboQuant codecs it takes); False where it did not run, for the codecs' ops."""
        kc, vc = self.codecs[layer]
        K, V, slot_pos = self.keys[layer], self.values[layer], self.slot_pos[layer]
        if not triton_ops.encodes_kv(k, v, kc, vc, K, V, pos):
            return False
        window = slot_pos.numel() if self.ring[layer] else 0

        def launch() -> bool:
            triton_ops.kv_encode(k, v, kc, vc, K, V, slot_pos, pos, window, self.key_scale.get(layer))
            return True

        return guarded("kv_encode", launch, lambda: False)

    def _held(self, layer: int, end: int | None) -> tuple:
        """After one token's write (KVCache.written): the codes as they are where a kernel reads them."""
        kc, vc = self.codecs[layer]
        K, V = self.keys[layer], self.values[layer]
        if end is not None:
            K, V = (tuple(b[:, :, :end] for b in parts) for parts in (K, V))
        return self._read(kc, K, self.key_scale.get(layer), True), self._read(vc, V, None, True)

    def _read(self, codec, parts: tuple, key_scale, one_token: bool):
        """What attention reads: for one new token, TurboQuant codes as they are (Coded) where a decode
        attention kernel reads them (the CPU's compiled one, a sequence at a time; Triton's on CUDA), so that
        nothing is decoded; else the codec's read."""
        return attention_read(codec, parts, self.dtype, key_scale, one_token)


def attention_read(codec, parts: tuple, dtype: torch.dtype, key_scale, one_token: bool, on_cuda: bool = True):
    """A cache's buffers as attention reads them (see CompressedKVCache._read). `on_cuda` False: codes only
    for the CPU's kernel (the server's rows: Triton's over their per-row slots has not run on a GPU yet)."""
    on_cpu = parts[0].device.type == "cpu"
    if one_token and isinstance(codec, TQ) and ((on_cpu and native.reads_cache_codes(codec.cfg))
                                                or (on_cuda and triton_ops.reads_codes(parts))):
        return Coded(parts, codec, key_scale)
    return codec.read(parts, dtype, key_scale)


def joined(old: tuple, new: tuple) -> tuple:
    """A codec's buffers followed by a new chunk's, along the position axis (read as one)."""
    return tuple(torch.cat([a, b], dim=2) for a, b in zip(old, new))


def make_kv_cache(model, batch: int = 1, max_len: int | None = None, spec=None, device=None) -> KVCache:
    """The cache of type `spec` (a string such as `q8` or `tq4/tq3`, a (key, value) pair, or None for
    $WREN_KV_CACHE / the dense default) for `model`: the plain KVCache when both halves are the model's own
    dtype, else a CompressedKVCache."""
    types = resolve_types(model, spec)
    if types == (model_dtype_name(model),) * 2:
        return model.make_cache(batch=batch, max_len=max_len, device=device)
    weight = model.norm.weight
    return CompressedKVCache(model.specs, batch, max_len or model.config.max_position_embeddings,
                             model.config.sliding_window, types, weight.dtype, device or weight.device,
                             key_scales=key_scales(model))


def context_for_budget(model, spec, budget: int, batch: int = 1) -> int:
    """The longest context (up to the model's) whose cache of type `spec` fits in `budget` bytes: 0 if none."""
    low, high = 0, model.config.max_position_embeddings
    while low < high:  # cache bytes grow with the context (sliding rings stop at their window)
        mid = (low + high + 1) // 2
        if kv_cache_bytes(model, spec, batch, mid) <= budget:
            low = mid
        else:
            high = mid - 1
    return low


def kv_cache_bytes(model, spec=None, batch: int = 1, max_len: int | None = None) -> int:
    """The bytes `make_kv_cache(model, batch, max_len, spec).nbytes()` reports, from the formula:
    batch x kv_heads x slots x (key + value vector bytes), slots = window for sliding rings, else max_len."""
    k, v = resolve_types(model, spec)
    max_len = max_len or model.config.max_position_embeddings
    window = model.config.sliding_window
    total = 0
    for _, s, _, slots in owned_layers(model.specs, window, max_len):
        total += batch * s.num_kv_heads * slots * (vector_nbytes(k, s.head_dim) + vector_nbytes(v, s.head_dim))
    return total
