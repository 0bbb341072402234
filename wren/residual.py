"""A decoder layer's residual stream after a sublayer, handed on before it is computed.

After attention (and after the MLP) a Gemma layer adds norm(h) to its residual stream, and the next thing
the stream meets is another norm and a rotation into quantized projections. On CUDA at batch 1 the
rotation's kernel can compute the residual add on the way: one launch where there were two, a layer's
launches being what bounds a decode step of a small model (`quant.linear.linears`). Everywhere else the
value is computed when first asked for, by the same ops as before.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Residual:
    """residual + norm(h), times `scale` (Gemma 4's layer scalar, one element) where given."""

    __slots__ = ("h", "residual", "norm", "scale", "computed")

    def __init__(self, h: Tensor, residual: Tensor, norm, scale: Tensor | None = None):
        self.h, self.residual, self.norm, self.scale = h, residual, norm, scale
        self.computed: Tensor | None = None  # set by `value()`, or by the kernel that computed it

    @property
    def shape(self) -> torch.Size:
        return self.h.shape

    def value(self) -> Tensor:
        if self.computed is None:
            self.computed = self.norm(self.h, residual=self.residual, scale=self.scale)
        return self.computed

    def fusable(self) -> bool:
        """Whether a kernel may compute it in one pass: h and residual alike, outside autograd."""
        weight = self.norm.weight
        return (self.computed is None and self.residual.shape == self.h.shape
                and self.residual.dtype == self.h.dtype and (self.scale is None or self.scale.numel() == 1)
                and not (torch.is_grad_enabled() and (self.h.requires_grad or self.residual.requires_grad
                                                      or (weight is not None and weight.requires_grad))))


def value_of(x) -> Tensor:
    """x itself, or a Residual's value."""
    return x.value() if isinstance(x, Residual) else x
