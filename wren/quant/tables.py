"""A TurboQuant row table: Gemma 4's per-layer-embedding (PLE) table stored as row-wise codes.

Like `weights.tables.RowTable` it stays memory-mapped where it lies and a lookup decodes only the rows it
is asked for; each row is cut into groups (one per decoder layer's slice by default), every group a
TQ_mse code with an fp16 scale, exactly as the linear layers store theirs.
"""

from __future__ import annotations

import torch

from ..errors import ModelFormatError
from .linear import group_config, quantize_weight
from .turboquant import codes_nbytes, decode_rotated, unrotate


class TQRowTable:
    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bits: float, group: int, seed: int):
        rows, groups, nbytes = codes.shape
        self.cfg = group_config(bits, group, seed)
        if nbytes != codes_nbytes(self.cfg) or tuple(scales.shape) != (rows, groups):
            raise ModelFormatError(f"PLE codes {tuple(codes.shape)} and scales {tuple(scales.shape)} do not fit "
                                   f"{bits} bits in groups of {group}")
        self.codes, self.scales = codes, scales
        self.bits, self.group, self.seed = bits, group, seed
        self.rows, self.width = rows, groups * group
        self.tensor = None

    @classmethod
    def from_dense(cls, table, bits: float, group: int, seed: int) -> "TQRowTable":
        dense = table.tensor if table.tensor is not None else table.lookup(torch.arange(table.rows), "cpu",
                                                                           torch.float32)
        codes, scales = quantize_weight(dense, bits, group, seed)
        return cls(codes, scales, bits, group, seed)

    def numel(self) -> int:
        return self.rows * self.width

    def nbytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * 2

    def lookup(self, ids: torch.Tensor, device, dtype) -> torch.Tensor:
        flat = ids.reshape(-1).cpu()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.rows):
            raise ModelFormatError(f"token id outside the table's {self.rows} rows")
        c = decode_rotated(self.codes[flat], self.cfg) * self.scales[flat].float().unsqueeze(-1)
        rows = unrotate(c, self.cfg.seed, self.cfg.rotation, self.cfg.block).reshape(flat.numel(), self.width)
        return rows.to(device=device, dtype=dtype, non_blocking=True).reshape(*ids.shape, self.width)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.codes": self.codes.contiguous(), f"{name}.scales": self.scales.contiguous()}
