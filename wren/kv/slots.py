"""The server's per-row cache (wren.cache.SlotCache) with compressed keys and values.

Rows are independent sequences, as in SlotCache; each head vector is coded once when written, into the
row's slot, and the selected rows are decoded for attention, exactly as CompressedKVCache does for one
sequence. The buffers are allocated to their compressed size up front.
"""

from __future__ import annotations

import torch

from ..cache import SlotCache
from .cache import attention_read, encode_keys, joined, layer_key_scales
from .codecs import codec_for
from .scales import key_scales
from .types import model_dtype_name


class CompressedSlotCache(SlotCache):
    def __init__(self, specs, slots: int, max_len: int, window: int, types: tuple[str, str],
                 dtype: torch.dtype = torch.float32, device="cpu", key_scales: dict | None = None):
        self.types, self.dtype = tuple(types), dtype
        self.codecs: dict[int, tuple] = {}
        super().__init__(specs, slots, max_len, window, dtype, device)
        self.key_scale = layer_key_scales(self.codecs, key_scales, device)

    @classmethod
    def for_model(cls, model, slots: int, max_len: int | None = None, types=("f32", "f32")) -> "CompressedSlotCache":
        weight = model.norm.weight
        return cls(model.specs, slots, max_len or model.config.max_position_embeddings, model.config.sliding_window,
                   types, weight.dtype, weight.device, key_scales=key_scales(model))

    def _allocate(self, layer, spec, prefix, dtype, device):
        kc, vc = codec_for(self.types[0], spec.head_dim), codec_for(self.types[1], spec.head_dim)
        self.codecs[layer] = (kc, vc)
        return kc.empty(prefix, device), vc.empty(prefix, device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, _pos=None):
        pos = self._pos  # [b, T]
        kc, vc = self.codecs[layer]
        s = self.key_scale.get(layer)
        K, V, P = self.keys[layer], self.values[layer], self.slot_pos[layer]
        new_k, new_v = encode_keys(kc, k, s), vc.encode(v)

        def write(slots, first: int = 0):
            for buffers, new in ((K, new_k), (V, new_v)):
                for buf, part in zip(buffers, new):
                    self._write(buf, slots, part[:, :, first:].transpose(1, 2))

        one = pos.shape[1] == 1  # one new token a row: its codes may be read as they are (attention_read)
        if not self.ring[layer]:
            write(pos)
            self._write(P, pos, pos)
            end = int(pos.max()) + 1
            keys = attention_read(kc, tuple(self._rows(b, end) for b in K), self.dtype, s, one, on_cuda=False)
            values = attention_read(vc, tuple(self._rows(b, end) for b in V), self.dtype, None, one, on_cuda=False)
            return keys, values, self._rows(P, end), None
        window = P.shape[1]
        if one:  # written first, then the ring is what it attends to (KVCache)
            write(pos % window)
            self._write(P, pos % window, pos)
            return (attention_read(kc, tuple(self._rows(b) for b in K), self.dtype, s, True, on_cuda=False),
                    attention_read(vc, tuple(self._rows(b) for b in V), self.dtype, None, True, on_cuda=False),
                    self._rows(P), None)
        # Sliding ring: what the rows held plus the chunk itself (read as stored), then keep the newest.
        keys = kc.read(joined(tuple(self._rows(b) for b in K), new_k), self.dtype, s)
        values = vc.read(joined(tuple(self._rows(b) for b in V), new_v), self.dtype)
        key_pos = torch.cat([self._rows(P), pos], dim=1)
        keep = pos[:, -window:]
        write(keep % window, first=max(0, pos.shape[1] - window))
        self._write(P, keep % window, keep)
        return keys, values, key_pos, None


def make_slot_cache(model, slots: int, max_len: int | None, types: tuple[str, str]) -> SlotCache:
    """The server's cache for `types` (concrete, as resolve_types gives them): the dense SlotCache when both
    halves are the model's own dtype, else a CompressedSlotCache."""
    if tuple(types) == (model_dtype_name(model),) * 2:
        return SlotCache.for_model(model, slots, max_len)
    return CompressedSlotCache.for_model(model, slots, max_len, types)
