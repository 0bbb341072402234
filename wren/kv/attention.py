"""Attention straight from TurboQuant codes, in the rotated frame (stage 1: plain PyTorch, the reference for
compressed-attention kernels).

The rotation R is orthogonal, so <q, k> = <Rq, Rk> and sum_i p_i v_i = Rᵀ sum_i p_i (R v_i): the query is
rotated once, scored against codebook values x scale, the probabilities weight the rotated values, and only
the output is rotated back. No cached key or value is ever de-rotated.
"""

from __future__ import annotations

import torch

from ..models.layers import attend
from ..quant.cpu_kernels import rotate_fast, unrotate_fast


def attend_rotated(q: torch.Tensor, key_parts: tuple, value_parts: tuple, key_codec, value_codec,
                   mask: torch.Tensor, scale: float, softcap: float | None = None,
                   key_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`attend(q, keys, values, ...)` on TQ-coded keys/values as a CompressedKVCache stores them
    ([B, Hkv, S, bytes] codes, [B, Hkv, S] scales; keys coded as k·key_scale, so the query is divided by
    it). q: [B, H, T, D]. Returns [B, T, H*D] in q's dtype."""
    b, h, t, d = q.shape
    if key_scale is not None:
        q = q.float() / key_scale
    keys = key_codec.decode_rotated(key_parts)
    values = value_codec.decode_rotated(value_parts)
    out = attend(rotate_fast(q, key_codec.cfg), keys, values, mask, scale, softcap)
    return unrotate_fast(out.view(b, t, h, d), value_codec.cfg).reshape(b, t, h * d).to(q.dtype)
