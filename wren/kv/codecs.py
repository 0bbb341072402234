"""How one cache type stores a head vector [..., D]: the buffers it writes, and how it reads them back.

Every codec quantizes a vector once, on its own (no state shared across positions), so a vector's codes do
not depend on how the sequence was chunked. Buffers are (codes, scale) pairs or one dense tensor; the
leading dims of every buffer are the vector's (batch, head, slot).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from .. import native
from ..models.layers import InFrame
from ..quant.cpu_kernels import rotate_fast, unrotate_fast
from ..quant.turboquant import TQConfig, codes_nbytes, decode_rotated, encode_with_values

DENSE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
TQ_BITS = {"tq4": 4.0, "tq3.5": 3.5, "tq3": 3.0, "tq2.5": 2.5, "tq2": 2.0}
TYPES = (*DENSE, "q8", *TQ_BITS)
TQ_SEED = 0
_FP16_MAX = 65504.0


class Dense:
    def __init__(self, name: str, dim: int):
        self.name, self.dim, self.dtype = name, dim, DENSE[name]
        self.nbytes = dim * torch.finfo(self.dtype).bits // 8

    def empty(self, prefix: tuple, device) -> tuple[Tensor, ...]:
        return (torch.zeros(*prefix, self.dim, dtype=self.dtype, device=device),)

    def encode(self, x: Tensor) -> tuple[Tensor, ...]:
        return (x.to(self.dtype),)

    def decode(self, parts: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
        return parts[0].to(dtype)

    def read(self, parts: tuple[Tensor, ...], dtype: torch.dtype, key_scale: Tensor | None = None) -> Tensor:
        """What attention takes (a tensor, or InFrame): here the vectors as stored; attention reads them in
        its own dtype (the compiled decode kernel converts as it reads, without a copy)."""
        return parts[0]


def _fp16_scale_up(scale: Tensor) -> Tensor:
    """scale rounded to fp16, never below the float32 value (so levels fit), clamped to fp16's range."""
    scale = scale.clamp(max=_FP16_MAX)
    half = scale.half()
    return torch.where(half.float() < scale, torch.nextafter(half, torch.full_like(half, _FP16_MAX)), half)


class Q8:
    """int8 levels with one fp16 absmax scale per vector: D + 2 bytes."""

    name = "q8"

    def __init__(self, dim: int):
        self.dim, self.nbytes = dim, dim + 2

    def empty(self, prefix: tuple, device) -> tuple[Tensor, ...]:
        return (torch.zeros(*prefix, self.dim, dtype=torch.int8, device=device),
                torch.zeros(prefix, dtype=torch.float16, device=device))

    def encode(self, x: Tensor) -> tuple[Tensor, ...]:
        x = x.float()
        scale = _fp16_scale_up(x.abs().amax(-1) / 127)
        s = scale.float()
        levels = torch.round(x / torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(-1)).clamp(-127, 127)
        return levels.to(torch.int8), scale

    def decode(self, parts: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
        levels, scale = parts
        return (levels.float() * scale.float().unsqueeze(-1)).to(dtype)

    def read(self, parts: tuple[Tensor, ...], dtype: torch.dtype, key_scale: Tensor | None = None) -> Tensor:
        return self.decode(parts, dtype)


class TQ:
    """TurboQuant MSE codes of the Hadamard-rotated vector (fractional rates split the rotated coordinates,
    turboquant._runs) and one fp16 scale, the least-squares fit of the rotated vector to its codebook values
    (as quant/linear.py's quantize_weight does; better than the norm): codes_nbytes + 2 bytes."""

    def __init__(self, name: str, dim: int):
        self.name, self.dim = name, dim
        self.cfg = TQConfig(TQ_BITS[name], dim, seed=TQ_SEED)
        self.code_bytes = codes_nbytes(self.cfg)
        self.nbytes = self.code_bytes + 2

    def empty(self, prefix: tuple, device) -> tuple[Tensor, ...]:
        return (torch.zeros(*prefix, self.code_bytes, dtype=torch.uint8, device=device),
                torch.zeros(prefix, dtype=torch.float16, device=device))

    def encode(self, x: Tensor) -> tuple[Tensor, ...]:
        if native.encodes(x, self.cfg):  # the same steps in one compiled call (what the decode plan writes)
            return native.encode_rows(x, self.cfg)
        xr = rotate_fast(x, self.cfg)
        norms = torch.linalg.vector_norm(xr, dim=-1)
        unit = xr / torch.where(norms > 0, norms, torch.ones_like(norms)).unsqueeze(-1)
        codes, c = encode_with_values(unit, self.cfg.bits, self.cfg)
        scale = (xr * c).sum(-1) / (c * c).sum(-1).clamp_min(1e-12)
        return codes, scale.clamp(-_FP16_MAX, _FP16_MAX).half()

    def decode_rotated(self, parts: tuple[Tensor, ...]) -> Tensor:
        """The vectors in the rotated frame, float32: what a rotated query scores against."""
        codes, scale = parts
        return decode_rotated(codes, self.cfg) * scale.float().unsqueeze(-1)

    def decode(self, parts: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
        """The vectors in the model's frame: the dense reference path (tests)."""
        return unrotate_fast(self.decode_rotated(parts), self.cfg).to(dtype)

    def read(self, parts: tuple[Tensor, ...], dtype: torch.dtype, key_scale: Tensor | None = None) -> InFrame:
        """The vectors left in the rotated frame, for `attend` (models/layers.py InFrame). Keys coded as
        k·key_scale are read with that scale, which the query is divided by on entering the frame."""
        codes, scale = parts
        if codes.device.type == "cpu" and native.reads_cache_codes(self.cfg):  # one compiled call
            return InFrame(native.decode_rows(codes, self.cfg).to(dtype), Frame(self.cfg, key_scale), scale)
        return InFrame(decode_rotated(codes, self.cfg).to(dtype), Frame(self.cfg, key_scale), scale)

    def frame(self, key_scale: Tensor | None = None) -> "Frame":
        return Frame(self.cfg, key_scale)


class Frame(NamedTuple):
    """The rotated frame of a TQ codec, for InFrame: queries enter it, attention outputs leave it."""

    cfg: TQConfig
    key_scale: Tensor | None = None

    def enter(self, q: Tensor) -> Tensor:
        q32 = q.float() if self.key_scale is None else q.float() / self.key_scale
        return rotate_fast(q32, self.cfg).to(q.dtype)

    def leave(self, out: Tensor) -> Tensor:
        return unrotate_fast(out, self.cfg).to(out.dtype)


@functools.lru_cache(maxsize=64)
def codec_for(name: str, dim: int):
    """The codec of cache type `name` (a concrete type, not `auto`) for head vectors of `dim`."""
    if name in DENSE:
        return Dense(name, dim)
    if name == "q8":
        return Q8(dim)
    return TQ(name, dim)


def vector_nbytes(name: str, dim: int) -> int:
    """Bytes one cached head vector of `dim` takes in type `name` (codes and scale together)."""
    return codec_for(name, dim).nbytes
