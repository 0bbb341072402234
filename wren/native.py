"""The compiled CPU kernels (`_native.c`), where pip built them and the CPU runs them.

* The TurboQuant matmul, for any number of input rows (decode and prefill): the input rotated per group
  and quantized to int8 with one scale per group (`quantize_input`), then int8 x int8 dot products with
  the int8 levels (`Weight.matmul`). Against PyTorch's int8 weight-only kernel (`cpu_kernels.int8_matmul`)
  it reads the same bytes faster and does the rotation in one call instead of a dozen small ops; against
  dequantizing to bf16 for prefill it does a quarter of the memory traffic. The input's int8 rounding adds
  ~0.6% error to the product (~1% with the levels' own, against ~10% for 4-bit weights); on real text
  decoding it stays closer to the exact reference than the bf16 path does (docs/performance.md).
* On a CPU with AVX-512 VBMI, weights of up to 6 bits are read straight from their packed codes
  (`CodesWeight`): each 64-code chunk is unpacked to bytes in registers, so decode reads 2-6 bits a weight
  instead of 8 and nothing is decoded at load; prefill unpacks a block of 16 rows once for all its inputs.
* Decode attention over a dense cache (`attend_one`) and RMSNorm fused with RoPE or the residual
  (`rms_norm`): a few hundred fewer small PyTorch ops a token.

On a CPU without AVX-512 VNNI but with AVX2 (most laptops; AMD before Zen 4), the same kernels come from a second
build, `_native_avx2` (setup.py: the file compiled for AVX2, its AVX-512 intrinsics emulated by SIMDe on two
256-bit halves, the hot loops written for AVX2: wren/_avx2_compat.h).

`available()` is False without a built module for this CPU, or with WREN_NATIVE=0; callers then take the
PyTorch paths.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
from torch import Tensor

from .quant.turboquant import TQConfig, _block_size, _centroids, _hadamard_plan, _runs, codes_nbytes, tensor_cache

try:  # built by setup.py when a C compiler was there; torch is imported first, so its libgomp is shared
    from . import _native
except ImportError:
    _native = None


def _cpu_has_avx2() -> bool:
    """What the AVX2 build was compiled for (setup.py); read before importing it, since its module's own code
    may use those instructions."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return {"avx2", "fma", "f16c", "bmi2"} <= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return False


if (_native is None or not _native.supported()) and _cpu_has_avx2():
    try:  # no AVX-512: the same kernels built for AVX2 (wren/_native_avx2.c)
        from . import _native_avx2 as _native
    except ImportError:
        pass

@functools.lru_cache(maxsize=1)
def available() -> bool:
    if os.environ.get("WREN_NATIVE", "1") == "0":
        return False
    return _native is not None and _native.supported()


def codes_readable() -> bool:
    """Whether the kernels that read packed codes run here: the built module on a CPU with AVX-512 VBMI."""
    return available() and _native.codes_supported()


def takes_layout(cfg: TQConfig) -> bool:
    """Whether the kernels take this weight's layout: one Hadamard block per group of a multiple of 64."""
    return cfg.rotation == "hadamard" and cfg.dim % 64 == 0 and cfg.dim <= 4096 and _block_size(cfg.dim, cfg.block) == cfg.dim


def supports(cfg: TQConfig) -> bool:
    """Whether the kernels run for this weight here (its layout, and the built module on this CPU)."""
    return available() and takes_layout(cfg)


class QuantizedInput(NamedTuple):
    values: Tensor  # uint8 [rows, width]: the int8 value of the rotated input + 128, as VNNI multiplies it
    scales: Tensor  # float32 [rows, width / group]
    group: int


@tensor_cache(64)
def _signs(group: int, seed: int) -> Tensor:
    return _hadamard_plan(group, group, seed, torch.device("cpu"))[0].float().contiguous()


def quantize_input(x: Tensor, cfg: TQConfig, column_scale: Tensor | None) -> QuantizedInput:
    """x [rows, width] rotated as `TQWeight.rotate_input` does (column scale, then per group), as int8."""
    x = x.float().contiguous()
    rows, width = x.shape
    group = cfg.dim
    values = torch.empty(rows, width, dtype=torch.uint8)
    scales = torch.empty(rows, width // group, dtype=torch.float32)
    _native.rotate_quantize(x.data_ptr(), rows, width, group, 0 if column_scale is None else column_scale.data_ptr(),
                            _signs(group, cfg.seed).data_ptr(), values.data_ptr(), scales.data_ptr(),
                            torch.get_num_threads())
    return QuantizedInput(values, scales, group)


def group_sums(levels: Tensor, group: int) -> Tensor:
    """float32 [ceil(out / 16), width / group, 16]: 128 x each row's sum of levels over each group, what
    `matmul` takes off for the +128 of its input, 16 rows a block as it reads them. Once per weight: ~1% of
    the levels' bytes."""
    levels = levels.contiguous()
    out, width = levels.shape
    sums = torch.empty((out + 15) // 16, width // group, 16, dtype=torch.float32)
    _native.group_sums(levels.data_ptr(), out, width, group, sums.data_ptr(), torch.get_num_threads())
    return sums


LEVELS, CODES = 0, 1  # the formats `matmul_many` reads (_native.c `matrix`), and a GGUF's blocks:
GGUF_BASE, BLOCK_INPUT = 16, 32  # format GGUF_BASE + ggml type, its input quantized per 32, unrotated
IN_PLACE_TYPES = frozenset({2, 3, 6, 7, 8, 10, 11, 12, 13, 14})  # Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K-Q6_K (_gguf_blocks.h)
READ_CODES = True  # tests turn it off to run the levels format where the codes one would run


class Weight:
    """A weight as `matmul` reads it: int8 levels [out, width], bf16 row scales [out] and their `group_sums`,
    checked once, so that a matmul costs one allocation and one call."""

    def __init__(self, levels: Tensor, row_scales: Tensor, group: int):
        if levels.dtype != torch.int8 or row_scales.dtype != torch.bfloat16 or row_scales.shape != levels.shape[:1]:
            raise ValueError(f"levels {tuple(levels.shape)} {levels.dtype} and scales {row_scales.dtype} do not fit")
        self.levels, self.row_scales = levels.contiguous(), row_scales.contiguous()
        self.sums = group_sums(self.levels, group)
        self.out, self.width = levels.shape
        self.group = group

    def fields(self) -> tuple:
        """(format, data, scale, extra): the tensors a `_native.c` matrix points into."""
        return LEVELS, self.levels, self.row_scales, self.sums

    def matmul(self, q: QuantizedInput) -> Tensor:
        """float32 [rows, out]: the quantized input times this weight."""
        return matmul_many(q, (self,))[0]


def blocks_readable() -> bool:
    """Whether `BlocksWeight`s run here: the built module on a CPU with AVX-512 VNNI, VL and F16C."""
    return available() and _cpu_reads_blocks()


@functools.lru_cache(maxsize=1)
def _cpu_reads_blocks() -> bool:  # asked once: every decode step's layers ask blocks_readable
    return _native.blocks_supported()


def quantize_blocks(x: Tensor) -> QuantizedInput:
    """x [rows, width] as a GGUF matrix reads it: int8 per block of BLOCK_INPUT, not rotated."""
    x = x.float().contiguous()
    rows, width = x.shape
    values = torch.empty(rows, width, dtype=torch.uint8)
    scales = torch.empty(rows, width // BLOCK_INPUT, dtype=torch.float32)
    _native.rotate_quantize(x.data_ptr(), rows, width, BLOCK_INPUT, 0, 0, values.data_ptr(), scales.data_ptr(),
                            torch.get_num_threads())
    return QuantizedInput(values, scales, BLOCK_INPUT)


def dequantize_blocks(blocks: Tensor, ggml_type: int, width: int) -> Tensor:
    """float32 [rows, width] of a GGUF matrix's blocks [rows, row bytes] (`blocks_readable` types)."""
    out = torch.empty(blocks.shape[0], width, dtype=torch.float32)
    _native.gguf_dequantize(ggml_type, blocks.contiguous().data_ptr(), blocks.shape[0], width, out.data_ptr(),
                            torch.get_num_threads())
    return out


def blocks_to_levels(blocks: Tensor, ggml_type: int, width: int, group: int, seed: int) -> tuple[Tensor, Tensor]:
    """(int8 levels [rows, width], bf16 row scales [rows]) of a GGUF matrix's blocks: bit for bit
    `quant.levels.to_levels` of the dequantized rows, in one pass."""
    rows = blocks.shape[0]
    levels = torch.empty(rows, width, dtype=torch.int8)
    scales = torch.empty(rows, dtype=torch.bfloat16)
    _native.gguf_to_levels(ggml_type, blocks.contiguous().data_ptr(), rows, width, group,
                           _signs(group, seed).data_ptr(), levels.data_ptr(), scales.data_ptr(), torch.get_num_threads())
    return levels, scales


class BlocksWeight(Weight):
    """A GGUF matrix read in place (_native.c, formats GGUF_BASE + ggml type; `_gguf_blocks.h`): its blocks
    [out, row bytes] as stored in the file, 4.5-8.5 bits a weight, nothing converted at load."""

    def __init__(self, blocks: Tensor, ggml_type: int, width: int):
        if (blocks.dtype != torch.uint8 or blocks.dim() != 2 or not blocks.is_contiguous()
                or ggml_type not in IN_PLACE_TYPES):
            raise ValueError(f"blocks {tuple(blocks.shape)} {blocks.dtype} of ggml type {ggml_type} "
                             "are not read in place")
        self.blocks, self.ggml_type = blocks, ggml_type
        self.out, self.width, self.group = blocks.shape[0], width, BLOCK_INPUT

    def fields(self) -> tuple:
        return GGUF_BASE + self.ggml_type, self.blocks, self.blocks, self.blocks


class CodesWeight(Weight):
    """A weight read straight from its packed TurboQuant codes [out, width / group, bytes] and fp16 group
    scales [out, width / group] (_native.c, format CODES): 2-6 bits a weight read instead of the levels' 8,
    nothing decoded at load. `layout` builds it, or None where the kernel cannot read this config."""

    def __init__(self, codes: Tensor, scales: Tensor, layout: Tensor, cfg: TQConfig):
        out, groups = scales.shape
        if (codes.dtype != torch.uint8 or scales.dtype != torch.float16 or codes.shape != (out, groups, codes_nbytes(cfg))
                or not (codes.is_contiguous() and scales.is_contiguous())):
            raise ValueError(f"codes {tuple(codes.shape)} {codes.dtype} and scales {tuple(scales.shape)} "
                             f"{scales.dtype} do not fit {cfg}")
        self.codes, self.scales, self.layout = codes, scales, layout
        self.out, self.width, self.group = out, groups * cfg.dim, cfg.dim

    def fields(self) -> tuple:
        return CODES, self.codes, self.scales, self.layout

    @staticmethod
    def layout(cfg: TQConfig) -> Tensor | None:
        """The kernel's description of cfg's codes (bytes of each chunk of 64, and the centroids on an int8
        grid), or None where it cannot read them: no AVX-512 VBMI, a layout `takes_layout` refuses, over 6
        bits, or a fractional rate whose split is not a multiple of 64 coordinates."""
        if not (READ_CODES and codes_readable() and takes_layout(cfg)):
            return None
        return _codes_layout(cfg.bits, cfg.dim, cfg.codebook)


@tensor_cache(64)
def _codes_layout(bits: float, dim: int, codebook: str) -> Tensor | None:
    runs = _runs(bits, dim)
    if any(b > 6 for _, _, b in runs):
        return None
    centroids = [_centroids(b, dim, codebook, torch.device("cpu"))[0] for _, _, b in runs]
    step = max(float(c.abs().max()) for c in centroids) / 127  # one grid for both runs: one group scale
    levels = [torch.round(c / step).clamp(-127, 127).to(torch.int8).contiguous() for c in centroids]
    split = runs[0][1] if len(runs) == 2 else 0
    layout = torch.zeros(_native.codes_layout_size(), dtype=torch.uint8)
    ok = _native.codes_layout(layout.data_ptr(), dim, split, runs[0][2], runs[-1][2], levels[0].data_ptr(),
                              levels[-1].data_ptr(), step)
    return layout if ok else None


def matmul_many(q: QuantizedInput, weights) -> list[Tensor]:
    """[w.matmul(q) for w in weights] (up to 8, as q/k/v, in either format) in one call: one pass of the
    thread pool."""
    rows, width = q.values.shape
    args = []
    outs = []
    for w in weights:
        if width != w.width or q.group != w.group:
            raise ValueError(f"an input of width {width} (group {q.group}) does not fit a weight "
                             f"{w.out}x{w.width} (group {w.group})")
        y = torch.empty(rows, w.out, dtype=torch.float32)
        fmt, data, scale, extra = w.fields()
        args += (fmt, data.data_ptr(), scale.data_ptr(), extra.data_ptr(), y.data_ptr(), w.out)
        outs.append(y)
    _native.gemm(q.values.data_ptr(), q.scales.data_ptr(), rows, width, q.group, torch.get_num_threads(),
                 len(outs), *args)
    return outs


_KV_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
KV_CODES = 3  # a TurboQuant cache (_native.c attention_args)


def attends(q: Tensor, keys, values) -> bool:
    """Whether `attend_one` takes this step: one query of one sequence in fp32 over dense cached K/V (fp32,
    fp16 or bf16) whose head vectors are contiguous, outside autograd."""
    return (available() and q.dtype == torch.float32 and q.shape[0] == 1 and q.shape[2] == 1
            and isinstance(keys, Tensor) and isinstance(values, Tensor) and keys.device.type == "cpu"
            and keys.dtype in _KV_DTYPES and values.dtype == keys.dtype and keys.stride() == values.stride()
            and keys.shape == values.shape and keys.stride(-1) == 1 and q.shape[-1] % 16 == 0
            and not (torch.is_grad_enabled() and q.requires_grad))


def attend_one(q: Tensor, keys: Tensor, values: Tensor, key_pos: Tensor, key_valid: Tensor | None, position: int,
               window: int | None, scale: float, softcap: float | None) -> Tensor:
    """`attend(q, keys, values, attention_mask(...), scale, softcap)` for one query at `position`
    (q [1, H, 1, D], keys/values [1, Hkv, S, D], key_pos [S], key_valid [1, S] or None); [1, 1, H * D] out."""
    _, h, _, d = q.shape
    _, hkv, s, _ = keys.shape
    q = q.reshape(h, d).contiguous()
    key_pos = key_pos.to(torch.int64).contiguous()
    valid = None if key_valid is None else key_valid.reshape(-1).to(torch.bool).contiguous()
    out = torch.empty(1, 1, h * d, dtype=torch.float32)
    _native.attend_one(q.data_ptr(), keys.data_ptr(), values.data_ptr(), _KV_DTYPES[keys.dtype], h, hkv, d, s,
                       keys.stride(1), keys.stride(2), key_pos.data_ptr(), 0 if valid is None else valid.data_ptr(),
                       position, window or 0, out.data_ptr(), torch.get_num_threads(), float(scale),
                       float(softcap or 0.0))
    return out


def rotates(x: Tensor, cfg: TQConfig) -> bool:
    """Whether `rotate_rows` takes x [..., cfg.dim]: float32 on the CPU outside autograd, a Hadamard rotation
    of one block of 16 to 4096."""
    return (available() and x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[-1] == cfg.dim
            and cfg.rotation == "hadamard" and 16 <= cfg.dim <= MAX_WIDTH and _block_size(cfg.dim, cfg.block) == cfg.dim
            and not (torch.is_grad_enabled() and x.requires_grad))


def rotate_rows(x: Tensor, cfg: TQConfig, inverse: bool = False) -> Tensor:
    """turboquant.rotate (or its inverse) of each row of x [..., cfg.dim], by the vectorised Walsh-Hadamard
    transform: a few thousand adds a row where the matrix products of `cpu_kernels.rotate_fast` take
    dim^2 multiply-adds a round (a prefill's queries, keys and values into a TurboQuant cache's frame)."""
    out = x.clone(memory_format=torch.contiguous_format)
    _native.rotate_rows(out.data_ptr(), out.numel() // cfg.dim, cfg.dim, _signs(cfg.dim, cfg.seed).data_ptr(), 0,
                        int(inverse), torch.get_num_threads())
    return out


def encodes(x: Tensor, cfg: TQConfig) -> bool:
    """Whether `encode_rows` codes x [..., cfg.dim] for a TurboQuant cache here."""
    return rotates(x, cfg) and reads_cache_codes(cfg)


def encode_rows(x: Tensor, cfg: TQConfig) -> tuple[Tensor, Tensor]:
    """The TQ cache codec's encode (kv/codecs.py) in one call: (codes uint8 [..., bytes], fp16 scales [...]),
    the codes `decode_layer` writes too."""
    layout, centroids, midpoints = _kv_layout(cfg)
    flat = x.reshape(-1, cfg.dim).contiguous()
    codes = torch.empty(flat.shape[0], codes_nbytes(cfg), dtype=torch.uint8)
    scales = torch.empty(flat.shape[0], dtype=torch.float16)
    _native.encode_rows(flat.data_ptr(), flat.shape[0], cfg.dim, 0, _signs(cfg.dim, cfg.seed).data_ptr(),
                        layout.data_ptr(), centroids.data_ptr(), midpoints.data_ptr(), codes.data_ptr(),
                        scales.data_ptr(), torch.get_num_threads())
    return codes.reshape(*x.shape[:-1], -1), scales.reshape(x.shape[:-1])


def decode_rows(codes: Tensor, cfg: TQConfig) -> Tensor:
    """`turboquant.decode_rotated` of a TurboQuant cache codec's codes [..., bytes] (`reads_cache_codes`):
    the centroids, float32 [..., cfg.dim], in one call instead of a lookup per run and a concatenation."""
    layout, centroids, _ = _kv_layout(cfg)
    flat = codes.reshape(-1, codes.shape[-1]).contiguous()
    out = torch.empty(flat.shape[0], cfg.dim, dtype=torch.float32)
    _native.decode_rows(flat.data_ptr(), flat.shape[0], cfg.dim, layout.data_ptr(), centroids.data_ptr(),
                        out.data_ptr(), torch.get_num_threads())
    return out.reshape(*codes.shape[:-1], cfg.dim)


def attends_codes(q: Tensor, keys, values) -> bool:
    """Whether `attend_codes` takes this step: one fp32 query of one sequence over a TurboQuant cache's
    codes (models.layers.Coded) on a CPU with AVX-512 VBMI, in a layout the kernel reads, outside autograd."""
    from .models.layers import Coded

    if not (isinstance(keys, Coded) and isinstance(values, Coded) and q.dtype == torch.float32 and q.shape[0] == 1
            and q.shape[2] == 1 and not (torch.is_grad_enabled() and q.requires_grad)
            and reads_cache_codes(keys.codec.cfg) and reads_cache_codes(values.codec.cfg)):
        return False
    (kcodes, kscales), (vcodes, vscales) = keys.parts, values.parts
    return (kcodes.device.type == "cpu" and kcodes.shape[:3] == vcodes.shape[:3] == kscales.shape == vscales.shape
            and kscales.stride() == vscales.stride() and kcodes.stride(-1) == vcodes.stride(-1) == 1
            and kscales.stride(-1) == 1)


def reads_cache_codes(cfg: TQConfig) -> bool:
    """Whether `attend_codes` reads a TurboQuant cache codec's codes here (its layout, this CPU)."""
    return codes_readable() and _kv_layout(cfg) is not None


def _kv_layout(cfg: TQConfig) -> tuple[Tensor, Tensor, Tensor] | None:
    """(a codes layout whose table gives each code itself, the runs' centroids and midpoints [2, 16] float32)
    for a cache codec, or None where the kernel cannot read it (its float lookup takes up to 4 bits)."""
    if cfg.bits > 4 or not takes_layout(cfg):
        return None
    return _identity_layout(cfg.bits, cfg.dim, cfg.codebook)


@tensor_cache(16)
def _identity_layout(bits: float, dim: int, codebook: str) -> tuple[Tensor, Tensor, Tensor] | None:
    runs = _runs(bits, dim)
    codes = [(torch.arange(2 ** b) - 128).to(torch.int8) for *_, b in runs]
    centroids, midpoints = torch.zeros(2, 16), torch.zeros(2, 16)
    for i, (*_, b) in enumerate(runs):
        row = i if len(runs) == 2 else 1  # the kernel's second table is the (only or) lower run's
        c, m = _centroids(b, dim, codebook, torch.device("cpu"))
        centroids[row, : 2 ** b], midpoints[row, : 2 ** b - 1] = c, m
    layout = torch.zeros(_native.codes_layout_size(), dtype=torch.uint8)
    split = runs[0][1] if len(runs) == 2 else 0
    if not _native.codes_layout(layout.data_ptr(), dim, split, runs[0][2], runs[-1][2], codes[0].data_ptr(),
                                codes[-1].data_ptr(), 1.0):
        return None
    return layout, centroids, midpoints


def attend_codes(q: Tensor, keys, values, key_pos: Tensor, key_valid: Tensor | None, position: int,
                 window: int | None, scale: float, softcap: float | None) -> Tensor:
    """`attend_one` over a TurboQuant cache (keys/values: models.layers.Coded), read from the codes: the
    query is rotated into the keys' frame (divided by their channel scales first), the output rotated out of
    the values'; [1, 1, H * D] out."""
    return attend_codes_rows(q, keys, values, key_pos, key_valid, [position], window, scale, softcap)


def attend_codes_rows(q: Tensor, keys, values, key_pos: Tensor, key_valid: Tensor | None, positions: list[int],
                      window: int | None, scale: float, softcap: float | None) -> Tensor:
    """`attend_codes` for one query of each of B sequences (q [B, H, 1, D]; keys/values Coded of B rows;
    key_pos [S] for all rows or [B, S]; key_valid None or [B, S]; a position a row): [B, 1, H * D]. The
    rotations into and out of the frames take all rows at once (as PyTorch ops they cost ~0.1 ms a call,
    several times the kernel's own time); the kernel runs a row at a time."""
    from .kv.codecs import Frame
    from .quant.cpu_kernels import unrotate_fast

    b, h, _, d = q.shape
    (kcodes, kscales), (vcodes, vscales) = keys.parts, values.parts
    _, hkv, s, _ = kcodes.shape
    q_in = Frame(keys.codec.cfg, keys.key_scale).enter(q).reshape(b, h, d).float().contiguous()
    key_layout, key_centroids, _ = _kv_layout(keys.codec.cfg)
    value_layout, value_centroids, _ = _kv_layout(values.codec.cfg)
    key_pos = key_pos.to(torch.int64).reshape(-1, s).contiguous()  # one row for all, or one a row
    valid = None if key_valid is None else key_valid.reshape(b, s).to(torch.bool).contiguous()
    out = torch.empty(b, h, d, dtype=torch.float32)
    threads = torch.get_num_threads()
    for r in range(b):
        _native.attend_codes(q_in[r].data_ptr(), kcodes[r].data_ptr(), vcodes[r].data_ptr(), h, hkv, d, s,
                             kcodes.stride(1), kcodes.stride(2), vcodes.stride(1), vcodes.stride(2),
                             kscales[r].data_ptr(), vscales[r].data_ptr(), kscales.stride(1), key_layout.data_ptr(),
                             value_layout.data_ptr(), key_centroids.data_ptr(), value_centroids.data_ptr(),
                             key_pos[r if key_pos.shape[0] > 1 else 0].data_ptr(),
                             0 if valid is None else valid[r].data_ptr(), positions[r], window or 0,
                             out[r].data_ptr(), threads, float(scale), float(softcap or 0.0))
    return unrotate_fast(out, values.codec.cfg).reshape(b, 1, h * d)


MAX_WIDTH = 4096  # the widest row the kernels' norms and rotations keep on the stack (_native.c MAX_GROUP)


def norms(x: Tensor, weight: Tensor | None) -> bool:
    """Whether `rms_norm` takes x: fp32 rows of up to MAX_WIDTH on the CPU, outside autograd."""
    return (available() and x.dtype == torch.float32 and x.device.type == "cpu" and 0 < x.shape[-1] <= MAX_WIDTH
            and (weight is None or weight.dtype == torch.float32)
            and not (torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))))


def rms_norm(x: Tensor, weight: Tensor | None, offset: float, eps: float, rope: tuple[Tensor, Tensor] | None = None,
             residual: Tensor | None = None) -> Tensor:
    """`RMSNorm` in one pass; with `rope` (cos, sin [B, T, D] for x [B, T, H, D]) followed by `apply_rope`,
    or with `residual` (x's shape) added to it."""
    x = x.contiguous()
    dim = x.shape[-1]
    out = torch.empty_like(x)
    cos = sin = 0
    heads = 1
    if rope is not None:
        c, s = (t.float().contiguous() for t in rope)
        heads = x.shape[-2]
        if c.shape[-1] != dim or c.numel() * heads != x.numel() or s.shape != c.shape:
            raise ValueError(f"RoPE tables {tuple(c.shape)} do not fit {tuple(x.shape)}")
        cos, sin = c.data_ptr(), s.data_ptr()
    res = 0
    if residual is not None:
        residual = residual.float().contiguous()
        if residual.shape != x.shape:
            raise ValueError(f"residual {tuple(residual.shape)} does not fit {tuple(x.shape)}")
        res = residual.data_ptr()
    _native.rms_norm(x.data_ptr(), x.numel() // dim, dim, 0 if weight is None else weight.contiguous().data_ptr(),
                     cos, sin, heads, res, out.data_ptr(), torch.get_num_threads(), float(offset), float(eps))
    return out


TOP_K_MAX = 1024  # the most the compiled search keeps in its heap (the sampler's top_k; the widening top_p search)


def top_k(x: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """torch.topk(x, k) of a float32 CPU vector, compiled, or None where it does not run: fewer than k values
    above -inf (a masked vector) is left to torch.topk."""
    if not (available() and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 1
            and 0 < k <= min(TOP_K_MAX, x.numel())):
        return None
    x = x.contiguous()
    values, ids = torch.empty(k), torch.empty(k, dtype=torch.long)
    if not _native.top_k(x.data_ptr(), x.numel(), k, values.data_ptr(), ids.data_ptr(), torch.get_num_threads()):
        return None
    return values, ids


def sample_rows(logits: Tensor, rows: list[int], opts: list, us: list[Tensor], counts: list) -> list[int] | None:
    """The token of each of these rows of logits [R, V] (float32, CPU) through sampling's chain (penalties on
    counts[i], a Counter or None; top_k, top_p, min_p, temperature; the draw of us[i]), compiled: a token, or
    -1 where the chain is left to the caller (fewer than top_k values above -inf); None where it does not
    run. opts[i]'s top_k must be within 1..TOP_K_MAX, or its temperature 0 (greedy: top_k is not looked at)."""
    if not (available() and logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.dim() == 2):
        return None
    x = logits[rows].contiguous() if rows != list(range(logits.shape[0])) else logits.contiguous()
    options = torch.tensor([[o.top_p, o.min_p, o.temperature, float(u), o.repeat_penalty, o.frequency_penalty,
                             o.presence_penalty] for o, u in zip(opts, us)], dtype=torch.float64)
    ks = torch.tensor([o.top_k if o.temperature > 0 else 1 for o in opts], dtype=torch.long)
    ids = [i for c in counts if c for i in c]
    times = [n for c in counts if c for n in c.values()]
    at = torch.tensor([0] + [len(c) if c else 0 for c in counts], dtype=torch.long).cumsum(0)
    ids, times = torch.tensor(ids or [0], dtype=torch.long), torch.tensor(times or [0], dtype=torch.long)
    out = torch.empty(len(rows), dtype=torch.long)
    _native.sample_rows(x.data_ptr(), len(rows), x.shape[1], x.shape[1], ks.data_ptr(), options.data_ptr(),
                        at.data_ptr(), ids.data_ptr(), times.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out.tolist()


GELU_MAX = 8192  # elements up to which the one-pass loop beats PyTorch's (vectorised, threaded) gelu


def gelu_mul(gate: Tensor, up: Tensor) -> Tensor | None:
    """gelu_tanh(gate) * up in one pass (what `decode_layer` computes too), or None where it does not run:
    float32 CPU tensors of one shape of a few tokens (decode; prefill's are faster in PyTorch), outside
    autograd."""
    if not (available() and gate.dtype == up.dtype == torch.float32 and gate.shape == up.shape
            and gate.numel() <= GELU_MAX
            and gate.device.type == "cpu" and up.device.type == "cpu"
            and not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad))):
        return None
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    _native.gelu_mul(gate.data_ptr(), up.data_ptr(), out.data_ptr(), out.numel())
    return out
