"""Vectorised PyTorch (CPU) dequantisation of GGML tensor data to float32.

`dequantize(raw, ggml_type, shape)` turns the bytes of one GGUF tensor into a
float32 tensor. Quantised data is a run of fixed-size blocks (`type_size` bytes
holding `block_size` weights); each type has one small function that decodes a
[n_blocks, type_size] uint8 tensor into a [n_blocks, block_size] float32 one.
Large tensors are decoded a chunk of blocks at a time so that the integer
temporaries stay in cache and memory use stays near the size of the result.

The arithmetic follows gguf-py's numpy reference (`gguf.quants`) step by step:
integers are formed exactly and every float product/sum is done in float32 in
the same order (no fused multiply-adds), so the results are bit-identical.
Layouts are those of ggml-common.h; fp16 scales are little-endian.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from wren.errors import ModelFormatError, UnsupportedModelError

__all__ = ["SUPPORTED_TYPES", "dequantize", "tensor_nbytes"]

_CHUNK_WEIGHTS = 1 << 19  # weights per chunk (2 MiB of output): temporaries stay in cache


def _u8(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


_NIBBLE_SHIFTS = _u8([0, 4])
_CRUMB_SHIFTS = _u8([0, 2, 4, 6])  # four 2-bit fields per byte
_BIT_SHIFTS = _u8(list(range(8)))


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte `at` of every block, as a float32 [n, 1] column."""
    return b[:, at:at + 2].view(torch.float16).float()


def _nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """Split bytes into 4-bit values: in each group of bytes, all the low
    nibbles come first, then all the high nibbles."""
    q = qs.reshape(qs.shape[0], groups, 1, -1) >> _NIBBLE_SHIFTS.view(1, 1, 2, 1)
    return (q & 0x0F).reshape(qs.shape[0], -1)


def _bits(qh: torch.Tensor, shifts: torch.Tensor, mask: int, groups: int) -> torch.Tensor:
    """Split each byte into fields (bit or crumb) laid out plane by plane:
    field k of byte j of a group lands at k * group_len + j."""
    q = qh.reshape(qh.shape[0], groups, 1, -1) >> shifts.view(1, 1, -1, 1)
    return (q & mask).reshape(qh.shape[0], -1)


# --- 32-weight blocks -------------------------------------------------------

def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    # d: f16 | qs: int8[32];  y = d * q
    torch.mul(b[:, 2:].view(torch.int8), _f16(b, 0), out=out)


def _q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    # d: f16 | qs: 16 bytes (weights 0-15 low nibbles, 16-31 high);  y = d * (q - 8)
    q = (_nibbles(b[:, 2:], 1) - 8).view(torch.int8)  # wraps, then reads signed
    torch.mul(q, _f16(b, 0), out=out)


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    # d: f16 | m: f16 | qs: 16 bytes as Q4_0;  y = d * q + m
    torch.mul(_nibbles(b[:, 4:], 1), _f16(b, 0), out=out)
    out.add_(_f16(b, 2))


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    # qh is a little-endian uint32 whose bit i is bit 4 of weight i; it sits at
    # an odd 2-byte offset, so read it byte by byte (bit i = byte i//8, bit i%8).
    return ((qh.unsqueeze(2) >> _BIT_SHIFTS) & 1).reshape(qh.shape[0], 32) << 4


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    # d: f16 | qh: 4 bytes | qs: 16 bytes;  y = d * (q - 16)
    q = ((_nibbles(b[:, 6:], 1) | _q5_high(b[:, 2:6])) - 16).view(torch.int8)
    torch.mul(q, _f16(b, 0), out=out)


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    # d: f16 | m: f16 | qh: 4 bytes | qs: 16 bytes;  y = d * q + m
    torch.mul(_nibbles(b[:, 8:], 1) | _q5_high(b[:, 4:8]), _f16(b, 0), out=out)
    out.add_(_f16(b, 2))


# --- K-quants: 256-weight super-blocks of 8 or 16 sub-blocks ----------------

def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack Q4_K/Q5_K's 12 bytes into 8 six-bit scales and 8 six-bit mins.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7;
    bytes 4-7 the same for the mins; bytes 8-11 the low nibbles of scales 4-7
    (low half) and of mins 4-7 (high half)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _q2_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # scales: 16 bytes (low nibble scale, high nibble min, per 16 weights) |
    # qs: 64 bytes of 2-bit weights | d: f16 | dmin: f16;  y = d*sc * q - dmin*m
    n, s = b.shape[0], b[:, :16]
    dl = (_f16(b, 80) * (s & 0x0F)).unsqueeze(2)
    ml = (_f16(b, 82) * (s >> 4)).unsqueeze(2)
    q = _bits(b[:, 16:80], _CRUMB_SHIFTS, 3, 2).view(n, 16, 16)
    o = out.view(n, 16, 16)
    torch.mul(q, dl, out=o)
    o.sub_(ml)


def _q3_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # hmask: 32 bytes | qs: 64 bytes of 2-bit low parts | scales: 12 bytes of
    # 16 six-bit scales | d: f16;  y = d * (sc - 32) * (q - 4 * (1 - hbit))
    n, s = b.shape[0], b[:, 96:108]
    lo = _bits(s[:, :8], _NIBBLE_SHIFTS, 0x0F, 1)  # low 4 bits of scales 0-15
    hi = _bits(s[:, 8:], _CRUMB_SHIFTS, 3, 1)  # high 2 bits of scales 0-15
    sc = ((lo | (hi << 4)) - 32).view(torch.int8)
    dl = (_f16(b, 108) * sc).unsqueeze(2)
    ql = _bits(b[:, 32:96], _CRUMB_SHIFTS, 3, 2)
    # a *clear* hmask bit means "subtract 4"
    qh = (_bits(b[:, :32], _BIT_SHIFTS, 1, 1) ^ 1) << 2
    q = (ql - qh).view(torch.int8).view(n, 16, 16)
    torch.mul(q, dl, out=out.view(n, 16, 16))


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # d: f16 | dmin: f16 | scales: 12 bytes | qs: 128 bytes, in 4 groups of 32
    # bytes whose low then high nibbles are sub-blocks of 32 weights
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    o = out.view(n, 8, 32)
    torch.mul(_nibbles(b[:, 16:], 4).view(n, 8, 32), (_f16(b, 0) * sc).unsqueeze(2), out=o)
    o.sub_((_f16(b, 2) * mn).unsqueeze(2))


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # as Q4_K, plus qh: 32 bytes before qs; bit k of qh[j] is bit 4 of
    # weight j of sub-block k
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    q = _nibbles(b[:, 48:], 4) | (_bits(b[:, 16:48], _BIT_SHIFTS, 1, 1) << 4)
    o = out.view(n, 8, 32)
    torch.mul(q.view(n, 8, 32), (_f16(b, 0) * sc).unsqueeze(2), out=o)
    o.sub_((_f16(b, 2) * mn).unsqueeze(2))


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # ql: 128 bytes (low 4 bits) | qh: 64 bytes (high 2 bits) | scales: int8[16]
    # | d: f16. Each half of 128 weights uses 64 ql bytes (low nibbles, then
    # high) and 32 qh bytes (four 2-bit planes);  y = d * sc * (q - 32)
    n = b.shape[0]
    q = _nibbles(b[:, :128], 2) | (_bits(b[:, 128:192], _CRUMB_SHIFTS, 3, 2) << 4)
    q = (q - 32).view(torch.int8).view(n, 16, 16)
    d = (_f16(b, 208) * b[:, 192:208].view(torch.int8)).unsqueeze(2)
    torch.mul(q, d, out=out.view(n, 16, 16))


def _q8_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # d: f32 | qs: int8[256] | bsums: int16[16] (only used by dot products)
    torch.mul(b[:, 4:260].view(torch.int8), b[:, :4].view(torch.float32), out=out)


_BLOCK_DECODERS: dict[int, Callable[[torch.Tensor, torch.Tensor], None]] = {
    QT.Q8_0: _q8_0, QT.Q4_0: _q4_0, QT.Q4_1: _q4_1, QT.Q5_0: _q5_0, QT.Q5_1: _q5_1,
    QT.Q2_K: _q2_k, QT.Q3_K: _q3_k, QT.Q4_K: _q4_k, QT.Q5_K: _q5_k, QT.Q6_K: _q6_k,
    QT.Q8_K: _q8_k,
}
_FLOAT_DTYPES = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}

SUPPORTED_TYPES: frozenset[int] = frozenset(int(t) for t in (*_FLOAT_DTYPES, *_BLOCK_DECODERS))


def _type_name(ggml_type: int) -> str:
    try:
        return QT(ggml_type).name
    except ValueError:
        return f"unknown type {ggml_type}"


def tensor_nbytes(ggml_type: int, shape) -> int:
    """Bytes a tensor of `shape` (numpy order, contiguous dim last) takes."""
    if ggml_type not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"GGML tensor type {_type_name(ggml_type)} (id {ggml_type}) is not supported; "
            f"supported: {', '.join(sorted(QT(t).name for t in SUPPORTED_TYPES))}")
    name = QT(ggml_type).name
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise ModelFormatError(f"{name} tensor has a negative dimension in shape {dims}")
    block_size, type_size = GGML_QUANT_SIZES[QT(ggml_type)]
    row = dims[-1] if dims else 1
    if row % block_size:
        raise ModelFormatError(
            f"{name} tensor of shape {dims}: the last dimension ({row}) "
            f"is not a multiple of the {name} block size ({block_size})")
    return math.prod(dims) // block_size * type_size


def dequantize(raw, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode the bytes `raw` of a `ggml_type` tensor into float32 of `shape`.

    `raw` is a 1-D uint8 numpy array (typically a read-only memmap slice); it is
    never written. An F32 tensor is returned as a zero-copy view of `raw` when
    `raw` is writable (e.g. a copy-on-write memmap), otherwise as a copy, so an
    in-place op can never fault on a read-only mapping."""
    dims = tuple(int(d) for d in shape)
    expected = tensor_nbytes(ggml_type, dims)
    arr = raw if isinstance(raw, np.ndarray) else np.frombuffer(raw, dtype=np.uint8)
    if arr.nbytes != expected:
        raise ModelFormatError(
            f"{QT(ggml_type).name} tensor of shape {dims} needs {expected} bytes, "
            f"but {arr.nbytes} were given (truncated or corrupt file?)")
    arr = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)  # no copy for a uint8 slice
    with warnings.catch_warnings():  # torch warns about read-only arrays; we only read
        warnings.simplefilter("ignore", UserWarning)
        src = torch.from_numpy(arr)

    if ggml_type in _FLOAT_DTYPES:
        t = src.view(_FLOAT_DTYPES[QT(ggml_type)])
        if ggml_type == QT.F32:
            t = t if arr.flags.writeable else t.clone()
        else:
            t = t.float()
        return t.view(dims)

    block_size, type_size = GGML_QUANT_SIZES[QT(ggml_type)]
    decode = _BLOCK_DECODERS[ggml_type]
    blocks = src.view(expected // type_size, type_size)
    out = torch.empty(blocks.shape[0], block_size, dtype=torch.float32)
    step = max(1, _CHUNK_WEIGHTS // block_size)
    for i in range(0, blocks.shape[0], step):
        decode(blocks[i:i + step], out[i:i + step])
    return out.view(dims)
