"""KV caches, allocated once, up front, at their final size (the gpt-fast habit).

Full-attention layers get `max_len` slots indexed by position. Sliding layers keep only their window, in a
ring indexed by position % window. KV-shared layers own nothing: they read their source layer's K/V.
All sequences of a batch share positions; shorter prompts are left-padded and their pad positions marked
invalid, which is exact because RoPE only sees relative positions.
"""

from __future__ import annotations

import torch

from . import triton_ops
from .config import SLIDING, LayerSpec
from .errors import ContextLengthError
from .triton_ops import guarded


def owned_layers(specs: list[LayerSpec], window: int, max_len: int):
    """(layer, spec, ring, slots) for every layer that owns its K/V: a sliding layer shorter than the
    context keeps a ring of `window` slots, any other layer `max_len`; KV-shared layers are skipped."""
    for i, spec in enumerate(specs):
        if spec.kv_source == i:
            ring = spec.kind == SLIDING and window < max_len
            yield i, spec, ring, (window if ring else max_len)


class KVCache:
    def __init__(self, specs: list[LayerSpec], batch: int, max_len: int, window: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.max_len, self.batch = max_len, batch
        self.length = 0  # the next position to be written
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        # While set (graphs.StaticDecoder), a one-token step reads its position from this device tensor and
        # full layers hand attention their whole buffers: no shape or value depends on the position, so
        # the step can be captured once in a CUDA graph and replayed.
        self.step_position: torch.Tensor | None = None
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.slot_pos: dict[int, torch.Tensor] = {}
        self.ring: dict[int, bool] = {}
        for i, spec, ring, slots in owned_layers(specs, window, max_len):
            shape = (batch, spec.num_kv_heads, slots, spec.head_dim)
            self.keys[i] = torch.zeros(shape, dtype=dtype, device=device)
            self.values[i] = torch.zeros(shape, dtype=dtype, device=device)
            self.slot_pos[i] = torch.full((slots,), -1, dtype=torch.long, device=device)
            self.ring[i] = ring

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))

    def __getstate__(self) -> dict:
        # a copy (deepcopy, pickle) drops the decode plan: it points at this cache's buffers, not the copy's
        return {k: v for k, v in self.__dict__.items() if k != "_decode_plan"}

    def positions(self, n_new: int) -> torch.Tensor:
        if self.length + n_new > self.max_len:
            raise ContextLengthError(
                f"{self.length + n_new} tokens do not fit the context of {self.max_len}; "
                "shorten the prompt or raise num_ctx")
        if self.step_position is not None and n_new == 1:
            return self.step_position
        return torch.arange(self.length, self.length + n_new, device=self.valid.device)

    def advance(self, n_new: int) -> None:
        self.length += n_new

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Store new K/V ([B, Hkv, T, D]) at positions `pos` ([T]) and return what the new queries attend
        to: (keys, values, key positions [S], key validity [B, S])."""
        if k.shape[2] == 1 or not self.ring[layer]:  # (a chunk in a ring is written after it is read)
            self._write(layer, k, v, pos)
        if k.shape[2] == 1 or not self.ring[layer]:
            return self.written(layer, pos)
        ring_k, ring_v, ring_pos = self.keys[layer], self.values[layer], self.slot_pos[layer]
        # Sliding ring: attend over what the ring held before this chunk plus the chunk itself, then keep
        # only the newest `window` entries.
        keys, values = torch.cat([ring_k, k], dim=2), torch.cat([ring_v, v], dim=2)
        key_pos = torch.cat([ring_pos, pos])
        window = ring_pos.numel()
        keep = pos[-window:]
        slots = keep % window
        ring_k[:, :, slots] = k[:, :, -window:]
        ring_v[:, :, slots] = v[:, :, -window:]
        ring_pos[slots] = keep
        return keys, values, key_pos, self.valid[:, key_pos.clamp(min=0)]

    def written(self, layer: int, pos: torch.Tensor):
        """What `update` returns once the new keys and values at `pos` are in place (in a sliding layer's
        ring: one token's, written into the slot of the position one window back, which it no longer sees)."""
        slot_pos = self.slot_pos[layer]
        if self.ring[layer]:
            return (*self._held(layer, None), slot_pos, self.valid[:, slot_pos.clamp(min=0)])
        if self.step_position is not None and pos.numel() == 1:  # every slot; empty ones have position -1
            return (*self._held(layer, None), slot_pos, self.valid)
        end = int(pos[-1]) + 1
        return (*self._held(layer, end), slot_pos[:end], self.valid[:, :end])

    def _held(self, layer: int, end: int | None) -> tuple:
        """A layer's keys and values as attention reads them: every slot, or those before `end`."""
        keys, values = self.keys[layer], self.values[layer]
        return (keys, values) if end is None else (keys[:, :, :end], values[:, :, :end])

    def write_target(self, layer: int, k: torch.Tensor, pos: torch.Tensor) -> tuple | None:
        """Where a kernel that makes one new token's keys (k [B, 1, Hkv, D], or a view of that shape) and
        values may store them itself, then `written()` instead of `update()`: (keys, values, slot positions,
        position, ring window or 0), for this dense cache of their dtype on CUDA; else None."""
        keys = self.keys[layer]
        if not (k.dim() == 4 and k.shape[1] == 1 and (k.shape[0], k.shape[2], k.shape[3]) == (keys.shape[0],
                keys.shape[1], keys.shape[3]) and k.dtype == keys.dtype and pos.numel() == 1
                and triton_ops.takes(keys) and keys.is_contiguous() and self.values[layer].is_contiguous()):
            return None
        slot_pos = self.slot_pos[layer]
        return keys, self.values[layer], slot_pos, pos, slot_pos.numel() if self.ring[layer] else 0

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """K/V at positions `pos` of a full layer, or one token's at pos % window of a sliding layer's ring;
        on CUDA one token's key, value and position in one kernel instead of three (and a modulo)."""
        keys, values, slot_pos = self.keys[layer], self.values[layer], self.slot_pos[layer]
        window = slot_pos.numel() if self.ring[layer] else 0

        def by_ops():
            slot = pos % window if window else pos
            keys[:, :, slot], values[:, :, slot], slot_pos[slot] = k, v, pos

        if k.shape[2] == 1 and triton_ops.writes_kv(k, v, keys, values, pos):
            guarded("kv_write", lambda: triton_ops.kv_write(k, v, keys, values, slot_pos, pos, window), by_ops)
        else:
            by_ops()

    @classmethod
    def for_model(cls, model, batch: int = 1, max_len: int | None = None, dtype=None, device=None) -> "KVCache":
        weight = model.norm.weight  # always dense, in the model's dtype (embeddings may be quantized)
        return cls(model.specs, batch, max_len or model.config.max_position_embeddings, model.config.sliding_window,
                   dtype or weight.dtype, device or weight.device)

    def reset(self) -> None:
        self.length = 0
        self.valid.fill_(True)
        for p in self.slot_pos.values():
            p.fill_(-1)


class SlotCache:
    """A cache whose rows ("slots") are independent sequences, for continuous batching in the server.

    Each row has its own length; a forward runs on any subset of rows (`select`), so a new sequence is
    prefilled into a free row while the others keep decoding, and a finished row is truncated to a prefix
    and reused. Key positions are kept per row (-1 = empty), so rows never need padding. The model calls
    `positions`, `update` and `advance` exactly as on a KVCache; `update` ignores the positions it is
    handed (the model passes row 0's) and uses the per-row ones that `positions` returned.
    """

    def __init__(self, specs: list[LayerSpec], slots: int, max_len: int, window: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.max_len, self.batch, self.device = max_len, slots, device
        self.lengths = [0] * slots
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.slot_pos: dict[int, torch.Tensor] = {}
        self.ring: dict[int, bool] = {}
        self.window = None  # the smallest ring, or None when no layer wraps
        for i, spec, ring, n in owned_layers(specs, window, max_len):
            self.keys[i], self.values[i] = self._allocate(i, spec, (slots, spec.num_kv_heads, n), dtype, device)
            self.slot_pos[i] = torch.full((slots, n), -1, dtype=torch.long, device=device)
            self.ring[i] = ring
            if ring:
                self.window = n if self.window is None else min(self.window, n)
        self.select(list(range(slots)))

    @classmethod
    def for_model(cls, model, slots: int, max_len: int | None = None) -> "SlotCache":
        weight = model.norm.weight
        return cls(model.specs, slots, max_len or model.config.max_position_embeddings,
                   model.config.sliding_window, weight.dtype, weight.device)

    def _allocate(self, layer: int, spec: LayerSpec, prefix: tuple, dtype, device):
        """(keys, values) buffers of one layer: [slots, kv_heads, positions, head_dim] dense tensors here;
        a compressed cache (wren.kv) stores tuples of code buffers instead."""
        shape = (*prefix, spec.head_dim)
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    def __getstate__(self) -> dict:
        # a copy drops the rows' decode plans: they point at this cache's buffers (decode_plan.SlotRow)
        return {k: v for k, v in self.__dict__.items() if k not in ("_row_plans", "_rows_plan")}

    def nbytes(self) -> int:
        parts = [p for t in (*self.keys.values(), *self.values.values()) for p in (t if isinstance(t, tuple) else (t,))]
        return sum(t.numel() * t.element_size() for t in parts)

    def select(self, rows: list[int]) -> None:
        """The rows the next forward runs on, in the order of its batch dimension."""
        self.rows = list(rows)
        first = self.rows[0] if self.rows else 0
        if self.rows == list(range(first, first + len(self.rows))):
            self._index = slice(first, first + len(self.rows))  # a view: no gather, no scatter
        else:
            self._index = torch.tensor(self.rows, device=self.device)
        self._pos = None

    def truncate(self, row: int, length: int) -> None:
        """Keep only the first `length` positions of a row (0 frees it)."""
        self.lengths[row] = length
        for p in self.slot_pos.values():
            p[row].masked_fill_(p[row] >= length, -1)

    def positions(self, n_new: int) -> torch.Tensor:
        starts = [self.lengths[r] for r in self.rows]
        if max(starts) + n_new > self.max_len:
            raise ContextLengthError(f"{max(starts) + n_new} tokens do not fit the context of {self.max_len}; "
                                     "shorten the prompt or raise num_ctx")
        base = torch.tensor(starts, device=self.device)[:, None]
        self._pos = base + torch.arange(n_new, device=self.device)
        return self._pos

    def advance(self, n_new: int) -> None:
        for r in self.rows:
            self.lengths[r] += n_new

    def _rows(self, t: torch.Tensor, end: int | None = None) -> torch.Tensor:
        """The selected rows of t ([B, H, S, ...] or [B, S]), up to slot `end`: cut before gathering."""
        if end is not None:
            t = t[:, :, :end] if t.dim() >= 3 else t[:, :end]
        return t[self._index]

    def _write(self, t: torch.Tensor, slots: torch.Tensor, new: torch.Tensor) -> None:
        # t: [B, H, S, ...] (or [B, S]); slots: [b, n]; new: [b, n, H, ...] (or [b, n])
        idx = self._index
        rows = (torch.arange(slots.shape[0], device=self.device) if isinstance(idx, slice) else idx)[:, None]
        target = t[idx] if isinstance(idx, slice) else t
        if t.dim() >= 3:
            target[rows, :, slots] = new
        else:
            target[rows, slots] = new

    def write_target(self, layer: int, k: torch.Tensor, pos: torch.Tensor) -> None:
        return None  # (rows of a shared cache are written by `update` only)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, _pos=None):
        pos = self._pos  # [b, T]
        K, V, P = self.keys[layer], self.values[layer], self.slot_pos[layer]
        if not self.ring[layer]:
            self._write(K, pos, k.transpose(1, 2))
            self._write(V, pos, v.transpose(1, 2))
            self._write(P, pos, pos)
            end = int(pos.max()) + 1
            return self._rows(K, end), self._rows(V, end), self._rows(P, end), None
        window = P.shape[1]
        if pos.shape[1] == 1:  # one new token a row: written first, then the ring is what it attends to (KVCache)
            slots = pos % window
            self._write(K, slots, k.transpose(1, 2))
            self._write(V, slots, v.transpose(1, 2))
            self._write(P, slots, pos)
            return self._rows(K), self._rows(V), self._rows(P), None
        keys = torch.cat([self._rows(K), k], dim=2)
        values = torch.cat([self._rows(V), v], dim=2)
        key_pos = torch.cat([self._rows(P), pos], dim=1)
        keep = pos[:, -window:]
        slots = keep % window
        self._write(K, slots, k[:, :, -window:].transpose(1, 2))
        self._write(V, slots, v[:, :, -window:].transpose(1, 2))
        self._write(P, slots, keep)
        return keys, values, key_pos, None
