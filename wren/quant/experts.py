"""Gemma 4's MoE experts stored as TurboQuant codes: the same call as `models.gemma4.Experts`.

Every expert's gate_up [2I, H] and down [H, I] matrices are quantized row by row like a linear layer. All
experts share one rotation per input width, so a token's input is rotated once whatever experts it is
routed to; an expert's rotated weight is decoded when a token reaches it (its codes are all that stays
resident).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.layers import gelu_tanh
from .cpu_kernels import rotate_fast
from .linear import group_config, quantize_weight
from .turboquant import codes_nbytes, decode_rotated


class TQMatrices(nn.Module):
    """A stack of [E, out, in] matrices as codes [E, out, in/group, bytes] and scales [E, out, in/group]."""

    def __init__(self, experts: int, out_features: int, in_features: int, bits: float, group: int, seed: int):
        super().__init__()
        self.cfg = group_config(bits, group, seed)
        self.out_features, self.in_features, self.group = out_features, in_features, group
        groups = in_features // group
        self.register_buffer("codes", torch.zeros(experts, out_features, groups, codes_nbytes(self.cfg),
                                                  dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(experts, out_features, groups, dtype=torch.float16))

    def fill(self, dense: torch.Tensor) -> "TQMatrices":
        for e in range(dense.shape[0]):
            self.codes[e], self.scales[e] = quantize_weight(dense[e], self.cfg.bits, self.group, self.cfg.seed)
        return self

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xg = x.float().reshape(*shape[:-1], self.in_features // self.group, self.group)
        return rotate_fast(xg, self.cfg).reshape(shape)

    def matmul(self, x_rotated: torch.Tensor, expert: int) -> torch.Tensor:
        w = decode_rotated(self.codes[expert], self.cfg) * self.scales[expert].float().unsqueeze(-1)
        return x_rotated @ w.reshape(self.out_features, self.in_features).T


class TQExperts(nn.Module):
    def __init__(self, experts: int, hidden: int, intermediate: int, bits: float, group: int, down_group: int,
                 seed: int):
        super().__init__()
        self.gate_up = TQMatrices(experts, 2 * intermediate, hidden, bits, group, seed)
        self.down = TQMatrices(experts, hidden, intermediate, bits, down_group, seed)

    @classmethod
    def from_dense(cls, dense, bits: float, group: int, down_group: int, seed: int) -> "TQExperts":
        e, two_i, h = dense.gate_up_proj.shape
        module = cls(e, h, two_i // 2, bits, group, down_group, seed)
        module.gate_up.fill(dense.gate_up_proj.data)
        module.down.fill(dense.down_proj.data)
        return module

    def bits_and_weights(self) -> tuple[float, int]:
        bits = sum(m.codes.numel() * 8 + m.scales.numel() * 16 for m in (self.gate_up, self.down))
        weights = sum(m.codes.shape[0] * m.out_features * m.in_features for m in (self.gate_up, self.down))
        return bits, weights

    def forward(self, x, weights, experts):
        out = torch.zeros_like(x)
        x_rotated = self.gate_up.rotate(x)
        for e in torch.unique(experts).tolist():
            token, slot = torch.where(experts == e)
            gate, up = self.gate_up.matmul(x_rotated[token], e).chunk(2, dim=-1)
            y = self.down.matmul(self.down.rotate(gelu_tanh(gate) * up), e)
            out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
        return out
