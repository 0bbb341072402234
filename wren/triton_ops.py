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

    return {"rms_norm": rms_norm_kernel, "next_power_of_2": triton.next_power_of_2}


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
