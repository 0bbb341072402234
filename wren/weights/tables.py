"""Row tables: embedding tables that stay memory-mapped where they lie; a lookup reads only its rows.

Gemma 4's per-layer embedding (PLE) table is as large as the rest of a small model, yet each token needs
one row of it. Keeping it mapped (and, on CUDA, in host memory) means only the rows a prompt touches ever
become resident; the gathered rows alone move to the accelerator.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..errors import ModelFormatError
from .gguf_quants import dequantize, tensor_nbytes
from .mapped_rows import take_rows


class RowTable:
    def __init__(self, rows: int, width: int, *, tensor: torch.Tensor | None = None,
                 raw: np.ndarray | None = None, ggml_type: int | None = None):
        self.rows, self.width = rows, width
        self.tensor = tensor  # a mapped [rows, width] tensor of any float dtype
        self.ggml_type = ggml_type
        if raw is not None:
            row_bytes = tensor_nbytes(ggml_type, (1, width))
            if raw.nbytes != rows * row_bytes:
                raise ModelFormatError(f"row table holds {raw.nbytes} bytes, expected {rows * row_bytes}")
            self.raw = raw.reshape(rows, row_bytes)
            with warnings.catch_warnings():  # torch warns that the array is read-only: it is only read
                warnings.simplefilter("ignore", UserWarning)
                self.raw_rows = torch.from_numpy(self.raw)  # the same mapping, for take_rows
        else:
            self.raw = self.raw_rows = None

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "RowTable":
        if t.dim() != 2:
            raise ModelFormatError(f"an embedding table must be 2-D, got shape {tuple(t.shape)}")
        return cls(t.shape[0], t.shape[1], tensor=t)

    def numel(self) -> int:
        return self.rows * self.width

    def nbytes(self) -> int:
        return self.raw.nbytes if self.raw is not None else self.tensor.numel() * self.tensor.element_size()

    def lookup(self, ids: torch.Tensor, device, dtype) -> torch.Tensor:
        flat = ids.reshape(-1).cpu()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.rows):
            raise ModelFormatError(f"token id outside the table's {self.rows} rows")
        if self.raw is not None:
            picked = take_rows(self.raw_rows, flat).numpy()  # by pread, as below
            rows = dequantize(picked.reshape(-1), self.ggml_type, (flat.numel(), self.width))
        else:
            rows = take_rows(self.tensor, flat)  # a mapped file's rows by pread (mapped_rows.py says why)
        return rows.to(device=device, dtype=dtype, non_blocking=True).reshape(*ids.shape, self.width)
