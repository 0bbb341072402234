"""A GGUF's linear layers multiplied in place, in the file's own block formats (Q4_0 ... Q6_K): `--low-memory`.

Int8 levels (`levels.py`) read 8 bits a weight, so a Q4_K_M model held as levels takes 1.5-1.8x its file in
memory, and as much again in the level cache on disk. `BlocksLinear` keeps the GGUF's blocks as stored
(mapped from the file: 4.5-6.5 bits a weight for Q4_K/Q5_0/Q6_K), and the compiled kernels multiply them
there for up to PREFILL_ROWS input rows (decode, server batches, prompts of up to a few hundred tokens;
`_gguf_blocks.h`), with the input quantized to int8 per block of 32, as llama.cpp's kernels do. Longer
prefills make each matrix's int8 levels for the call, bit for bit those `wren run` holds (`levels.to_levels`,
in one compiled pass: a few ms a matrix), and take their prefill tiles. Where the kernels do not run, and on
the reference path, the blocks are dequantized to float32, exactly.

The module is a TurboQuant module to the rest of wren (`linears`, the decode plan), with an unrotated input
(`input_rotated` False). It runs on the CPU only.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from ..weights.gguf_quants import dequantize
from . import linear as linear_mod
from .linear import TQLinear, group_config

# Input rows from which prefill multiplies int8 levels made for the call. Below, the kernels read the blocks
# (from 12 rows on, unpacked once per 16 rows into the levels' tiles: _gguf_blocks.h, gguf_tiles). Making the
# levels (~0.7 ns a weight) paid from ~300 rows against the first tiles: an E2B-wide Q3_K_M model prefilled
# 172 / 190 / 188 tokens/s at 96 / 192 / 512 tokens without them, 108 / 156 / 247 with them from 48 rows
# (bench/decode.py). Against the tiles as they are now, 512 rows ran at 210.5 without, 206.6 with: even.
PREFILL_ROWS = 256
LEVELS_GROUP = 128  # their rotation's group: levels.GROUP, as a GGUF's int8 levels have it
CHUNK_WEIGHTS = 1 << 22  # weights dequantized at a time for the exact path's float32 matmul


def as_tensor(raw: np.ndarray, rows: int) -> torch.Tensor:
    """A GGUF tensor's bytes (a read-only view of the mapped file) as uint8 [rows, row bytes], not copied:
    nothing writes to it."""
    with warnings.catch_warnings():  # torch warns that the array is read-only; the kernels only read it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(raw).reshape(rows, -1)


class BlocksLinear(TQLinear):
    """nn.Linear(in, out, bias=False) held as a GGUF tensor's blocks [out, row bytes] of `ggml_type`."""

    input_rotated = False

    def __init__(self, out_features: int, in_features: int, ggml_type: int, row_bytes: int):
        nn.Module.__init__(self)  # not TQWeight's: it would allocate codes
        self.out_features, self.in_features, self.ggml_type = out_features, in_features, ggml_type
        self.bits, self.group, self.seed = 8, native.BLOCK_INPUT, 0
        self.cfg = group_config(8, native.BLOCK_INPUT, 0)
        self.register_buffer("blocks", torch.zeros(out_features, row_bytes, dtype=torch.uint8))
        self.input_scale = self.codes = self.scales = None
        self._native = None
        self._column_scale = None

    def bits_per_weight(self) -> float:
        return self.blocks.shape[1] * 8 / self.in_features

    def takes_native(self, x: torch.Tensor) -> bool:
        """The compiled kernels take a CPU input of under PREFILL_ROWS rows that needs no gradient."""
        return (linear_mod._fast_paths and x.device.type == "cpu"
                and not (x.requires_grad and torch.is_grad_enabled())
                and x.numel() < PREFILL_ROWS * self.in_features and native.blocks_readable())

    def native_input(self, x: torch.Tensor) -> native.QuantizedInput:
        return linear_mod._once_per_input("native", x, self._input_key(x, None),
                                          lambda: native.quantize_blocks(x.reshape(-1, self.in_features)))

    def _input_key(self, x: torch.Tensor, column_bytes) -> tuple:
        return ("blocks", native.BLOCK_INPUT, linear_mod._version(x))

    def native_weight(self) -> native.BlocksWeight:
        if self._native is None or self._native.blocks is not self.blocks:
            self._native = native.BlocksWeight(self.blocks, self.ggml_type, self.in_features)
        return self._native

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError("GGUF blocks run on the CPU; load the model with its exact weights for CUDA")
        if self.takes_native(x):
            y = self.native_weight().matmul(self.native_input(x))
        elif self._prefills_on_levels(x):
            y = self._levels_weight().matmul(self._levels_input(x))
        else:  # the exact weights (the reference path, and CPUs without the kernels)
            flat = x.reshape(-1, self.in_features).float()
            step = max(1, CHUNK_WEIGHTS // self.in_features)
            parts = [F.linear(flat, self._dequantized(start, start + step))
                     for start in range(0, self.out_features, step)]
            y = torch.cat(parts, dim=-1)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _prefills_on_levels(self, x: torch.Tensor) -> bool:
        """Prefill (PREFILL_ROWS rows or more) on the int8 levels of `levels.py`, made from the blocks for this
        call (~0.7 ns a weight on 2 threads: ~70 ms a forward of the default model): their prefill tiles beat
        float32's matmul on the dequantized rows by more than that (803 against 630 tokens/s for a
        512-token prompt on the default model, each beside the levels' ~940 in its own run)."""
        return (linear_mod._fast_paths and not (x.requires_grad and torch.is_grad_enabled())
                and self.in_features % LEVELS_GROUP == 0 and native.blocks_readable())

    def _levels_weight(self) -> native.Weight:
        levels, scales = native.blocks_to_levels(self.blocks, self.ggml_type, self.in_features, LEVELS_GROUP, 0)
        return native.Weight(levels, scales, LEVELS_GROUP)

    def _levels_input(self, x: torch.Tensor) -> native.QuantizedInput:
        """x rotated and quantized as the levels read it: once for q/k/v (and gate/up)."""
        return linear_mod._once_per_input("native", x, ("levels", LEVELS_GROUP, linear_mod._version(x)),
                                          lambda: native.quantize_input(x.reshape(-1, self.in_features),
                                                                        group_config(8, LEVELS_GROUP, 0), None))

    def _dequantized(self, start: int, stop: int) -> torch.Tensor:
        part = self.blocks[start:stop]
        if native.blocks_readable():  # the kernels' own unpacking: ~10x PyTorch's
            return native.dequantize_blocks(part, self.ggml_type, self.in_features)
        return dequantize(part.numpy().reshape(-1), self.ggml_type, (part.shape[0], self.in_features))

    def dense(self) -> torch.Tensor:
        return self._dequantized(0, self.out_features)

    def rotated_weight(self, dtype: torch.dtype) -> torch.Tensor:  # the input is not rotated: the weight itself
        return self.dense().to(dtype)

    def int8_levels(self):
        raise RuntimeError("GGUF blocks have no int8 levels; they run through native.BlocksWeight")


class BlocksEmbedding(BlocksLinear):
    """A tied embedding held as a GGUF tensor's blocks: the LM head's matmul reads them in place, and lookups
    read the GGUF's own rows, exactly (`source_rows`, a RowTable the loader attaches)."""

    def __init__(self, out_features: int, in_features: int, ggml_type: int, row_bytes: int):
        super().__init__(out_features, in_features, ggml_type, row_bytes)
        self.source_rows = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.source_rows is None:
            raise RuntimeError("a GGUF embedding read in place looks its rows up in the file: none was attached")
        return self.source_rows.lookup(ids, ids.device, torch.float32)
