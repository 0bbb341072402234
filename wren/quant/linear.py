"""TurboQuant weights: each row of a weight matrix is cut into groups along the input dimension; a group
is stored as TQ_mse codes (a seeded Hadamard rotation, Lloyd-Max codebook) and one fp16 scale.

The modules keep the call signatures of nn.Linear / nn.Embedding. A matmul rotates the activation once,
per group, and multiplies it by the codebook values: W x = sum_g s_g <c_g, R x_g>, so the weight is never
de-rotated. This is the reference path: it materialises the rotated codebook matrix once, on first use,
and runs a dense matmul on it (a codebook-lookup kernel that keeps only the codes resident is the
performance issue's work).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadOptionError
from .turboquant import TQConfig, codes_nbytes, decode_rotated, quantize_mse, rotate, unrotate

ROW_CHUNK = 8192  # rows quantized at a time: bounds the float32 temporaries of a 262k-row embedding


def group_config(bits: float, group: int, seed: int) -> TQConfig:
    return TQConfig(bits=bits, dim=group, seed=seed)


def quantize_weight(w: torch.Tensor, bits: float, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [out, in/group, bytes], scales fp16 [out, in/group]) for a [out, in] weight.

    The scale is the least-squares fit of the group to its codebook values, not its norm: it removes the
    shrinkage a nearest-centroid code has on average, at no cost in bits."""
    out_f, in_f = w.shape
    if in_f % group:
        raise BadOptionError(f"group size {group} does not divide the input width {in_f}; pick a divisor")
    cfg = group_config(bits, group, seed)
    codes, scales = [], []
    for start in range(0, out_f, ROW_CHUNK):
        x = w[start:start + ROW_CHUNK].float().reshape(-1, in_f // group, group)
        q = quantize_mse(x, cfg)
        c = decode_rotated(q.codes, cfg)
        xr = rotate(x, cfg.seed, cfg.rotation, cfg.block)
        s = (xr * c).sum(-1) / (c * c).sum(-1).clamp_min(1e-12)
        codes.append(q.codes)
        scales.append(s.half())
    return torch.cat(codes), torch.cat(scales)


class TQWeight(nn.Module):
    """Codes and scales of a [out, in] matrix, and the two things a model does with one."""

    def __init__(self, out_features: int, in_features: int, bits: float, group: int, seed: int):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bits, self.group, self.seed = bits, group, seed
        self.cfg = group_config(bits, group, seed)
        groups = in_features // group
        self.register_buffer("codes", torch.zeros(out_features, groups, codes_nbytes(self.cfg), dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16))
        self._rotated = None

    @classmethod
    def from_dense(cls, w: torch.Tensor, bits: float, group: int, seed: int) -> "TQWeight":
        module = cls(w.shape[0], w.shape[1], bits, group, seed)
        module.codes, module.scales = quantize_weight(w, bits, group, seed)
        return module

    def bits_per_weight(self) -> float:
        return (self.codes.numel() * 8 + self.scales.numel() * 16) / (self.out_features * self.in_features)

    def rotated_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """[out, in] codebook values times scales, in the rotated space; built once."""
        if self._rotated is None or self._rotated.dtype != dtype:
            c = decode_rotated(self.codes, self.cfg) * self.scales.float().unsqueeze(-1)
            self._rotated = c.reshape(self.out_features, self.in_features).to(dtype)
        return self._rotated

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xg = x.float().reshape(*shape[:-1], self.in_features // self.group, self.group)
        return rotate(xg, self.cfg.seed, self.cfg.rotation, self.cfg.block).reshape(shape).to(x.dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.rotate_input(x), self.rotated_weight(x.dtype))

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows (an embedding lookup): only the rows asked for are decoded."""
        flat = ids.reshape(-1)
        c = decode_rotated(self.codes[flat], self.cfg) * self.scales[flat].float().unsqueeze(-1)
        w = unrotate(c, self.cfg.seed, self.cfg.rotation, self.cfg.block).reshape(flat.numel(), self.in_features)
        return w.to(dtype).reshape(*ids.shape, self.in_features)

    def dense(self) -> torch.Tensor:
        return self.rows(torch.arange(self.out_features), torch.float32)


class TQLinear(TQWeight):
    """nn.Linear(in, out, bias=False) stored as TurboQuant codes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class TQEmbedding(TQWeight):
    """nn.Embedding stored as TurboQuant codes; also serves as the tied LM head through `linear`."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids, torch.float32)
