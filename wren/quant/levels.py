"""Weights held only as rotated int8 levels: how a GGUF's quantized weights run on the CPU's fast path.

A GGUF stores its weights in llama.cpp's block formats (Q8_0, Q5_0, Q4_K, Q6_K, ...). The exact way to run
them is to dequantize to float32 and use dense matmuls: four bytes a weight read per token, 4-5x what
llama.cpp reads. Re-laid once as the levels the compiled int8 kernels read (`native.Weight`: each row
rotated per group of GROUP by the seeded Hadamard rotation, then rounded to 255 levels of its largest
value, `cpu_kernels.round_to_levels`), they read one byte a weight, take the one-call-a-layer decode plan,
and differ from the exact weights by ~0.8% of each row's norm (the rotation spreads a row's outliers, so
its largest value is a few times its RMS). On the default model, with the kernels' int8 inputs, that moves
perplexity by +0.1-0.3% where llama.cpp's own kernels move it by +0.7-1.0% (docs/performance.md).

The modules are TurboQuant modules with int8 levels in place of codes, so every CPU path of
`quant/linear.py` (the compiled kernels, PyTorch's int8 kernel, the exact reference on the levels) and the
decode plan take them unchanged. They run on the CPU only: the CUDA kernels read packed codes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..weights.mapped_rows import take_rows
from . import cpu_kernels
from .linear import TQEmbedding, TQLinear, TQWeight, group_config

GROUP = 128  # a Hadamard block of the compiled kernels (native.takes_layout), dividing every Gemma width
SEED = 0
CHUNK_WEIGHTS = 1 << 22  # weights rotated at a time: bounds the float32 temporaries (a 262k-row table, 21k-wide rows)


def rows_per_chunk(width: int) -> int:
    return max(1, CHUNK_WEIGHTS // width)


def convertible(shape) -> bool:
    """Whether a [out, in] weight can be held as levels (its width a multiple of the rotation's group)."""
    return len(shape) == 2 and shape[1] % GROUP == 0 and shape[0] > 0


def to_levels(w: torch.Tensor, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 levels [out, in], bf16 row scales [out]) of a float [out, in] weight: rotated per group, then
    rounded to each row's grid."""
    cfg = group_config(8, GROUP, seed)
    rows, width = w.shape
    levels = torch.empty(rows, width, dtype=torch.int8)
    scales = torch.empty(rows, dtype=torch.bfloat16)
    step = rows_per_chunk(width)
    for start in range(0, rows, step):
        part = w[start:start + step].float().reshape(-1, width // GROUP, GROUP)
        rotated = cpu_kernels.rotate_fast(part, cfg).reshape(-1, width)
        levels[start:start + step], scales[start:start + step] = cpu_kernels.round_to_levels(rotated)
    return levels, scales


class LevelsWeight(TQWeight):
    """A [out, in] weight as int8 levels `levels` and bf16 row scales `row_scales` in the rotated space of
    group GROUP (no codes). `source_rows`, when set (a `weights.tables.RowTable` of the exact weight), serves
    embedding lookups exactly; without it rows are de-rotated from the levels."""

    def __init__(self, out_features: int, in_features: int, seed: int = SEED):
        nn.Module.__init__(self)  # not TQWeight's: it would allocate codes
        self.out_features, self.in_features = out_features, in_features
        self.bits, self.group, self.seed = 8, GROUP, seed
        self.cfg = group_config(8, GROUP, seed)
        self.register_buffer("levels", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("row_scales", torch.zeros(out_features, dtype=torch.bfloat16))
        self.input_scale = None
        self.codes = self.scales = None
        self.source_rows = None
        self._rotated = self._int8 = self._column_scale = self._native = self._native_layout = None
        self._codes_layout_for = None

    def bits_per_weight(self) -> float:
        return 8 + 16 / self.in_features

    def int8_levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.levels, self.row_scales

    def reads_codes(self) -> bool:
        return False

    def rotated_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self._rotated is None or self._rotated.dtype != dtype:
            self._rotated = (self.levels.float() * self.row_scales.float().unsqueeze(-1)).to(dtype)
        return self._rotated

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError("int8-level weights run on the CPU; load the model with its exact weights for CUDA")
        return super().linear(x)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.source_rows is not None:
            return self.source_rows.lookup(ids, ids.device, dtype)
        return self._derotated(ids.reshape(-1)).reshape(*ids.shape, self.in_features).to(dtype)

    def dense(self) -> torch.Tensor:
        """The weight this module multiplies by (the levels), de-rotated."""
        return self._derotated(torch.arange(self.out_features))

    def _derotated(self, flat: torch.Tensor) -> torch.Tensor:
        picked = take_rows(self.levels, flat).float() * take_rows(self.row_scales, flat).float().unsqueeze(-1)
        w = cpu_kernels.unrotate_fast(picked.reshape(-1, self.in_features // GROUP, GROUP), self.cfg)
        return w.reshape(flat.numel(), self.in_features)


class LevelsLinear(LevelsWeight, TQLinear):
    """nn.Linear(in, out, bias=False) held as int8 levels."""


class LevelsEmbedding(LevelsWeight, TQEmbedding):
    """A tied embedding held as int8 levels: the LM head's matmul reads the levels."""
