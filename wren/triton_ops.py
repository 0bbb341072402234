"""Triton kernels for the small ops of a decode step on CUDA: RMSNorm with its residual add or RoPE, and
one query's attention over the cache.

A token's step runs each of these once a layer on a few kilobytes; written as PyTorch ops they are ~8
(a norm) to ~16 (attention) kernels each, and the launches, not the bytes, cost the time, even inside a
CUDA graph. Here each is one kernel. Checked against the PyTorch ops in Triton's CPU interpreter
(tests/test_triton_ops.py). Triton is imported at the first CUDA call only.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

MAX_NORM_WIDTH = 16384  # a row is one program's registers

broken: dict[str, str] = {}  # kernel -> the error that turned it off in this process


def guarded(kernel: str, launch, fallback):
    """launch(), or where this kernel failed to compile or launch here (a Triton or GPU this code has not
    met), a warning, the kernel off for the rest of the process, and fallback(): a slower path still runs."""
    if kernel not in broken:
        try:
            return launch()
        except Exception as exc:  # noqa: BLE001 - compiler and driver errors have no common type
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise  # inside a graph capture the stream is spoiled: the capture's owner falls back
            broken[kernel] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"wren: the Triton kernel {kernel} failed here and is off from now on "
                          f"({broken[kernel][:300]})", RuntimeWarning, stacklevel=2)
    return fallback()


@functools.lru_cache(maxsize=1)
def _kernels():
    from .quant import triton_kernels

    if triton_kernels.triton is None:
        return None
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_kernel(x_ptr, w_ptr, res_ptr, cos_ptr, sin_ptr, out_ptr, heads, eps, offset, D: tl.constexpr,
                        HAS_W: tl.constexpr, HAS_RES: tl.constexpr, ROPE: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        d = tl.arange(0, BLOCK_D)
        ok = d < D
        x = tl.load(x_ptr + row * D + d, mask=ok, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        y = x * r
        if HAS_W:
            y = y * (tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32) + offset)
        y = y.to(out_ptr.dtype.element_ty).to(tl.float32)  # the norm is rounded to x's dtype, as in PyTorch
        if ROPE:  # half-split RoPE: the partner of coordinate d is d +- D/2, normed the same way
            half: tl.constexpr = D // 2
            partner = tl.where(d < half, d + half, d - half)
            yp = tl.load(x_ptr + row * D + partner, mask=ok, other=0.0).to(tl.float32) * r
            if HAS_W:
                yp = yp * (tl.load(w_ptr + partner, mask=ok, other=0.0).to(tl.float32) + offset)
            yp = yp.to(out_ptr.dtype.element_ty).to(tl.float32)
            at = (row // heads) * D + d
            c = tl.load(cos_ptr + at, mask=ok, other=0.0).to(tl.float32)
            s = tl.load(sin_ptr + at, mask=ok, other=0.0).to(tl.float32)
            y = y * c + tl.where(d < half, -yp, yp) * s
        if HAS_RES:
            y = tl.load(res_ptr + row * D + d, mask=ok, other=0.0).to(tl.float32) + y
        tl.store(out_ptr + row * D + d, y.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def attend_one_kernel(q_ptr, k_ptr, v_ptr, kpos_ptr, valid_ptr, qpos_ptr, out_ptr, S, sq_b, sq_h, sk_b, sk_h,
                          sk_s, sv_b, sv_h, sv_s, skp_b, sva_b, sqp_b, window, scale, softcap,
                          G: tl.constexpr, D: tl.constexpr, HAS_VALID: tl.constexpr, HAS_WINDOW: tl.constexpr,
                          SOFTCAP: tl.constexpr, IEEE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
        """The G query heads that share KV head h of sequence b, over every cache slot at once-through
        (online softmax): a slot counts where its position is known (>= 0), not after the query's, within
        the window, and valid."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        ok_g = g < G
        q = tl.load(q_ptr + b * sq_b + (h * G + g)[:, None] * sq_h + d[None, :], mask=ok_g[:, None], other=0.0)
        q = q.to(k_ptr.dtype.element_ty)
        qpos = tl.load(qpos_ptr + b * sqp_b)
        m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, D), tl.float32)
        s0 = 0
        while s0 < S:  # (a while loop: Triton's interpreter cannot range() to a run-time bound)
            s = s0 + tl.arange(0, BLOCK_S)
            s0 += BLOCK_S
            ok_s = s < S
            kpos = tl.load(kpos_ptr + b * skp_b + s, mask=ok_s, other=-1)
            seen = (kpos >= 0) & (kpos <= qpos)
            if HAS_WINDOW:
                seen = seen & (kpos > qpos - window)
            if HAS_VALID:
                seen = seen & (tl.load(valid_ptr + b * sva_b + s, mask=ok_s, other=0) != 0)
            k = tl.load(k_ptr + b * sk_b + h * sk_h + s[:, None] * sk_s + d[None, :], mask=ok_s[:, None], other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                scores = tl.dot(q, tl.trans(k)) * scale
            if SOFTCAP:
                scores = softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))  # softcap * tanh(x / softcap)
            scores = tl.where(seen[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            base = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: keep exp() finite
            p = tl.exp(scores - base[:, None])
            alpha = tl.exp(m - base)
            total = total * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + b * sv_b + h * sv_h + s[:, None] * sv_s + d[None, :], mask=ok_s[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / tl.where(total > 0, total, 1.0)[:, None]  # a query that sees nothing attends to nothing
        tl.store(out_ptr + b * (G * tl.num_programs(1) * D) + (h * G + g)[:, None] * D + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=ok_g[:, None])

    return {"rms_norm": rms_norm_kernel, "attend_one": attend_one_kernel, "next_power_of_2": triton.next_power_of_2}


def _on(x: Tensor) -> bool:
    if not x.is_cuda:
        return False
    from .quant import triton_kernels

    return triton_kernels.available()


def norms(x: Tensor, weight: Tensor | None) -> bool:
    """Whether `rms_norm` takes x: a CUDA tensor (outside autograd) whose rows fit one program."""
    return (_on(x) and 0 < x.shape[-1] <= MAX_NORM_WIDTH
            and not (torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))))


def rms_norm(x: Tensor, weight: Tensor | None, offset: float, eps: float, rope: tuple[Tensor, Tensor] | None = None,
             residual: Tensor | None = None) -> Tensor:
    """layers.RMSNorm in one kernel; with `rope` (cos, sin [B, T, D] for x [B, T, H, D]) followed by
    `apply_rope`, or with `residual` (x's shape and dtype) added to it. x's dtype out."""
    k = _kernels()
    x = x.contiguous()
    dim = x.shape[-1]
    rows = x.numel() // dim
    out = torch.empty_like(x)
    heads = 1
    cos = sin = x  # (unused pointers where there is no RoPE)
    if rope is not None:
        cos, sin = (t.contiguous() for t in rope)
        heads = x.shape[-2]
        if cos.shape[-1] != dim or cos.numel() * heads != x.numel() or sin.shape != cos.shape:
            raise ValueError(f"RoPE tables {tuple(cos.shape)} do not fit {tuple(x.shape)}")
    if residual is not None:
        residual = residual.contiguous()
        if residual.shape != x.shape:
            raise ValueError(f"residual {tuple(residual.shape)} does not fit {tuple(x.shape)}")
    k["rms_norm"][(rows,)](x, weight if weight is not None else x, residual if residual is not None else x, cos, sin,
                           out, heads, float(eps), float(offset), D=dim, HAS_W=weight is not None,
                           HAS_RES=residual is not None, ROPE=rope is not None,
                           BLOCK_D=k["next_power_of_2"](dim))
    return out


def attends(q: Tensor, keys, values) -> bool:
    """Whether `attend_one` takes this step: one query a sequence, on CUDA, outside autograd, over dense
    cached K/V of one dtype whose head vectors are contiguous, a power-of-two head size of at least 16."""
    d = q.shape[-1]
    return (isinstance(keys, Tensor) and isinstance(values, Tensor) and _on(q) and q.shape[2] == 1
            and q.stride(-1) == 1 and keys.dtype == values.dtype and keys.stride(-1) == 1 and values.stride(-1) == 1
            and 16 <= d <= 512 and d & (d - 1) == 0 and keys.shape[-1] == d
            and not (torch.is_grad_enabled() and q.requires_grad))


def attend_one(q: Tensor, keys: Tensor, values: Tensor, key_pos: Tensor, key_valid: Tensor | None, pos: Tensor,
               window: int | None, scale: float, softcap: float | None) -> Tensor:
    """layers.attend for one query a sequence (q [B, H, 1, D]) over a cache's `update` result, the mask
    made inside the kernel: [B, 1, H*D] in q's dtype."""
    k = _kernels()
    b, h, _, d = q.shape
    hkv = keys.shape[1]
    out = torch.empty(b, 1, h * d, dtype=q.dtype, device=q.device)
    key_pos = key_pos if key_pos.dim() == 2 else key_pos[None]  # [S] or [B, S]
    valid = key_valid if key_valid is not None else key_pos
    if valid.dtype == torch.bool:
        valid = valid.view(torch.uint8)
    group = h // hkv
    k["attend_one"][(b, hkv)](
        q, keys, values, key_pos, valid, pos, out, keys.shape[2], q.stride(0), q.stride(1), keys.stride(0),
        keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        key_pos.stride(0) if key_pos.shape[0] > 1 else 0, valid.stride(0) if key_valid is not None else 0,
        pos.stride(0), int(window or 0), float(scale), float(softcap or 0.0), G=group, D=d,
        HAS_VALID=key_valid is not None, HAS_WINDOW=window is not None, SOFTCAP=softcap is not None,
        IEEE=keys.dtype == torch.float32, BLOCK_G=max(16, k["next_power_of_2"](group)),
        BLOCK_S=32 if d > 256 else 64)
    return out
