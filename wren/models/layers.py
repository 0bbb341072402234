"""Small building blocks shared by the model families: norms, RoPE, attention, the gated MLP.

Functions rather than classes where there is no weight; the family files compose them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import native, triton_ops
from ..quant.linear import input_rotation, linears, of_gelu, of_rotated
from ..triton_ops import guarded


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32. Gemma 3 scales by (1 + w), Gemma 4 by w, weightless norms by 1."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0, with_scale: bool = True):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                scale: torch.Tensor | None = None) -> torch.Tensor:
        """norm(x), or residual + norm(x); then times `scale` (one element; Gemma 4's layer scalar), if
        given: one pass of the compiled kernel where it runs (on CUDA the scale too)."""
        if residual is None or residual.dtype == x.dtype:
            if native.norms(x, self.weight):
                out = native.rms_norm(x, self.weight, self.offset, self.eps, residual=residual)
                return out if scale is None else out * scale
            if triton_ops.norms(x, self.weight):
                return guarded("rms_norm", lambda: triton_ops.rms_norm(x, self.weight, self.offset, self.eps,
                                                                       residual=residual, scale=scale),
                               lambda: self.by_ops(x, residual, scale))
        return self.by_ops(x, residual, scale)

    def by_ops(self, x: torch.Tensor, residual: torch.Tensor | None = None,
               scale: torch.Tensor | None = None) -> torch.Tensor:
        h = x.float()
        h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            h = h * (self.weight.float() + self.offset)
        h = h.type_as(x)
        h = h if residual is None else residual + h
        return h if scale is None else h * scale


def rope_inv_freq(head_dim: int, rotated_dims: int, theta: float, factor: float = 1.0) -> torch.Tensor:
    """Inverse frequencies over head_dim/2 slots; slots past rotated_dims/2 get 0 (no rotation), the
    "proportional" partial RoPE of Gemma 4's full layers."""
    # On the CPU even inside a meta-device block: an op on meta imports torch._dynamo (a second per load).
    exponents = torch.arange(0, rotated_dims, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv = 1.0 / (theta ** exponents)
    inv = torch.cat([inv, torch.zeros(head_dim // 2 - inv.numel(), device="cpu")])
    return inv / factor


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin of shape [B, T, head_dim] for the half-split layout (on CUDA one kernel, not seven ops)."""
    if triton_ops.makes_rope_tables(positions, inv_freq):
        return guarded("rope_tables", lambda: triton_ops.rope_tables(positions, inv_freq, dtype),
                       lambda: _rope_cos_sin_by_ops(positions, inv_freq, dtype))
    return _rope_cos_sin_by_ops(positions, inv_freq, dtype)


def _rope_cos_sin_by_ops(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos/sin: [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def norm_rope(norm: RMSNorm, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope(norm(x), cos, sin) for x [B, T, H, D]; one pass of the compiled kernel where it runs."""
    if native.norms(x, norm.weight):
        return native.rms_norm(x, norm.weight, norm.offset, norm.eps, rope=(cos, sin))
    if triton_ops.norms(x, norm.weight):
        return guarded("rms_norm_rope", lambda: triton_ops.rms_norm(x, norm.weight, norm.offset, norm.eps,
                                                                    rope=(cos, sin)),
                       lambda: apply_rope(norm.by_ops(x), cos, sin))
    return apply_rope(norm(x), cos, sin)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class GatedMLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x)), the Gemma feed-forward."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
        """The MLP of norm(x) (x itself without `norm`; with it, on CUDA, the norm runs in the rotation)."""
        gate, up = linears(x, (self.gate_proj, self.up_proj), norm)
        return of_gated(self.down_proj, gate, up)


def of_gated(module: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """module(gelu_tanh(gate) * up): on CUDA at batch 1 the gelu inside the rotation's kernel, else the middle
    in one pass (compiled on the CPU, Triton on CUDA) where it runs, else the ops."""
    down = of_gelu(module, gate, up)
    if down is not None:
        return down
    middle = native.gelu_mul(gate, up)
    if middle is None:
        middle = guarded("gelu_mul", lambda: triton_ops.gelu_mul(gate, up), lambda: None)
    return module(gelu_tanh(gate) * up if middle is None else middle)


def uninitialized_embedding(rows: int, dim: int) -> nn.Embedding:
    """An nn.Embedding without its random init: the checkpoint fills it. (On the meta device the init's
    normal_ imports torch._dynamo, 1.4 s of every model load.)"""
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None,
                   k_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [B, 1, T, S] mask: causal, within the sliding window (which includes the token itself),
    and only over valid keys (empty cache slots and left padding have k_pos < 0 or k_valid False)."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    mask = (k <= q) & (k >= 0)
    if window is not None:
        mask &= k > q - window
    if k_valid is not None:
        mask &= k_valid[:, None, :]
    return mask[:, None]


class InFrame(NamedTuple):
    """Cached keys or values held in an orthogonal frame R, as a compressed cache decodes its codes (wren.kv),
    never rotated back: `data` [B, Hkv, S, D] times the per-vector `scale` [B, Hkv, S]. Since <q, k> =
    <Rq, Rk> and sum_i p_i v_i = Rᵀ sum_i p_i R v_i, `attend` moves the query into the keys' frame
    (`frame.enter`) and its output out of the values' frame (`frame.leave`), one rotation per query instead
    of one per cached vector, and applies the scales to the scores and probabilities, S numbers instead of
    S x D."""

    data: torch.Tensor
    frame: object  # .enter(q) -> q in the frame; .leave(out) -> out back in the model's frame
    scale: torch.Tensor | None = None


class Coded(NamedTuple):
    """Cached keys or values still as a TurboQuant cache holds them (kv/codecs.py TQ): `parts` (codes
    [B, Hkv, S, bytes], fp16 scales [B, Hkv, S]), for the compiled decode attention to read as they are;
    `in_frame` decodes them for `attend` where it does not run."""

    parts: tuple
    codec: object
    key_scale: torch.Tensor | None = None

    def in_frame(self, dtype: torch.dtype) -> InFrame:
        return self.codec.read(self.parts, dtype, self.key_scale)

    def frame(self):
        """The rotated frame the codes live in (.enter(q), .leave(out)), as `in_frame(...).frame`."""
        return self.codec.frame(self.key_scale)


def attend(q: torch.Tensor, k, v, mask: torch.Tensor, scale: float,
           softcap: float | None = None) -> torch.Tensor:
    """Grouped-query attention. q: [B, H, T, D]; k, v: [B, Hkv, S, D] tensors or InFrame; mask: bool
    [B, 1, T, S]. Returns [B, T, H*D]. Softmax in fp32.

    Written out rather than through SDPA: the CPU flash kernel's blockwise softmax rounds differently for
    one query than for many, which put cached decoding 1.2e-4 away from a full forward."""
    key_scale = value_scale = value_frame = None
    if isinstance(k, InFrame):
        q, k, key_scale = k.frame.enter(q), k.data, k.scale
    if isinstance(v, InFrame):
        value_frame, v, value_scale = v.frame, v.data, v.scale
    b, h, t, d = q.shape
    hkv = k.shape[1]
    # Query heads sharing a KV head are stacked along the row axis, so no repeated copy of K/V is made.
    scores = q.reshape(b, hkv, h // hkv * t, d) @ k.transpose(-1, -2)
    if key_scale is not None:
        scores = scores.float() * key_scale.float()[:, :, None]
    scores = scores.reshape(b, h, t, -1) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    # A row with every key masked (a left-pad query) would be NaN; it attends to nothing instead.
    # (In place only outside autograd: softmax's backward needs its output unmodified.)
    probs = torch.softmax(scores.float(), dim=-1)
    probs = probs.nan_to_num(0.0) if probs.requires_grad else probs.nan_to_num_(0.0)
    probs = probs.reshape(b, hkv, h // hkv * t, -1)
    if value_scale is not None:
        probs = probs * value_scale.float()[:, :, None]
    out = (probs.to(q.dtype) @ v).reshape(b, h, t, d)
    if value_frame is not None:
        out = value_frame.leave(out)
    return out.transpose(1, 2).reshape(b, t, h * d)


QUERY_BLOCK = 128  # queries attended at a time outside autograd (bounds the prefill's score matrices)


def cached_attention(q: torch.Tensor, kv: tuple, pos: torch.Tensor, window: int | None, scale: float,
                     softcap: float | None = None) -> torch.Tensor:
    """Attention of the new queries over what a cache's `update` returned (keys, values, key positions, key
    validity): for one decoded token the compiled kernel where it runs (dense K/V read in their stored
    dtype), else the mask and `attend`. Returns [B, T, H*D]."""
    keys, values, key_pos, key_valid = kv
    if native.attends(q, keys, values):
        return native.attend_one(q, keys, values, key_pos, key_valid, int(pos[0, -1]), window, scale, softcap)
    row_kernel = _row_kernel(q, keys, values)
    if row_kernel is not None:
        return _attend_rows(row_kernel, q, kv, pos, window, scale, softcap)
    if native.attends_codes(q, keys, values):
        return native.attend_codes(q, keys, values, key_pos, key_valid, int(pos[0, -1]), window, scale, softcap)
    if triton_ops.attends_codes(q, keys, values):  # CUDA, a TurboQuant cache: read from its codes
        return guarded("attend_codes", lambda: triton_ops.attend_codes(q, keys, values, key_pos, key_valid, pos,
                                                                       window, scale, softcap),
                       lambda: _attention_by_ops(q, kv, pos, window, scale, softcap))
    if triton_ops.attends(q, keys, values):  # CUDA: one kernel, the mask made inside it
        return guarded("attend_one", lambda: triton_ops.attend_one(q, keys, values, key_pos, key_valid, pos, window,
                                                                   scale, softcap),
                       lambda: _attention_by_ops(q, kv, pos, window, scale, softcap))
    return _attention_by_ops(q, kv, pos, window, scale, softcap)


def attend_project(o_proj: nn.Module, q: torch.Tensor, kv: tuple, pos: torch.Tensor, window: int | None,
                   scale: float, softcap: float | None = None) -> torch.Tensor:
    """o_proj(cached_attention(q, kv, ...)). For one token of one sequence on CUDA with a 4-bit TurboQuant
    o_proj, the attention kernel (over a dense cache or a TurboQuant cache's codes) also rotates its output
    into the projection's input, as the row GEMV reads it: one launch fewer a layer."""
    keys, values, key_pos, key_valid = kv
    if q.shape[0] == 1 and (triton_ops.attends(q, keys, values) or triton_ops.attends_codes(q, keys, values)):
        rotation = input_rotation(o_proj, q, q.shape[-1])
        if rotation is not None:
            kernel, attend = (("attend_one_rotated", triton_ops.attend_one) if isinstance(keys, torch.Tensor)
                              else ("attend_codes_rotated", triton_ops.attend_codes))
            both = guarded(kernel, lambda: attend(q, keys, values, key_pos, key_valid, pos, window, scale, softcap,
                                                  rotation), lambda: None)
            if both is not None:
                return of_rotated(o_proj, both[1], like=both[0])
    return o_proj(cached_attention(q, kv, pos, window, scale, softcap))


def _row(t, b: int):
    """Row b of cached keys or values: of a tensor, or of a Coded's codes and scales."""
    return t._replace(parts=tuple(p[b:b + 1] for p in t.parts)) if isinstance(t, Coded) else t[b:b + 1]


def _row_kernel(q: torch.Tensor, keys, values):
    """For one decoded token of each of several sequences: the compiled decode attention that takes a row of
    them (over a dense cache, or a TurboQuant cache's codes), or None."""
    if q.shape[0] == 1 or q.shape[2] != 1 or not isinstance(keys, (torch.Tensor, Coded)):
        return None
    q0, k0, v0 = q[:1], _row(keys, 0), _row(values, 0)
    if native.attends(q0, k0, v0):
        return native.attend_one
    return native.attend_codes if native.attends_codes(q0, k0, v0) else None


def _attend_rows(kernel, q: torch.Tensor, kv: tuple, pos: torch.Tensor, window: int | None, scale: float,
                 softcap: float | None) -> torch.Tensor:
    """One decoded token of each of B sequences (a batch's step, the server's rows): the compiled kernel a
    row at a time, each over its own slots. Through the mask and two bmm's over every slot of the cache (a
    sliding layer's whole ring) this was ~5 ms of a 4-row step on the default model, and a TurboQuant
    cache was decoded whole first."""
    keys, values, key_pos, key_valid = kv
    positions = pos[:, -1].tolist()
    if kernel is native.attend_codes:  # its frame rotations take every row at once
        positions = positions * q.shape[0] if len(positions) == 1 else positions
        return native.attend_codes_rows(q, keys, values, key_pos, key_valid, positions, window, scale, softcap)
    rows = []
    for b in range(q.shape[0]):
        row_pos = key_pos[b] if key_pos.dim() == 2 and key_pos.shape[0] > 1 else key_pos.reshape(-1)
        row_valid = None if key_valid is None else key_valid[b:b + 1]
        rows.append(kernel(q[b:b + 1], _row(keys, b), _row(values, b), row_pos, row_valid,
                           positions[b if len(positions) > 1 else 0], window, scale, softcap))
    return torch.cat(rows)


def _attention_by_ops(q: torch.Tensor, kv: tuple, pos: torch.Tensor, window: int | None, scale: float,
                      softcap: float | None) -> torch.Tensor:
    """`cached_attention` through the mask and `attend`, in query blocks."""
    keys, values, key_pos, key_valid = kv
    keys, values = (t.in_frame(q.dtype) if isinstance(t, Coded) else t for t in (keys, values))
    # a dense cache in another dtype (an f16 cache of an fp32 model) is read in the query's
    keys, values = (t.to(q.dtype) if isinstance(t, torch.Tensor) else t for t in (keys, values))
    key_pos = key_pos.expand(q.shape[0], -1)
    # Queries a block at a time outside autograd: a prefill chunk's scores are [B, H, T, S] floats several
    # times over (scaled, masked, softmaxed), the peak of a long prompt's memory; blocks bound them.
    block = q.shape[2] if torch.is_grad_enabled() else QUERY_BLOCK
    outs = []
    for s in range(0, q.shape[2], block):
        mask = attention_mask(pos[:, s:s + block], key_pos, window, key_valid)
        k, v = keys, values
        if q.shape[2] > 1:  # a prefill's blocks (a decoded token of a batch sees its whole cache anyway)
            k, v, mask = _seen_slots(keys, values, mask)
        outs.append(attend(q[:, :, s:s + block], k, v, mask, scale, softcap))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _seen_slots(keys, values, mask: torch.Tensor):
    """Keys, values and mask cut to the run of cache slots that some query of the block sees: a prefill's
    early query blocks see none of the later slots (causal), so their scores are never computed. Exact:
    the slots cut off are masked for every query. On the CPU only (finding the run reads the mask)."""
    if mask.device.type != "cpu":
        return keys, values, mask
    seen = mask.reshape(-1, mask.shape[-1]).any(0).nonzero()
    if seen.numel() == 0 or (seen[0, 0] == 0 and seen[-1, 0] == mask.shape[-1] - 1):
        return keys, values, mask
    lo, hi = int(seen[0, 0]), int(seen[-1, 0]) + 1

    def cut(t):
        if isinstance(t, InFrame):
            return InFrame(t.data[:, :, lo:hi], t.frame, None if t.scale is None else t.scale[:, :, lo:hi])
        return t[:, :, lo:hi]

    return cut(keys), cut(values), mask[..., lo:hi]


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


def positions(ids: torch.Tensor, cache) -> torch.Tensor:
    """[B, T] positions of the new tokens: after what the cache holds, or from 0 without one."""
    b, t = ids.shape
    return (cache.positions(t) if cache is not None else torch.arange(t, device=ids.device)).expand(b, t)


def output_logits(model, x: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
    """Final norm, the (usually tied) LM head and soft-capping, on the last `logits_to_keep` positions
    only (0 = all): prefill chunks whose logits nobody reads skip the vocabulary-wide matmul."""
    if logits_to_keep:
        x = x[:, -logits_to_keep:]
    head = model.embed_tokens if model.lm_head is None else model.lm_head
    x = model.norm(x)
    logits = head.linear(x) if hasattr(head, "linear") else x @ head.weight.T  # TurboQuant heads: rotated matmul
    return softcap(logits, model.config.final_logit_softcapping)


def embed(model, ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings scaled by sqrt(hidden) in the model's dtype (that of its dense norms)."""
    dtype = model.norm.weight.dtype
    return model.embed_tokens(ids).to(dtype) * embed_scale(model.config.hidden_size, dtype)


def embed_scale(hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """sqrt(hidden) rounded to the weight dtype, as the reference does (55.4256 becomes 55.5 in bf16)."""
    return torch.tensor(math.sqrt(hidden), dtype=dtype)
