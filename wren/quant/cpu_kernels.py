"""The fast CPU path for TurboQuant weights.

Two pieces, both plain PyTorch so they need no compiler and compile with `torch.compile`:

* The activation rotation as small matrix products. The reference `_fwht` runs log2(block) butterfly
  passes of tiny ops, which costs more than the matmul it feeds at batch 1. The same normalised Sylvester
  Hadamard matrix applied as one [block, block] product (or two, H_a ⊗ H_b, for blocks over 256) gives
  the same rotation to float rounding.
* The rotated weight as int8 levels with one bf16 scale per row. A row's codebook values times its group
  scales are re-expressed on the 255-level grid of its largest value: on a Lloyd–Max codebook that grid
  step is ~1/100 of the quantization step, so this adds ~0.5% to the weight error (measured in
  tests/test_quant_weights.py), and it lets PyTorch's int8 weight-only kernel (`_weight_int8pack_mm`,
  AVX2/AVX-512) read one byte per weight, 4x less than the fp32 reference and the fastest matmul here
  for a handful of rows. Wider inputs (prefill) dequantize a slice of rows to bf16 at a time and use the
  dense bf16 matmul, which wins there.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .. import native
from .turboquant import TQConfig, _block_size, _hadamard_plan, _HADAMARD_ROUNDS, decode_rotated, tensor_cache

SMALL_BATCH = 32  # rows up to which the int8 kernel beats dequantize + bf16 matmul (measured at 4096×640)
DEQUANT_ROWS = 16384  # output rows dequantized at a time on the wide path: bounds the bf16 temporary
_DIRECT_BLOCK = 256  # blocks up to this size are one dense product; larger ones factor into two


@tensor_cache(32)
def _sylvester(n: int, device: torch.device) -> Tensor:
    """The normalised n×n Sylvester Hadamard matrix (symmetric; the matrix `_fwht` applies)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / math.sqrt(n)).float().to(device)


def _hadamard_blocks(x: Tensor, block: int) -> Tensor:
    shape = x.shape
    if block <= _DIRECT_BLOCK:
        return (x.reshape(-1, block) @ _sylvester(block, x.device)).reshape(shape)
    a = 1 << (block.bit_length() - 1) // 2  # H_block = H_a ⊗ H_b: X -> H_a · X · H_b on [a, b] views
    b = block // a
    y = x.reshape(-1, a, b) @ _sylvester(b, x.device)
    return (_sylvester(a, x.device) @ y).reshape(shape)


def rotate_fast(x: Tensor, cfg: TQConfig) -> Tensor:
    """`turboquant.rotate` for the Hadamard rotation, by matrix products (or the compiled kernels'
    Walsh-Hadamard transform where they take it); float32 out."""
    x = x.float()
    if native.rotates(x, cfg):
        return native.rotate_rows(x, cfg)
    block = _block_size(cfg.dim, cfg.block)
    signs, perm, _ = _hadamard_plan(cfg.dim, block, cfg.seed, x.device)
    for r in range(_HADAMARD_ROUNDS):
        x = _hadamard_blocks(x * signs[r], block)
        if perm is not None and r + 1 < _HADAMARD_ROUNDS:
            x = x[..., perm]
    return x


def unrotate_fast(y: Tensor, cfg: TQConfig) -> Tensor:
    """The inverse of `rotate_fast`."""
    y = y.float()
    if native.rotates(y, cfg):
        return native.rotate_rows(y, cfg, inverse=True)
    block = _block_size(cfg.dim, cfg.block)
    signs, perm, inverse = _hadamard_plan(cfg.dim, block, cfg.seed, y.device)
    for r in reversed(range(_HADAMARD_ROUNDS)):
        if perm is not None and r + 1 < _HADAMARD_ROUNDS:
            y = y[..., inverse]
        y = _hadamard_blocks(y, block) * signs[r]
    return y


def int8_levels(codes: Tensor, scales: Tensor, cfg: TQConfig, in_features: int) -> tuple[Tensor, Tensor]:
    """(int8 [out, in], bf16 scale [out]) with level × scale ≈ the rotated weight row (`round_to_levels`),
    filled into tensors allocated once: for a 262k-row head, pieces and one concatenation held it twice and
    left up to ~1.7 GB of fragmented heap resident."""
    levels = torch.empty(codes.shape[0], in_features, dtype=torch.int8, device=codes.device)
    row_scales = torch.empty(codes.shape[0], dtype=torch.bfloat16, device=codes.device)
    for start, lv, sc in int8_level_pieces(codes, scales, cfg, in_features):
        levels[start:start + lv.shape[0]], row_scales[start:start + lv.shape[0]] = lv, sc
    release_free_memory()
    return levels, row_scales


def int8_level_pieces(codes: Tensor, scales: Tensor, cfg: TQConfig, in_features: int, rows: int = 1024):
    """Yield (first row, int8 levels, bf16 scales) of `rows` rows at a time (`int8_levels` in pieces, so that
    a writer never holds the whole). Pieces of 1024 rows keep the float temporaries small: the default model's
    head takes 0.58 s, against 0.83 in pieces of 8192."""
    for start in range(0, codes.shape[0], rows):
        c = codes[start:start + rows]
        v = decode_rotated(c, cfg) * scales[start:start + rows].float().unsqueeze(-1)
        yield (start, *round_to_levels(v.reshape(c.shape[0], in_features)))
        if start % (64 * rows) == 0:
            release_free_memory()


def round_to_levels(v: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 [rows, width], bf16 scale [rows]) with level × scale ≈ v, on the 255-level grid of each row's
    largest value; the scale is rounded up to bf16 first, so the bf16 scale adds no error of its own."""
    step = (v.abs().amax(-1) / 127).clamp_min(1e-30)
    step_bf16 = step.bfloat16()
    step_bf16 = torch.where(step_bf16.float() < step, torch.nextafter(step_bf16, torch.full_like(step_bf16, 1e30)),
                            step_bf16)
    return torch.round(v / step_bf16.float().unsqueeze(-1)).clamp(-127, 127).to(torch.int8), step_bf16


def int8_matmul(x_rotated: Tensor, levels: Tensor, row_scales: Tensor) -> Tensor:
    """x_rotated [..., in] (float) times the int8 weight [out, in]ᵀ with per-row scales; bf16 inside,
    the input's dtype out."""
    shape = x_rotated.shape
    x2 = x_rotated.reshape(-1, shape[-1]).to(torch.bfloat16)
    if x2.shape[0] <= SMALL_BATCH and shape[-1] % 16 == 0:  # the kernel crashes on other widths
        y = torch._weight_int8pack_mm(x2, levels, row_scales)
    else:
        y = torch.cat([x2 @ (levels[s:s + DEQUANT_ROWS].to(torch.bfloat16)
                             * row_scales[s:s + DEQUANT_ROWS].unsqueeze(-1)).T
                       for s in range(0, levels.shape[0], DEQUANT_ROWS)], dim=-1)
    return y.reshape(*shape[:-1], levels.shape[0]).to(x_rotated.dtype)


def int8_rows(ids: Tensor, levels: Tensor, row_scales: Tensor) -> Tensor:
    """Rows `ids` of the rotated weight, float32 (an embedding lookup on the int8 levels)."""
    return levels[ids].float() * row_scales[ids].float().unsqueeze(-1)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise); a no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
