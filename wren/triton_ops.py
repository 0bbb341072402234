"""The small ops of a decode step on CUDA as one Triton kernel each: RMSNorm with its residual add or
RoPE, gelu(gate) * up, one query's attention over the cache (dense, or a TurboQuant cache read from its
codes), the cache write (dense, or coded into a TurboQuant cache), Gemma 4's head norms, and the RoPE
tables of a step.

A token's step runs each of these once a layer on a few kilobytes; written as PyTorch ops they are ~8
(a norm) to ~16 (attention) kernels each, and the launches, not the bytes, cost the time, even inside a
CUDA graph. The kernels are in _triton_ops.py, imported at the first CUDA call only; checked against the
PyTorch ops in Triton's CPU interpreter (tests/test_triton_ops.py). `guarded` turns off a kernel that
fails on a GPU and takes the ops instead.
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
    from . import _triton_ops

    return {"rms_norm": _triton_ops.rms_norm_kernel, "attend_one": _triton_ops.attend_one_kernel,
            "attend_codes": _triton_ops.attend_codes_kernel, "gelu_mul": _triton_ops.gelu_mul_kernel,
            "kv_write": _triton_ops.kv_write_kernel, "qkv_norms": _triton_ops.qkv_norms_kernel,
            "rope_tables": _triton_ops.rope_tables_kernel, "kv_encode": _triton_ops.kv_encode_kernel,
            "next_power_of_2": _triton_ops.triton.next_power_of_2}


def takes(x: Tensor) -> bool:
    """Whether tensors like x take the Triton kernels: on CUDA, where Triton is installed. (The one place
    that decides it: the tests point it at CPU tensors to run the whole CUDA step in Triton's interpreter.)"""
    if not x.is_cuda:
        return False
    from .quant import triton_kernels

    return triton_kernels.available()


def norms(x: Tensor, weight: Tensor | None) -> bool:
    """Whether `rms_norm` takes x: a CUDA tensor (outside autograd) whose rows fit one program."""
    return (takes(x) and 0 < x.shape[-1] <= MAX_NORM_WIDTH
            and not (torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))))


def rms_norm(x: Tensor, weight: Tensor | None, offset: float, eps: float, rope: tuple[Tensor, Tensor] | None = None,
             residual: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
    """layers.RMSNorm in one kernel; with `rope` (cos, sin [B, T, D] for x [B, T, H, D]) followed by
    `apply_rope`, or with `residual` (x's shape and dtype) added to it; then times `scale` (one element),
    if given. x's dtype out."""
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
    if scale is not None and scale.numel() != 1:
        raise ValueError(f"a norm's output scale is one number, got {tuple(scale.shape)}")
    k["rms_norm"][(rows,)](x, weight if weight is not None else x, residual if residual is not None else x, cos, sin,
                           scale if scale is not None else x, out, heads, float(eps), float(offset), D=dim,
                           HAS_W=weight is not None, HAS_RES=residual is not None, ROPE=rope is not None,
                           HAS_SCALE=scale is not None, BLOCK_D=k["next_power_of_2"](dim))
    return out


def attends(q: Tensor, keys, values) -> bool:
    """Whether `attend_one` takes this step: one query a sequence, on CUDA, outside autograd, over dense
    cached K/V of one dtype whose head vectors are contiguous, a power-of-two head size of at least 16."""
    d = q.shape[-1]
    return (isinstance(keys, Tensor) and isinstance(values, Tensor) and takes(q) and q.shape[2] == 1
            and q.stride(-1) == 1 and keys.dtype == values.dtype and keys.stride(-1) == 1 and values.stride(-1) == 1
            and 16 <= d <= 512 and d & (d - 1) == 0 and keys.shape[-1] == d
            and not (torch.is_grad_enabled() and q.requires_grad))


def attend_one(q: Tensor, keys: Tensor, values: Tensor, key_pos: Tensor, key_valid: Tensor | None, pos: Tensor,
               window: int | None, scale: float, softcap: float | None, rotation: tuple | None = None):
    """layers.attend for one query a sequence (q [B, H, 1, D]) over a cache's `update` result, the mask
    made inside the kernel: [B, 1, H*D] in q's dtype. With `rotation` (a TurboQuant o projection's signs,
    Hadamard block and column scales or None: quant.linear.input_rotation) also that projection's rotated
    input, [B, H*D] float32 in the row GEMV's order: (out, rotated)."""
    k = _kernels()
    b, h, _, d = q.shape
    hkv = keys.shape[1]
    out = torch.empty(b, 1, h * d, dtype=q.dtype, device=q.device)
    key_pos, valid = _seen_args(key_pos, key_valid)
    group = h // hkv
    rotated, column, signs, block, has_col = _rotation_args(rotation, out, q)
    k["attend_one"][(b, hkv)](
        q, keys, values, key_pos, valid, pos, out, rotated, column, signs, block ** -0.5, keys.shape[2],
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0),
        values.stride(1), values.stride(2), key_pos.stride(0) if key_pos.shape[0] > 1 else 0,
        valid.stride(0) if key_valid is not None else 0, pos.stride(0), int(window or 0), float(scale),
        float(softcap or 0.0), G=group, D=d, HAS_VALID=key_valid is not None, HAS_WINDOW=window is not None,
        SOFTCAP=softcap is not None, IEEE=keys.dtype == torch.float32, BLOCK_G=max(16, k["next_power_of_2"](group)),
        BLOCK_S=32 if d > 256 else 64, ROTATE=rotation is not None, HAS_COL=has_col,
        RDIM=block, K_ROW=h * d)
    return out if rotation is None else (out, rotated)


def _seen_args(key_pos: Tensor, key_valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """Key positions as [B or 1, S], and validity as bytes (key_pos itself, unread, where there is none)."""
    key_pos = key_pos if key_pos.dim() == 2 else key_pos[None]
    valid = key_valid if key_valid is not None else key_pos
    return key_pos, valid.view(torch.uint8) if valid.dtype == torch.bool else valid


def _rotation_args(rotation: tuple | None, out: Tensor, q: Tensor) -> tuple:
    """(the rotated output [B, H*D] float32, column scales, signs, Hadamard block, whether there are column
    scales) of an attention kernel that rotates its output for the o projection; placeholders the kernel
    never reads where there is no `rotation` or no column scales."""
    if rotation is None:
        return out, out, out, 16, False
    signs, block, column = rotation
    b, h, _, d = q.shape
    rotated = torch.empty(b, h * d, dtype=torch.float32, device=q.device)
    return rotated, column if column is not None else out, signs, block, column is not None


def reads_codes(parts: tuple) -> bool:
    """Whether `attend_codes` can read a TurboQuant cache's buffers (codes, scales) as they lie: on CUDA."""
    return takes(parts[0])


def attends_codes(q: Tensor, keys, values) -> bool:
    """Whether `attend_codes` takes this step: one query a sequence on CUDA over TurboQuant codes
    (models.layers.Coded) of a power-of-two head size from 16 to 512, each vector rotated as one Hadamard
    block, outside autograd."""
    from .models.layers import Coded
    from .quant.turboquant import _block_size

    d = q.shape[-1]
    if not (isinstance(keys, Coded) and isinstance(values, Coded) and takes(q) and q.shape[2] == 1
            and q.stride(-1) == 1 and 16 <= d <= 512 and d & (d - 1) == 0
            and not (torch.is_grad_enabled() and q.requires_grad)):
        return False
    if not all(c.cfg.dim == d and c.cfg.rotation == "hadamard" and _block_size(d, c.cfg.block) == d
               for c in (keys.codec, values.codec)):
        return False
    (kc, ks), (vc, vs) = keys.parts, values.parts
    return all(t.is_contiguous() for t in (kc, ks, vc, vs)) and kc.shape[:3] == vc.shape[:3]


def attend_codes(q: Tensor, keys, values, key_pos: Tensor, key_valid: Tensor | None, pos: Tensor,
                 window: int | None, scale: float, softcap: float | None, rotation: tuple | None = None):
    """`attend` over Coded keys and values (q [B, H, 1, D]) in one kernel: the query enters the keys' frame,
    the codes are scored and weighed, the output leaves the values' frame. [B, 1, H*D] in q's dtype; with
    `rotation`, also the o projection's rotated input, as `attend_one` gives it."""
    from .quant.triton_kernels import _layout
    from .quant.turboquant import _hadamard_plan

    k = _kernels()
    b, h, _, d = q.shape
    (kc, ks), (vc, vs) = keys.parts, values.parts
    hkv, slots = kc.shape[1], kc.shape[2]
    out = torch.empty(b, 1, h * d, dtype=q.dtype, device=q.device)
    key_pos, valid = _seen_args(key_pos, key_valid)
    ktab, k_high, k_hb, k_lb, k_low0, k_hl = _layout(keys.codec.cfg, q.device)
    vtab, v_high, v_hb, v_lb, v_low0, v_hl = _layout(values.codec.cfg, q.device)
    ksigns, vsigns = (_hadamard_plan(d, d, t.codec.cfg.seed, q.device)[0] for t in (keys, values))
    key_scale = keys.key_scale.float().contiguous() if keys.key_scale is not None else ksigns
    group = h // hkv
    rotated, column, osigns, block, has_col = _rotation_args(rotation, out, q)
    k["attend_codes"][(b, hkv)](
        q, kc, ks, vc, vs, ktab, vtab, key_pos, valid, pos, out, key_scale, ksigns, vsigns, d ** -0.5, rotated,
        column, osigns, block ** -0.5, slots, q.stride(0), q.stride(1),
        key_pos.stride(0) if key_pos.shape[0] > 1 else 0, valid.stride(0) if key_valid is not None else 0,
        pos.stride(0), int(window or 0), float(scale),
        float(softcap or 0.0), h, G=group, D=d, K_NBYTES=kc.shape[-1], K_HIGH=k_high, K_HB=k_hb, K_LB=k_lb,
        K_LOW0=k_low0, K_HL=k_hl, V_NBYTES=vc.shape[-1], V_HIGH=v_high, V_HB=v_hb, V_LB=v_lb, V_LOW0=v_low0,
        V_HL=v_hl, HAS_VALID=key_valid is not None, HAS_WINDOW=window is not None, SOFTCAP=softcap is not None,
        HAS_KSCALE=keys.key_scale is not None, LOWP=q.dtype in (torch.float16, torch.bfloat16),
        BLOCK_G=max(16, k["next_power_of_2"](group)), BLOCK_S=32 if d <= 256 else 16, ROTATE=rotation is not None,
        HAS_COL=has_col, RDIM=block, K_ROW=h * d, num_warps=4 if d <= 256 else 8)
    return out if rotation is None else (out, rotated)


def gelu_mul(gate: Tensor, up: Tensor) -> Tensor | None:
    """gelu_tanh(gate) * up in one kernel on CUDA (outside autograd, same shapes and dtype), else None."""
    if not (takes(gate) and gate.shape == up.shape and gate.dtype == up.dtype and gate.is_contiguous()
            and up.is_contiguous() and not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad))):
        return None
    out = torch.empty_like(gate)
    n = gate.numel()
    _kernels()["gelu_mul"][(-(-n // 1024),)](gate, up, out, n, BLOCK=1024)
    return out


def writes_kv(k: Tensor, v: Tensor, keys: Tensor, values: Tensor, pos: Tensor) -> bool:
    """Whether `kv_write` takes this write: one new token (k, v [B, H, 1, D], head vectors contiguous) into
    a dense cache's buffers of its dtype, on CUDA, outside autograd, its position a one-element tensor."""
    return (takes(k) and k.shape[2] == 1 and k.shape == v.shape and k.shape[:2] == keys.shape[:2]
            and k.shape[-1] == keys.shape[-1] and keys.shape == values.shape and keys.is_contiguous()
            and values.is_contiguous() and k.dtype == v.dtype == keys.dtype == values.dtype
            and k.stride(-1) == 1 and v.stride(-1) == 1 and pos.numel() == 1
            and not (torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)))


def kv_write(k: Tensor, v: Tensor, keys: Tensor, values: Tensor, slot_pos: Tensor, pos: Tensor, window: int) -> None:
    """keys[:, :, slot] = k, values[:, :, slot] = v, slot_pos[slot] = pos in one kernel: the slot is pos,
    or pos % window in a sliding layer's ring (window > 0); `writes_kv` says when it applies."""
    b, h, _, d = k.shape
    _kernels()["kv_write"][(b * h,)](k, v, keys, values, slot_pos, pos, h, keys.shape[2], k.stride(0), k.stride(1),
                                     v.stride(0), v.stride(1), WINDOW=window, D=d,
                                     BLOCK_D=_kernels()["next_power_of_2"](d))


def norms_qkv(q: Tensor, k: Tensor, v: Tensor, weight: Tensor) -> bool:
    """Whether `qkv_norms` takes these raw heads ([B, T, H, D] each, head vectors contiguous within a token,
    one dtype, even D): on CUDA, outside autograd."""
    return (takes(q) and q.dtype == k.dtype == v.dtype and q.shape[-1] == k.shape[-1] == v.shape[-1]
            and q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape[2] == v.shape[2] and q.shape[-1] % 2 == 0
            and all(t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] and t.stride(0) == t.shape[1] * t.stride(1)
                    for t in (q, k, v))
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or weight.requires_grad)))


def qkv_norms(q: Tensor, k: Tensor, v: Tensor, q_norm, k_norm, cos: Tensor, sin: Tensor,
              target: tuple | None = None) -> tuple[Tensor, ...]:
    """(apply_rope(q_norm(q)), apply_rope(k_norm(k)), weightless norm of v) in one kernel, for q/k/v
    [B, T, H, D] (`norms_qkv`); cos/sin [B, T, D]. Three contiguous tensors out, in q's dtype. With a
    cache's `write_target` (one token a sequence) k and v also go into the cache there."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qo, ko, vo = torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty(
        b, t, hkv, d, dtype=q.dtype, device=q.device), torch.empty(b, t, hkv, d, dtype=q.dtype, device=q.device)
    cos, sin = cos.contiguous(), sin.contiguous()
    if cos.shape != (b, t, d) or sin.shape != cos.shape:
        raise ValueError(f"RoPE tables {tuple(cos.shape)} do not fit {tuple(q.shape)}")
    if q_norm.eps != k_norm.eps or q_norm.offset != k_norm.offset:
        raise ValueError("q and k norms with different eps or offsets")
    keys, values, slot_pos, pos, window = target if target is not None else (qo, qo, qo, qo, 0)
    if target is not None and (t != 1 or keys.shape != (b, hkv, keys.shape[2], d) or keys.dtype != q.dtype):
        raise ValueError(f"a cache of {tuple(keys.shape)} {keys.dtype} for keys {tuple(k.shape)} {k.dtype}")
    _kernels()["qkv_norms"][(b * t, hq + 2 * hkv)](
        q, k, v, q_norm.weight, k_norm.weight, cos, sin, qo, ko, vo, keys, values, slot_pos, pos, keys.shape[2],
        hq, hkv, q.stride(1), k.stride(1), v.stride(1), float(q_norm.eps), float(q_norm.offset), D=d,
        BLOCK_D=_kernels()["next_power_of_2"](d), WRITE=target is not None, WINDOW=window)
    return qo, ko, vo


def makes_rope_tables(positions: Tensor, inv_freq: Tensor) -> bool:
    """Whether `rope_tables` takes these: CUDA positions, the inverse frequencies on their device."""
    return takes(positions) and inv_freq.device == positions.device and inv_freq.is_floating_point()


def rope_tables(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """layers.rope_cos_sin in one kernel (seven PyTorch ops): cos and sin [B, T, D] of positions [B, T]."""
    positions = positions.contiguous()
    half = inv_freq.numel()
    cos = torch.empty(*positions.shape, 2 * half, dtype=dtype, device=positions.device)
    sin = torch.empty_like(cos)
    _kernels()["rope_tables"][(positions.numel(),)](positions, inv_freq.contiguous(), cos, sin, HALF=half,
                                                     BLOCK_D=_kernels()["next_power_of_2"](2 * half))
    return cos, sin


def encodes_kv(k: Tensor, v: Tensor, key_codec, value_codec, keys: tuple, values: tuple, pos: Tensor) -> bool:
    """Whether `kv_encode` takes this write: one new token (k, v [B, H, 1, D], head vectors contiguous) into
    TurboQuant-coded keys and values (their buffers as they lie) on CUDA, outside autograd, the position a
    one-element tensor; codecs rotating a vector as one Hadamard block, their runs whole groups of 8."""
    from .kv.codecs import TQ
    from .quant.turboquant import _block_size, _runs

    def codes_whole_groups(codec) -> bool:
        if not isinstance(codec, TQ):
            return False
        cfg = codec.cfg
        return (cfg.rotation == "hadamard" and _block_size(cfg.dim, cfg.block) == cfg.dim and 8 <= cfg.dim <= 1024
                and all(a % 8 == 0 and z % 8 == 0 and b <= 8 for a, z, b in _runs(cfg.bits, cfg.dim)))

    return (takes(k) and k.shape[2] == 1 and k.shape == v.shape and k.stride(-1) == 1 and v.stride(-1) == 1
            and pos.numel() == 1 and codes_whole_groups(key_codec) and codes_whole_groups(value_codec)
            and key_codec.dim == value_codec.dim == k.shape[-1] and all(t.is_contiguous() for t in (*keys, *values))
            and not (torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)))


def kv_encode(k: Tensor, v: Tensor, key_codec, value_codec, keys: tuple, values: tuple, slot_pos: Tensor, pos: Tensor,
              window: int, key_scale: Tensor | None) -> None:
    """keys/values (codes, scales)[:, :, slot] = the codecs' encoding of k (times `key_scale` per channel) and
    v, slot_pos[slot] = pos, in one kernel (about forty PyTorch ops a layer): the slot is pos, or pos % window
    in a sliding layer's ring (window > 0). `encodes_kv` says when it applies."""
    from .quant.triton_kernels import _layout, _midpoints
    from .quant.turboquant import _hadamard_plan

    b, h, _, d = k.shape
    (kcodes, kscales), (vcodes, vscales) = keys, values
    kcfg, vcfg = key_codec.cfg, value_codec.cfg
    ktab, k_high, k_hb, k_lb, k_low0, k_hl = _layout(kcfg, k.device)
    vtab, v_high, v_hb, v_lb, v_low0, v_hl = _layout(vcfg, k.device)
    (kmids, k_lm), (vmids, v_lm) = _midpoints(kcfg, k.device), _midpoints(vcfg, k.device)
    ksigns, vsigns = (_hadamard_plan(d, d, cfg.seed, k.device)[0] for cfg in (kcfg, vcfg))
    scale = key_scale.float().contiguous() if key_scale is not None else ksigns
    _kernels()["kv_encode"][(b * h, 2)](
        k, v, scale, ksigns, vsigns, ktab, kmids, vtab, vmids, kcodes, kscales, vcodes, vscales, slot_pos, pos, h,
        kcodes.shape[2], k.stride(0), k.stride(1), v.stride(0), v.stride(1), d ** -0.5, D=d, WINDOW=window,
        HAS_KSCALE=key_scale is not None, K_NBYTES=kcodes.shape[-1], K_HIGH=k_high, K_HB=k_hb, K_LB=k_lb,
        K_LOW0=k_low0, K_HL=k_hl, V_NBYTES=vcodes.shape[-1], V_HIGH=v_high, V_HB=v_hb, V_LB=v_lb, V_LOW0=v_low0,
        V_HL=v_hl, K_LM=k_lm, V_LM=v_lm, MIDS=(1 << max(k_hb, k_lb, v_hb, v_lb)) - 1)
