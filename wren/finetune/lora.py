"""LoRA layers over a frozen base that stays in the form it is stored in: dense `nn.Linear`, or TurboQuant
codes (`TQLinear`) multiplied on the fly.

    y = base(x) + (dropout(x) Aᵀ Bᵀ) · alpha / r           A: [r, in], B: [out, r]  (PEFT's layout)

Gradients reach only A and B. A TurboQuant base goes through `frozen_tq_linear`, an autograd function
that saves nothing: its backward multiplies the output gradient by the rotated codebook weight, one slice
of rows at a time, and un-rotates the result, so no dense copy of any weight ever lives across a step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadOptionError
from ..quant import cpu_kernels
from ..quant import linear as tq
from ..quant.turboquant import decode_rotated, unrotate
from .config import DEFAULT_TARGETS

GRAD_ROWS = 8192  # weight rows dequantized at a time in the TurboQuant backward: bounds the temporary


def rotated_rows(m: tq.TQWeight, start: int, stop: int, dtype: torch.dtype, fast: bool) -> torch.Tensor:
    """Rows [start, stop) of the rotated weight (codebook values times scales) in `dtype`. On the CPU fast
    path the int8 levels the forward uses, so forward and backward see the same weight."""
    if fast and m.cfg.rotation == "hadamard" and m.codes.device.type == "cpu":
        levels, row_scales = m.int8_levels()
        return levels[start:stop].to(dtype).mul_(row_scales[start:stop].to(dtype).unsqueeze(-1))
    c = decode_rotated(m.codes[start:stop], m.cfg) * m.scales[start:stop].float().unsqueeze(-1)
    return c.reshape(stop - start, m.in_features).to(dtype)


def tq_input_grad(m: tq.TQWeight, grad: torch.Tensor, fast: bool | None = None) -> torch.Tensor:
    """dL/dx of y = m.linear(x), given dL/dy: Rᵀ (W_rotᵀ g), divided like the input by the column scales.
    `fast`: whether the forward took the fast (bf16) path; default: whether it is on now."""
    shape = grad.shape
    g = grad.reshape(-1, shape[-1])
    fast = (tq._fast_paths if fast is None else fast) and g.device.type == "cpu"
    dtype = torch.bfloat16 if fast else torch.float32  # the fast forward multiplies in bf16 too
    g = g.to(dtype)
    out = None
    for s in range(0, m.out_features, GRAD_ROWS):
        part = g[:, s:s + GRAD_ROWS] @ rotated_rows(m, s, min(s + GRAD_ROWS, m.out_features), dtype, fast)
        out = part.float() if out is None else out.add_(part.float())
    return from_rotated(m, out, fast).reshape(*shape[:-1], m.in_features).to(grad.dtype)


def from_rotated(m: tq.TQWeight, g: torch.Tensor, fast: bool) -> torch.Tensor:
    """A gradient with respect to the rotated input [..., in] -> with respect to the input itself (the
    transpose of `rotate_input`: un-rotate per group, then the column scales), float32."""
    shape = g.shape
    xg = g.float().reshape(-1, m.in_features // m.group, m.group)
    if fast and m.cfg.rotation == "hadamard":
        x = cpu_kernels.unrotate_fast(xg, m.cfg)
    else:
        x = unrotate(xg, m.cfg.seed, m.cfg.rotation, m.cfg.block)
    x = x.reshape(shape)
    return x * m.input_scale.float() if m.input_scale is not None else x


class _FrozenTQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module):
        ctx.module, ctx.fast = module, tq._fast_paths  # the backward uses the weight the forward used
        with torch.no_grad():
            return module.linear(x)

    @staticmethod
    def backward(ctx, grad):
        return tq_input_grad(ctx.module, grad, ctx.fast), None


def frozen_linear(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """base(x) with gradients for x only, whatever form the frozen weight is in."""
    if isinstance(base, tq.TQWeight):
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenTQ.apply(x, base)
        return base.linear(x)
    return F.linear(x, base.weight, base.bias)


def base_shape(base: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a dense or TurboQuant linear."""
    return base.out_features, base.in_features


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable low-rank update; `merge()` folds the update into a dense base."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if rank < 1:
            raise BadOptionError(f"LoRA rank must be at least 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise BadOptionError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base.requires_grad_(False)
        out_f, in_f = base_shape(base)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        device = _device(base)
        self.lora_A = nn.Parameter(torch.empty(rank, in_f, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init: B = 0, so y is unchanged
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = frozen_linear(self.base, x)
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        return y + (self.dropout(x) @ a.T @ b.T) * self.scaling

    def delta(self) -> torch.Tensor:
        """The update B·A·scaling as a dense [out, in] float32 matrix."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding base + update (a TurboQuant base is dequantized first)."""
        base = self.base
        w = base.dense() if isinstance(base, tq.TQWeight) else base.weight.detach().float()
        dtype = torch.float32 if isinstance(base, tq.TQWeight) else base.weight.dtype
        out = nn.Linear(self.in_features, self.out_features, bias=False, device=w.device, dtype=dtype)
        out.weight.data.copy_(w + self.delta().to(w.device))
        return out.requires_grad_(False)


def _device(m: nn.Module) -> torch.device:
    t = next(iter(m.buffers()), None) if isinstance(m, tq.TQWeight) else m.weight
    return t.device if t is not None else torch.device("cpu")


def _is_base(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, tq.TQLinear)) and not isinstance(m, LoRALinear)


def target_names(model: nn.Module, targets=DEFAULT_TARGETS) -> list[str]:
    """Module names (wren's) of the linear layers whose last name part is one of `targets`."""
    targets = tuple(targets)
    return [n for n, m in model.named_modules() if _is_base(m) and n.rsplit(".", 1)[-1] in targets
            and n.startswith("layers.")]


def _split(model: nn.Module, name: str):
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def inject(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
           targets=DEFAULT_TARGETS, rslora: bool = False, names: list[str] | None = None) -> list[str]:
    """Freeze the model and wrap the target linears in LoRALinear, in place. Returns the wrapped names."""
    model.requires_grad_(False)
    names = target_names(model, targets) if names is None else names
    if not names:
        raise BadOptionError(f"no linear layer matches the LoRA targets {list(targets)}; the model has "
                             f"{sorted({n.rsplit('.', 1)[-1] for n, m in model.named_modules() if _is_base(m)})}")
    for name in names:
        parent, child = _split(model, name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout, rslora))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """wren module name + `.lora_A` / `.lora_B` -> the trainable tensors."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A
        out[f"{name}.lora_B"] = m.lora_B
    return out


def merge(model: nn.Module) -> int:
    """Fold every adapter into its base, leaving plain nn.Linear layers (a TurboQuant base becomes dense:
    re-quantize after). Returns how many layers were merged."""
    modules = lora_modules(model)
    for name, m in modules.items():
        parent, child = _split(model, name)
        setattr(parent, child, m.merged())
    return len(modules)


def merge_dense(model: nn.Module) -> int:
    """Fold the adapters whose base is dense into it (serving then costs nothing extra); adapters over
    TurboQuant codes stay beside them, since folding would need the weight re-quantized."""
    n = 0
    for name, m in lora_modules(model).items():
        if isinstance(m.base, nn.Linear):
            # A new tensor, not an in-place add: a float32 checkpoint's weight may be a view of the mapped file.
            w = m.base.weight.detach()
            m.base.weight = nn.Parameter((w.float() + m.delta().to(w.device)).to(w.dtype), requires_grad=False)
            parent, child = _split(model, name)
            setattr(parent, child, m.base)
            n += 1
    return n
