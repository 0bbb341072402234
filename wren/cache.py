"""KV caches, allocated once, up front, at their final size (the gpt-fast habit).

Full-attention layers get `max_len` slots indexed by position. Sliding layers keep only their window, in a
ring indexed by position % window. KV-shared layers own nothing: they read their source layer's K/V.
All sequences of a batch share positions; shorter prompts are left-padded and their pad positions marked
invalid, which is exact because RoPE only sees relative positions.
"""

from __future__ import annotations

import torch

from .config import SLIDING, LayerSpec
from .errors import ContextLengthError


class KVCache:
    def __init__(self, specs: list[LayerSpec], batch: int, max_len: int, window: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.max_len, self.batch = max_len, batch
        self.length = 0  # the next position to be written
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.slot_pos: dict[int, torch.Tensor] = {}
        self.ring: dict[int, bool] = {}
        for i, spec in enumerate(specs):
            if spec.kv_source != i:
                continue
            ring = spec.kind == SLIDING and window < max_len
            slots = window if ring else max_len
            shape = (batch, spec.num_kv_heads, slots, spec.head_dim)
            self.keys[i] = torch.zeros(shape, dtype=dtype, device=device)
            self.values[i] = torch.zeros(shape, dtype=dtype, device=device)
            self.slot_pos[i] = torch.full((slots,), -1, dtype=torch.long, device=device)
            self.ring[i] = ring

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))

    def positions(self, n_new: int) -> torch.Tensor:
        if self.length + n_new > self.max_len:
            raise ContextLengthError(
                f"{self.length + n_new} tokens do not fit the context of {self.max_len}; "
                "shorten the prompt or raise num_ctx")
        return torch.arange(self.length, self.length + n_new, device=self.valid.device)

    def advance(self, n_new: int) -> None:
        self.length += n_new

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Store new K/V ([B, Hkv, T, D]) at positions `pos` ([T]) and return what the new queries attend
        to: (keys, values, key positions [S], key validity [B, S])."""
        if not self.ring[layer]:
            end = int(pos[-1]) + 1
            self.keys[layer][:, :, pos] = k
            self.values[layer][:, :, pos] = v
            self.slot_pos[layer][pos] = pos
            return (self.keys[layer][:, :, :end], self.values[layer][:, :, :end], self.slot_pos[layer][:end],
                    self.valid[:, :end])
        # Sliding ring: attend over what the ring held before this chunk plus the chunk itself, then keep
        # only the newest `window` entries.
        ring_k, ring_v, ring_pos = self.keys[layer], self.values[layer], self.slot_pos[layer]
        keys, values = torch.cat([ring_k, k], dim=2), torch.cat([ring_v, v], dim=2)
        key_pos = torch.cat([ring_pos, pos])
        window = ring_pos.numel()
        keep = pos[-window:]
        slots = keep % window
        ring_k[:, :, slots] = k[:, :, -window:]
        ring_v[:, :, slots] = v[:, :, -window:]
        ring_pos[slots] = keep
        return keys, values, key_pos, self.valid[:, key_pos.clamp(min=0)]

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
