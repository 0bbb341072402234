"""The CUDA path for TurboQuant weights: Triton kernels that multiply rotated activations by packed codes.

Only the packed codes cross memory (0.5 byte per weight at 4 bits); the weight is never de-rotated, the
activation is rotated once instead (`rotate`: column scales, signs and Hadamard blocks in one kernel).

* `_tq_gemv_row` (`tq_row`): one activation row (decode at batch 1) at 4 bits, up to three matrices a
  launch. The rotation writes x in float32, in the order the kernel reads (code j of every word meets a
  contiguous run of x); each thread keeps one word column of several rows and its own sums, so the loop
  has no layout change, barrier or cross-thread sum. Programs split the input dimension (and add their
  sums atomically) only as far as needed to fill the GPU. The autotuner picks between two lookups: the
  16-value codebook per code (one cache line), or a 256-entry table of value pairs per byte.
* `_tq_gemv`: up to GEMV_ROWS rows (one) at 2, 4 or 8 bits: the same word reads, one lookup per code.
* `_tq_aligned`: more rows (a batch's decode, prefill) at 1, 2, 4 or 8 bits: byte tiles split into
  codes, `tl.dot` per code position.
* `_tq_generic`: any rate (3 bits, fractional rates' two runs): finds every code's bits in the packed
  stream one coordinate at a time. Correct everywhere, slower.

All are checked against the reference in Triton's CPU interpreter (tests/test_tq_kernels.py). Without
Triton (or without a GPU) `available()` is False and the module costs nothing but this import.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

from ..residual import Residual
from ..triton_ops import broken, guarded
from . import cpu_kernels
from .turboquant import _HADAMARD_ROUNDS, TQConfig, _block_size, _centroids, _hadamard_plan, _runs, packed_size

try:  # Triton is optional: CUDA machines have it, the CPU wheels of PyTorch do not
    import triton
    import triton.language as tl

    from .._triton_ops import walsh_hadamard
except ImportError:  # pragma: no cover - depends on the machine
    triton = None


def available() -> bool:
    return triton is not None and torch.cuda.is_available()




@functools.lru_cache(maxsize=64)
def _layout(cfg: TQConfig, device: torch.device):
    """(codebook table, coordinates in the high run, high bits, low bits, first byte of the low run,
    table entries before the low codebook)."""
    runs = _runs(cfg.bits, cfg.dim)
    if len(runs) == 2:
        (_, k_high, hb), (_, _, lb) = runs
    else:
        k_high, (_, _, lb) = 0, runs[0]
        hb = lb
    tables = []
    if k_high:
        tables.append(_centroids(hb, cfg.dim, cfg.codebook, device)[0])
    tables.append(_centroids(lb, cfg.dim, cfg.codebook, device)[0])
    high_levels = (1 << hb) if k_high else 0
    return torch.cat(tables).contiguous(), k_high, hb, lb, packed_size(k_high, hb), high_levels


@functools.lru_cache(maxsize=64)
def _midpoints(cfg: TQConfig, device: torch.device) -> tuple[torch.Tensor, int]:
    """(the midpoints between neighbouring centroids of each run, high run's first; where the low run's
    begin): the nearest-centroid search of a coded cache's encoder."""
    runs = _runs(cfg.bits, cfg.dim)
    mids = [_centroids(b, cfg.dim, cfg.codebook, device)[1] for _, _, b in runs]
    return torch.cat(mids).contiguous(), mids[0].numel() if len(runs) == 2 else 0


_TARGET_PROGRAMS = 2 * 132  # enough programs to keep every SM of an H100 busy twice over

if triton is not None:

    @triton.jit
    def _tq_generic(x_ptr, codes_ptr, scales_ptr, table_ptr, out_ptr, M, N, M_BUCKET, K: tl.constexpr,
                   GROUP: tl.constexpr, NBYTES: tl.constexpr, K_HIGH: tl.constexpr, HB: tl.constexpr,
                   LB: tl.constexpr, LOW_BYTE0: tl.constexpr, HIGH_LEVELS: tl.constexpr,
                   IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        groups = K // GROUP
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            g = rk // GROUP
            kk = rk % GROUP
            high = kk < K_HIGH
            bit = tl.where(high, kk * HB, LOW_BYTE0 * 8 + (kk - K_HIGH) * LB)
            byte = bit >> 3
            ok = (rn[:, None] < N) & (rk[None, :] < K)
            where = codes_ptr + rn[:, None] * (groups * NBYTES) + (g * NBYTES + byte)[None, :]
            b0 = tl.load(where, mask=ok, other=0).to(tl.int32)
            b1 = tl.load(where + 1, mask=ok & ((byte + 1) < NBYTES)[None, :], other=0).to(tl.int32)
            width_mask = tl.where(high, (1 << HB) - 1, (1 << LB) - 1)
            code = ((b0 | (b1 << 8)) >> (bit & 7)[None, :]) & width_mask[None, :]
            value = tl.load(table_ptr + tl.where(high[None, :], code, HIGH_LEVELS + code))
            scale = tl.load(scales_ptr + rn[:, None] * groups + g[None, :], mask=ok, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            w = (value * scale).to(x.dtype)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _tq_aligned(x_ptr, codes_ptr, scales_ptr, table_ptr, out_ptr, M, N, M_BUCKET, K: tl.constexpr,
                    GROUP: tl.constexpr, BITS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, SPLITS: tl.constexpr):
        PER_BYTE: tl.constexpr = 8 // BITS
        ROW_BYTES: tl.constexpr = K * BITS // 8
        GROUPS: tl.constexpr = K // GROUP
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ok_n = rn < N
        ok_m = rm < M
        PER_SPLIT: tl.constexpr = (ROW_BYTES + SPLITS * BLOCK_B - 1) // (SPLITS * BLOCK_B) * BLOCK_B
        # A byte tile inside one group (tiles start at multiples of their size): its rows' scales multiply
        # the tile's product once, instead of every weight before it.
        TILE_SCALE: tl.constexpr = GROUPS > 1 and GROUP % (BLOCK_B * PER_BYTE) == 0
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(0, PER_SPLIT, BLOCK_B):
            rb = pid_k * PER_SPLIT + i + tl.arange(0, BLOCK_B)
            ok_b = rb < ROW_BYTES
            packed = tl.load(codes_ptr + rn[:, None] * ROW_BYTES + rb[None, :],
                             mask=ok_n[:, None] & ok_b[None, :], other=0).to(tl.int32)
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for p in tl.static_range(PER_BYTE):
                k = rb * PER_BYTE + p
                w = tl.load(table_ptr + ((packed >> (p * BITS)) & ((1 << BITS) - 1)))
                if GROUPS > 1 and not TILE_SCALE:
                    w = w * tl.load(scales_ptr + rn[:, None] * GROUPS + (k // GROUP)[None, :],
                                    mask=ok_n[:, None] & ok_b[None, :], other=0.0).to(tl.float32)
                x = tl.load(x_ptr + rm[:, None] * K + k[None, :], mask=ok_m[:, None] & ok_b[None, :], other=0.0)
                if BLOCK_M == 1:
                    part += tl.sum(w * x.to(tl.float32), axis=1)[None, :]
                elif IEEE:
                    part += tl.dot(x, tl.trans(w), input_precision="ieee")
                else:
                    part += tl.dot(x, tl.trans(w.to(x.dtype)))
            if TILE_SCALE:
                group = (pid_k * PER_SPLIT + i) * PER_BYTE // GROUP
                part = part * tl.load(scales_ptr + rn * GROUPS + group, mask=ok_n & (group < GROUPS),
                                      other=0.0).to(tl.float32)[None, :]
            acc += part
        if GROUPS == 1:
            acc = acc * tl.load(scales_ptr + rn, mask=ok_n, other=0.0).to(tl.float32)[None, :]
        tl.atomic_add(out_ptr + rm[:, None] * N + rn[None, :], acc, mask=ok_m[:, None] & ok_n[None, :])

    @triton.jit
    def _word_tile(words_ptr, scales_ptr, rn, rw, ok, ROW_WORDS: tl.constexpr, GROUP_WORDS: tl.constexpr,
                   GROUPS: tl.constexpr):
        """Rows rn, words rw of a matrix's packed codes as 32-bit words (each thread reads whole 16-byte
        runs of a row), and the group scale of each word (a word never straddles two groups)."""
        words = tl.load(words_ptr + rn[:, None] * ROW_WORDS + rw[None, :], mask=ok, other=0)
        scale = tl.load(scales_ptr + rn[:, None] * GROUPS + (rw // GROUP_WORDS)[None, :], mask=ok, other=0.0)
        return words, scale.to(tl.float32)

    @triton.jit
    def _tq_gemv(x_ptr, words_ptr, scales_ptr, table_ptr, out_ptr, M, N, K: tl.constexpr, GROUP: tl.constexpr,
                 BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                 SPLITS: tl.constexpr):
        """out[m, n] += sum_k x[m, k] * table[code[n, k]] * scale[n, k // GROUP] for a few rows m, over the
        words of this program's share of the input (split K; partial sums added atomically)."""
        PER_WORD: tl.constexpr = 32 // BITS
        ROW_WORDS: tl.constexpr = K // PER_WORD
        GROUP_WORDS: tl.constexpr = GROUP // PER_WORD
        GROUPS: tl.constexpr = K // GROUP
        PER_SPLIT: tl.constexpr = (ROW_WORDS + SPLITS * BLOCK_W - 1) // (SPLITS * BLOCK_W) * BLOCK_W
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        ok_n = rn < N
        ok_m = rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(0, PER_SPLIT, BLOCK_W):
            rw = pid_k * PER_SPLIT + i + tl.arange(0, BLOCK_W)
            ok_w = rw < ROW_WORDS
            ok = ok_n[:, None] & ok_w[None, :]
            words, scale = _word_tile(words_ptr, scales_ptr, rn, rw, ok, ROW_WORDS, GROUP_WORDS, GROUPS)
            part = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_W), dtype=tl.float32)
            for j in tl.static_range(PER_WORD):
                w = tl.load(table_ptr + ((words >> (j * BITS)) & ((1 << BITS) - 1)))  # the codebook, in L1
                x = tl.load(x_ptr + rm[:, None] * K + (rw * PER_WORD + j)[None, :],
                            mask=ok_m[:, None] & ok_w[None, :], other=0.0).to(tl.float32)
                part += w[None, :, :] * x[:, None, :]
            acc += tl.sum(part * scale[None, :, :], axis=2)
        ok_out = ok_m[:, None] & ok_n[None, :]
        where = out_ptr + rm[:, None] * N + rn[None, :]
        if SPLITS == 1:
            tl.store(where, acc, mask=ok_out)
        else:
            tl.atomic_add(where, acc, mask=ok_out)

    @triton.jit
    def _x_run(x_ptr, j, rw, ROW_WORDS: tl.constexpr, EVEN: tl.constexpr):
        """The x of code j of words rw (nibble-major x: one contiguous run a code position); 0 past the row."""
        if EVEN:
            return tl.load(x_ptr + j * ROW_WORDS + rw)
        return tl.load(x_ptr + j * ROW_WORDS + rw, mask=rw < ROW_WORDS, other=0.0)

    @triton.jit
    def _tq_gemv_row(x_ptr, w0_ptr, s0_ptr, w1_ptr, s1_ptr, w2_ptr, s2_ptr, table_ptr, pairs_ptr, out_ptr,
                     N0, N1, N2, K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_W: tl.constexpr, PAIRS: tl.constexpr, SPLITS: tl.constexpr):
        """One activation row times up to three 4-bit matrices that read it (q/k/v, gate/up): the row blocks
        of each in turn, their outputs side by side in one row.

        x is float32 and nibble-major (x[j * K/8 + w] is coordinate 8w + j: `rotate(nibble_major=True)`), so
        that code j of every word of a tile meets a contiguous run of x. The tile is flat: each thread takes
        one word column of several rows (one x load serves them all) and keeps its own sums until the end,
        so the loop has no layout change, no barrier and no cross-thread sum. A code is looked up in the
        16-value codebook (64 bytes: one cache line per warp-wide lookup), or with PAIRS, a byte of two
        codes in the 256-entry pair table (half the lookups, but a warp's lookups spread over up to 16
        lines); the autotuner measures both."""
        ROW_WORDS: tl.constexpr = K // 8
        GROUP_WORDS: tl.constexpr = GROUP // 8
        GROUPS: tl.constexpr = K // GROUP
        PER_SPLIT: tl.constexpr = (ROW_WORDS + SPLITS * BLOCK_W - 1) // (SPLITS * BLOCK_W) * BLOCK_W
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        nb0 = tl.cdiv(N0, BLOCK_N)
        nb1 = tl.cdiv(N1, BLOCK_N)
        in1 = pid_n >= nb0
        in2 = pid_n >= nb0 + nb1
        words_ptr = tl.where(in2, w2_ptr, tl.where(in1, w1_ptr, w0_ptr))
        scales_ptr = tl.where(in2, s2_ptr, tl.where(in1, s1_ptr, s0_ptr))
        n = tl.where(in2, N2, tl.where(in1, N1, N0))
        block = tl.where(in2, pid_n - nb0 - nb1, tl.where(in1, pid_n - nb0, pid_n))
        column = tl.where(in2, N0 + N1, tl.where(in1, N0, 0))
        EVEN: tl.constexpr = PER_SPLIT * SPLITS == ROW_WORDS  # no split runs past the row: no masks
        e = tl.arange(0, BLOCK_N * BLOCK_W)
        rn = tl.minimum(block * BLOCK_N + e // BLOCK_W, n - 1)  # rows past the end: read the last, never stored
        acc = tl.zeros((BLOCK_N * BLOCK_W,), dtype=tl.float32)
        for i in range(0, PER_SPLIT, BLOCK_W):
            rw = pid_k * PER_SPLIT + i + e % BLOCK_W
            if EVEN:
                words = tl.load(words_ptr + rn * ROW_WORDS + rw)
                scale = tl.load(scales_ptr + rn * GROUPS + rw // GROUP_WORDS).to(tl.float32)
            else:
                ok = rw < ROW_WORDS
                words = tl.load(words_ptr + rn * ROW_WORDS + rw, mask=ok, other=0)
                scale = tl.load(scales_ptr + rn * GROUPS + rw // GROUP_WORDS, mask=ok, other=0.0).to(tl.float32)
            part = tl.zeros((BLOCK_N * BLOCK_W,), dtype=tl.float32)
            if PAIRS:
                for b in tl.static_range(4):
                    pair = tl.load(pairs_ptr + ((words >> (8 * b)) & 255))
                    low = (pair & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)  # code 2b's value
                    high = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)  # code 2b + 1's
                    part = tl.fma(low, _x_run(x_ptr, 2 * b, rw, ROW_WORDS, EVEN), part)
                    part = tl.fma(high, _x_run(x_ptr, 2 * b + 1, rw, ROW_WORDS, EVEN), part)
            else:
                for j in tl.static_range(8):
                    value = tl.load(table_ptr + ((words >> (4 * j)) & 15))
                    part = tl.fma(value, _x_run(x_ptr, j, rw, ROW_WORDS, EVEN), part)
            acc = tl.fma(part, scale, acc)
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        y = tl.sum(tl.reshape(acc, (BLOCK_N, BLOCK_W)), axis=1)
        if SPLITS == 1:  # (then the output may be the activation's dtype: no zeroing, no cast after)
            tl.store(out_ptr + column + rows, y.to(out_ptr.dtype.element_ty), mask=rows < n)
        else:
            tl.atomic_add(out_ptr + column + rows, y, mask=rows < n)

    # The last two give small matrices (E2B's per-layer gate: 256 rows) a program for every SM without
    # splitting the input, so they too need no zeroing kernel and no cast.
    _ROW_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_W": w, "PAIRS": p}, num_warps=nw)
                    for p in (0, 1)
                    for n, w, nw in ((16, 32, 4), (32, 32, 4), (8, 64, 4), (16, 64, 4), (64, 32, 8), (4, 64, 4),
                                     (1, 64, 2))]
    _tq_gemv_row_split = triton.heuristics({"SPLITS": lambda a: _row_splits(a)})(_tq_gemv_row)
    _tq_gemv_row_tuned = triton.autotune(
        configs=_ROW_CONFIGS, key=["N0", "N1", "N2", "K"], reset_to_zero=["out_ptr"],
        prune_configs_by={"early_config_prune": lambda configs, named, **constants: _unsplit_if_full(
            configs, {**named, **constants})},
    )(_tq_gemv_row_split)

    _GEMV_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_W": w}, num_warps=nw)
                     for n, w, nw in ((16, 64, 4), (32, 32, 4), (64, 16, 4), (32, 64, 8), (64, 32, 8), (8, 128, 4),
                                      (128, 16, 8))]
    # Split the input only as far as needed for ~_TARGET_PROGRAMS programs (fewer atomics); never for a
    # row block count that fills the GPU already.
    _tq_gemv_split = triton.heuristics({"SPLITS": lambda a: max(1, min(
        triton.cdiv(a["K"] * a["BITS"] // 32, a["BLOCK_W"]), _TARGET_PROGRAMS // triton.cdiv(a["N"], a["BLOCK_N"])))})(
        _tq_gemv)
    _tq_gemv_tuned = triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "BLOCK_M"],
                                     reset_to_zero=["out_ptr"])(_tq_gemv_split)

    @triton.jit
    def _sum_of_squares(src_ptr, K: tl.constexpr, CHUNK: tl.constexpr):
        """Sum of the squares of a row of K values, read CHUNK at a time (a wide row would not fit registers)."""
        acc = tl.zeros((CHUNK,), dtype=tl.float32)
        for k0 in range(0, K, CHUNK):
            kk = k0 + tl.arange(0, CHUNK)
            v = tl.load(src_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            acc += v * v
        return tl.sum(acc, axis=0)

    @triton.jit
    def _new_residual(h_ptr, res_ptr, post_w_ptr, scale_ptr, at, ok, r_post, post_offset, POST_W: tl.constexpr,
                      PRE_SCALE: tl.constexpr):
        """residual + post_norm(h) (times the scale) at `at`, rounded where rms_norm_kernel rounds."""
        y = tl.load(h_ptr + at, mask=ok, other=0.0).to(tl.float32) * r_post
        if POST_W:
            y = y * (tl.load(post_w_ptr + at, mask=ok, other=0.0).to(tl.float32) + post_offset)
        y = y.to(h_ptr.dtype.element_ty).to(tl.float32) + tl.load(res_ptr + at, mask=ok, other=0.0).to(tl.float32)
        if PRE_SCALE:
            y = y.to(h_ptr.dtype.element_ty).to(tl.float32) * tl.load(scale_ptr).to(tl.float32)
        return y.to(h_ptr.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _residual_prologue(h_ptr, res_ptr, post_w_ptr, scale_ptr, value_ptr, flat, ok, post_eps, post_offset,
                           K: tl.constexpr, POST_W: tl.constexpr, PRE_SCALE: tl.constexpr, CHUNK: tl.constexpr):
        """The new residual stream (one row) at this tile's `flat` positions and the sum of its squares; the
        first program also stores the whole row (`value_ptr`) for the layer to carry on with."""
        r_post = 1.0 / tl.sqrt(_sum_of_squares(h_ptr, K, CHUNK) / K + post_eps)
        first = tl.program_id(0) == 0
        acc = tl.zeros((CHUNK,), dtype=tl.float32)
        for k0 in range(0, K, CHUNK):
            kk = k0 + tl.arange(0, CHUNK)
            v = _new_residual(h_ptr, res_ptr, post_w_ptr, scale_ptr, kk, kk < K, r_post, post_offset, POST_W,
                              PRE_SCALE)
            acc += v * v
            tl.store(value_ptr + kk, v.to(value_ptr.dtype.element_ty), mask=(kk < K) & first)
        x = _new_residual(h_ptr, res_ptr, post_w_ptr, scale_ptr, flat, ok, r_post, post_offset, POST_W, PRE_SCALE)
        return x, tl.sum(acc, axis=0)

    @triton.jit
    def _hadamard_round(src_ptr, col_ptr, signs_ptr, perm_ptr, unit, dst_ptr, norm_w_ptr, up_ptr, res_ptr,
                        post_w_ptr, scale_ptr, value_ptr, ROWS, eps, offset, post_eps, post_offset, K: tl.constexpr,
                        DIM: tl.constexpr, BLOCK: tl.constexpr, ROUND: tl.constexpr, HAS_COL: tl.constexpr,
                        HAS_PERM: tl.constexpr, BOTH: tl.constexpr, TILE: tl.constexpr, NIBBLE_MAJOR: tl.constexpr,
                        NORM: tl.constexpr, NORM_W: tl.constexpr, GELU: tl.constexpr, PRE: tl.constexpr,
                        POST_W: tl.constexpr, PRE_SCALE: tl.constexpr, CHUNK: tl.constexpr):
        """A round of the rotation on TILE runs of BLOCK values (a run: one Hadamard block of one group):
        read (through the permutation between rounds, if any; times the column scales before the first),
        times the round's signs, the Walsh-Hadamard transform times `unit` (1/sqrt(BLOCK)). With BOTH (a
        group that is one block: no permutation), the second round follows in registers. NIBBLE_MAJOR
        stores coordinate 8w + j of a row at j * K/8 + w (the order _tq_gemv_row reads).

        Before the rotation, on one row: PRE takes x = residual + post_norm(src) (times the scale with
        PRE_SCALE; the post norm's weight with POST_W), the residual add that ends a sublayer, and stores
        it (`value_ptr`); NORM then takes x's RMSNorm (times its weight plus offset with NORM_W), rounded to
        x's dtype as the norm's own kernel would. Every program reads the whole row for the sums of squares.
        GELU takes gelu_tanh(x) * up (the MLP's middle, as gelu_mul_kernel computes it) instead of x."""
        NB: tl.constexpr = DIM // BLOCK
        r = tl.program_id(0) * TILE + tl.arange(0, TILE)
        c = tl.arange(0, BLOCK)
        ok = (r < ROWS)[:, None]
        at = (r % NB)[:, None] * BLOCK + c[None, :]  # position within the group
        flat = r[:, None] * BLOCK + c[None, :]
        if PRE:
            x, squares = _residual_prologue(src_ptr, res_ptr, post_w_ptr, scale_ptr, value_ptr, flat, ok, post_eps,
                                            post_offset, K, POST_W, PRE_SCALE, CHUNK)
        elif HAS_PERM:
            x = tl.load(src_ptr + (r // NB)[:, None] * DIM + tl.load(perm_ptr + at), mask=ok, other=0.0)
            x = x.to(tl.float32)
        else:
            x = tl.load(src_ptr + flat, mask=ok, other=0.0).to(tl.float32)
        if NORM:
            if not PRE:
                squares = _sum_of_squares(src_ptr, K, CHUNK)
            x = x / tl.sqrt(squares / K + eps)
            if NORM_W:
                x = x * (tl.load(norm_w_ptr + flat % K).to(tl.float32) + offset)
            x = x.to(src_ptr.dtype.element_ty).to(tl.float32)
        if GELU:
            inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2/pi) (x + 0.044715 x^3)
            up = tl.load(up_ptr + flat, mask=ok, other=0.0).to(tl.float32)
            x = (0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)) * up).to(src_ptr.dtype.element_ty)
            x = x.to(tl.float32)
        if HAS_COL:
            x = x * tl.load(col_ptr + flat % K)
        x = x * tl.load(signs_ptr + ROUND * DIM + at)
        y = walsh_hadamard(x, TILE, BLOCK) * unit
        if BOTH:
            y = walsh_hadamard(y * tl.load(signs_ptr + (ROUND + 1) * DIM + at), TILE, BLOCK) * unit
        if NIBBLE_MAJOR:
            k = flat % K
            flat = flat - k + (k % 8) * (K // 8) + k // 8
        tl.store(dst_ptr + flat, y.to(dst_ptr.dtype.element_ty), mask=ok)

    _ALIGNED_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_B": b}, num_warps=w)
                        for n, b, w in ((64, 64, 4), (128, 32, 4), (32, 128, 4), (16, 128, 2), (128, 64, 8))]
    # Split the input dimension only as far as needed for ~_TARGET_PROGRAMS programs: fewer atomics.
    _tq_aligned_split = triton.heuristics({"SPLITS": lambda a: max(1, min(
        triton.cdiv(a["K"] * a["BITS"] // 8, a["BLOCK_B"]), _TARGET_PROGRAMS // triton.cdiv(a["N"], a["BLOCK_N"])))})(
        _tq_aligned)
    _tq_aligned_tuned = triton.autotune(configs=_ALIGNED_CONFIGS, key=["N", "K", "M_BUCKET"],
                                        reset_to_zero=["out_ptr"])(_tq_aligned_split)

    _CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
                for n, k, w in ((64, 128, 4), (128, 128, 4), (32, 256, 4), (128, 64, 8))]
    _tq_generic_tuned = triton.autotune(configs=_CONFIGS, key=["N", "K", "M_BUCKET"])(_tq_generic)


def _aligned(cfg: TQConfig) -> bool:
    return cfg.bits in (1, 2, 4, 8) and (cfg.dim * int(cfg.bits)) % 8 == 0


def rotates(cfg: TQConfig) -> bool:
    """Whether `rotate` takes this rotation: Hadamard blocks of 16 to 128 (one tl.dot tile)."""
    if cfg.rotation != "hadamard":
        return False
    block = _block_size(cfg.dim, cfg.block)
    return 16 <= block <= 128


def rotate(x: torch.Tensor, cfg: TQConfig, column: torch.Tensor | None = None, nibble_major: bool = False,
           norm=None, gelu_up: torch.Tensor | None = None, residual: Residual | None = None) -> torch.Tensor:
    """`cpu_kernels.rotate_fast` of x [M, K] by groups of cfg.dim, x first times `column` [K] (float32), in
    one kernel (two where a group spans several Hadamard blocks); x's dtype out, or with `nibble_major`
    float32 in the order _tq_gemv_row reads (see `nibble_major()`; K a multiple of 8). Inside the same
    kernel, on one row: with `residual` (a Residual whose h is x) the rotation is of its value, which the
    kernel also computes and sets; with `norm` (an RMSNorm) of norm(x) (or of the residual's value); with
    `gelu_up` (x's shape and dtype) of gelu_tanh(x) * gelu_up."""
    x = x.contiguous()
    up = gelu_up.contiguous() if gelu_up is not None else x
    assert up.shape == x.shape and up.dtype == x.dtype and (gelu_up is None or (norm is None and residual is None))
    rows, k = x.shape
    block = _block_size(cfg.dim, cfg.block)
    signs, perm, _ = _hadamard_plan(cfg.dim, block, cfg.seed, x.device)
    unit = block ** -0.5
    runs = rows * k // block
    tile = 16
    grid = (triton.cdiv(runs, tile),)
    assert _HADAMARD_ROUNDS == 2 and (k % 8 == 0 or not nibble_major) and (norm is None or rows == 1)
    col = column if column is not None else x  # (unused pointers where there is none)
    norm_w = norm.weight if norm is not None and norm.weight is not None else x
    out = torch.empty(x.shape, dtype=torch.float32 if nibble_major else x.dtype, device=x.device)
    shape = dict(K=k, DIM=cfg.dim, BLOCK=block, TILE=tile, CHUNK=1024)
    first = dict(HAS_COL=column is not None, NORM=norm is not None, NORM_W=norm is not None and norm.weight is not None,
                 GELU=gelu_up is not None, **_prologue(residual, x))
    norms = (float(norm.eps), float(norm.offset)) if norm is not None else (0.0, 0.0)
    post = residual.norm if residual is not None else None
    norms += (float(post.eps), float(post.offset)) if post is not None else (0.0, 0.0)
    pre = _prologue_tensors(residual, x)
    if perm is None:
        _hadamard_round[grid](x, col, signs, signs, unit, out, norm_w, up, *pre, runs, *norms, **shape, ROUND=0,
                              **first, HAS_PERM=False, BOTH=True, NIBBLE_MAJOR=nibble_major)
    else:  # a permutation across the group's blocks between the rounds: a round trip through float32 memory
        mid = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        _hadamard_round[grid](x, col, signs, perm, unit, mid, norm_w, up, *pre, runs, *norms, **shape, ROUND=0,
                              **first, HAS_PERM=False, BOTH=False, NIBBLE_MAJOR=False)
        _hadamard_round[grid](mid, col, signs, perm, unit, out, norm_w, up, *pre, runs, *norms, **shape, ROUND=1,
                              HAS_COL=False, NORM=False, NORM_W=False, GELU=False, PRE=False, POST_W=False,
                              PRE_SCALE=False, HAS_PERM=True, BOTH=False, NIBBLE_MAJOR=nibble_major)
    if residual is not None:
        residual.computed = pre[-1].reshape(residual.h.shape)
    return out


def _prologue(residual: Residual | None, x: torch.Tensor) -> dict:
    """The residual prologue's constants for _hadamard_round."""
    if residual is None:
        return dict(PRE=False, POST_W=False, PRE_SCALE=False)
    assert x.shape[0] == 1 and residual.h.numel() == x.numel() and residual.fusable()
    return dict(PRE=True, POST_W=residual.norm.weight is not None, PRE_SCALE=residual.scale is not None)


def _prologue_tensors(residual: Residual | None, x: torch.Tensor) -> tuple:
    """(residual, post norm weight, scale, value out) for _hadamard_round; x itself where unused."""
    if residual is None:
        return x, x, x, x
    post_w = residual.norm.weight
    return (residual.residual.reshape(x.shape).contiguous(), post_w if post_w is not None else x,
            residual.scale if residual.scale is not None else x, torch.empty_like(x))


# Up to this many activation rows take _tq_gemv; more take _tq_aligned's tl.dot. Counted in SASS for the
# 31B shapes (bench/gpu_compile.py), _tq_gemv costs ~16, ~21 and ~31 instructions per weight code for 2, 4
# and 8 rows (and 36-52 barriers a trip), _tq_aligned ~8-9 for any number up to 16 with its tiles inside a
# group (5-7 barriers): from two rows on, the tensor cores' dot. (Not timed on a GPU yet:
# bench/tq_kernels.py --batch 2 8 would say.)
GEMV_ROWS = 1


def _word_aligned(cfg: TQConfig, k: int) -> bool:
    """Codes that _tq_gemv reads as 32-bit words: 2, 4 or 8 bits, groups (and rows) of whole words."""
    return cfg.bits in (2, 4, 8) and (cfg.dim * int(cfg.bits)) % 32 == 0 and (k * int(cfg.bits)) % 32 == 0


@functools.lru_cache(maxsize=64)
def _pairs(cfg: TQConfig, device: torch.device) -> torch.Tensor:
    """The 4-bit codebook as 256 value pairs, one per byte of codes: the float32 bits of the low nibble's
    value in the low half of an int64, the high nibble's in the high half."""
    bits = _layout(cfg, device)[0].view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    byte = torch.arange(256, device=device)
    return (bits[byte & 15] | (bits[byte >> 4] << 32)).contiguous()


def _row_blocks(a: dict) -> int:
    return sum(triton.cdiv(a[n], a["BLOCK_N"]) for n in ("N0", "N1", "N2"))


def _row_splits(a: dict) -> int:
    """Programs along the input for _tq_gemv_row: only as many as it takes to reach ~_TARGET_PROGRAMS."""
    return max(1, min(triton.cdiv(a["K"] // 8, a["BLOCK_W"]), _TARGET_PROGRAMS // _row_blocks(a)))


_ONE_WAVE = 132  # programs that give every SM of an H100/H200 one


def _unsplit_if_full(configs: list, shape: dict) -> list:
    """The configs that leave the input whole where one of them has a program for every SM: their output
    needs no zeroing kernel before, nor cast after (two launches of a few microseconds, which cost a
    small matrix more than the lower occupancy); all of them otherwise."""
    whole = [c for c in configs if _row_splits({**shape, **c.kwargs}) == 1
             and _row_blocks({**shape, **c.kwargs}) >= _ONE_WAVE]
    return whole or configs


# the interpreter cannot autotune: one config (the tests set PAIRS to check both lookups)
INTERPRETER_ROW = {"BLOCK_N": 16, "BLOCK_W": 8, "PAIRS": 0}


def takes_row(x: torch.Tensor, cfg: TQConfig, matrices: int) -> bool:
    """Whether x times `matrices` matrices of cfg takes `tq_row`: one activation row (decode at batch 1),
    4 bits in whole words, a rotation `rotate` takes, up to three matrices."""
    k = x.shape[-1]
    return x.numel() == k and _row_gemv_takes(cfg, k) and 1 <= matrices <= 3 and rotates(cfg)


def _row_gemv_takes(cfg: TQConfig, k: int) -> bool:
    return cfg.bits == 4 and _word_aligned(cfg, k) and "_tq_gemv_row" not in broken


def row_rotation(cfg: TQConfig, column: torch.Tensor | None, k: int, head_dim: int, device: torch.device):
    """(signs, Hadamard block, column scales or None) for a kernel that rotates the one-row input of a
    [., k] matrix of cfg itself, a head's output of head_dim at a time (triton_ops.attend_one), for
    `tq_rotated_row`: where the row GEMV takes the matrix and each group is one Hadamard block of whole
    groups a head; else None."""
    block = _block_size(cfg.dim, cfg.block)
    if not (_row_gemv_takes(cfg, k) and rotates(cfg) and cfg.dim == block and head_dim % block == 0):
        return None
    signs, perm, _ = _hadamard_plan(cfg.dim, block, cfg.seed, device)
    return (signs, block, column) if perm is None else None


def nibble_major(x_rotated: torch.Tensor) -> torch.Tensor:
    """A rotated row [1, K] as _tq_gemv_row reads it: float32, coordinate 8w + j at j * K/8 + w."""
    k = x_rotated.shape[-1]
    return x_rotated.reshape(k // 8, 8).t().float().contiguous().reshape(1, k)


def _gemv_row(xn: torch.Tensor, weights: list, cfg: TQConfig, dtype: torch.dtype, interpret: bool,
              config: dict | None = None) -> torch.Tensor:
    """The nibble-major row xn times up to three 4-bit matrices ((words, scales) each) in one launch:
    [1, sum of outs], in `dtype` where no config splits the input (the large matrices: each program stores
    its own rows), else float32 sums added atomically into zeros. `config` (BLOCK_N, BLOCK_W, PAIRS and
    num_warps) skips the autotuner: the interpreter's, or bench/tq_kernels.py timing each lookup."""
    config = INTERPRETER_ROW if interpret else config
    ns = [w.shape[0] for w, _ in weights] + [0] * (3 - len(weights))
    padded = weights + [weights[0]] * (3 - len(weights))  # (pointers the kernel never reads)
    shape = {"K": xn.shape[1], "N0": ns[0], "N1": ns[1], "N2": ns[2]}
    configs = [config] if config else [c.kwargs for c in _unsplit_if_full(_ROW_CONFIGS, shape)]
    if all(_row_splits({**shape, **c}) == 1 for c in configs):
        out = torch.empty(1, sum(ns), device=xn.device, dtype=dtype)
    else:
        out = torch.zeros(1, sum(ns), device=xn.device, dtype=torch.float32)
    grid = lambda meta: (_row_blocks({**meta, **shape}), meta["SPLITS"])  # noqa: E731
    tables = (_layout(cfg, xn.device)[0], _pairs(cfg, xn.device))
    args = (xn, *[t for pair in padded for t in pair], *tables, out, *ns)
    if config:
        _tq_gemv_row_split[grid](*args, K=xn.shape[1], GROUP=cfg.dim, **config)
    else:
        _tq_gemv_row_tuned[grid](*args, K=xn.shape[1], GROUP=cfg.dim)
    return out


def row_configs() -> list[dict]:
    """The row GEMV's autotune configs, as `_gemv_row(config=)` takes them."""
    return [{**c.kwargs, "num_warps": c.num_warps} for c in _ROW_CONFIGS]


def _split_outputs(out: torch.Tensor, weights: list, like: torch.Tensor) -> list[torch.Tensor]:
    splits = out.to(like.dtype).split([c.shape[0] for c, _ in weights], dim=-1)
    return [y.reshape(*like.shape[:-1], y.shape[-1]) for y in splits]


def tq_row(x: torch.Tensor | Residual, weights: list, cfg: TQConfig, column: torch.Tensor | None = None,
           norm=None, gelu_up: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One row x (not rotated; a Residual's value, computed on the way; first normed by `norm`, an RMSNorm,
    or taken as gelu_tanh(x) * gelu_up, and times `column`, where given) times up to three 4-bit matrices
    ((codes, scales) each; `takes_row`): two launches, the rotation (with the residual add, norm or gelu)
    writing x as the GEMV reads it, and the GEMV."""
    residual = x if isinstance(x, Residual) else None
    x = x.h if residual is not None else x
    k = x.shape[-1]
    x2 = x.reshape(1, k)
    up2 = gelu_up.reshape(1, k) if gelu_up is not None else None

    def by_ops():
        first = x2 if residual is None else residual.value().reshape(1, k)
        first = first if norm is None else norm.by_ops(first)
        first = first if up2 is None else (F.gelu(x2.float(), approximate="tanh") * up2.float()).to(x2.dtype)
        return nibble_major(_rotate_by_ops(first, cfg, column))

    xn = guarded("_hadamard_round", lambda: rotate(x2, cfg, column, nibble_major=True, norm=norm, gelu_up=up2,
                                                   residual=residual), by_ops)
    return tq_rotated_row(xn, weights, cfg, x)


def tq_rotated_row(xn: torch.Tensor, weights: list, cfg: TQConfig, like: torch.Tensor) -> list[torch.Tensor]:
    """The row GEMV on a row already rotated into its order (xn [1, K] float32, `nibble_major`) times up to
    three 4-bit matrices ((codes, scales) each): one launch; the outputs in `like`'s dtype and leading shape."""
    k = xn.shape[-1]
    words = [(_words(c), s.contiguous()) for c, s in weights]
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    out = guarded("_tq_gemv_row", lambda: _gemv_row(xn, words, cfg, like.dtype, interpret), lambda: None)
    if out is None:  # the row kernel failed here: the general GEMV, on x in its usual order
        x_rotated = xn.reshape(8, k // 8).t().reshape(*like.shape[:-1], k).to(like.dtype)
        return [tq_linear(x_rotated, codes, scales, cfg) for codes, scales in weights]
    return _split_outputs(out, weights, like)


def _rotate_by_ops(x2: torch.Tensor, cfg: TQConfig, column: torch.Tensor | None) -> torch.Tensor:
    xs = x2.float() if column is None else x2.float() * column
    return cpu_kernels.rotate_fast(xs.reshape(x2.shape[0], -1, cfg.dim), cfg).reshape(x2.shape)


def tq_linears(x_rotated: torch.Tensor, weights: list, cfg: TQConfig) -> list[torch.Tensor]:
    """[tq_linear(x_rotated, codes, scales, cfg) for (codes, scales) in weights]: for one row at 4 bits,
    up to three matrices in one launch (after a reorder of x; `tq_row` rotates straight into that order)."""
    k = x_rotated.shape[-1]
    if not (x_rotated.numel() == k and _row_gemv_takes(cfg, k) and len(weights) <= 3):
        return [tq_linear(x_rotated, codes, scales, cfg) for codes, scales in weights]
    return tq_rotated_row(nibble_major(x_rotated), weights, cfg, x_rotated)


def _words(codes: torch.Tensor) -> torch.Tensor:
    """Codes [out, groups, bytes] as 32-bit words a row (little-endian: code j of a word at bits j*BITS)."""
    return codes.contiguous().reshape(codes.shape[0], -1).view(torch.int32)


def _gemv(x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, cfg: TQConfig, interpret: bool) -> torch.Tensor:
    m, k = x2.shape
    n = codes.shape[0]
    words = _words(codes)
    if m == 1 and cfg.bits == 4:
        out = guarded("_tq_gemv_row", lambda: _gemv_row(nibble_major(x2), [(words, scales)], cfg, torch.float32,
                                                        interpret), lambda: None)
        if out is not None:
            return out
    out = torch.zeros(m, n, device=x2.device, dtype=torch.float32)
    table = _layout(cfg, x2.device)[0]
    block_m = triton.next_power_of_2(m)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLITS"])  # noqa: E731
    args = (x2, words, scales, table, out, m, n)
    meta = dict(K=k, GROUP=cfg.dim, BITS=int(cfg.bits), BLOCK_M=block_m)
    if interpret:
        _tq_gemv_split[grid](*args, **meta, BLOCK_N=16, BLOCK_W=8)
    else:
        _tq_gemv_tuned[grid](*args, **meta)
    return out


def tq_linear(x_rotated: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, cfg: TQConfig) -> torch.Tensor:
    """x_rotated [..., in] times the TurboQuant weight (codes [out, in/group, bytes], scales [out, in/group])."""
    shape = x_rotated.shape
    k = shape[-1]
    n = codes.shape[0]
    x2 = x_rotated.reshape(-1, k).contiguous()
    m = x2.shape[0]
    interpret = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter (tests on CPU) cannot autotune
    codes, scales = codes.contiguous(), scales.contiguous()
    if m <= GEMV_ROWS and _word_aligned(cfg, k):
        return guarded("_tq_gemv", lambda: _gemv(x2, codes, scales, cfg, interpret),
                       lambda: _matmul(x2, codes, scales, cfg, interpret)).to(x_rotated.dtype).reshape(*shape[:-1], n)
    return _matmul(x2, codes, scales, cfg, interpret).to(x_rotated.dtype).reshape(*shape[:-1], n)


def _matmul(x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, cfg: TQConfig, interpret: bool) -> torch.Tensor:
    """Any number of rows, any rate: _tq_aligned (tl.dot per code position) or _tq_generic; float32 out."""
    m, k = x2.shape
    n = codes.shape[0]
    bucket = 1 << max(0, math.ceil(math.log2(m)))
    ieee = x2.dtype == torch.float32
    if _aligned(cfg):
        table = _layout(cfg, x2.device)[0]
        out = torch.zeros(m, n, device=x2.device, dtype=torch.float32)
        block_m = 1 if m == 1 else 16
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLITS"], triton.cdiv(m, block_m))  # noqa: E731
        args = (x2, codes, scales, table, out, m, n, bucket)
        meta = dict(K=k, GROUP=cfg.dim, BITS=int(cfg.bits), IEEE=ieee, BLOCK_M=block_m)
        if interpret:
            _tq_aligned_split[grid](*args, **meta, BLOCK_N=16, BLOCK_B=32)
        else:
            _tq_aligned_tuned[grid](*args, **meta)
        return out
    table, k_high, hb, lb, low_byte0, high_levels = _layout(cfg, x2.device)
    out = torch.empty(m, n, device=x2.device, dtype=torch.float32)
    block_m = 16 if m <= 16 else 64
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m))  # noqa: E731
    args = (x2, codes, scales, table, out, m, n, bucket)
    meta = dict(K=k, GROUP=cfg.dim, NBYTES=codes.shape[-1], K_HIGH=k_high, HB=hb, LB=lb, LOW_BYTE0=low_byte0,
                HIGH_LEVELS=high_levels, IEEE=ieee, BLOCK_M=block_m)
    if interpret:
        _tq_generic[grid](*args, **meta, BLOCK_N=32, BLOCK_K=64)
    else:
        _tq_generic_tuned[grid](*args, **meta)
    return out
