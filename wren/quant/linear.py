"""TurboQuant weights: each row of a weight matrix is cut into groups along the input dimension; a group
is stored as TQ_mse codes (a seeded Hadamard rotation, Lloyd-Max codebook) and one fp16 scale.

The modules keep the call signatures of nn.Linear / nn.Embedding. A matmul rotates the activation once,
per group, and multiplies it by the codebook values: W x = sum_g s_g <c_g, R x_g>, so the weight is never
de-rotated. Three paths compute it:
* the reference: the rotated codebook matrix in float32, built once, and a dense matmul (exact; tests);
* CPU: int8 levels and the int8 weight-only kernel (`cpu_kernels.py`, within ~0.5% of the reference), or
  where pip built them, the compiled int8 x int8 kernels (`wren/native.py`, ~1%), which read weights of up
  to 6 bits straight from their packed codes (`reads_codes`) and the others from the int8 levels;
* CUDA: a Triton kernel that reads the packed codes and looks the codebook up in registers
  (`triton_kernels.py`), when Triton is installed.
`reference_path()` forces the first everywhere, for parity tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import contextlib

from ..errors import BadOptionError
from .. import native, triton_ops
from ..residual import Residual, value_of
from ..triton_ops import guarded
from ..weights.mapped_rows import take_rows
from . import cpu_kernels
from .turboquant import TQConfig, codes_nbytes, decode_rotated, quantize_mse, rotate, unrotate

ROW_CHUNK = 8192  # rows quantized at a time: bounds the float32 temporaries of a 262k-row embedding
_fast_paths = True
# The last fast rotation of an input (and its int8 form for the compiled kernels), by kind: (input, key,
# value). q/k/v, and gate/up, take the very same input tensor, so each is computed once per layer, not three
# times. Identity plus the version counter and the column scales' bytes keep it exact: a new or modified
# tensor, or other column scales, never match.
_last_input: dict[str, tuple] = {}


def _once_per_input(kind: str, x: torch.Tensor, key: tuple, compute):
    last = _last_input.get(kind)
    if last is not None and last[0] is x and last[1] == key:
        return last[2]
    value = compute()
    _last_input[kind] = (x, key, value)
    return value


@contextlib.contextmanager
def reference_path():
    """Within this block every TurboQuant matmul takes the exact float32 reference path."""
    global _fast_paths
    saved, _fast_paths = _fast_paths, False
    try:
        yield
    finally:
        _fast_paths = saved


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


def _triton_rotates(cfg) -> bool:
    from . import triton_kernels  # imported on first CUDA use: Triton holds ~50 MB on a CPU machine

    return triton_kernels.rotates(cfg)


def _version(x: torch.Tensor) -> int | None:
    # inference-mode tensors keep no version counter (and are not modified in place); asking raises, slowly
    return None if x.is_inference() else x._version


class TQWeight(nn.Module):
    """Codes and scales of a [out, in] matrix, and the two things a model does with one."""

    input_rotated = True  # the compiled kernels' input is rotated per group (not so for GGUF blocks)

    def __init__(self, out_features: int, in_features: int, bits: float, group: int, seed: int,
                 input_scaled: bool = False):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bits, self.group, self.seed = bits, group, seed
        self.cfg = group_config(bits, group, seed)
        groups = in_features // group
        self.register_buffer("codes", torch.zeros(out_features, groups, codes_nbytes(self.cfg), dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16))
        # 1/s per input channel when the columns were scaled by s before quantizing (importance.py)
        self.register_buffer("input_scale", torch.ones(in_features, dtype=torch.float16) if input_scaled else None)
        self._rotated = None  # the reference path's float32 matrix
        self._int8 = None  # the CPU fast path's (levels, row scales)
        self._column_scale = None  # (input_scale, its float32 copy, its bytes): column_scale()
        self._native = None  # the compiled kernels' native.Weight
        self._native_layout = None  # whether they take this layout (checked once)
        self._codes_layout_for = None  # (the switches it was asked under, native.CodesWeight.layout)

    @classmethod
    def from_dense(cls, w: torch.Tensor, bits: float, group: int, seed: int,
                   column_scale: torch.Tensor | None = None) -> "TQWeight":
        """Quantize w; with `column_scale` s, quantize w·diag(s) and divide inputs by s at run time."""
        module = cls(w.shape[0], w.shape[1], bits, group, seed, input_scaled=column_scale is not None)
        if column_scale is not None:
            inverse = (1 / column_scale.float()).half()  # the inverse is what is stored: fit to it
            w = w.float() / inverse.float().to(w.device)
            module.input_scale = inverse.to(w.device)
        module.codes, module.scales = quantize_weight(w, bits, group, seed)
        return module

    def bits_per_weight(self) -> float:
        extra = 0 if self.input_scale is None else self.input_scale.numel() * 16
        return (self.codes.numel() * 8 + self.scales.numel() * 16 + extra) / (self.out_features * self.in_features)

    def rotated_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """[out, in] codebook values times scales, in the rotated space; built once."""
        if self._rotated is None or self._rotated.dtype != dtype:
            c = decode_rotated(self.codes, self.cfg) * self.scales.float().unsqueeze(-1)
            self._rotated = c.reshape(self.out_features, self.in_features).to(dtype)
        return self._rotated

    def column_scale(self) -> tuple[torch.Tensor | None, bytes | None]:
        """(1/s per input channel as float32, its bytes) or (None, None); the bytes tell equal copies (q/k/v
        hold one each) apart from other scales without a tensor compare on the hot path."""
        if self.input_scale is None:
            return None, None
        if self._column_scale is None or self._column_scale[0] is not self.input_scale:
            f32 = self.input_scale.float().contiguous()
            self._column_scale = (self.input_scale, f32, f32.cpu().numpy().tobytes())  # once, at the first call
        return self._column_scale[1], self._column_scale[2]

    def _input_key(self, x: torch.Tensor, column_bytes: bytes | None) -> tuple:
        """What the rotated input depends on besides x's identity."""
        return (self.cfg.dim, self.cfg.seed, self.cfg.rotation, self.cfg.block, _version(x), column_bytes)

    def rotate_input(self, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """The input as the codes see it: divided by the column scales (if any), then rotated per group."""
        column, column_bytes = self.column_scale()
        shape = x.shape

        def compute():
            if fast and triton_ops.takes(x) and _triton_rotates(self.cfg):  # one kernel, not ~7 small ops
                from . import triton_kernels

                return guarded(
                    "_hadamard_round", lambda: triton_kernels.rotate(x.reshape(-1, self.in_features), self.cfg,
                                                                     column).reshape(shape), by_matrices)
            return by_matrices()

        def by_matrices():
            xs = x.float() if column is None else x.float() * column
            xg = xs.reshape(*shape[:-1], self.in_features // self.group, self.group)
            if fast:
                return cpu_kernels.rotate_fast(xg, self.cfg).reshape(shape).to(x.dtype)
            return rotate(xg, self.cfg.seed, self.cfg.rotation, self.cfg.block).reshape(shape).to(x.dtype)

        return _once_per_input("rotated", x, self._input_key(x, column_bytes), compute) if fast else compute()

    def native_input(self, x: torch.Tensor) -> native.QuantizedInput:
        """The input rotated and quantized for the compiled kernels; computed once for q/k/v (and gate/up)."""
        column, column_bytes = self.column_scale()
        return _once_per_input("native", x, self._input_key(x, column_bytes),
                               lambda: native.quantize_input(x.reshape(-1, self.in_features), self.cfg, column))

    def takes_native(self, x: torch.Tensor) -> bool:
        """Whether the compiled kernels multiply x here: fast paths on, a CPU input that needs no gradient
        (they have no backward; training takes PyTorch's path), a layout they take."""
        if not (_fast_paths and x.device.type == "cpu") or (x.requires_grad and torch.is_grad_enabled()):
            return False
        if self._native_layout is None:
            self._native_layout = native.takes_layout(self.cfg)
        return self._native_layout and native.available()

    def _codes_layout(self):
        """native.CodesWeight.layout(cfg), asked again only when the kernels are switched (a matmul's path)."""
        switches = (native.READ_CODES, native.available())
        if self._codes_layout_for is None or self._codes_layout_for[0] != switches:
            self._codes_layout_for = (switches, native.CodesWeight.layout(self.cfg))
        return self._codes_layout_for[1]

    def reads_codes(self) -> bool:
        """Whether the compiled kernels read this weight's packed codes themselves (no int8 levels)."""
        return self._codes_layout() is not None and self.codes.is_contiguous() and self.scales.is_contiguous()

    def native_weight(self) -> native.Weight:
        """The weight as the compiled kernels read it: its codes where they can, else its int8 levels."""
        layout = self._codes_layout()
        if layout is not None:
            codes, scales, held = self.codes, self.scales, self._native  # (module attributes cost ~0.5 us each)
            if held is not None and getattr(held, "codes", None) is codes and held.scales is scales:
                return held
            if codes.is_contiguous() and scales.is_contiguous():
                self._native = native.CodesWeight(codes, scales, layout, self.cfg)
                return self._native
        levels, row_scales = self.int8_levels()
        if self._native is None or getattr(self._native, "levels", None) is not levels:  # the level cache may swap them
            self._native = native.Weight(levels, row_scales, self.group)
        return self._native

    def int8_levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._int8 is None:
            self._int8 = cpu_kernels.int8_levels(self.codes, self.scales, self.cfg, self.in_features)
        return self._int8

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        fast = _fast_paths and self.cfg.rotation == "hadamard"
        if fast and triton_ops.takes(x):
            from . import triton_kernels  # imported on first CUDA use: Triton holds ~50 MB on a CPU machine

            if triton_kernels.takes_row(x, self.cfg, 1):  # decode at batch 1: rotated straight into its order
                return triton_kernels.tq_row(x, [(self.codes, self.scales)], self.cfg, self.column_scale()[0])[0]
            return triton_kernels.tq_linear(self.rotate_input(x, fast=True), self.codes, self.scales, self.cfg)
        if fast and x.device.type == "cpu":
            if self.takes_native(x):
                y = self.native_weight().matmul(self.native_input(x))
                return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
            return cpu_kernels.int8_matmul(self.rotate_input(x, fast=True), *self.int8_levels())
        return F.linear(self.rotate_input(x), self.rotated_weight(x.dtype))

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows (an embedding lookup): only the rows asked for are decoded."""
        flat = ids.reshape(-1)
        codes, scales = take_rows(self.codes, flat), take_rows(self.scales, flat)  # a mapped file's rows by pread
        c = decode_rotated(codes, self.cfg) * scales.float().unsqueeze(-1)
        if _fast_paths and self.cfg.rotation == "hadamard":  # the same rotation as matrix products, fewer ops
            w = cpu_kernels.unrotate_fast(c, self.cfg)
        else:
            w = unrotate(c, self.cfg.seed, self.cfg.rotation, self.cfg.block)
        w = w.reshape(flat.numel(), self.in_features)
        return w.to(dtype).reshape(*ids.shape, self.in_features)

    def dense(self) -> torch.Tensor:
        """The weight this module multiplies by, de-rotated (input scales folded back in)."""
        w = self.rows(torch.arange(self.out_features, device=self.codes.device), torch.float32)
        return w if self.input_scale is None else w * self.input_scale.float()


def linears(x: torch.Tensor | Residual, modules, norm=None) -> list[torch.Tensor]:
    """[m(norm(x)) for m in modules] (`norm` an RMSNorm, or None; x a tensor, or a Residual, whose value is
    taken): TurboQuant layers that read x the same way (q/k/v, gate/up) in one call of the compiled
    kernels, one pass of the thread pool; anything else (dense, LoRA-wrapped) one by one. On CUDA one
    rotation and one Triton launch for them all, and for one row the residual add and the norm inside the
    rotation's kernel."""
    read = x.h if isinstance(x, Residual) else x  # the tensor the kernels read
    if triton_ops.takes(read) and _same_input(read, modules):
        from . import triton_kernels

        first = modules[0]
        weights = [(m.codes, m.scales) for m in modules]
        if (triton_kernels.takes_row(read, first.cfg, len(modules))
                and (norm is None or triton_ops.norms(read, norm.weight))
                and (not isinstance(x, Residual) or (x.fusable() and triton_ops.norms(read, x.norm.weight)))):
            return triton_kernels.tq_row(x, weights, first.cfg, first.column_scale()[0], norm=norm)
        x = value_of(x)
        x = x if norm is None else norm(x)
        return triton_kernels.tq_linears(first.rotate_input(x, fast=True), weights, first.cfg)
    x = value_of(x)
    x = x if norm is None else norm(x)
    if triton_ops.takes(x):
        return [m(x) for m in modules]
    if len(modules) <= 8 and all(isinstance(m, TQWeight) and m.takes_native(x) for m in modules):
        inputs = [m.native_input(x) for m in modules]
        if all(q is inputs[0] for q in inputs):  # the same rotation and column scales: one quantized input
            outs = native.matmul_many(inputs[0], [m.native_weight() for m in modules])
            return [y.reshape(*x.shape[:-1], m.out_features).to(x.dtype) for y, m in zip(outs, modules)]
    return [m(x) for m in modules]


def of_gelu(module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """module(gelu_tanh(gate) * up) where the gelu can run inside the rotation's kernel (CUDA, a TurboQuant
    module, one row: `triton_kernels.takes_row`); None elsewhere, for the caller's own path."""
    if not (isinstance(module, TQWeight) and _fast_paths and module.cfg.rotation == "hadamard"
            and triton_ops.takes(gate) and gate.shape == up.shape and gate.dtype == up.dtype
            and not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad))):
        return None
    from . import triton_kernels

    if not triton_kernels.takes_row(gate, module.cfg, 1):
        return None
    return triton_kernels.tq_row(gate, [(module.codes, module.scales)], module.cfg, module.column_scale()[0],
                                 gelu_up=up)[0]


def input_rotation(module, x: torch.Tensor, head_dim: int) -> tuple | None:
    """What a kernel that makes `module`'s one-row input x (attention's output, head_dim at a time) needs to
    rotate it for the module itself (signs, Hadamard block, column scales or None), where `of_rotated`
    then takes it: a 4-bit TurboQuant layer on CUDA whose groups are one Hadamard block, outside autograd;
    else None."""
    if not (isinstance(module, TQWeight) and _fast_paths and module.cfg.rotation == "hadamard"
            and triton_ops.takes(x) and x.numel() == module.in_features
            and not (torch.is_grad_enabled() and x.requires_grad)):
        return None
    from . import triton_kernels

    return triton_kernels.row_rotation(module.cfg, module.column_scale()[0], module.in_features, head_dim, x.device)


def of_rotated(module, rotated: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """module(x) from x rotated as `input_rotation` asked ([1, in] float32, the row GEMV's order): one launch;
    `like` (x) gives the dtype and leading shape."""
    from . import triton_kernels

    return triton_kernels.tq_rotated_row(rotated, [(module.codes, module.scales)], module.cfg, like)[0]


def _same_input(x: torch.Tensor, modules) -> bool:
    """Whether the TurboQuant layers (one to three) read x alike (rate, groups, rotation, column scales): one
    rotated input (for one, a norm before it may run in its rotation's kernel)."""
    if not (_fast_paths and 1 <= len(modules) <= 3 and all(isinstance(m, TQWeight) for m in modules)):
        return False
    first = modules[0]
    return (first.cfg.rotation == "hadamard" and not (x.requires_grad and torch.is_grad_enabled())
            and all(m.cfg == first.cfg and m.in_features == first.in_features
                    and m.column_scale()[1] == first.column_scale()[1] for m in modules))


class TQLinear(TQWeight):
    """nn.Linear(in, out, bias=False) stored as TurboQuant codes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class TQEmbedding(TQWeight):
    """nn.Embedding stored as TurboQuant codes; also serves as the tied LM head through `linear`."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids, torch.float32)
