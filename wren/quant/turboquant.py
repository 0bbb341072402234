"""TurboQuant: online vector quantization with near-optimal distortion (Zandieh et al., arXiv 2504.19874).

TQ_mse keeps a vector's norm and quantizes its direction.  A seeded random rotation gives every
coordinate of a unit vector the same known law -- one coordinate of a uniform point on the sphere in
R^d, f(x) ∝ (1-x²)^((d-3)/2), close to N(0, 1/d) -- so one Lloyd–Max codebook for that law, applied
coordinate by coordinate, is near-optimal: E||x - x̃||² ≈ 0.363, 0.117, 0.0345, 0.0095 for a unit x at
b = 1..4 bits (the paper rounds these to 0.36, 0.117, 0.03, 0.009; its bound is √3·π/2·4^-b).
TQ_prod spends b-1 bits on TQ_mse and one bit on a QJL sketch of the residual r = x - x_mse:
sign(S·r) with S a seeded d×d matrix of N(0, 1) entries, plus ||r||.  Inner products become unbiased:
<y, x̃> = <y, x_mse> + ||r||·√(π/2)/d·<S·y, sign(S·r)>.

Choices the paper leaves open:
* Rotation: by default a randomized Hadamard transform, two rounds of (random ±1 diagonal, normalised
  fast Walsh–Hadamard), O(d log d).  One round maps a basis vector to ±1/√d everywhere, a two-point
  law the codebook is not made for; a second round makes such inputs near-Gaussian too.  A dimension
  that is not a power of two is cut into equal blocks of `block` (default: its largest power-of-two
  factor, 640 = 5 × 128, 96 = 3 × 32) so that every coordinate sees the same mixing, and a seeded
  permutation between the rounds mixes the blocks with each other.  rotation="qr" is the exact Haar
  rotation (seeded Gaussian -> QR with the sign fix), kept as the reference.
* Fractional rates (2.5, 3.5 bits): the first k = frac·d rotated coordinates take ⌈b⌉ bits and the
  rest ⌊b⌋, so the rate is exact (2.5 bits at d = 128: 64 coordinates at 3 bits, 64 at 2).  The paper
  splits outlier channels off before rotating and runs two TurboQuant instances; after one shared
  rotation all coordinates are statistically alike, so a fixed split does the same job.  (The paper's
  example for "2.5 bits", 32 of 128 channels at 3 bits and 96 at 2, averages 2.25.)
* Only seeds are stored, never matrices.  Everything works on the last dim of [..., d] tensors, in
  float32, on the input's device.  Norms and the QJL projection go through float64 so that CPU and
  CUDA give the same codes bit for bit with the Hadamard rotation (the QR rotation is a float32
  matmul: close across devices, not bitwise).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import BadOptionError
from . import codebook_table

ROTATIONS = ("hadamard", "qr")
CODEBOOKS = ("beta", "gaussian")
_HADAMARD_ROUNDS = 2
_QJL_SCALE = math.sqrt(math.pi / 2)  # E|<s, r>| = √(2/π)·||r|| for s ~ N(0, I): this undoes it
_STREAM_HADAMARD, _STREAM_QJL, _STREAM_QR = 1, 2, 3


def tensor_cache(maxsize: int | None):
    """functools.lru_cache for functions that build tensors (rotation signs, codebooks): built outside
    inference mode, so that a tensor first asked for under torch.inference_mode() (a decode step) can still
    be saved by autograd later (training through a TurboQuant layer)."""

    def wrap(fn):
        @functools.lru_cache(maxsize=maxsize)
        @functools.wraps(fn)
        def cached(*args):
            with torch.inference_mode(False):
                return fn(*args)

        return cached

    return wrap


@dataclass(frozen=True)
class TQConfig:
    """Quantize dim-vectors at `bits` per coordinate; a fractional rate (2.5) splits the coordinates."""

    bits: float
    dim: int
    seed: int = 0
    rotation: str = "hadamard"  # or "qr"
    codebook: str = "beta"  # or "gaussian" (the large-d limit)
    block: int | None = None  # Hadamard block size; None: the largest power of two dividing dim

    def __post_init__(self):
        if not _is_int(self.dim) or self.dim < 2:
            raise BadOptionError(f"dim must be an integer of at least 2, got {self.dim!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, float)) or not 1 <= self.bits <= 8:
            raise BadOptionError(f"bits must be a number from 1 to 8, got {self.bits!r}")
        if not _is_int(self.seed):
            raise BadOptionError(f"seed must be an integer, got {self.seed!r}")
        _check_choice("rotation", self.rotation, ROTATIONS)
        _check_choice("codebook", self.codebook, CODEBOOKS)
        _runs(self.bits, self.dim)
        if self.rotation == "hadamard":
            _block_size(self.dim, self.block)


@dataclass(frozen=True)
class QuantizedMSE:
    norms: Tensor  # [...] float32, ||x||
    codes: Tensor  # [..., n_bytes] uint8: each run of coordinates bit-packed, runs back to back
    cfg: TQConfig


@dataclass(frozen=True)
class QuantizedProd:
    norms: Tensor  # [...] float32, ||x||
    codes: Tensor  # TQ_mse codes at cfg.bits - 1
    signs: Tensor  # [..., ceil(d/8)] uint8: sign(S·r) one bit each, 1 = non-negative
    residual_norms: Tensor  # [...] float32, ||r||
    cfg: TQConfig


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise BadOptionError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _as_float(x) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise BadOptionError(f"expected a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    return x.float()


def _runs(bits: float, dim: int) -> list[tuple[int, int, int]]:
    """[(start, stop, bits)]: the first frac·dim rotated coordinates at ⌈bits⌉, the others at ⌊bits⌋."""
    low = math.floor(bits)
    high = (bits - low) * dim
    if abs(high - round(high)) > 1e-9:
        raise BadOptionError(
            f"{bits} bits over {dim} coordinates needs {high:g} of them at {low + 1} bits; "
            f"use a multiple of 1/{dim} bits"
        )
    k = round(high)
    return [run for run in ((0, k, low + 1), (k, dim, low)) if run[1] > run[0]]


# --- rotations -------------------------------------------------------------------------------------


def _generator(seed: int, stream: int) -> torch.Generator:
    # One seed feeds independent streams, so the rotation and the QJL matrix are independent.
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + stream) % 2**63)


def _block_size(dim: int, block: int | None) -> int:
    if block is None:
        block = dim & -dim  # the largest power of two dividing dim
    if not _is_int(block) or block < 1 or block & (block - 1) or dim % block:
        raise BadOptionError(f"Hadamard block {block!r} must be a power of two that divides dim {dim}")
    if block < min(dim, 8):
        raise BadOptionError(f"dim {dim} cuts into Hadamard blocks of {block}, too small to mix; use rotation='qr'")
    return block


@tensor_cache(64)
def _hadamard_plan(dim: int, block: int, seed: int, device: torch.device):
    """(±1 signs [rounds, dim], permutation between rounds and its inverse, or None for one block)."""
    g = _generator(seed, _STREAM_HADAMARD)
    signs = (torch.randint(0, 2, (_HADAMARD_ROUNDS, dim), generator=g) * 2 - 1).float()
    perm = torch.randperm(dim, generator=g) if dim > block else None
    if perm is None:
        return signs.to(device), None, None
    return signs.to(device), perm.to(device), torch.argsort(perm).to(device)


def _fwht(x: Tensor, block: int) -> Tensor:
    """Normalised Walsh–Hadamard transform of each run of `block` on the last dim; its own inverse."""
    shape = x.shape
    x = x.reshape(-1, block)
    h = 1
    while h < block:  # butterflies on pairs (i, i + h): log2(block) vectorised passes
        x = x.view(-1, block // (2 * h), 2, h)
        a, b = x[:, :, 0], x[:, :, 1]
        x = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return x.reshape(shape) * (1.0 / math.sqrt(block))


def hadamard_rotate(x: Tensor, seed: int = 0, block: int | None = None) -> Tensor:
    """The seeded randomized Hadamard rotation of the last dim of [..., d], in float32."""
    x = _as_float(x)
    block = _block_size(x.shape[-1], block)
    signs, perm, _ = _hadamard_plan(x.shape[-1], block, seed, x.device)
    for r in range(_HADAMARD_ROUNDS):
        x = _fwht(x * signs[r], block)
        if perm is not None and r + 1 < _HADAMARD_ROUNDS:
            x = x[..., perm]
    return x


def hadamard_unrotate(y: Tensor, seed: int = 0, block: int | None = None) -> Tensor:
    """The inverse (= transpose) of `hadamard_rotate`."""
    y = _as_float(y)
    block = _block_size(y.shape[-1], block)
    signs, perm, inverse = _hadamard_plan(y.shape[-1], block, seed, y.device)
    for r in reversed(range(_HADAMARD_ROUNDS)):
        if perm is not None and r + 1 < _HADAMARD_ROUNDS:
            y = y[..., inverse]
        y = _fwht(y, block) * signs[r]
    return y


@tensor_cache(16)
def _qr_matrix(dim: int, seed: int, device: torch.device) -> Tensor:
    g = torch.randn(dim, dim, generator=_generator(seed, _STREAM_QR), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    # Without the sign fix, QR's sign convention would make Q slightly non-uniform (not Haar).
    return (q * torch.sign(torch.diagonal(r))).float().to(device)


def qr_rotation(dim: int, seed: int = 0) -> Tensor:
    """The reference rotation: a Haar-random orthogonal [dim, dim] float32 matrix Q (rotate: Q·x)."""
    return _qr_matrix(dim, seed, torch.device("cpu")).clone()


def rotate(x: Tensor, seed: int = 0, kind: str = "hadamard", block: int | None = None) -> Tensor:
    """Rotate the last dim of [..., d] with the seeded `kind` rotation ("hadamard" or "qr")."""
    _check_choice("rotation", kind, ROTATIONS)
    if kind == "hadamard":
        return hadamard_rotate(x, seed, block)
    x = _as_float(x)
    return x @ _qr_matrix(x.shape[-1], seed, x.device).T


def unrotate(y: Tensor, seed: int = 0, kind: str = "hadamard", block: int | None = None) -> Tensor:
    """The inverse of `rotate`."""
    _check_choice("rotation", kind, ROTATIONS)
    if kind == "hadamard":
        return hadamard_unrotate(y, seed, block)
    y = _as_float(y)
    return y @ _qr_matrix(y.shape[-1], seed, y.device)


# --- codebooks -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _lloyd_max(bits: int, dim: int | None) -> tuple[tuple[float, ...], float]:
    """Lloyd–Max centroids of z = √d·x (unit variance) and their distortion E(z - q(z))²: stored in
    codebook_table.py where they take long to compute (6-8 bits), else computed."""
    stored = codebook_table.STORED.get((bits, dim))
    return stored if stored is not None else lloyd_max_computed(bits, dim)


def lloyd_max_computed(bits: int, dim: int | None) -> tuple[tuple[float, ...], float]:
    """Lloyd–Max centroids of z = √d·x (unit variance) and their distortion E(z - q(z))².

    dim None is the Gaussian limit N(0, 1); otherwise z has the density ∝ (1 - z²/d)^((d-3)/2) on
    |z| < √d.  The density is taken piecewise constant on a fine grid, and the bucket masses and first
    moments are integrated exactly on it, so centroids are accurate to ~1e-8 at b <= 4.
    """
    if bits == 0:
        return (0.0,), 1.0
    n, levels = 1 << 16, 1 << bits
    half = 12.0 if dim is None else min(12.0, math.sqrt(dim))
    edges = np.linspace(-half, half, n + 1)
    width = edges[1] - edges[0]
    z = (edges[1:] + edges[:-1]) / 2
    log_f = -z * z / 2 if dim is None else (dim - 3) / 2 * np.log1p(-z * z / dim)
    w = np.exp(log_f - log_f.max())
    w /= w.sum()
    mass = np.concatenate(([0.0], np.cumsum(w)))
    moment = np.concatenate(([0.0], np.cumsum(w * z)))

    def below(t):  # (P(z < t), E[z; z < t]) for the piecewise-constant density
        j = np.clip(np.searchsorted(edges, t) - 1, 0, n - 1)
        e, dens = edges[j], w[j] / width
        return mass[j] + dens * (t - e), moment[j] + dens * (t * t - e * e) / 2

    # Start from the high-resolution optimum (centroid density ∝ f^(1/3)); it cuts the iterations.
    cube = np.concatenate(([0.0], np.cumsum(w ** (1 / 3))))
    c = np.interp((np.arange(levels) + 0.5) / levels, cube / cube[-1], edges)
    for _ in range(100_000):
        p, m = below((c[1:] + c[:-1]) / 2)
        p = np.diff(np.concatenate(([0.0], p, [1.0])))
        m = np.diff(np.concatenate(([0.0], m, [moment[-1]])))
        new = m / p
        new = (new - new[::-1]) / 2  # the law is symmetric; keep the codebook exactly so
        step = np.abs(new - c).max()
        c = new
        if step < 1e-9:
            break
    distortion = float((w * z * z).sum() - (p * c * c).sum())
    return tuple(float(v) for v in c), distortion


def _check_bits(bits, low: int = 1) -> int:
    if not _is_int(bits) or not low <= bits <= 8:
        raise BadOptionError(f"bits must be an integer from {low} to 8, got {bits!r}")
    return bits


def codebook(bits: int, dim: int, kind: str = "beta") -> Tensor:
    """The 2**bits sorted centroids for one coordinate of a randomly rotated unit vector in R^dim."""
    _check_bits(bits)
    _check_choice("codebook", kind, CODEBOOKS)
    if not _is_int(dim) or dim < 2:
        raise BadOptionError(f"dim must be an integer of at least 2, got {dim!r}")
    centroids, _ = _lloyd_max(bits, dim if kind == "beta" else None)
    return (torch.tensor(centroids, dtype=torch.float64) / math.sqrt(dim)).float()


def expected_mse(bits: float, dim: int, kind: str = "beta") -> float:
    """E||x - x̃||² of TQ_mse for a unit x and a Haar rotation, from the codebook's own distortion.

    kind="beta" is exact for rotation="qr" in dimension `dim`; kind="gaussian" is the d -> ∞ limit.
    """
    _check_choice("codebook", kind, CODEBOOKS)
    runs = _runs(TQConfig(bits, dim, rotation="qr").bits, dim)  # TQConfig validates bits and dim
    return sum((stop - start) * _lloyd_max(b, dim if kind == "beta" else None)[1] for start, stop, b in runs) / dim


@tensor_cache(128)
def _centroids(bits: int, dim: int, kind: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """(centroids, the midpoints between them) in float32 on `device`, for nearest-centroid search."""
    c = torch.tensor(_lloyd_max(bits, dim if kind == "beta" else None)[0], dtype=torch.float64) / math.sqrt(dim)
    return c.float().to(device), ((c[1:] + c[:-1]) / 2).float().to(device)


# --- bit packing -----------------------------------------------------------------------------------


def packed_size(n: int, bits: int) -> int:
    """Bytes that `pack` makes of n codes: ceil(n·bits/8) (3 bits: 8 codes in 3 bytes)."""
    return -(-n * bits // 8)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes < 2**bits on the last dim into a little-endian bit stream of uint8 bytes."""
    _check_bits(bits, low=0)
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8:
        raise BadOptionError("pack takes a uint8 tensor of codes")
    n = codes.shape[-1]
    if bits == 4 and n % 2 == 0:  # the common case, in one op: the first code of a pair in the low nibble
        return codes[..., 0::2] | codes[..., 1::2] << 4
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).flatten(-2)  # code i holds bits [i·b, (i+1)·b)
    size = packed_size(n, bits)
    stream = torch.nn.functional.pad(stream, (0, 8 * size - n * bits)).unflatten(-1, (size, 8))
    return (stream << torch.arange(8, dtype=torch.uint8, device=codes.device)).sum(-1).to(torch.uint8)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """The n codes that `pack(codes, bits)` packed, as uint8 [..., n]."""
    _check_bits(bits, low=0)
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.shape[-1] != packed_size(n, bits):
        raise BadOptionError(f"unpack needs uint8 [..., {packed_size(n, bits)}] for {n} codes of {bits} bits")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., : n * bits].unflatten(-1, (n, bits))
    return (stream << torch.arange(bits, dtype=torch.uint8, device=packed.device)).sum(-1).to(torch.uint8)


# --- TQ_mse and TQ_prod ----------------------------------------------------------------------------


def _normalise(x: Tensor, cfg: TQConfig) -> tuple[Tensor, Tensor]:
    """(the rotated unit vectors, the norms) of x [..., d]."""
    x = _as_float(x)
    if x.shape[-1] != cfg.dim:
        raise BadOptionError(f"vectors have {x.shape[-1]} coordinates but cfg.dim is {cfg.dim}")
    norms = torch.linalg.vector_norm(x.double(), dim=-1).float()  # float64: the same on every device
    unit = x / torch.where(norms > 0, norms, torch.ones_like(norms)).unsqueeze(-1)  # 0 stays 0
    return rotate(unit, cfg.seed, cfg.rotation, cfg.block), norms


def _encode(unit: Tensor, bits: float, cfg: TQConfig) -> Tensor:
    return encode_with_values(unit, bits, cfg)[0]


def encode_with_values(unit: Tensor, bits: float, cfg: TQConfig) -> tuple[Tensor, Tensor]:
    """(packed codes of rotated unit vectors, the centroids they stand for): the codes and what
    `decode_rotated` would give back, without decoding them again."""
    parts, values = [], []
    for start, stop, b in _runs(bits, cfg.dim):
        centroids, midpoints = _centroids(b, cfg.dim, cfg.codebook, unit.device)
        codes = torch.bucketize(unit[..., start:stop].contiguous(), midpoints)  # the nearest centroid
        parts.append(pack(codes.to(torch.uint8), b))
        values.append(centroids[codes])
    if len(parts) == 1:
        return parts[0], values[0]
    return torch.cat(parts, dim=-1), torch.cat(values, dim=-1)


def _decode(codes: Tensor, bits: float, cfg: TQConfig) -> Tensor:
    """The rotated unit vectors that `_encode` coded."""
    parts, offset = [], 0
    for start, stop, b in _runs(bits, cfg.dim):
        size = packed_size(stop - start, b)
        parts.append(_lookup(codes[..., offset : offset + size], b, stop - start, cfg.dim, cfg.codebook))
        offset += size
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


@tensor_cache(64)
def _word_table(bits: int, per_word: int, dim: int, kind: str, device: torch.device) -> Tensor:
    """[2**(bits·per_word), per_word]: the centroids of the `per_word` codes packed in each possible word."""
    centroids, _ = _centroids(bits, dim, kind, device)
    words = torch.arange(2 ** (bits * per_word), device=device)[:, None]
    shifts = torch.arange(per_word, device=device) * bits
    return centroids[(words >> shifts) & (2**bits - 1)].contiguous()


def _lookup(packed: Tensor, bits: int, n: int, dim: int, kind: str) -> Tensor:
    """The centroids of n packed codes, float32 [..., n]. Whole words index a table of their codes' values
    (a byte for 1, 2, 4 and 8 bits; each 12-bit half of a 3-byte group for 3 bits), about ten times faster
    than unpacking bit by bit, which matters where every cached key and value is read at every step."""
    if bits and 8 % bits == 0:
        table = _word_table(bits, 8 // bits, dim, kind, packed.device)
        return F.embedding(packed.int(), table).flatten(-2)[..., :n]
    if bits == 3 and n % 8 == 0:
        w = packed.unflatten(-1, (n // 8, 3)).int()
        halves = torch.stack((w[..., 0] | (w[..., 1] & 15) << 8, w[..., 1] >> 4 | w[..., 2] << 4), dim=-1)
        return F.embedding(halves, _word_table(3, 4, dim, kind, packed.device)).flatten(-3)
    centroids, _ = _centroids(bits, dim, kind, packed.device)
    return centroids[unpack(packed, bits, n).long()]


def codes_nbytes(cfg: TQConfig) -> int:
    """Bytes of packed TQ_mse codes per vector (a fractional rate packs each run of bits on its own)."""
    return sum(packed_size(stop - start, b) for start, stop, b in _runs(cfg.bits, cfg.dim))


def decode_rotated(codes: Tensor, cfg: TQConfig) -> Tensor:
    """The rotated unit vectors (codebook values) that packed TQ_mse codes stand for: what a quantized
    matmul multiplies a rotated activation by, without ever de-rotating the weight."""
    return _decode(codes, cfg.bits, cfg)


def quantize_mse(x: Tensor, cfg: TQConfig) -> QuantizedMSE:
    """TQ_mse of x [..., d]: the norms and the packed codes of the rotated unit vectors."""
    unit, norms = _normalise(x, cfg)
    return QuantizedMSE(norms, _encode(unit, cfg.bits, cfg), cfg)


def dequantize_mse(q: QuantizedMSE) -> Tensor:
    """The float32 [..., d] reconstruction: rotationᵀ(centroids) × norm."""
    cfg = q.cfg
    return unrotate(_decode(q.codes, cfg.bits, cfg) * q.norms.unsqueeze(-1), cfg.seed, cfg.rotation, cfg.block)


@tensor_cache(16)
def _qjl_matrix(dim: int, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.randn(dim, dim, generator=_generator(seed, _STREAM_QJL), dtype=torch.float64).to(device, dtype)


def quantize_prod(x: Tensor, cfg: TQConfig) -> QuantizedProd:
    """TQ_prod of x [..., d]: TQ_mse at cfg.bits - 1 plus the 1-bit QJL sketch of the residual.

    The sketch is taken in the rotated frame, S·Π·r rather than S·r: for orthogonal Π, S·Π has the
    same law as S (i.i.d. Gaussian), so the estimator is the paper's and one rotation is saved.
    """
    unit, norms = _normalise(x, cfg)
    codes = _encode(unit, cfg.bits - 1, cfg)
    residual = (unit - _decode(codes, cfg.bits - 1, cfg)).double()
    projection = residual @ _qjl_matrix(cfg.dim, cfg.seed, unit.device, torch.float64).T
    signs = pack((projection >= 0).to(torch.uint8), 1)
    residual_norms = norms * torch.linalg.vector_norm(residual, dim=-1).float()
    return QuantizedProd(norms, codes, signs, residual_norms, cfg)


def _prod_rotated(q: QuantizedProd) -> Tensor:
    """Πx̃ = Π·x_mse + ||r||·√(π/2)/d · Sᵀ·sign(S·Π·r), all in the rotated frame."""
    cfg = q.cfg
    mse = _decode(q.codes, cfg.bits - 1, cfg) * q.norms.unsqueeze(-1)
    z = unpack(q.signs, 1, cfg.dim).float() * 2 - 1
    qjl = z @ _qjl_matrix(cfg.dim, cfg.seed, z.device, torch.float32)
    return mse + (q.residual_norms * (_QJL_SCALE / cfg.dim)).unsqueeze(-1) * qjl


def dequantize_prod(q: QuantizedProd) -> Tensor:
    """x̃ [..., d]: a vector estimate with E<y, x̃> = <y, x> for every y (noisy per coordinate)."""
    cfg = q.cfg
    return unrotate(_prod_rotated(q), cfg.seed, cfg.rotation, cfg.block)


def inner_product_prod(y: Tensor, q: QuantizedProd) -> Tensor:
    """The unbiased estimate of <y, x>; y [..., d] broadcasts against q's batch shape."""
    y = _as_float(y)
    if y.shape[-1] != q.cfg.dim:
        raise BadOptionError(f"queries have {y.shape[-1]} coordinates but cfg.dim is {q.cfg.dim}")
    cfg = q.cfg
    return (rotate(y, cfg.seed, cfg.rotation, cfg.block) * _prod_rotated(q)).sum(-1)


__all__ = [
    "TQConfig",
    "QuantizedMSE",
    "QuantizedProd",
    "quantize_mse",
    "dequantize_mse",
    "quantize_prod",
    "dequantize_prod",
    "inner_product_prod",
    "codebook",
    "expected_mse",
    "pack",
    "unpack",
    "packed_size",
    "rotate",
    "unrotate",
    "hadamard_rotate",
    "hadamard_unrotate",
    "qr_rotation",
]
