/* wren's compiled CPU kernels: the TurboQuant matmul, decode attention, RMSNorm, and a whole Gemma 3 layer for
   one decoded token.

   Built by pip from source when a C compiler is there (setup.py marks it optional); without it, or on a CPU
   without AVX-512 VNNI, wren uses PyTorch's kernels instead (wren/native.py decides).

   A TurboQuant linear layer multiplies the input, rotated per group, by int8 levels (cpu_kernels.py):
     y[m, n] = row_scale[n] * sum_k rot(x[m])[k] * level[n, k].
   Two steps:
   1. rotate_quantize: per group of the input, the column scales, the two signed Walsh-Hadamard rounds the
      codes were made with, and int8 quantization with one float scale per group (as llama.cpp's Q8 blocks:
      ~0.6% error on a rotated, near-Gaussian group). Done once per input, shared by q/k/v and gate/up.
   2. gemm: int8 x int8 dot products with AVX-512 VNNI (64 multiply-adds an instruction), so a 1-byte
      weight is read at memory speed rather than converted to float first, once for all input rows. VNNI
      multiplies unsigned by signed bytes, so the input is stored as value + 128 and 128 x each row's sum
      of levels per group (group_sums, once per weight) is taken back off, 16 rows at a time.
   Weights of up to 6 bits skip the levels on a CPU with AVX-512 VBMI: gemm reads their packed codes as
   stored (format CODES, below), a quarter to three quarters of the bytes; the levels serve the 8-bit
   embedding / LM head and older CPUs. A GGUF's own block formats (Q4_0 ... Q6_K) are read in place too
   (formats GGUF_BASE + ggml type, _gguf_blocks.h), on an unrotated input quantized per block of 32.
   Then attend_one (one query over a dense cache), rms_norm (with RoPE or a residual), gelu_mul, and
   decode_layer_rows, which strings them together for one Gemma 3 or 4 layer and one new token in each of one or
   more rows (wren/decode_plan.py).

   Threads: OpenMP, linked against the libgomp PyTorch has already loaded (same soname), so the kernels
   share PyTorch's thread pool; the thread count is passed in by the caller (torch.get_num_threads()). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define WREN_X86 1
#ifdef WREN_AVX2 /* the AVX2 build (_native_avx2.c): the AVX-512 intrinsics below through SIMDe */
#include "_avx2_compat.h"
#endif
#endif

#define MAX_GROUP 4096
enum { GGUF_BASE = 16, BLOCK_INPUT = 32 }; /* gemm's GGUF formats (base + ggml type) and their input's group */

static float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* sums [ceil(N / 16), groups, 16] = 128 * the sum of each row's levels over each group: what the +128 of the
   input adds to a row's dot product, taken back off; laid out as gemm reads it, 16 rows a block in one
   stream (rows past N are 0). Once per weight. */
static void group_sums(const int8_t *levels, int N, int K, int group, float *sums, int threads) {
    const int groups = K / group, blocks = (N + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < blocks; b++)
        for (int g = 0; g < groups; g++)
            for (int r = 0; r < 16; r++) {
                const int n = b * 16 + r;
                int32_t total = 0;
                if (n < N) {
                    const int8_t *w = levels + (size_t)n * K + (size_t)g * group;
                    for (int i = 0; i < group; i++) total += w[i];
                }
                sums[((size_t)b * groups + g) * 16 + r] = 128.0f * (float)total;
            }
}

#ifdef WREN_X86
#ifdef WREN_AVX2 /* the whole file is built for AVX2 */
#define VNNI
#define VBMI
#else
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define VBMI __attribute__((target("avx512f,avx512bw,avx512vnni,avx512vbmi,f16c")))
#endif

/* acc + VNNI's 4-byte dot products of unsigned a and signed b, as _mm512_dpbusd_epi32, written as asm: with the
   intrinsic GCC 12 copies each accumulator to another register and back around every one (a third of the
   instructions of the prefill loops). */
VNNI static inline __attribute__((always_inline)) __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
#ifdef WREN_AVX2
    return avx2_dpbusd(acc, a, b);
#else
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "vm"(b));
    return acc;
#endif
}

/* Unnormalised Walsh-Hadamard transform of n floats (a power of two, a multiple of 16), the Sylvester order.
   Butterflies (a[j], a[j + h]) -> (a[j] + a[j + h], a[j] - a[j + h]): for h >= 16 between whole vectors; for
   h < 16 inside each vector, as x * sign + x[lane ^ h] with sign -1 on the lanes that hold the second half. */
#ifdef WREN_AVX2
/* The same transform on 8-float registers: in-register shuffles for h < 8 (the emulated 16-lane permute costs
   several times more), whole registers from h = 8. */
static void fwht(float *a, int n) {
    const __m256 first = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
    const __m256 second = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
    const __m256 third = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
    for (int i = 0; i < n; i += 8) {
        __m256 v = _mm256_loadu_ps(a + i);
        v = _mm256_fmadd_ps(v, first, _mm256_permute_ps(v, 0xB1));
        v = _mm256_fmadd_ps(v, second, _mm256_permute_ps(v, 0x4E));
        v = _mm256_fmadd_ps(v, third, _mm256_permute2f128_ps(v, v, 1));
        _mm256_storeu_ps(a + i, v);
    }
    for (int h = 8; h < n; h <<= 1)
        for (int i = 0; i < n; i += 2 * h)
            for (int j = i; j < i + h; j += 8) {
                const __m256 u = _mm256_loadu_ps(a + j), v = _mm256_loadu_ps(a + j + h);
                _mm256_storeu_ps(a + j, _mm256_add_ps(u, v));
                _mm256_storeu_ps(a + j + h, _mm256_sub_ps(u, v));
            }
}
#else
VNNI static void fwht(float *a, int n) {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int i = 0; i < n; i += 16) {
        __m512 v = _mm512_loadu_ps(a + i);
        for (int h = 1; h < 16; h <<= 1) {
            const __m512i partner = _mm512_xor_si512(lane, _mm512_set1_epi32(h));
            const __mmask16 second = _mm512_test_epi32_mask(lane, _mm512_set1_epi32(h));
            const __m512 sign = _mm512_mask_blend_ps(second, _mm512_set1_ps(1.0f), _mm512_set1_ps(-1.0f));
            v = _mm512_fmadd_ps(v, sign, _mm512_permutexvar_ps(partner, v));
        }
        _mm512_storeu_ps(a + i, v);
    }
    for (int h = 16; h < n; h <<= 1)
        for (int i = 0; i < n; i += 2 * h)
            for (int j = i; j < i + h; j += 16) {
                const __m512 u = _mm512_loadu_ps(a + j), v = _mm512_loadu_ps(a + j + h);
                _mm512_storeu_ps(a + j, _mm512_add_ps(u, v));
                _mm512_storeu_ps(a + j + h, _mm512_sub_ps(u, v));
            }
}
#endif

/* x [M, K] fp32 -> xq [M, K] as unsigned bytes (the int8 value + 128, what VNNI multiplies), xs [M, K/group].
   in_scale [K] (or NULL) divides out the columns' importance scaling; signs [2, group] are the rounds' (NULL:
   no rotation, the input of a GGUF matrix). group: a power of two, a multiple of 16. Rows in parallel when
   there are several (prefill). */
VNNI static void rotate_quantize(const float *x, int M, int K, int group, const float *in_scale, const float *signs,
                                 uint8_t *xq, float *xs, int threads) {
    const int groups = K / group;
    const __m512 norm = _mm512_set1_ps(1.0f / (float)group); /* two normalised transforms: (1/sqrt(group))^2 */
#pragma omp parallel for schedule(static) num_threads(threads) if (M >= 8)
    for (int m = 0; m < M; m++) {
        float buf[MAX_GROUP];
        for (int g = 0; g < groups; g++) {
            const size_t base = (size_t)m * K + (size_t)g * group;
            for (int i = 0; i < group; i += 16) {
                __m512 v = _mm512_loadu_ps(x + base + i);
                if (signs) v = _mm512_mul_ps(v, _mm512_loadu_ps(signs + i));
                if (in_scale) v = _mm512_mul_ps(v, _mm512_loadu_ps(in_scale + (size_t)g * group + i));
                _mm512_storeu_ps(buf + i, v);
            }
            if (signs) {
                fwht(buf, group);
                for (int i = 0; i < group; i += 16)
                    _mm512_storeu_ps(buf + i,
                                     _mm512_mul_ps(_mm512_loadu_ps(buf + i), _mm512_loadu_ps(signs + group + i)));
                fwht(buf, group);
            }
            __m512 top = _mm512_setzero_ps();
            for (int i = 0; i < group; i += 16) {
                const __m512 v = signs ? _mm512_mul_ps(_mm512_loadu_ps(buf + i), norm) : _mm512_loadu_ps(buf + i);
                _mm512_storeu_ps(buf + i, v);
                top = _mm512_max_ps(top, _mm512_abs_ps(v));
            }
            const float amax = _mm512_reduce_max_ps(top);
            const __m512 inverse = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            for (int i = 0; i < group; i += 16) {
                __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(buf + i), inverse)); /* nearest even */
                q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
                q = _mm512_add_epi32(q, _mm512_set1_epi32(128));
                _mm_storeu_si128((__m128i *)(xq + base + i), _mm512_cvtepi32_epi8(q));
            }
            xs[(size_t)m * groups + g] = amax / 127.0f;
        }
    }
}

#ifdef WREN_AVX2
/* levels_block's dot products without VNNI: the signed input q = xq - 128 times the levels, 32 bytes at a time
   (avx2_signed_dot256: half the instructions of an exact vpdpbusd). Without the +128 there is nothing to take
   back off (levels_block skips the group sums). */
static inline __attribute__((always_inline)) __m256i signed_dot32(__m256i acc, __m256i q, const int8_t *w) {
    return avx2_signed_dot256(acc, _mm256_loadu_si256((const __m256i *)w), q);
}

static inline __attribute__((always_inline)) __m256i signed_input32(const uint8_t *xq) {
    return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)xq), _mm256_set1_epi8((char)0x80));
}

static inline __attribute__((always_inline)) __m256i load32(const void *p) {
    return _mm256_loadu_si256((const __m256i *)p);
}

#define LEVELS_PREFETCH 1024 /* bytes ahead of a row's reads (a block's rows follow each other) */

/* `call` with n_ the constant nx (1-4), so that the kernels' loops over their inputs unroll with constant indices
   (their accumulators in registers). */
#define WITH_INPUTS(nx, call)                                                                                    \
    do {                                                                                                         \
        if ((nx) == 4) { const int n_ = 4; call; }                                                               \
        else if ((nx) == 3) { const int n_ = 3; call; }                                                          \
        else if ((nx) == 2) { const int n_ = 2; call; }                                                          \
        else { const int n_ = 1; call; }                                                                         \
    } while (0)

/* nx (1-4) input rows' products with one row of levels (input i's xq at xq + i * K, its scales at
   xs + i * groups, its output at out[i * N], times the row's scale): one row at a time, its bytes in order.
   Four rows read side by side (sharing the input's loads) ran at 60% of this speed on a 2-core AMD EPYC,
   whose prefetcher follows one stream well and four poorly (a C micro-benchmark of the 262k x 640 LM head:
   6.4 against 10.2 GB/s on one core). */
static inline __attribute__((always_inline)) void levels_row(int nx, const int8_t *w, int K, int chunks,
                                                             const uint8_t *xq, const float *xs, int groups,
                                                             float scale, float *out, int N) {
    __m256 f[4];
    for (int i = 0; i < 4; i++) f[i] = _mm256_setzero_ps();
    for (int g = 0, k = 0; k < K; g++) {
        __m256i a[4];
        for (int i = 0; i < 4; i++) a[i] = _mm256_setzero_si256();
        for (int c = 0; c < chunks; c++, k += 64) {
            _mm_prefetch((const char *)(w + k + LEVELS_PREFETCH), _MM_HINT_T0);
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++)
                if (i < nx) {
                    const uint8_t *xi = xq + (size_t)i * K + k;
                    a[i] = signed_dot32(signed_dot32(a[i], signed_input32(xi), w + k), signed_input32(xi + 32),
                                        w + k + 32);
                }
        }
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++)
            if (i < nx)
                f[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[i]), _mm256_set1_ps(xs[(size_t)i * groups + g]), f[i]);
    }
    for (int i = 0; i < nx; i++) out[(size_t)i * N] = avx2_sum8(f[i]) * scale;
}
#else
/* One weight row's sum over groups of xs_g * <x_g + 128, level_g>; `chunks` = group / 64. */
VNNI static inline __attribute__((always_inline)) __m512 row_dot(const int8_t *w, int K, int chunks, const uint8_t *xq,
                                                                 const float *xs) {
    __m512 f = _mm512_setzero_ps();
    for (int g = 0, k = 0; k < K; g++) {
        __m512i a = _mm512_setzero_si512();
        for (int c = 0; c < chunks; c++, k += 64)
            a = dpbusd(a, _mm512_loadu_si512(xq + k), _mm512_loadu_si512(w + k));
        f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(xs[g]), f);
    }
    return f;
}

/* Four rows at a time, so each 64-byte load of x feeds four rows; the group of 128 (two chunks) written out
   so that the inner loop unrolls. */
VNNI static inline __attribute__((always_inline)) void four_rows_of(const int8_t *w, int K, int chunks,
                                                                   const uint8_t *xq, const float *xs, float *out) {
    const int8_t *w1 = w + K, *w2 = w + 2 * (size_t)K, *w3 = w + 3 * (size_t)K;
    __m512 f0 = _mm512_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
    for (int g = 0, k = 0; k < K; g++) {
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        for (int c = 0; c < chunks; c++, k += 64) {
            const __m512i xv = _mm512_loadu_si512(xq + k);
            a0 = dpbusd(a0, xv, _mm512_loadu_si512(w + k));
            a1 = dpbusd(a1, xv, _mm512_loadu_si512(w1 + k));
            a2 = dpbusd(a2, xv, _mm512_loadu_si512(w2 + k));
            a3 = dpbusd(a3, xv, _mm512_loadu_si512(w3 + k));
        }
        const __m512 s = _mm512_set1_ps(xs[g]);
        f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0), s, f0);
        f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1), s, f1);
        f2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a2), s, f2);
        f3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a3), s, f3);
    }
    out[0] = _mm512_reduce_add_ps(f0);
    out[1] = _mm512_reduce_add_ps(f1);
    out[2] = _mm512_reduce_add_ps(f2);
    out[3] = _mm512_reduce_add_ps(f3);
}

VNNI static inline __attribute__((always_inline)) void four_rows(const int8_t *w, int K, int chunks, const uint8_t *xq,
                                                                const float *xs, float *out) {
    if (chunks == 2)
        four_rows_of(w, K, 2, xq, xs, out);
    else
        four_rows_of(w, K, chunks, xq, xs, out);
}
#endif

#define MAX_MATRICES 8

/* A weight as gemm reads it, in one of two formats:
   LEVELS: int8 levels [N, K], bf16 row scales [N], `extra` their group_sums (the int8 copy of any weight);
   CODES: the packed TurboQuant codes [N, K / group, group_bytes] as stored, fp16 group scales [N, K / group],
   `extra` its codes_layout (weights of up to 6 bits on a CPU with AVX-512 VBMI; read at 2-6 bits a weight). */
enum { LEVELS = 0, CODES = 1 };

typedef struct {
    int format;
    const void *data;
    const uint16_t *scale;
    const void *extra;
    float *y;
    int N;
} matrix;

#ifdef WREN_AVX2
/* 16 rows [n0, n0 + 16) of one matrix (or its last, shorter block) for every input row, four inputs at a time
   (the block's levels stay in cache across the passes; no +128, so no group sums to take off). */
static void levels_block(const uint8_t *xq, const float *xs, int M, int K, int group, const matrix *w, int b) {
    const int groups = K / group, chunks = group / 64, N = w->N, n0 = b * 16, end = N - n0 < 16 ? N : n0 + 16;
    for (int m = 0; m < M; m += 4) {
        const int nx = M - m < 4 ? M - m : 4;
        for (int n = n0; n < end; n++)
            WITH_INPUTS(nx, levels_row(n_, (const int8_t *)w->data + (size_t)n * K, K, chunks, xq + (size_t)m * K,
                                       xs + (size_t)m * groups, groups, bf16_to_float(w->scale[n]),
                                       w->y + (size_t)m * N + n, N));
    }
}
#else
/* 16 rows [n0, n0 + 16) of one matrix (or its last, shorter block) for every input row. */
VNNI static void levels_block(const uint8_t *xq, const float *xs, int M, int K, int group, const matrix *w, int b) {
    const int groups = K / group, chunks = group / 64, N = w->N, n0 = b * 16;
    for (int m = 0; m < M; m++) {
        const uint8_t *xm = xq + (size_t)m * K;
        const float *sm = xs + (size_t)m * groups;
        float *ym = w->y + (size_t)m * N;
        const float *sums = (const float *)w->extra + (size_t)b * groups * 16;
        if (n0 + 16 <= N) {
            float acc[16];
            for (int r = 0; r < 16; r += 4) four_rows((const int8_t *)w->data + (size_t)(n0 + r) * K, K, chunks, xm, sm, acc + r);
            __m512 v = _mm512_loadu_ps(acc);
            for (int g = 0; g < groups; g++)
                v = _mm512_fnmadd_ps(_mm512_set1_ps(sm[g]), _mm512_loadu_ps(sums + (size_t)g * 16), v);
            const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w->scale + n0))), 16));
            _mm512_storeu_ps(ym + n0, _mm512_mul_ps(v, scale));
        } else {
            for (int n = n0; n < N; n++) {
                float v = _mm512_reduce_add_ps(row_dot((const int8_t *)w->data + (size_t)n * K, K, chunks, xm, sm));
                for (int g = 0; g < groups; g++) v -= sm[g] * sums[(size_t)g * 16 + (n - n0)];
                ym[n] = v * bf16_to_float(w->scale[n]);
            }
        }
    }
}

#endif

/* --- The same product straight from the packed codes (format CODES) ------------------------------------
   A row's weight is centroid[code] * group scale in the rotated space; the centroids of each run of bits
   (turboquant._runs: a fractional rate gives the first coordinates of a group one bit more) are put on one
   int8 grid, value = (table - 128) * step, so a 64-code chunk becomes 64 unsigned bytes in four
   instructions: a masked load of its 8 * bits bytes, vpermb to give every 64-bit lane the `bits` bytes of
   its 8 codes, vpmultishiftqb to cut out each code, vpermb through the 64-entry table (repeated every
   2^bits entries, so that the bits above a code need no mask). VNNI then multiplies those unsigned bytes by
   the signed input (xq - 128); the +128 of the table adds 128 * the group's input sum, taken off per group.
   The codes are read as stored (0.25-0.75 bytes a weight instead of the levels' 1): decode reads less
   memory, and nothing is decoded at load. Wider inputs (prefill) unpack a 16-row block once and reuse it. */

#define MAX_CHUNKS (MAX_GROUP / 64)

typedef struct {
    int32_t group_bytes; /* bytes of one group's codes */
    int32_t chunks;      /* group / 64 */
    int32_t uniform;     /* 1: every chunk at the same bits */
    float step;          /* the int8 grid's step */
    int32_t offset[MAX_CHUNKS]; /* each chunk's first byte in its group */
    uint8_t bits[MAX_CHUNKS];
    uint8_t table_of[MAX_CHUNKS]; /* 0: the first run's table, 1: the second's */
    uint8_t table[2][64];
} codes_layout;

/* Per bits (1-6): which source byte each output byte's 64-bit lane starts from, and each code's bit shift. */
static uint8_t spread_of[7][64] __attribute__((aligned(64))), shift_of[7][64] __attribute__((aligned(64)));

static void init_unpack_tables(void) {
    for (int b = 1; b <= 6; b++)
        for (int p = 0; p < 64; p++) {
            spread_of[b][p] = (uint8_t)(b * (p / 8) + p % 8);
            shift_of[b][p] = (uint8_t)(b * (p % 8));
        }
}

/* Fill a layout for a group of `group` coordinates: the first `split` at bits_hi, the rest at bits_lo
   (split 0: all at bits_lo); levels_hi / levels_lo: the int8 centroids of each run (2^bits each).
   Returns -1 where the kernel cannot read it (a run boundary inside a chunk, bits outside 1-6). */
static int fill_codes_layout(codes_layout *L, int group, int split, int bits_hi, int bits_lo, const int8_t *levels_hi,
                             const int8_t *levels_lo, float step) {
    if (group % 64 || group > MAX_GROUP || split % 64 || split < 0 || split > group || bits_lo < 1 || bits_lo > 6 ||
        (split && (bits_hi < 1 || bits_hi > 6)))
        return -1;
    memset(L, 0, sizeof *L);
    L->chunks = group / 64;
    L->step = step;
    L->uniform = split == 0 || split == group;
    int offset = 0;
    for (int c = 0; c < L->chunks; c++) {
        const int hi = c * 64 < split;
        L->offset[c] = offset;
        L->bits[c] = (uint8_t)(hi ? bits_hi : bits_lo);
        L->table_of[c] = (uint8_t)(hi ? 0 : 1);
        offset += 8 * L->bits[c];
    }
    L->group_bytes = offset;
    for (int i = 0; i < 64; i++) {
        if (split) L->table[0][i] = (uint8_t)(levels_hi[i & ((1 << bits_hi) - 1)] + 128);
        L->table[1][i] = (uint8_t)(levels_lo[i & ((1 << bits_lo) - 1)] + 128);
    }
    return 0;
}

/* tail: read only the chunk's own 8 * bits bytes (a masked load, several times slower on AMD); otherwise 32 or
   64 bytes are read from its start, the next chunk's bytes ignored: the last block of a matrix takes tail. */
VBMI static inline __attribute__((always_inline)) __m512i unpack_chunk(const uint8_t *src, int bits, __m512i spread,
                                                                       __m512i shift, __m512i table, int tail) {
#ifdef WREN_AVX2
    return avx2_unpack_chunk(src, bits, table, tail); /* VBMI's byte permutes emulated are ~10x slower */
#else
    const __m512i raw = tail ? _mm512_maskz_loadu_epi8(((__mmask64)1 << (8 * bits)) - 1, src)
                        : bits <= 4 ? _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)src))
                                    : _mm512_loadu_si512(src);
    return _mm512_permutexvar_epi8(_mm512_multishift_epi64_epi8(shift, _mm512_permutexvar_epi8(spread, raw)), table);
#endif
}

/* The decode kernels' products of a chunk's table entries with the signed input, and where a group's sums start:
   VNNI multiplies the entries (level + 128, unsigned) and corr takes the +128 back off. The AVX2 build looks up
   the levels themselves (codes_table: signed) and multiplies them as signed_dot32 does, in half the
   instructions of an exact vpdpbusd: nothing to take off, the sums start at 0. */
VBMI static inline __attribute__((always_inline)) __m512i codes_table(const codes_layout *L, int which) {
#ifdef WREN_AVX2
    return _mm512_xor_si512(_mm512_loadu_si512(L->table[which]), _mm512_set1_epi8((char)0x80));
#else
    return _mm512_loadu_si512(L->table[which]);
#endif
}

VBMI static inline __attribute__((always_inline)) __m512i codes_start(int32_t corr) {
#ifdef WREN_AVX2
    return _mm512_setzero_si512();
#else
    return _mm512_maskz_mov_epi32(1, _mm512_set1_epi32(corr));
#endif
}

VBMI static inline __attribute__((always_inline)) __m512i codes_dot(__m512i acc, __m512i entries, __m512i x) {
#ifdef WREN_AVX2
    return avx2_signed_dot(acc, entries, x);
#else
    return dpbusd(acc, entries, x);
#endif
}

#define PREFETCH_BLOCKS 1 /* the direct kernel asks for the same bytes a block of 16 rows on: the hardware's
                             prefetch alone left it at half the memory's speed (measured; 1-4 blocks alike) */

#ifndef WREN_AVX2 /* (the AVX2 build's direct_block, after the nibble kernels, reads codes for any input rows) */
/* Decode: `count` (1-4) rows' dot products with one input row, straight from the codes; rows are `row_bytes`
   apart. x: the input as signed bytes, xs its group scales, corr[g] = -128 * the group's input sum (what the
   table's +128 adds); scales: the rows' fp16 group scales [rows, groups]. Four rows share each load of x. */
VBMI static inline __attribute__((always_inline)) void direct_rows(int count, int tail, const uint8_t *w,
                                                                   size_t row_bytes, const codes_layout *L,
                                                                   const uint16_t *scales, int groups, const int8_t *x,
                                                                   const float *xs, const int32_t *corr, float *out) {
    __m512 f[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    __m512i spread = _mm512_load_si512(spread_of[L->bits[0]]), shift = _mm512_load_si512(shift_of[L->bits[0]]);
    __m512i table = codes_table(L, L->table_of[0]);
    for (int g = 0; g < groups; g++) {
        const __m512i start = codes_start(corr[g]);
        __m512i a[4] = {start, start, start, start};
        const uint8_t *wg = w + (size_t)g * L->group_bytes;
        const int8_t *xg = x + (size_t)g * 64 * L->chunks;
        for (int r = 0; r < count; r++)
            _mm_prefetch((const char *)(wg + (r + 16 * PREFETCH_BLOCKS) * row_bytes), _MM_HINT_T0);
        for (int c = 0; c < L->chunks; c++) {
            const __m512i xv = _mm512_loadu_si512(xg + 64 * c);
            const int bits = L->bits[c];
            if (!L->uniform) {
                spread = _mm512_load_si512(spread_of[bits]);
                shift = _mm512_load_si512(shift_of[bits]);
                table = codes_table(L, L->table_of[c]);
            }
            for (int r = 0; r < count; r++)
                a[r] = codes_dot(
                    a[r], unpack_chunk(wg + r * row_bytes + L->offset[c], bits, spread, shift, table, tail), xv);
        }
        for (int r = 0; r < count; r++)
            f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r]),
                                   _mm512_set1_ps(_cvtsh_ss(scales[(size_t)r * groups + g]) * xs[g]), f[r]);
    }
    for (int r = 0; r < count; r++) out[r] = _mm512_reduce_add_ps(f[r]) * L->step;
}

#endif

/* Whether a layout's codes are 4-bit nibbles throughout, in whole 64-byte pairs of chunks (TQ4's layers): code 2i
   in the low half of byte i of a pair, 2i + 1 in the high half, so that two ANDs and a shift unpack 128 of them
   where unpack_chunk takes two byte permutes and a multishift per 64. */
static inline int nibble_layout(const codes_layout *L) {
    return L->uniform && L->bits[0] == 4 && L->chunks % 2 == 0;
}

/* table[index] for indices below 16 (the nibble kernels'): vpermb, or without VBMI a byte shuffle in each half. */
VBMI static inline __attribute__((always_inline)) __m512i lookup16(__m512i index, __m512i table) {
#ifdef WREN_AVX2
    return avx2_lookup16(index, table);
#else
    return _mm512_permutexvar_epi8(index, table);
#endif
}

/* direct_rows for a nibble_layout: x_split holds each 128 inputs' even coordinates, then their odd ones
   (split_input), so that the low and the high nibbles each multiply a whole vector. A pair is its own 64
   bytes: no read past the codes, so no tail. */
#ifdef WREN_AVX2
/* The AVX2 build's codes kernels, in 256-bit registers of their own (through SIMDe's 512-bit types the
   accumulators lived on the stack: 2.6 GB/s of codes): each half of a pair's 64 bytes holds 32 even and 32 odd
   codes, which multiply the matching halves of the even and the odd inputs. */
static inline __attribute__((always_inline)) __m256i nibble_levels(const codes_layout *L) {
    const __m128i table = _mm_loadu_si128((const __m128i *)L->table[L->table_of[0]]);
    return _mm256_broadcastsi128_si256(_mm_xor_si128(table, _mm_set1_epi8((char)0x80))); /* signed levels */
}

/* nx (1-4) input rows' products with one row of codes (out[i * N] for input i; its x at x + i * K, its scales
   at xs + i * groups), the row's bytes in order, as levels_row reads the levels: each unpack of the row serves
   the nx inputs. nibbles_row for a nibble_layout (x: split_input's), codes_row for any other (quarters: the
   layout's two tables of signed levels, avx2_table_quarters; tail as unpack_chunk's; or, unpacked not NULL,
   the row's K signed levels, which direct_block unpacked there). */

/* f[i] += a group's sums a[i] times its scale and input i's (xs[i * groups]), for the nx inputs. */
static inline __attribute__((always_inline)) void scale_group(int nx, __m256 *f, const __m256i *a, float scale,
                                                              const float *xs, int groups) {
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
        if (i < nx)
            f[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[i]), _mm256_set1_ps(scale * xs[(size_t)i * groups]), f[i]);
}

static inline __attribute__((always_inline)) void nibbles_row(int nx, const uint8_t *w, const codes_layout *L,
                                                              const uint16_t *scales, int groups, const int8_t *x,
                                                              int K, const float *xs, float *out, int N) {
    const __m256i levels = nibble_levels(L), low = _mm256_set1_epi8(0x0F);
    const int pairs = L->chunks / 2;
    __m256 f[4];
    for (int i = 0; i < 4; i++) f[i] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256i a[4];
        for (int i = 0; i < 4; i++) a[i] = _mm256_setzero_si256();
        const uint8_t *wg = w + (size_t)g * L->group_bytes;
        const int8_t *xg = x + (size_t)g * 128 * pairs;
        for (int p = 0; p < pairs; p++) {
            _mm_prefetch((const char *)(wg + 64 * p + LEVELS_PREFETCH), _MM_HINT_T0);
            for (int h = 0; h < 64; h += 32) {
                const __m256i raw = load32(wg + 64 * p + h);
                const __m256i lo = _mm256_shuffle_epi8(levels, _mm256_and_si256(raw, low));
                const __m256i hi = _mm256_shuffle_epi8(levels, _mm256_and_si256(_mm256_srli_epi16(raw, 4), low));
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++)
                    if (i < nx) {
                        const int8_t *xi = xg + (size_t)i * K + 128 * p + h;
                        a[i] = avx2_signed_dot256(avx2_signed_dot256(a[i], lo, load32(xi)), hi, load32(xi + 64));
                    }
            }
        }
        scale_group(nx, f, a, _cvtsh_ss(scales[g]), xs + g, groups);
    }
    for (int i = 0; i < nx; i++) out[(size_t)i * N] = avx2_sum8(f[i]) * L->step;
}

static inline __attribute__((always_inline)) void codes_row(int nx, const uint8_t *w, const codes_layout *L,
                                                            const __m256i (*quarters)[4], const int8_t *unpacked,
                                                            const uint16_t *scales, int groups, const int8_t *x,
                                                            int K, const float *xs, float *out, int N, int tail) {
    __m256 f[4];
    for (int i = 0; i < 4; i++) f[i] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256i a[4];
        for (int i = 0; i < 4; i++) a[i] = _mm256_setzero_si256();
        const uint8_t *wg = w + (size_t)g * L->group_bytes;
        const int8_t *xg = x + (size_t)g * 64 * L->chunks;
        if (!unpacked)
            for (int at = 0; at < L->group_bytes; at += 64)
                _mm_prefetch((const char *)(wg + at + LEVELS_PREFETCH), _MM_HINT_T0);
        for (int c = 0; c < L->chunks; c++) {
            __m256i lo, hi;
            if (unpacked) {
                lo = load32(unpacked + (size_t)g * 64 * L->chunks + 64 * c);
                hi = load32(unpacked + (size_t)g * 64 * L->chunks + 64 * c + 32);
            } else {
                avx2_unpack64(wg + L->offset[c], L->bits[c], quarters[L->table_of[c]], tail, &lo, &hi);
            }
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++)
                if (i < nx) {
                    const int8_t *xi = xg + (size_t)i * K + 64 * c;
                    a[i] = avx2_signed_dot256(avx2_signed_dot256(a[i], lo, load32(xi)), hi, load32(xi + 32));
                }
        }
        scale_group(nx, f, a, _cvtsh_ss(scales[g]), xs + g, groups);
    }
    for (int i = 0; i < nx; i++) out[(size_t)i * N] = avx2_sum8(f[i]) * L->step;
}

/* Every input row times `rows` rows of codes (a block, row_bytes apart; scales its [rows, groups]; y [M, N]
   from its first row's column), four inputs at a time: the block's codes stay in cache across the passes.
   x_split: the input as split_input makes it, for a nibble_layout (else NULL: x); unpacked (NULL, or room for
   rows x K bytes): other codes are unpacked there once for all the inputs rather than once for every four.
   The AVX2 build's codes product at every width: without VBMI an unpack into tiles and their transpose cost
   more than they save. */
static void direct_block(const int8_t *x, const int8_t *x_split, const float *xs, int M, int K, int groups,
                         const codes_layout *L, const uint8_t *codes, size_t row_bytes, const uint16_t *scales,
                         float *y, int N, int rows, int tail, int8_t *unpacked) {
    __m256i quarters[2][4];
    for (int t = 0; t < 2; t++) avx2_table_quarters(L->table[t], _mm_set1_epi8((char)0x80), quarters[t]);
    if (unpacked) /* every row's signed levels, once for all the inputs */
        for (int r = 0; r < rows; r++)
            for (int g = 0; g < groups; g++)
                for (int c = 0; c < L->chunks; c++) {
                    int8_t *to = unpacked + (size_t)r * K + (size_t)g * 64 * L->chunks + 64 * c;
                    __m256i lo, hi;
                    avx2_unpack64(codes + r * row_bytes + (size_t)g * L->group_bytes + L->offset[c], L->bits[c],
                                  quarters[L->table_of[c]], tail, &lo, &hi);
                    _mm256_storeu_si256((__m256i *)to, lo);
                    _mm256_storeu_si256((__m256i *)(to + 32), hi);
                }
    for (int m = 0; m < M; m += 4) {
        const int nx = M - m < 4 ? M - m : 4;
        for (int r = 0; r < rows; r++) {
            const uint8_t *wr = codes + r * row_bytes;
            const uint16_t *sr = scales + (size_t)r * groups;
            const float *xsm = xs + (size_t)m * groups;
            float *out = y + (size_t)m * N + r;
            const int8_t *levels = unpacked ? unpacked + (size_t)r * K : NULL;
            if (x_split)
                WITH_INPUTS(nx, nibbles_row(n_, wr, L, sr, groups, x_split + (size_t)m * K, K, xsm, out, N));
            else
                WITH_INPUTS(nx, codes_row(n_, wr, L, (const __m256i (*)[4])quarters, levels, sr, groups,
                                          x + (size_t)m * K, K, xsm, out, N, tail));
        }
    }
}
#else
VBMI static inline __attribute__((always_inline)) void direct_rows_nibbles(int count, const uint8_t *w,
                                                                           size_t row_bytes, const codes_layout *L,
                                                                           const uint16_t *scales, int groups,
                                                                           const int8_t *x_split, const float *xs,
                                                                           const int32_t *corr, float *out) {
    __m512 f[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const __m512i table = codes_table(L, L->table_of[0]), low = _mm512_set1_epi8(0x0F);
    const int pairs = L->chunks / 2;
    for (int g = 0; g < groups; g++) {
        const __m512i start = codes_start(corr[g]);
        __m512i a[4] = {start, start, start, start}, b[4]; /* b: the odd coordinates, a second chain */
        for (int r = 0; r < 4; r++) b[r] = _mm512_setzero_si512();
        const uint8_t *wg = w + (size_t)g * L->group_bytes;
        const int8_t *xg = x_split + (size_t)g * 128 * pairs;
        for (int r = 0; r < count; r++)
            _mm_prefetch((const char *)(wg + (r + 16 * PREFETCH_BLOCKS) * row_bytes), _MM_HINT_T0);
        for (int p = 0; p < pairs; p++) {
            const __m512i even = _mm512_loadu_si512(xg + 128 * p), odd = _mm512_loadu_si512(xg + 128 * p + 64);
            for (int r = 0; r < count; r++) {
                const __m512i raw = _mm512_loadu_si512(wg + r * row_bytes + 64 * p);
                a[r] = codes_dot(a[r], lookup16(_mm512_and_si512(raw, low), table), even);
                b[r] = codes_dot(b[r], lookup16(_mm512_and_si512(_mm512_srli_epi16(raw, 4), low), table),
                              odd);
            }
        }
        for (int r = 0; r < count; r++)
            f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a[r], b[r])),
                                   _mm512_set1_ps(_cvtsh_ss(scales[(size_t)r * groups + g]) * xs[g]), f[r]);
    }
    for (int r = 0; r < count; r++) out[r] = _mm512_reduce_add_ps(f[r]) * L->step;
}

/* direct_rows_nibbles for two input rows at once (x_split, xs and corr of the second one stride, groups and
   groups after the first's; its outputs out + N): each weight unpacked once for both. A step of a few decoded
   rows (the server's) reads the codes this way rather than through 16-row tiles (decode_plan.RowsPlan). */
VBMI static inline __attribute__((always_inline)) void direct_rows_nibbles2(int count, const uint8_t *w,
                                                                            size_t row_bytes, const codes_layout *L,
                                                                            const uint16_t *scales, int groups,
                                                                            const int8_t *x_split, size_t stride,
                                                                            const float *xs, const int32_t *corr,
                                                                            float *out, int N) {
    __m512 f0[4], f1[4];
    for (int r = 0; r < 4; r++) f0[r] = f1[r] = _mm512_setzero_ps();
    const __m512i table = codes_table(L, L->table_of[0]), low = _mm512_set1_epi8(0x0F);
    const int pairs = L->chunks / 2;
    for (int g = 0; g < groups; g++) {
        const __m512i start0 = codes_start(corr[g]), start1 = codes_start(corr[groups + g]);
        __m512i a0[4] = {start0, start0, start0, start0}, a1[4] = {start1, start1, start1, start1};
        const uint8_t *wg = w + (size_t)g * L->group_bytes;
        const int8_t *xg = x_split + (size_t)g * 128 * pairs;
        for (int r = 0; r < count; r++)
            _mm_prefetch((const char *)(wg + (r + 16 * PREFETCH_BLOCKS) * row_bytes), _MM_HINT_T0);
        for (int p = 0; p < pairs; p++) {
            const __m512i even0 = _mm512_loadu_si512(xg + 128 * p), odd0 = _mm512_loadu_si512(xg + 128 * p + 64);
            const __m512i even1 = _mm512_loadu_si512(xg + stride + 128 * p);
            const __m512i odd1 = _mm512_loadu_si512(xg + stride + 128 * p + 64);
            for (int r = 0; r < count; r++) {
                const __m512i raw = _mm512_loadu_si512(wg + r * row_bytes + 64 * p);
                const __m512i lo = lookup16(_mm512_and_si512(raw, low), table);
                const __m512i hi = lookup16(_mm512_and_si512(_mm512_srli_epi16(raw, 4), low), table);
                a0[r] = codes_dot(codes_dot(a0[r], lo, even0), hi, odd0);
                a1[r] = codes_dot(codes_dot(a1[r], lo, even1), hi, odd1);
            }
        }
        for (int r = 0; r < count; r++) {
            const float s = _cvtsh_ss(scales[(size_t)r * groups + g]);
            f0[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0[r]), _mm512_set1_ps(s * xs[g]), f0[r]);
            f1[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1[r]), _mm512_set1_ps(s * xs[groups + g]), f1[r]);
        }
    }
    for (int r = 0; r < count; r++) {
        out[r] = _mm512_reduce_add_ps(f0[r]) * L->step;
        out[N + r] = _mm512_reduce_add_ps(f1[r]) * L->step;
    }
}

#endif

/* v[i] (16 dwords of row i) -> v[j] (dword j of rows 0..15): a 16 x 16 transpose of 32-bit elements. */
VNNI static inline __attribute__((always_inline)) void transpose16(__m512i *v) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
    }
    __m512i u[16]; /* u[4g + k]: in each 128-bit lane L, dword 4L + k of rows 4g .. 4g + 3 */
    for (int g = 0; g < 4; g++) {
        u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int k = 0; k < 4; k++) {
        const __m512i a = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x44), b = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x44);
        const __m512i c = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xEE), d = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xEE);
        v[k] = _mm512_shuffle_i32x4(a, b, 0x88);
        v[4 + k] = _mm512_shuffle_i32x4(a, b, 0xDD);
        v[8 + k] = _mm512_shuffle_i32x4(c, d, 0x88);
        v[12 + k] = _mm512_shuffle_i32x4(c, d, 0xDD);
    }
}

/* Prefill: a block of 16 rows unpacked once into `tiles` [K / 4][16 rows][4 bytes], so that one 64-byte load
   holds four weights of each of the 16 rows and VNNI sums them lane by lane: a lane is a row, the input's
   four bytes are broadcast, and a group's scales are one vector of the 16 rows'. Eight input rows at a time
   share each load of the tiles (written out: GCC spills an array of accumulators); one at a time after.
   out: input row m's 16 outputs at out + m * N (`rows` of them valid). */
#define EIGHT(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define BROADCAST_QUAD(p) _mm512_set1_epi32(*(const int32_t *)(const void *)(p))

#ifdef WREN_AVX2
#define BROADCAST_QUAD32(p) _mm256_set1_epi32(*(const int32_t *)(const void *)(p))

/* The sum of n (a multiple of 16) signed bytes. */
static inline int32_t sum_signed_bytes(const int8_t *x, int n) {
    int64_t total = 0;
    for (int i = 0; i < n; i += 16) {
        const __m128i u = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(x + i)), _mm_set1_epi8((char)0x80));
        const __m128i sad = _mm_sad_epu8(u, _mm_setzero_si128());
        total += _mm_cvtsi128_si64(sad) + _mm_extract_epi64(sad, 1);
    }
    return (int32_t)(total - 128LL * n);
}

/* tile_rows8 without VNNI: each half of the 16 rows in turn (8 lanes a register, so that the eight input rows'
   sums stay in registers), the tiles' bytes (value + 128) taken back to signed values and multiplied as
   avx2_signed_dot256 does; the sums start 128 * the group's input sum higher, where VNNI's +128 put them. */
static void tile_rows8(const uint8_t *tiles, const float *block_scales, int groups, int group, const int8_t *x,
                       int K, const float *xs, const int32_t *corr, float step, float *out, int N, int rows) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    for (int h = 0; h < 2 && 8 * h < rows; h++) {
        __m256 f[8];
        for (int m = 0; m < 8; m++) f[m] = _mm256_setzero_ps();
        for (int g = 0; g < groups; g++) {
            const int8_t *xg = x + (size_t)g * group;
#define START(m) \
    __m256i a##m = _mm256_set1_epi32(corr[(size_t)(m) * groups + g] +                                          \
                                     128 * sum_signed_bytes(xg + (size_t)(m) * K, group));
            EIGHT(START)
#undef START
            const uint8_t *t = tiles + (size_t)g * group * 16 + 32 * h;
            for (int q = 0; q < group; q += 4) {
                const __m256i level = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(t + q * 16)), flip);
#define DOT(m) \
    a##m = avx2_signed_dot256(a##m, level, BROADCAST_QUAD32(xg + (size_t)(m) * K + q));
                EIGHT(DOT)
#undef DOT
            }
            const __m256 s = _mm256_loadu_ps(block_scales + (size_t)g * 16 + 8 * h);
#define SCALE(m) \
    f[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a##m), _mm256_mul_ps(s, _mm256_set1_ps(xs[(size_t)(m) * groups + g])), \
                           f[m]);
            EIGHT(SCALE)
#undef SCALE
        }
        const int valid = rows - 8 * h >= 8 ? 8 : rows - 8 * h;
        const __m256i lanes = avx2_lane_mask((1u << valid) - 1);
        for (int m = 0; m < 8; m++)
            _mm256_maskstore_ps(out + (size_t)m * N + 8 * h, lanes, _mm256_mul_ps(f[m], _mm256_set1_ps(step)));
    }
}
#else
VNNI static void tile_rows8(const uint8_t *tiles, const float *block_scales, int groups, int group, const int8_t *x,
                            int K, const float *xs, const int32_t *corr, float step, float *out, int N, int rows) {
#define DECLARE(m) __m512 f##m = _mm512_setzero_ps();
    EIGHT(DECLARE)
#undef DECLARE
    for (int g = 0; g < groups; g++) {
#define START(m) __m512i a##m = _mm512_set1_epi32(corr[(size_t)(m) * groups + g]);
        EIGHT(START)
#undef START
        const uint8_t *t = tiles + (size_t)g * group * 16;
        const int8_t *xg = x + (size_t)g * group;
        for (int q = 0; q < group; q += 4) {
            const __m512i wv = _mm512_loadu_si512(t + q * 16);
#define DOT(m) a##m = dpbusd(a##m, wv, BROADCAST_QUAD(xg + (size_t)(m) * K + q));
            EIGHT(DOT)
#undef DOT
        }
        const __m512 s = _mm512_loadu_ps(block_scales + (size_t)g * 16);
#define SCALE(m) f##m = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a##m), \
                                        _mm512_mul_ps(s, _mm512_set1_ps(xs[(size_t)(m) * groups + g])), f##m);
        EIGHT(SCALE)
#undef SCALE
    }
    const __mmask16 valid = (__mmask16)((1u << rows) - 1);
#define STORE(m) _mm512_mask_storeu_ps(out + (size_t)(m) * N, valid, _mm512_mul_ps(f##m, _mm512_set1_ps(step)));
    EIGHT(STORE)
#undef STORE
}
#endif

VNNI static void tile_rows1(const uint8_t *tiles, const float *block_scales, int groups, int group, const int8_t *x,
                            const float *xs, const int32_t *corr, float step, float *out, int rows) {
    __m512 f = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512i a = _mm512_set1_epi32(corr[g]);
        const uint8_t *t = tiles + (size_t)g * group * 16;
        for (int q = 0; q < group; q += 4)
            a = dpbusd(a, _mm512_loadu_si512(t + q * 16), BROADCAST_QUAD(x + (size_t)g * group + q));
        f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a),
                            _mm512_mul_ps(_mm512_loadu_ps(block_scales + (size_t)g * 16), _mm512_set1_ps(xs[g])), f);
    }
    _mm512_mask_storeu_ps(out, (__mmask16)((1u << rows) - 1), _mm512_mul_ps(f, _mm512_set1_ps(step)));
}

/* Every input row times a block of 16 rows held in tiles. */
VNNI static void tile_rows(const uint8_t *tiles, const float *block_scales, int groups, int group, const int8_t *x,
                           const float *xs, const int32_t *corr, int M, int K, float step, float *out, int N, int rows) {
    int m = 0;
    for (; m + 8 <= M; m += 8)
        tile_rows8(tiles, block_scales, groups, group, x + (size_t)m * K, K, xs + (size_t)m * groups,
                   corr + (size_t)m * groups, step, out + (size_t)m * N, N, rows);
    for (; m < M; m++)
        tile_rows1(tiles, block_scales, groups, group, x + (size_t)m * K, xs + (size_t)m * groups,
                   corr + (size_t)m * groups, step, out + (size_t)m * N, rows);
}

#ifdef WREN_AVX2 /* (direct_block at every width) */
#define DIRECT_ROWS 4 /* (unpacking other bits is dear: more inputs share one unpack of the block) */
#define NIBBLE_DIRECT_ROWS INT_MAX
#else
#define DIRECT_ROWS 2 /* input rows up to which each reads the codes itself; more share one unpacked block */
#define NIBBLE_DIRECT_ROWS 8 /* and for 4-bit codes, which direct_rows_nibbles2 reads for two rows at a time */
#endif

static inline int reads_direct(int M, const codes_layout *L) {
    return M <= DIRECT_ROWS || (M <= NIBBLE_DIRECT_ROWS && nibble_layout(L));
}

/* Rows [n0, n0 + 16) of a CODES matrix (or its last, shorter block) for every input row. scratch: 16 * K + 64
   bytes and 16 * groups floats, for wide inputs. x_split: x as split_input makes it (decode of 4-bit codes), or
   NULL. */
VBMI static void codes_block(const int8_t *x, const int8_t *x_split, const float *xs, const int32_t *corr, int M,
                             int K, int group, const matrix *w, int b, uint8_t *scratch) {
    const codes_layout *L = w->extra;
    const int groups = K / group, N = w->N, n0 = b * 16, rows = N - n0 < 16 ? N - n0 : 16;
    const int tail = n0 + 16 >= N; /* the matrix's last block: read no byte past its codes */
    const size_t row_bytes = (size_t)groups * L->group_bytes;
    const uint8_t *codes = (const uint8_t *)w->data + (size_t)n0 * row_bytes;
    const uint16_t *scales = w->scale + (size_t)n0 * groups;
    if (reads_direct(M, L)) {
#ifdef WREN_AVX2
        direct_block(x, x_split && nibble_layout(L) ? x_split : NULL, xs, M, K, groups, L, codes, row_bytes, scales,
                     w->y + n0, N, rows, tail, NULL);
#else
        const int nibbles = x_split && nibble_layout(L);
        for (int r = 0; r < rows; r += 4) {
            const int count = rows - r < 4 ? rows - r : 4;
            const uint8_t *wr = codes + r * row_bytes;
            const uint16_t *sr = scales + (size_t)r * groups;
            int m = 0;
            /* (the count a constant where it is 4: the rows' loops unrolled) */
            for (; nibbles && m + 1 < M; m += 2) { /* two input rows at a time */
                float *out = w->y + (size_t)m * N + n0 + r;
                const size_t at = (size_t)m * K, at_groups = (size_t)m * groups;
                if (count == 4)
                    direct_rows_nibbles2(4, wr, row_bytes, L, sr, groups, x_split + at, K, xs + at_groups,
                                         corr + at_groups, out, N);
                else
                    direct_rows_nibbles2(count, wr, row_bytes, L, sr, groups, x_split + at, K, xs + at_groups,
                                         corr + at_groups, out, N);
            }
            for (; m < M; m++) {
                float *out = w->y + (size_t)m * N + n0 + r;
                const size_t at = (size_t)m * K, at_groups = (size_t)m * groups;
                if (nibbles && count == 4)
                    direct_rows_nibbles(4, wr, row_bytes, L, sr, groups, x_split + at, xs + at_groups,
                                        corr + at_groups, out);
                else if (nibbles)
                    direct_rows_nibbles(count, wr, row_bytes, L, sr, groups, x_split + at, xs + at_groups,
                                        corr + at_groups, out);
                else if (count == 4 && !tail)
                    direct_rows(4, 0, wr, row_bytes, L, sr, groups, x + at, xs + at_groups, corr + at_groups, out);
                else
                    direct_rows(count, 1, wr, row_bytes, L, sr, groups, x + at, xs + at_groups, corr + at_groups,
                                out);
            }
        }
#endif
        return;
    }
    uint8_t *tiles = (uint8_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
#ifdef WREN_AVX2 /* the rows unpacked to signed levels in the tiles' room, then multiplied as the levels are */
    direct_block(x, NULL, xs, M, K, groups, L, codes, row_bytes, scales, w->y + n0, N, rows, tail, (int8_t *)tiles);
    return;
#endif
    /* unpack: the 16 rows' 64 bytes of a chunk, as 16 x 16 dwords, transposed into 16 tiles (rows past N:
       zero weights) */
    float *block_scales = (float *)(tiles + (size_t)16 * K);
    for (int r = 0; r < 16; r++)
        for (int g = 0; g < groups; g++) block_scales[(size_t)g * 16 + r] = r < rows ? _cvtsh_ss(scales[(size_t)r * groups + g]) : 0.0f;
    for (int g = 0; g < groups; g++)
        for (int c = 0; c < L->chunks; c++) {
            const int bits = L->bits[c];
            const __m512i spread = _mm512_load_si512(spread_of[bits]), shift = _mm512_load_si512(shift_of[bits]);
            const __m512i table = _mm512_loadu_si512(L->table[L->table_of[c]]);
            __m512i v[16];
            for (int r = 0; r < 16; r++)
                v[r] = r < rows ? unpack_chunk(codes + r * row_bytes + (size_t)g * L->group_bytes + L->offset[c], bits,
                                               spread, shift, table, tail)
                                : _mm512_set1_epi8((char)128);
            transpose16(v); /* v[j]: dword j (weights 4j .. 4j + 3 of the chunk) of every row */
            uint8_t *t = tiles + (size_t)(g * group + 64 * c) * 16;
            for (int j = 0; j < 16; j++) _mm512_store_si512(t + 64 * j, v[j]);
        }
    tile_rows(tiles, block_scales, groups, group, x, xs, corr, M, K, L->step, w->y + n0, N, rows);
}

#ifdef WREN_AVX2 /* (levels_block at every width: its transposes without AVX-512 cost more than they save) */
#define LEVEL_TILE_ROWS INT_MAX
#else
#define LEVEL_TILE_ROWS 8 /* input rows from which a LEVELS block is transposed into tiles (reads shared by 8) */
#endif

/* Rows [n0, n0 + 16) of a LEVELS matrix for LEVEL_TILE_ROWS or more input rows: its levels transposed once into
   the tiles codes_block unpacks codes into (+128: unsigned, which `corr` takes off; rows past N: zero), every
   group's scales the row scales, and the same tile products. scratch as codes_block's. */
VNNI static void levels_tiles(const int8_t *x, const float *xs, const int32_t *corr, int M, int K, int group,
                              const matrix *w, int b, uint8_t *scratch) {
    const int groups = K / group, N = w->N, n0 = b * 16, rows = N - n0 < 16 ? N - n0 : 16;
    uint8_t *tiles = (uint8_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    float *block_scales = (float *)(tiles + (size_t)16 * K);
    for (int r = 0; r < 16; r++) {
        const float s = r < rows ? bf16_to_float(w->scale[n0 + r]) : 0.0f;
        for (int g = 0; g < groups; g++) block_scales[(size_t)g * 16 + r] = s;
    }
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const int8_t *levels = (const int8_t *)w->data + (size_t)n0 * K;
    for (int c = 0; c < K / 64; c++) {
        __m512i v[16];
        for (int r = 0; r < 16; r++)
            v[r] = r < rows ? _mm512_xor_si512(_mm512_loadu_si512(levels + (size_t)r * K + 64 * c), flip) : flip;
        transpose16(v);
        for (int j = 0; j < 16; j++) _mm512_store_si512(tiles + (size_t)64 * c * 16 + 64 * j, v[j]);
    }
    tile_rows(tiles, block_scales, groups, group, x, xs, corr, M, K, 1.0f, w->y + n0, N, rows);
}

#include "_gguf_blocks.h" /* after the tiles (tile_rows), which its kernels for several input rows take */

/* The input as CODES matrices read it: signed bytes x [M, K] (xq - 128) and corr [M, K / group] = -128 * each
   group's sum of them. */
VNNI static void signed_input(const uint8_t *xq, int M, int K, int group, int8_t *x, int32_t *corr) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int m = 0; m < M; m++)
        for (int g = 0; g < K / group; g++) {
            const size_t at = (size_t)m * K + (size_t)g * group;
            __m512i total = _mm512_setzero_si512();
            for (int i = 0; i < group; i += 64) {
                const __m512i v = _mm512_loadu_si512(xq + at + i);
                total = _mm512_add_epi64(total, _mm512_sad_epu8(v, _mm512_setzero_si512()));
                _mm512_storeu_si512(x + at + i, _mm512_xor_si512(v, flip));
            }
            corr[(size_t)m * (K / group) + g] = -128 * (int32_t)(_mm512_reduce_add_epi64(total) - 128LL * group);
        }
}

/* x [M, K] (K a multiple of 128) as direct_rows_nibbles reads it: each 128 coordinates' even ones, then their
   odd ones. */
VBMI static void split_input(const int8_t *x, int M, int K, int8_t *x_split) {
    uint8_t even[64], odd[64];
    for (int i = 0; i < 64; i++) even[i] = (uint8_t)(2 * i), odd[i] = (uint8_t)(2 * i + 1);
    const __m512i to_even = _mm512_loadu_si512(even), to_odd = _mm512_loadu_si512(odd);
    for (size_t at = 0; at < (size_t)M * K; at += 128) {
        const __m512i first = _mm512_loadu_si512(x + at), second = _mm512_loadu_si512(x + at + 64);
        _mm512_storeu_si512(x_split + at, _mm512_permutex2var_epi8(first, to_even, second));
        _mm512_storeu_si512(x_split + at + 64, _mm512_permutex2var_epi8(first, to_odd, second));
    }
}

/* For each matrix i (up to 8 that share the input, as q/k/v do): y_i [M, N_i] = row_scale[n] * sum_g xs[m, g]
   * (<xq[m, g], level[n, g]> - sums of n's block [g, n % 16]). Rows 16 at a time, so the correction and the
   scales are applied as 16-wide vectors; all matrices' blocks in one parallel loop. group: a multiple of 64. */
VNNI static int gemm(const uint8_t *xq, const float *xs, int M, int K, int group, const matrix *w, int count,
                    int threads) {
    int first[MAX_MATRICES + 1] = {0}; /* the first global block of each matrix */
    int codes = 0, levels = 0, blocks = 0, nibbles = 0, unpack_codes = 0;
    for (int i = 0; i < count; i++) {
        first[i + 1] = first[i] + (w[i].N + 15) / 16;
        codes |= w[i].format == CODES;
        nibbles |= w[i].format == CODES && M <= NIBBLE_DIRECT_ROWS && nibble_layout(w[i].extra);
        unpack_codes |= w[i].format == CODES && !reads_direct(M, w[i].extra);
        levels |= w[i].format == LEVELS;
        blocks |= w[i].format >= GGUF_BASE;
    }
    /* GGUF matrices (all of them, if any: they share an unrotated input) read it as block_in rows (floats, and
       their signed bytes after them); from GGUF_TILE_ROWS rows, in tiles with its scales per group of 16 (xs16)
       or 32 (xs) and, for each matrix, -bias times the group sums of x (gguf_corr[i]). The others read the
       signed input and its correction (corr). */
    const int gguf_tiles_on = blocks && M >= GGUF_TILE_ROWS && K % 64 == 0;
    const int tile_levels = levels && M >= LEVEL_TILE_ROWS;
    const int unpack = unpack_codes || tile_levels || gguf_tiles_on;
    float *floats = NULL, *xs16 = NULL;
    int32_t *corr = NULL, *gguf_corr = NULL;
    const int8_t *x;
    if (blocks) {
        const size_t per_matrix = (size_t)M * (K / 16);
        floats = malloc(sizeof(float) * (size_t)M * BLOCK_INPUT_FLOATS(K) + (size_t)M * K);
        xs16 = gguf_tiles_on ? malloc(sizeof(float) * per_matrix) : NULL;
        gguf_corr = gguf_tiles_on ? malloc(sizeof(int32_t) * per_matrix * (count + 1)) : NULL;
        if (!floats || (gguf_tiles_on && (!xs16 || !gguf_corr))) {
            free(floats), free(xs16), free(gguf_corr);
            return -1;
        }
        int8_t *signed_x = (int8_t *)(floats + (size_t)M * BLOCK_INPUT_FLOATS(K));
        for (int m = 0; m < M; m++)
            block_input(xq + (size_t)m * K, xs + (size_t)m * (K / BLOCK_INPUT), K, signed_x + (size_t)m * K,
                        floats + (size_t)m * BLOCK_INPUT_FLOATS(K));
        x = signed_x;
        if (gguf_tiles_on) {
            int32_t *sums16 = gguf_corr + per_matrix * count; /* each 16's sum of x, after the matrices' corr */
            for (size_t g = 0; g < per_matrix; g++) {
                const __m128i sad = _mm_sad_epu8(_mm_loadu_si128((const __m128i *)(xq + 16 * g)), _mm_setzero_si128());
                xs16[g] = xs[g / 2];
                sums16[g] = _mm_extract_epi16(sad, 0) + _mm_extract_epi16(sad, 4) - 16 * 128; /* xq = x + 128 */
            }
            for (int i = 0; i < count; i++) {
                const int type = w[i].format - GGUF_BASE, per = gguf_tile_group(type) / 16, bias = gguf_tile_bias(type);
                for (size_t g = 0; g < per_matrix / per; g++)
                    gguf_corr[per_matrix * i + g] = -bias * (per == 1 ? sums16[g] : sums16[2 * g] + sums16[2 * g + 1]);
            }
        }
    } else {
        const size_t x_bytes = (size_t)M * K * (nibbles ? 2 : 1); /* the signed input, and its split copy */
        if ((codes || tile_levels) && !(corr = malloc(sizeof(int32_t) * (size_t)M * (K / group) + x_bytes)))
            return -1;
        if (corr) signed_input(xq, M, K, group, (int8_t *)(corr + (size_t)M * (K / group)), corr);
        x = (const int8_t *)(corr + (size_t)M * (K / group));
        if (nibbles) split_input(x, M, K, (int8_t *)(x + (size_t)M * K));
    }
    const size_t scratch_floats = blocks ? GGUF_TILE_FLOATS(K) : 16 * (K / group);
    const size_t scratch_bytes = (size_t)16 * K + 64 + sizeof(float) * scratch_floats;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        uint8_t *scratch = unpack ? malloc(scratch_bytes) : NULL;
        if (unpack && !scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int b = 0; b < first[count]; b++) {
            int i = 0;
            while (b >= first[i + 1]) i++;
            const matrix *wi = &w[i];
            if (wi->format >= GGUF_BASE && !gguf_tiles_on)
                gguf_block(x, xq, floats, M, K, wi, b - first[i]);
            else if (wi->format >= GGUF_BASE && scratch)
                gguf_tiles(x, xq, floats, gguf_tile_group(wi->format - GGUF_BASE) == 16 ? xs16 : xs,
                           gguf_corr + (size_t)M * (K / 16) * i, M, K, wi, b - first[i], scratch);
            else if (wi->format == LEVELS && !tile_levels)
                levels_block(xq, xs, M, K, group, wi, b - first[i]);
            else if (wi->format == LEVELS && scratch)
                levels_tiles(x, xs, corr, M, K, group, wi, b - first[i], scratch);
            else if (wi->format == CODES && (!unpack || scratch))
                codes_block(x, nibbles ? x + (size_t)M * K : NULL, xs, corr, M, K, group, wi, b - first[i], scratch);
        }
        free(scratch);
    }
    free(floats), free(xs16), free(gguf_corr), free(corr);
    return failed ? -1 : 0;
}

/* --- Attention of one new query over a dense KV cache (decode, batch 1) ---------------------------------
   q [H, D] fp32; keys/values: Hkv heads of S slots of D elements (fp32, fp16 or bf16) at the given strides;
   slot_pos [S] the position each slot holds (-1: empty); slot_valid [S] (or NULL) 0 for padding. A slot is
   seen if 0 <= pos <= qpos, pos > qpos - window (window > 0) and valid: the mask `attention_mask` builds.
   Each thread takes a run of slots for every head and keeps a running max, sum and weighted sum of values
   (as flash-decoding does); the runs are merged at the end. out [H, D] fp32; a head that sees no slot gets
   zeros, as `attend` gives. */

enum { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2, KV_CODES = 3 };

VNNI static inline __m512 load16(const void *base, int dtype, size_t i) {
    if (dtype == KV_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i)));
    if (dtype == KV_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i))), 16));
    return _mm512_loadu_ps((const float *)base + i);
}

static size_t elem_size(int dtype) { return dtype == KV_F32 ? 4 : dtype == KV_CODES ? 1 : 2; }

typedef struct {
    const float *q;
    const void *keys, *values;
    int dtype, H, Hkv, D, S;
    long long head_stride, slot_stride;
    const int64_t *slot_pos;
    const uint8_t *slot_valid;
    long long qpos, window;
    float scale, softcap;
    /* KV_CODES (a TurboQuant cache, wren/kv/codecs.py TQ): keys and values are codes of vectors in their
       rotated frames (the query already rotated into the keys', the output left in the values'); strides are
       in bytes; each vector's fp16 scale at scales + head * scale_head_stride + slot; `layout` reads a vector
       as one group whose table gives the code itself, `centroids` [2 runs][16] its value. */
    long long value_head_stride, value_slot_stride; /* (dense: the keys' strides) */
    const uint16_t *key_scales, *value_scales;
    long long scale_head_stride;
    const codes_layout *key_layout, *value_layout;
    const float *key_centroids, *value_centroids;
} attention_args;

/* The float32 vector [D] that TurboQuant codes stand for in their rotated frame, times its fp16 scale. */
#ifdef WREN_AVX2
static void decode_vector(const uint8_t *codes, const codes_layout *L, const float *centroids, uint16_t scale,
                          float *out) {
    const __m256 s = _mm256_set1_ps(_cvtsh_ss(scale));
    for (int c = 0; c < L->chunks; c++) {
        __m256i quarters[4], half[2];
        avx2_table_quarters(L->table[L->table_of[c]], _mm_setzero_si128(), quarters); /* (gives the code) */
        avx2_unpack64(codes + L->offset[c], L->bits[c], quarters, 1, &half[0], &half[1]);
        const float *table = centroids + 16 * L->table_of[c];
        const __m256 low = _mm256_loadu_ps(table), high = _mm256_loadu_ps(table + 8);
        for (int i = 0; i < 8; i++) { /* 8 codes at a time: centroid[code] from either half of the 16 */
            const __m256i codes = half[i / 4];
            const __m128i bytes = i & 2 ? _mm256_extracti128_si256(codes, 1) : _mm256_castsi256_si128(codes);
            const __m256i index = _mm256_cvtepu8_epi32(i & 1 ? _mm_unpackhi_epi64(bytes, bytes) : bytes);
            const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, index),
                                              _mm256_permutevar8x32_ps(high, index),
                                              _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
            _mm256_storeu_ps(out + 64 * c + 8 * i, _mm256_mul_ps(v, s));
        }
    }
}
#else
VBMI static void decode_vector(const uint8_t *codes, const codes_layout *L, const float *centroids, uint16_t scale,
                               float *out) {
    const __m512 s = _mm512_set1_ps(_cvtsh_ss(scale));
    for (int c = 0; c < L->chunks; c++) {
        const int bits = L->bits[c];
        const __m512i v = unpack_chunk(codes + L->offset[c], bits, _mm512_load_si512(spread_of[bits]),
                                       _mm512_load_si512(shift_of[bits]), _mm512_loadu_si512(L->table[L->table_of[c]]),
                                       1);
        const __m512 table = _mm512_loadu_ps(centroids + 16 * L->table_of[c]);
        for (int i = 0; i < 4; i++) {
            const __m512i index = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(v, i));
            _mm512_storeu_ps(out + 64 * c + 16 * i, _mm512_mul_ps(_mm512_permutexvar_ps(index, table), s));
        }
    }
}

#endif

/* The vector of head kh at slot s, as attend_run reads it: where it is stored, or decoded into buf. */
VNNI static inline const void *cached_vector(const attention_args *a, int values, int kh, int s, float *buf) {
    const void *base = values ? a->values : a->keys;
    const size_t at = values ? (size_t)kh * a->value_head_stride + (size_t)s * a->value_slot_stride
                             : (size_t)kh * a->head_stride + (size_t)s * a->slot_stride;
    if (a->dtype != KV_CODES) return (const char *)base + at * elem_size(a->dtype);
    const uint16_t *scales = values ? a->value_scales : a->key_scales;
    decode_vector((const uint8_t *)base + at, values ? a->value_layout : a->key_layout,
                  values ? a->value_centroids : a->key_centroids,
                  scales[(size_t)kh * a->scale_head_stride + s], buf);
    return buf;
}

/* <q, cached vector> and o += w * cached vector, over D (a multiple of 16) floats; the AVX2 build's in 8-float
   registers of its own (SIMDe's 16-float ones spilled to the stack here). */
#ifdef WREN_AVX2
static inline __attribute__((always_inline)) __m256 load8(const void *base, int dtype, size_t i) {
    if (dtype == KV_F32) return _mm256_loadu_ps((const float *)base + i);
    const __m128i halves = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
    if (dtype == KV_F16) return _mm256_cvtph_ps(halves);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16)); /* bf16 */
}

static inline __attribute__((always_inline)) float dot_cached(const float *q, const void *k, int dtype, int D) {
    __m256 a = _mm256_setzero_ps(), b = a;
    for (int d = 0; d < D; d += 16) {
        a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k, dtype, d), a);
        b = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), load8(k, dtype, d + 8), b);
    }
    return avx2_sum8(_mm256_add_ps(a, b));
}

static inline __attribute__((always_inline)) void add_cached(float *o, float w, const void *v, int dtype, int D) {
    const __m256 wv = _mm256_set1_ps(w);
    for (int d = 0; d < D; d += 8)
        _mm256_storeu_ps(o + d, _mm256_fmadd_ps(wv, load8(v, dtype, d), _mm256_loadu_ps(o + d)));
}
#else
VNNI static inline __attribute__((always_inline)) float dot_cached(const float *q, const void *k, int dtype, int D) {
    __m512 dot = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 16) dot = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16(k, dtype, d), dot);
    return _mm512_reduce_add_ps(dot);
}

VNNI static inline __attribute__((always_inline)) void add_cached(float *o, float w, const void *v, int dtype, int D) {
    const __m512 wv = _mm512_set1_ps(w);
    for (int d = 0; d < D; d += 16)
        _mm512_storeu_ps(o + d, _mm512_fmadd_ps(wv, load16(v, dtype, d), _mm512_loadu_ps(o + d)));
}
#endif

/* Slots [s0, s1) for every head: max m[h], sum l[h] of exp(score - m), acc[h] = sum exp(score - m) v. */
VNNI static void attend_run(const attention_args *a, int s0, int s1, float *scores, float *m, float *l, float *acc) {
    const int H = a->H, D = a->D, group = a->H / a->Hkv;
    const int dtype = a->dtype == KV_CODES ? KV_F32 : a->dtype; /* codes are read decoded into buf */
    float buf[MAX_GROUP];
    for (int h = 0; h < H; h++) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
        memset(acc + (size_t)h * D, 0, sizeof(float) * D);
    }
    for (int s = s0; s < s1; s++) {
        const long long p = a->slot_pos[s];
        const int seen = p >= 0 && p <= a->qpos && (a->window <= 0 || p > a->qpos - a->window) &&
                         (!a->slot_valid || a->slot_valid[s]);
        for (int kh = 0; kh < a->Hkv; kh++) {
            const void *k = seen ? cached_vector(a, 0, kh, s, buf) : NULL;
            for (int h = kh * group; h < (kh + 1) * group; h++) {
                float score = -INFINITY;
                if (seen) {
                    score = dot_cached(a->q + (size_t)h * D, k, dtype, D) * a->scale;
                    if (a->softcap > 0.0f) score = tanhf(score / a->softcap) * a->softcap;
                }
                scores[(size_t)(s - s0) * H + h] = score;
                if (score > m[h]) m[h] = score;
            }
        }
    }
    for (int s = s0; s < s1; s++) {
        for (int kh = 0; kh < a->Hkv; kh++) {
            const void *v = NULL;
            for (int h = kh * group; h < (kh + 1) * group; h++) {
                const float score = scores[(size_t)(s - s0) * H + h];
                if (score == -INFINITY) continue;
                if (!v) v = cached_vector(a, 1, kh, s, buf);
                const float w = expf(score - m[h]);
                l[h] += w;
                add_cached(acc + (size_t)h * D, w, v, dtype, D);
            }
        }
    }
}

VNNI static int attend_one(const attention_args *a, float *out, int threads) {
    const int H = a->H, D = a->D;
    const int runs = a->S >= 128 * threads ? threads : 1;
    const int per_run = (a->S + runs - 1) / runs;
    /* per run: scores [per_run, H], m [H], l [H], acc [H, D] */
    const size_t stride = (size_t)per_run * H + 2 * (size_t)H + (size_t)H * D;
    float *scratch = malloc(sizeof(float) * stride * runs);
    if (!scratch) return -1;
#pragma omp parallel for schedule(static) num_threads(runs)
    for (int r = 0; r < runs; r++) {
        float *base = scratch + (size_t)r * stride;
        const int s0 = r * per_run, s1 = s0 + per_run < a->S ? s0 + per_run : a->S;
        attend_run(a, s0, s1, base, base + (size_t)per_run * H, base + (size_t)per_run * H + H,
                   base + (size_t)per_run * H + 2 * H);
    }
    for (int h = 0; h < H; h++) {
        float top = -INFINITY, total = 0.0f;
        for (int r = 0; r < runs; r++) {
            const float mr = scratch[(size_t)r * stride + (size_t)per_run * H + h];
            top = mr > top ? mr : top;
        }
        float *o = out + (size_t)h * D;
        memset(o, 0, sizeof(float) * D);
        if (top == -INFINITY) continue; /* no slot seen: zeros */
        for (int r = 0; r < runs; r++) {
            const float *base = scratch + (size_t)r * stride + (size_t)per_run * H;
            if (base[h] == -INFINITY) continue;
            const float f = expf(base[h] - top);
            total += base[H + h] * f;
            const float *acc = base + 2 * H + (size_t)h * D;
            for (int d = 0; d < D; d++) o[d] += acc[d] * f;
        }
        for (int d = 0; d < D; d++) o[d] /= total;
    }
    free(scratch);
    return 0;
}
#endif

/* --- RMSNorm, optionally followed by RoPE or added to a residual -------------------------------------------
   out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * (weight + offset)  (weight NULL: 1), in fp32, for rows of dim;
   then, with cos/sin [rows / heads, dim], the half-split RoPE of `apply_rope` (row r is position r / heads);
   or, with residual, out = residual + that. Plain C: the compiler vectorises it, and it runs anywhere. */
static void rms_norm(const float *x, int rows, int dim, const float *weight, float offset, float eps,
                     const float *cos, const float *sin, int heads, const float *residual, float *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * dim >= 65536)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * dim;
        float *o = out + (size_t)r * dim;
        float sum = 0.0f;
        for (int i = 0; i < dim; i++) sum += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(sum / (float)dim + eps);
        float buf[MAX_GROUP];
        float *h = cos || residual ? buf : o; /* out may be the residual itself */
        for (int i = 0; i < dim; i++) h[i] = xr[i] * inv * (weight ? weight[i] + offset : 1.0f);
        if (cos) {
            const int half = dim / 2;
            const float *c = cos + (size_t)(r / heads) * dim, *s = sin + (size_t)(r / heads) * dim;
            for (int i = 0; i < half; i++) {
                o[i] = h[i] * c[i] - h[i + half] * s[i];
                o[i + half] = h[i + half] * c[i + half] + h[i] * s[i + half];
            }
        } else if (residual) {
            const float *res = residual + (size_t)r * dim;
            for (int i = 0; i < dim; i++) o[i] = res[i] + h[i];
        }
    }
}

#ifdef WREN_X86
/* e^x of 16 floats (x clamped to [-88, 88]): 2^k e^r with k = round(x / ln 2) and r = x - k ln 2 (ln 2 in two
   parts), e^r by Cephes' expf polynomial: within 2 ulp of expf. */
VNNI static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, k);
}

/* gelu_mul 16 at a time: 0.5 g (1 + tanh(u)) = g / (1 + e^(-2u)), one exp and one division (tanhf was some
   18 ns a value: ~4% of a 270M model's decode step). */
VNNI static void gelu_mul16(const float *gate, const float *up, float *out, long long n) {
    const __m512 c = _mm512_set1_ps(-2.0f * 0.7978845608028654f), cube = _mm512_set1_ps(0.044715f);
    const __m512 one = _mm512_set1_ps(1.0f);
    for (long long i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        const __m512 g = _mm512_maskz_loadu_ps(m, gate + i), u = _mm512_maskz_loadu_ps(m, up + i);
        const __m512 inner = _mm512_mul_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(cube, g), _mm512_mul_ps(g, g), g));
        const __m512 gelu = _mm512_div_ps(g, _mm512_add_ps(one, exp16(inner)));
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(gelu, u));
    }
}
#endif

#ifdef WREN_X86
/* --- The k largest of a vector (the sampler's top_k over a 262k vocabulary) ------------------------------
   Two passes: the maxima of blocks of 256 (the one pass over the whole vector, threads splitting it), then a
   min-heap of the k largest over the values at least the k-th largest maximum, in the blocks whose maximum
   reaches it (k blocks hold k such values, so the k largest are among them), and the short last block.
   Out: values and ids sorted largest first (which of equal values at the cut are kept is not specified, as
   in torch.topk). PyTorch's topk with the blocked search around it took ~0.23 ms for 40 of 262k. */
static void heap_down(float *v, int64_t *id, int k, int i) {
    for (;;) {
        int least = i;
        const int l = 2 * i + 1, r = l + 1;
        if (l < k && v[l] < v[least]) least = l;
        if (r < k && v[r] < v[least]) least = r;
        if (least == i) return;
        const float tv = v[i];
        const int64_t ti = id[i];
        v[i] = v[least], id[i] = id[least], v[least] = tv, id[least] = ti;
        i = least;
    }
}

static inline void heap_offer(float *values, int64_t *ids, int k, float v, long long i) {
    if (v > values[0]) values[0] = v, ids[0] = i, heap_down(values, ids, k, 0);
}

#define TOP_K_BLOCK 256

/* values [start, end) of x at least `floor` offered to the heap (16 at a time past the ones below it) */
VNNI static void offer_run(const float *x, long long start, long long end, float floor, int k, float *values,
                           int64_t *ids) {
    long long i = start;
    for (; i + 16 <= end; i += 16)
        for (__mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), _mm512_set1_ps(floor), _CMP_GE_OQ); m;
             m &= m - 1)
            heap_offer(values, ids, k, x[i + __builtin_ctz(m)], i + __builtin_ctz(m));
    for (; i < end; i++)
        if (x[i] >= floor) heap_offer(values, ids, k, x[i], i);
}

VNNI static int top_k_floats(const float *x, long long n, int k, float *values, int64_t *ids, int threads) {
    const long long blocks = n / TOP_K_BLOCK, whole = blocks * TOP_K_BLOCK;
    for (int j = 0; j < k; j++) values[j] = -INFINITY, ids[j] = -1;
    if (blocks < k) {
        offer_run(x, 0, n, -INFINITY, k, values, ids);
    } else {
        float *maxima = malloc(sizeof(float) * (size_t)blocks);
        if (!maxima) return -1;
#pragma omp parallel for schedule(static) num_threads(threads) if (n >= 65536)
        for (long long b = 0; b < blocks; b++) {
            __m512 top = _mm512_loadu_ps(x + b * TOP_K_BLOCK);
            for (int j = 16; j < TOP_K_BLOCK; j += 16)
                top = _mm512_max_ps(top, _mm512_loadu_ps(x + b * TOP_K_BLOCK + j));
            maxima[b] = _mm512_reduce_max_ps(top);
        }
        offer_run(maxima, 0, blocks, -INFINITY, k, values, ids); /* the k largest maxima: the floor is the least */
        const float floor = values[0];
        for (int j = 0; j < k; j++) values[j] = -INFINITY, ids[j] = -1;
        for (long long b = 0; b < blocks; b++)
            if (maxima[b] >= floor) offer_run(x, b * TOP_K_BLOCK, (b + 1) * TOP_K_BLOCK, floor, k, values, ids);
        offer_run(x, whole, n, floor, k, values, ids);
        free(maxima);
    }
    if (ids[0] < 0) return 1; /* fewer than k values above -inf (the rest -inf or NaN): not found here */
    for (int last = k - 1; last > 0; last--) { /* heap sort: the least to the back, so largest first */
        const float tv = values[0];
        const int64_t ti = ids[0];
        values[0] = values[last], ids[0] = ids[last], values[last] = tv, ids[last] = ti;
        heap_down(values, ids, last, 0);
    }
    return 0;
}
#endif

#ifdef WREN_X86
/* --- The sampler's chain, for the rows of a server step at once (wren/sampling.py computes the same) -------
   Per row: the repeat, frequency and presence penalties on the ids of its recent history, top_k, top_p,
   min_p, then temperature and the draw of the row's uniform number u against the cumulative softmax (at
   temperature 0, the largest penalized logit), in float32 as sampling.candidates and draw compute them
   (torch's exp may differ by an ulp). Rows in parallel. In PyTorch ops the chain took ~0.4 ms a row; a step
   of 16 rows spent ~15% of its time there. */
enum { S_TOP_P, S_MIN_P, S_TEMPERATURE, S_U, S_REPEAT, S_FREQUENCY, S_PRESENCE, S_FIELDS };

typedef struct {
    float value;
    int64_t id;
} candidate;

static int by_value_descending(const void *a, const void *b) {
    const float x = ((const candidate *)a)->value, y = ((const candidate *)b)->value;
    return (x < y) - (x > y);
}

/* softmax of v [n] into p (float32: exp(v - max) / sum) */
static void softmax_floats(const float *v, int n, float *p) {
    float top = -INFINITY, sum = 0.0f;
    for (int i = 0; i < n; i++) top = v[i] > top ? v[i] : top;
    for (int i = 0; i < n; i++) sum += (p[i] = expf(v[i] - top));
    for (int i = 0; i < n; i++) p[i] /= sum;
}

static inline float penalized(float v, long long count, const double *o) {
    const float repeat = (float)o[S_REPEAT], frequency = (float)o[S_FREQUENCY], presence = (float)o[S_PRESENCE];
    return (v > 0 ? v / repeat : v * repeat) - (float)count * frequency - presence;
}

static inline int is_penalized(long long id, const int64_t *pen_ids, int npen) {
    for (int j = 0; j < npen; j++)
        if (pen_ids[j] == id) return 1;
    return 0;
}

/* Temperature 0: the index of the largest logit, the penalized ones at their penalized values (the first of
   equals, as an argmax over a penalized copy). The scan looks at a lane only where it beats the best so far. */
VNNI static long long greedy_row(const float *x, long long V, const double *o, const int64_t *pen_ids,
                                 const int64_t *pen_counts, int npen) {
    float best = -INFINITY;
    long long at = -1, i = 0;
    for (; i + 16 <= V; i += 16)
        for (__mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), _mm512_set1_ps(best), _CMP_GT_OQ); m;
             m &= m - 1) {
            const long long j = i + __builtin_ctz(m);
            if (x[j] > best && !is_penalized(j, pen_ids, npen)) best = x[j], at = j; /* (best may have risen) */
        }
    for (; i < V; i++)
        if (x[i] > best && !is_penalized(i, pen_ids, npen)) best = x[i], at = i;
    for (int p = 0; p < npen; p++) {
        const float v = penalized(x[pen_ids[p]], pen_counts[p], o);
        if (v > best || (v == best && pen_ids[p] < at)) best = v, at = pen_ids[p];
    }
    return at; /* -1: every logit -inf or NaN (left to the caller) */
}

/* The token row x [V] draws, or -1 where this chain does not decide it (fewer than k + penalized values
   above -inf, or no memory: the caller's own chain does). pen_ids/pen_counts [npen]: the distinct ids of the
   row's recent history and how often each came. */
VNNI static long long sample_row(const float *x, long long V, int k, const double *o, const int64_t *pen_ids,
                                 const int64_t *pen_counts, int npen, int threads) {
    if (o[S_TEMPERATURE] == 0.0) return greedy_row(x, V, o, pen_ids, pen_counts, npen);
    const int kk = (int)(k + npen < V ? k + npen : V);
    candidate *c = malloc(sizeof(candidate) * (size_t)(kk + npen));
    float *values = malloc(sizeof(float) * (size_t)(2 * kk + npen)), *p = values + kk;
    int64_t *ids = malloc(sizeof(int64_t) * (size_t)kk);
    long long token = -1;
    if (!c || !values || !ids || top_k_floats(x, V, kk, values, ids, threads) != 0) goto done;
    int n = 0;
    for (int i = 0; i < kk; i++) /* the k + npen largest, less the penalized ids ... */
        if (!is_penalized(ids[i], pen_ids, npen)) c[n++] = (candidate){values[i], ids[i]};
    for (int j = 0; j < npen; j++) /* ... and the penalized ones at their penalized values: the k largest */
        c[n++] = (candidate){penalized(x[pen_ids[j]], pen_counts[j], o), pen_ids[j]};
    qsort(c, (size_t)n, sizeof(candidate), by_value_descending);
    n = n < k ? n : k;
    for (int i = 0; i < n; i++) values[i] = c[i].value;
    if (o[S_TOP_P] < 1.0) { /* the smallest prefix whose mass reaches top_p (the one crossing it stays) */
        softmax_floats(values, n, p);
        float before = 0.0f;
        int kept = 0;
        for (int i = 0; i < n; i++) {
            const float through = before + p[i];
            if (through - p[i] < (float)o[S_TOP_P]) values[kept] = values[i], c[kept++] = c[i];
            before = through;
        }
        n = kept;
    }
    if (o[S_MIN_P] > 0.0) {
        softmax_floats(values, n, p);
        float top = 0.0f;
        for (int i = 0; i < n; i++) top = p[i] > top ? p[i] : top;
        for (int i = 0; i < n; i++)
            if (p[i] < (float)o[S_MIN_P] * top) values[i] = -INFINITY;
    }
    const float temperature = (float)o[S_TEMPERATURE];
    for (int i = 0; i < n; i++) values[i] /= temperature;
    softmax_floats(values, n, p);
    for (int i = 1; i < n; i++) p[i] += p[i - 1]; /* the cumulative sum, then its first entry past u * total */
    const float target = (float)o[S_U] * p[n - 1];
    int pick = 0;
    while (pick < n - 1 && !(p[pick] > target)) pick++;
    token = c[pick].id;
done:
    free(c), free(values), free(ids);
    return token;
}

/* Rows r of logits [R, V] (rows `stride` floats apart): k[r], options o [R, S_FIELDS], penalized ids and
   counts of row r at [pen_at[r], pen_at[r + 1]); out[r] the token, or -1 (sample_row). */
VNNI static void sample_rows(const float *logits, int R, long long V, long long stride, const int64_t *k,
                             const double *o, const int64_t *pen_at, const int64_t *pen_ids, const int64_t *pen_counts,
                             int64_t *out, int threads) {
#define SAMPLE_ROW(r, inner)                                                                                        \
    out[r] = sample_row(logits + (size_t)(r) * stride, V, (int)k[r], o + (size_t)(r) * S_FIELDS, pen_ids + pen_at[r], \
                        pen_counts + pen_at[r], (int)(pen_at[(r) + 1] - pen_at[r]), inner)
    if (R > 1 && R >= threads) { /* (two branches, not an OpenMP `if`: see decode_layer_rows) */
#pragma omp parallel for schedule(dynamic) num_threads(threads)
        for (int r = 0; r < R; r++) SAMPLE_ROW(r, 1);
    } else {
        for (int r = 0; r < R; r++) SAMPLE_ROW(r, threads);
    }
#undef SAMPLE_ROW
}
#endif

static int wide_vectors; /* AVX-512 here (cpu_supported), set when the module loads */

/* out = gelu(gate) * up, the tanh form of gelu: the gated MLP's middle, for the module path and decode_layer
   alike (so the two compute the same). out may be gate. */
static void gelu_mul(const float *gate, const float *up, float *out, long long n) {
#ifdef WREN_X86
    if (wide_vectors) {
        gelu_mul16(gate, up, out, n);
        return;
    }
#endif
    for (long long i = 0; i < n; i++) {
        const float g = gate[i];
        out[i] = 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g))) * up[i];
    }
}

#ifdef WREN_X86
/* --- One Gemma 3 or 4 decoder layer for one new token a row (decode), every step above in one call --------
   The model's forward calls this per layer instead of some seventy PyTorch ops and Python calls (wren/decode_plan.py
   builds the plan: the layer's weights, norms and cache buffers as addresses, in the order of the fields
   below). x [rows, hidden] is updated in place. The same arithmetic as the module path: the tests compare them. */

enum {
    P_HIDDEN, P_HEADS, P_KV_HEADS, P_HEAD_DIM, P_WIDTH, P_WINDOW, P_SLOTS, P_RING, P_KV_DTYPE, P_KEYS, P_VALUES,
    P_HEAD_STRIDE, P_SLOT_STRIDE, P_SLOT_POS,
    /* a TurboQuant cache (kv_dtype KV_CODES; wren/kv/codecs.py TQ): the values' strides (bytes), the fp16
       vector scales and their head stride, the keys' channel scales (0: none), the rotation's signs [2, D],
       then per keys and values: the layout, centroids [2][16] and midpoints [2][16] of its runs */
    P_VALUE_HEAD_STRIDE, P_VALUE_SLOT_STRIDE, P_KEY_SCALES, P_VALUE_SCALES, P_SCALE_HEAD_STRIDE,
    P_KEY_CHANNEL_SCALE, P_KV_SIGNS, P_KEY_LAYOUT, P_KEY_CENTROIDS, P_KEY_MIDPOINTS, P_VALUE_LAYOUT,
    P_VALUE_CENTROIDS, P_VALUE_MIDPOINTS,
    P_INPUT_NORM, P_POST_ATTENTION_NORM, P_PRE_FEEDFORWARD_NORM, P_POST_FEEDFORWARD_NORM, P_Q_NORM, P_K_NORM,
    P_QKV, P_O = P_QKV + 15, P_GATE_UP = P_O + 7, P_DOWN = P_GATE_UP + 11, /* group, in_scale, signs, then
                                                                       format, data, scale, extra a matrix */
    /* Gemma 4: how many of q, k, v the layer projects (3; 2 where v is k's projection, K=V; 1 where it reads
       an earlier layer's cache, KV sharing), v through a weightless norm, and the per-layer input block:
       this layer's input row [ple_dim], its gate and projection, the norm after them (ple_dim 0: none) */
    P_QKV_COUNT = P_DOWN + 7, P_V_FROM_K, P_V_NORM, P_PLE_INPUT, P_PLE_DIM, P_PLE_NORM, P_PLE_GATE,
    P_PLE_PROJ = P_PLE_GATE + 7,
    P_SCRATCH = P_PLE_PROJ + 7, P_SCRATCH_BYTES, P_FIELDS
};
enum { F_EPS, F_OFFSET, F_SCALE, F_SOFTCAP, F_LAYER_SCALAR, F_FIELDS };

#define PTR(type, i) ((type)(intptr_t)p[i])

/* floats of scratch decode_layer_rows needs a row (decode_plan.py allocates as much) */
static long long scratch_floats(int hidden, int H, int Hkv, int D, int width) {
    const int widest = hidden > width ? (hidden > H * D ? hidden : H * D) : (width > H * D ? width : H * D);
    return 2LL * hidden + 2LL * H * D + 2LL * Hkv * D + 2LL * width + widest / 16 + widest / 4 + 16;
}

/* rotate_quantize the input [M, K] of a projection (fields at f) and multiply it by `count` matrices into outs. */
VNNI static int project(const long long *p, int f, int count, const float *x, int M, int K, float *const *outs,
                        const int *N, uint8_t *xq, float *xs, int threads) {
    const int group = (int)p[f];
    rotate_quantize(x, M, K, group, PTR(const float *, f + 1), PTR(const float *, f + 2), xq, xs, 1);
    matrix w[3];
    for (int i = 0; i < count; i++) {
        const long long *m = p + f + 3 + 4 * i;
        w[i] = (matrix){(int)m[0], (const void *)(intptr_t)m[1], (const uint16_t *)(intptr_t)m[2],
                        (const void *)(intptr_t)m[3], outs[i], N[i]};
    }
    return gemm(xq, xs, M, K, group, w, count, threads);
}

VNNI static void store_kv(void *buffer, int dtype, const float *v, int n) {
    if (dtype == KV_F32) {
        memcpy(buffer, v, sizeof(float) * n);
        return;
    }
    uint16_t *out = buffer;
    for (int i = 0; i < n; i += 16) {
        const __m512 x = _mm512_loadu_ps(v + i);
        if (dtype == KV_F16) {
            _mm256_storeu_si256((__m256i *)(out + i), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
        } else { /* bf16, rounded to nearest even as PyTorch does */
            const __m512i bits = _mm512_castps_si512(x);
            const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
            const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
            _mm256_storeu_si256((__m256i *)(out + i), _mm512_cvtepi32_epi16(rounded));
        }
    }
}

/* x [D] (divided by `divisor` first, if any) -> its TurboQuant rotation in place: two rounds of signs and the
   normalised Walsh-Hadamard transform (turboquant.rotate, one block of D, a power of two); or back. */
VNNI static void rotate_vector(float *x, int D, const float *signs, const float *divisor) {
    for (int i = 0; i < D; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        if (divisor) v = _mm512_div_ps(v, _mm512_loadu_ps(divisor + i));
        _mm512_storeu_ps(x + i, _mm512_mul_ps(v, _mm512_loadu_ps(signs + i)));
    }
    fwht(x, D);
    for (int i = 0; i < D; i += 16)
        _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(signs + D + i)));
    fwht(x, D);
    const __m512 norm = _mm512_set1_ps(1.0f / (float)D); /* two normalised transforms: (1/sqrt(D))^2 */
    for (int i = 0; i < D; i += 16) _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), norm));
}

VNNI static void unrotate_vector(float *x, int D, const float *signs) {
    const float norm = 1.0f / sqrtf((float)D);
    fwht(x, D);
    for (int i = 0; i < D; i++) x[i] *= norm * signs[D + i];
    fwht(x, D);
    for (int i = 0; i < D; i++) x[i] *= norm * signs[i];
}

/* The TQ codec's encode (wren/kv/codecs.py) of one vector x [D] (times `channel` first, if any): rotate, the
   nearest centroid of each coordinate of the unit vector (the count of midpoints below it, as
   torch.bucketize), the codes packed per chunk of 64 as a little-endian bit stream, and the fp16 scale that
   fits the rotated vector to its centroids. */
VBMI static void encode_vector(const float *x, const float *channel, int D, const float *signs,
                               const codes_layout *L, const float *centroids, const float *midpoints, uint8_t *codes,
                               uint16_t *scale) {
    float xr[MAX_GROUP];
    for (int i = 0; i < D; i++) xr[i] = channel ? x[i] * channel[i] : x[i];
    rotate_vector(xr, D, signs, NULL);
    float sum = 0.0f;
    for (int i = 0; i < D; i++) sum += xr[i] * xr[i];
    const float norm = sum > 0.0f ? sqrtf(sum) : 1.0f;
    float dot = 0.0f, energy = 0.0f;
    for (int c = 0; c < L->chunks; c++) {
        const int bits = L->bits[c], run = L->table_of[c];
        const __m512 table = _mm512_loadu_ps(centroids + 16 * run);
        uint8_t chunk[64];
        for (int i = 0; i < 64; i += 16) {
            const __m512 r = _mm512_loadu_ps(xr + 64 * c + i), u = _mm512_div_ps(r, _mm512_set1_ps(norm));
            __m512i code = _mm512_setzero_si512();
            for (int m = 0; m < (1 << bits) - 1; m++)
                code = _mm512_mask_add_epi32(code, _mm512_cmp_ps_mask(u, _mm512_set1_ps(midpoints[16 * run + m]), _CMP_GT_OQ),
                                             code, _mm512_set1_epi32(1));
            const __m512 value = _mm512_permutexvar_ps(code, table);
            dot += _mm512_reduce_add_ps(_mm512_mul_ps(r, value));
            energy += _mm512_reduce_add_ps(_mm512_mul_ps(value, value));
            _mm_storeu_si128((__m128i *)(chunk + i), _mm512_cvtepi32_epi8(code));
        }
        uint8_t *out = codes + L->offset[c];
        memset(out, 0, (size_t)8 * bits);
        for (int i = 0; i < 64; i++) {
            const int at = i * bits;
            out[at >> 3] |= (uint8_t)(chunk[i] << (at & 7));
            if ((at & 7) + bits > 8) out[(at >> 3) + 1] |= (uint8_t)(chunk[i] >> (8 - (at & 7)));
        }
    }
    float fit = dot / (energy > 1e-12f ? energy : 1e-12f);
    fit = fit > 65504.0f ? 65504.0f : fit < -65504.0f ? -65504.0f : fit;
    *scale = _cvtss_sh(fit, _MM_FROUND_TO_NEAREST_INT);
}

/* Rows of x [N, D] rotated (or, inverse, rotated back) in place, rows in parallel: turboquant.rotate for a
   Hadamard rotation of one block of D (a power of two from 16 to 4096); divisor [D] (or NULL) first. */
VNNI static void rotate_rows(float *x, long long N, int D, const float *signs, const float *divisor, int inverse,
                             int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (N >= 8)
    for (long long n = 0; n < N; n++) {
        if (inverse)
            unrotate_vector(x + (size_t)n * D, D, signs);
        else
            rotate_vector(x + (size_t)n * D, D, signs, divisor);
    }
}

/* bf16 bits of a positive float, rounded to nearest, then up by one step if that fell below it. */
static uint16_t bf16_at_least(float v) {
    uint32_t bits;
    memcpy(&bits, &v, 4);
    uint16_t r = (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
    return bf16_to_float(r) < v ? r + 1 : r;
}

/* Rows of a GGUF matrix [N, row bytes] as the int8 levels [N, K] and bf16 row scales [N] that quant/levels.py's
   to_levels makes of its dequantized rows, bit for bit: rotated per group (signs [2, group]), rounded to 255
   levels of the row's largest value on a bf16 step rounded up (cpu_kernels.round_to_levels). Prefill of
   blocks read in place (quant/blocks.py) multiplies these, made anew for each call: a few ms a matrix. */
BLOCKS static int gguf_to_levels(int type, const uint8_t *data, long long N, int K, int group, const float *signs,
                                 int8_t *levels, uint16_t *scales, int threads) {
    const size_t row_bytes = gguf_row_bytes(type, K);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *row = malloc(sizeof(float) * (size_t)K);
        if (!row) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (long long n = 0; n < N; n++) {
            if (!row) continue;
            dequantize_row_of(type, data + (size_t)n * row_bytes, K, row);
            __m512 top = _mm512_setzero_ps();
            for (int g = 0; g < K; g += group) rotate_vector(row + g, group, signs, NULL);
            for (int i = 0; i < K; i += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(row + i)));
            const float step = _mm512_reduce_max_ps(top) / 127.0f;
            const uint16_t bf16 = bf16_at_least(step > 1e-30f ? step : 1e-30f);
            const __m512 s = _mm512_set1_ps(bf16_to_float(bf16));
            for (int i = 0; i < K; i += 16) {
                __m512i q = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(row + i), s)); /* nearest even */
                q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
                _mm_storeu_si128((__m128i *)(levels + (size_t)n * K + i), _mm512_cvtepi32_epi8(q));
            }
            scales[n] = bf16;
        }
        free(row);
    }
    return failed ? -1 : 0;
}

/* The TQ codec's encode of x [N, D] (times `channel`, if any): codes [N, layout bytes], fp16 scales [N]. */
VNNI static void encode_rows(const float *x, long long N, int D, const float *channel, const float *signs,
                             const codes_layout *L, const float *centroids, const float *midpoints, uint8_t *codes,
                             uint16_t *scales, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (N >= 8)
    for (long long n = 0; n < N; n++)
        encode_vector(x + (size_t)n * D, channel, D, signs, L, centroids, midpoints, codes + (size_t)n * L->group_bytes,
                      scales + n);
}

/* The centroids of codes [N, layout bytes] (a TurboQuant cache's vectors in their rotated frame, unscaled):
   out [N, D] float32. */
VNNI static void decode_rows(const uint8_t *codes, long long N, int D, const codes_layout *L, const float *centroids,
                             float *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (N >= 64)
    for (long long n = 0; n < N; n++)
        decode_vector(codes + (size_t)n * L->group_bytes, L, centroids, 0x3C00 /* fp16 1.0 */, out + (size_t)n * D);
}

/* Write the new token's key and value into a TurboQuant cache (slot `slot`), rotate the queries into the
   keys' frame; after attend_one, decode_layer rotates the output out of the values'. */
VNNI static void store_codes(const long long *p, int Hkv, int D, long long slot, const float *k, const float *v) {
    for (int kh = 0; kh < Hkv; kh++) {
        const size_t scale_at = (size_t)kh * p[P_SCALE_HEAD_STRIDE] + (size_t)slot;
        encode_vector(k + (size_t)kh * D, PTR(const float *, P_KEY_CHANNEL_SCALE), D, PTR(const float *, P_KV_SIGNS),
                      PTR(const codes_layout *, P_KEY_LAYOUT), PTR(const float *, P_KEY_CENTROIDS),
                      PTR(const float *, P_KEY_MIDPOINTS),
                      PTR(uint8_t *, P_KEYS) + (size_t)kh * p[P_HEAD_STRIDE] + (size_t)slot * p[P_SLOT_STRIDE],
                      PTR(uint16_t *, P_KEY_SCALES) + scale_at);
        encode_vector(v + (size_t)kh * D, NULL, D, PTR(const float *, P_KV_SIGNS), PTR(const codes_layout *, P_VALUE_LAYOUT),
                      PTR(const float *, P_VALUE_CENTROIDS), PTR(const float *, P_VALUE_MIDPOINTS),
                      PTR(uint8_t *, P_VALUES) + (size_t)kh * p[P_VALUE_HEAD_STRIDE] + (size_t)slot * p[P_VALUE_SLOT_STRIDE],
                      PTR(uint16_t *, P_VALUE_SCALES) + scale_at);
    }
}

/* Row r's new key and value written into its cache (its plan pr) at its position's slot. */
VNNI static void store_row(const long long *pr, int Hkv, int D, long long position, const float *k, const float *v) {
    const int dtype = (int)pr[P_KV_DTYPE], slots = (int)pr[P_SLOTS];
    const long long slot = pr[P_RING] ? position % slots : position;
    const long long *p = pr; /* (PTR reads p) */
    if (dtype == KV_CODES) {
        store_codes(p, Hkv, D, slot, k, v);
    } else {
        const size_t es = elem_size(dtype);
        for (int kh = 0; kh < Hkv; kh++) {
            const size_t at = ((size_t)kh * p[P_HEAD_STRIDE] + (size_t)slot * p[P_SLOT_STRIDE]) * es;
            store_kv(PTR(char *, P_KEYS) + at, dtype, k + (size_t)kh * D, D);
            store_kv(PTR(char *, P_VALUES) + at, dtype, v + (size_t)kh * D, D);
        }
    }
    PTR(int64_t *, P_SLOT_POS)[slot] = position;
}

/* Row r's queries q [H, D] (rotated in place for a TurboQuant cache) attended over its cache (its plan pr) at
   its position into attn [H, D]: with store_row, the part of a layer that each row does on its own. */
VNNI static int attend_row(const long long *pr, const double *f, int H, int Hkv, int D, long long position, float *q,
                           float *attn, int threads) {
    const int dtype = (int)pr[P_KV_DTYPE], slots = (int)pr[P_SLOTS], ring = (int)pr[P_RING];
    const long long *p = pr; /* (PTR reads p) */
    if (dtype == KV_CODES)
        for (int h = 0; h < H; h++)
            rotate_vector(q + (size_t)h * D, D, PTR(const float *, P_KV_SIGNS), PTR(const float *, P_KEY_CHANNEL_SCALE));
    const attention_args a = {q, PTR(const void *, P_KEYS), PTR(const void *, P_VALUES), dtype, H, Hkv, D,
                              ring ? slots : (int)position + 1, p[P_HEAD_STRIDE], p[P_SLOT_STRIDE],
                              PTR(const int64_t *, P_SLOT_POS), NULL, position, p[P_WINDOW], (float)f[F_SCALE],
                              (float)f[F_SOFTCAP], p[P_VALUE_HEAD_STRIDE], p[P_VALUE_SLOT_STRIDE],
                              PTR(const uint16_t *, P_KEY_SCALES), PTR(const uint16_t *, P_VALUE_SCALES),
                              p[P_SCALE_HEAD_STRIDE], PTR(const codes_layout *, P_KEY_LAYOUT),
                              PTR(const codes_layout *, P_VALUE_LAYOUT), PTR(const float *, P_KEY_CENTROIDS),
                              PTR(const float *, P_VALUE_CENTROIDS)};
    if (attend_one(&a, attn, threads) < 0) return -1;
    if (dtype == KV_CODES)
        for (int h = 0; h < H; h++) unrotate_vector(attn + (size_t)h * D, D, PTR(const float *, P_KV_SIGNS));
    return 0;
}

/* One layer for R rows of one new token each (R = 1: batch-1 decode; more: the server's rows decoded in one
   step, or, in_order, consecutive tokens of one sequence: a prompt's chunk). plans[r] is row r's plan: the same
   weights in every one (plans[0]'s are read), each its own cache (in_order: one cache); x [R, hidden] is
   updated in place, cos and sin are [R, head_dim], positions [R]. The matmuls read each weight once for all
   rows; each row writes its key and value and attends over its cache. scratch: R times scratch_floats. */
VNNI static int decode_layer_rows(const long long *const *plans, int R, const double *f, float *x, const float *cos,
                                  const float *sin, const long long *positions, float *scratch, int in_order,
                                  int threads) {
    const long long *p = plans[0];
    const int hidden = (int)p[P_HIDDEN], H = (int)p[P_HEADS], Hkv = (int)p[P_KV_HEADS], D = (int)p[P_HEAD_DIM];
    const int width = (int)p[P_WIDTH];
    const float eps = (float)f[F_EPS], offset = (float)f[F_OFFSET];
    float *h = scratch, *q = h + (size_t)R * hidden, *k = q + (size_t)R * H * D, *v = k + (size_t)R * Hkv * D;
    float *attn = v + (size_t)R * Hkv * D, *o = attn + (size_t)R * H * D, *gate = o + (size_t)R * hidden;
    float *up = gate + (size_t)R * width;
    const int widest = hidden > width ? (hidden > H * D ? hidden : H * D) : (width > H * D ? width : H * D);
    float *xs = up + (size_t)R * width;                    /* the widest input's group scales (groups of 16 or more) */
    uint8_t *xq = (uint8_t *)(xs + (size_t)R * widest / 16); /* and its int8 values */

    rms_norm(x, R, hidden, PTR(const float *, P_INPUT_NORM), offset, eps, NULL, NULL, 1, NULL, h, 1);
    float *qkv[3] = {q, k, v};
    const int qkv_n[3] = {H * D, Hkv * D, Hkv * D};
    const int owns_kv = p[P_QKV_COUNT] > 1; /* else K/V come from an earlier layer's cache, already written */
    if (project(p, P_QKV, (int)p[P_QKV_COUNT], h, R, hidden, qkv, qkv_n, xq, xs, threads) < 0) return -1;
    rms_norm(q, R * H, D, PTR(const float *, P_Q_NORM), offset, eps, cos, sin, H, NULL, q, 1);
    if (owns_kv) {
        if (p[P_V_FROM_K]) memcpy(v, k, sizeof(float) * R * Hkv * D); /* K=V: the key's projection, before its norm */
        if (p[P_V_NORM]) rms_norm(v, R * Hkv, D, NULL, 0.0f, eps, NULL, NULL, Hkv, NULL, v, 1);
        rms_norm(k, R * Hkv, D, PTR(const float *, P_K_NORM), offset, eps, cos, sin, Hkv, NULL, k, 1);
    }
    /* Each row writes its key and value, then attends. Rows of distinct caches, and a sequence's tokens
       where no slot one writes holds a position another still sees (a full layer, or a ring the chunk does
       not wrap), all write first, then attend in parallel once there are enough of them (round robin: a
       chunk's later tokens see more); else each row's attention splits its slots. A chunk that wraps its
       ring goes in order, each token written just before it attends: a position is dropped only when no
       later token needs it. (Plain branches, not an OpenMP `if`: a region inside an inactive one gets a new
       team of threads each time.) */
    const int wraps = in_order && p[P_RING] && positions[R - 1] >= p[P_SLOTS];
    int failed = 0;
#define ATTEND_ROW(r, inner) attend_row(plans[r], f, H, Hkv, D, positions[r], q + (size_t)(r) * H * D, \
                                        attn + (size_t)(r) * H * D, inner)
#define STORE_ROW(r) store_row(plans[r], Hkv, D, positions[r], k + (size_t)(r) * Hkv * D, v + (size_t)(r) * Hkv * D)
    if (wraps) {
        for (int r = 0; r < R; r++) {
            if (owns_kv) STORE_ROW(r);
            if (ATTEND_ROW(r, threads) < 0) failed = 1;
        }
    } else {
        if (owns_kv)
            for (int r = 0; r < R; r++) STORE_ROW(r);
        if (R > 1 && R >= threads) {
#pragma omp parallel for schedule(static, 1) num_threads(threads)
            for (int r = 0; r < R; r++)
                if (ATTEND_ROW(r, 1) < 0) failed = 1; /* (any thread's write of 1 will do) */
        } else {
            for (int r = 0; r < R; r++)
                if (ATTEND_ROW(r, threads) < 0) failed = 1;
        }
    }
#undef ATTEND_ROW
#undef STORE_ROW
    if (failed) return -1;

    float *o_out[1] = {o};
    const int o_n[1] = {hidden};
    if (project(p, P_O, 1, attn, R, H * D, o_out, o_n, xq, xs, threads) < 0) return -1;
    rms_norm(o, R, hidden, PTR(const float *, P_POST_ATTENTION_NORM), offset, eps, NULL, NULL, 1, x, x, 1);
    rms_norm(x, R, hidden, PTR(const float *, P_PRE_FEEDFORWARD_NORM), offset, eps, NULL, NULL, 1, NULL, h, 1);
    float *gate_up[2] = {gate, up};
    const int gate_up_n[2] = {width, width};
    if (project(p, P_GATE_UP, 2, h, R, hidden, gate_up, gate_up_n, xq, xs, threads) < 0) return -1;
    gelu_mul(gate, up, gate, (long long)R * width);
    if (project(p, P_DOWN, 1, gate, R, width, o_out, o_n, xq, xs, threads) < 0) return -1;
    rms_norm(o, R, hidden, PTR(const float *, P_POST_FEEDFORWARD_NORM), offset, eps, NULL, NULL, 1, x, x, 1);
    const int ple_dim = (int)p[P_PLE_DIM];
    if (ple_dim) { /* x += norm(projection(gelu(gate(x)) * this layer's input)) */
        float *ple_out[1] = {gate};
        const int ple_n[1] = {ple_dim};
        if (project(p, P_PLE_GATE, 1, x, R, hidden, ple_out, ple_n, xq, xs, threads) < 0) return -1;
        for (int r = 0; r < R; r++) /* each row's own input, in its own plan */
            gelu_mul(gate + (size_t)r * ple_dim, (const float *)(intptr_t)plans[r][P_PLE_INPUT],
                     gate + (size_t)r * ple_dim, ple_dim);
        if (project(p, P_PLE_PROJ, 1, gate, R, ple_dim, o_out, o_n, xq, xs, threads) < 0) return -1;
        rms_norm(o, R, hidden, PTR(const float *, P_PLE_NORM), offset, eps, NULL, NULL, 1, x, x, 1);
    }
    const float scalar = (float)f[F_LAYER_SCALAR];
    if (scalar != 1.0f)
        for (size_t i = 0; i < (size_t)R * hidden; i++) x[i] *= scalar;
    return 0;
}
#endif

static int cpu_supported(void) {
#ifdef WREN_AVX2
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
           __builtin_cpu_supports("bmi2");
#elif defined(WREN_X86)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

static int codes_supported(void) {
#ifdef WREN_AVX2
    return cpu_supported();
#elif defined(WREN_X86)
    return cpu_supported() && __builtin_cpu_supports("avx512vbmi");
#else
    return 0;
#endif
}


/* --- Python bindings: addresses and sizes as ints; the caller (native.py) checks shapes and dtypes. --- */

static int blocks_supported(void) {
#ifdef WREN_AVX2
    return cpu_supported();
#elif defined(WREN_X86)
    return cpu_supported() && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

static int need_vnni(void) {
    if (cpu_supported()) return 0;
    PyErr_SetString(PyExc_RuntimeError, "this CPU has no AVX-512 VNNI");
    return -1;
}

static int need_vbmi(void) {
    if (codes_supported()) return 0;
    PyErr_SetString(PyExc_RuntimeError, "this CPU has no AVX-512 VBMI");
    return -1;
}

#ifdef WREN_X86
/* The codes layout at `address`, if it reads vectors of D; else NULL with the error set. */
static const codes_layout *layout_for(long long address, long long D) {
    const codes_layout *L = (const codes_layout *)(intptr_t)address;
    if (L && D >= 64 && D <= MAX_GROUP && L->chunks * 64 == D) return L;
    PyErr_SetString(PyExc_ValueError, "vectors must be a multiple of 64 up to 4096 wide, as their codes' layout");
    return NULL;
}
#endif

static int as_ints(PyObject *const *args, Py_ssize_t n, Py_ssize_t want, long long *out) {
    if (n != want) {
        PyErr_Format(PyExc_TypeError, "expected %zd arguments, got %zd", want, n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = PyLong_AsLongLong(args[i]);
        if (out[i] == -1 && PyErr_Occurred()) return -1;
    }
    return 0;
}

/* `ints` integer arguments into out, then `floats` float ones into f: the bindings that take floats. */
static int ints_then_floats(PyObject *const *args, Py_ssize_t n, Py_ssize_t ints, long long *out, Py_ssize_t floats,
                            double *f) {
    if (n != ints + floats) {
        PyErr_Format(PyExc_TypeError, "expected %zd arguments, got %zd", ints + floats, n);
        return -1;
    }
    if (as_ints(args, ints, ints, out) < 0) return -1;
    for (Py_ssize_t i = 0; i < floats; i++) {
        f[i] = PyFloat_AsDouble(args[ints + i]);
        if (f[i] == -1.0 && PyErr_Occurred()) return -1;
    }
    return 0;
}

static PyObject *py_rotate_quantize(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[9];
    if (as_ints(args, n, 9, a) < 0) return NULL;
    /* x, M, K, group, in_scale (0: none), signs, xq, xs, threads */
    if (need_vnni() < 0) return NULL;
    if (a[3] < 16 || a[3] > MAX_GROUP || a[2] % a[3] || (a[3] & (a[3] - 1))) {
        PyErr_SetString(PyExc_ValueError, "group must be a power of two from 16 to 4096 that divides K");
        return NULL;
    }
#ifdef WREN_X86
    Py_BEGIN_ALLOW_THREADS
    rotate_quantize((const float *)(intptr_t)a[0], (int)a[1], (int)a[2], (int)a[3], (const float *)(intptr_t)a[4],
                    (const float *)(intptr_t)a[5], (uint8_t *)(intptr_t)a[6], (float *)(intptr_t)a[7],
                    a[8] > 0 ? (int)a[8] : 1);
    Py_END_ALLOW_THREADS
#endif
    Py_RETURN_NONE;
}

static PyObject *py_group_sums(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[6];
    if (as_ints(args, n, 6, a) < 0) return NULL;
    /* levels, N, K, group, sums, threads */
    if (a[3] < 1 || a[2] % a[3]) {
        PyErr_SetString(PyExc_ValueError, "group must divide K");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    group_sums((const int8_t *)(intptr_t)a[0], (int)a[1], (int)a[2], (int)a[3], (float *)(intptr_t)a[4],
               a[5] > 0 ? (int)a[5] : 1);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_gemm(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[7 + 6 * MAX_MATRICES];
    /* xq, xs, M, K, group, threads, count, then per matrix: format, data, scale, extra, y, N */
    if (n < 13 || (n - 7) % 6 || (n - 7) / 6 > MAX_MATRICES) {
        PyErr_SetString(PyExc_TypeError, "gemm takes 7 arguments and 6 per matrix, 1 to 8 matrices");
        return NULL;
    }
    if (as_ints(args, n, n, a) < 0) return NULL;
    if (need_vnni() < 0) return NULL;
    const int gguf = a[6] == (n - 7) / 6 && a[7] >= GGUF_BASE; /* the first matrix's format */
    if (gguf ? a[4] != BLOCK_INPUT || a[3] % BLOCK_INPUT
             : a[4] < 64 || a[4] % 64 || a[4] > MAX_GROUP || a[3] % a[4] || a[6] != (n - 7) / 6) {
        PyErr_SetString(PyExc_ValueError, gguf ? "a GGUF matrix takes an input quantized per 32 (no rotation)"
                                               : "group must be a multiple of 64 up to 4096 that divides K");
        return NULL;
    }
#ifdef WREN_X86
    matrix w[MAX_MATRICES];
    for (int i = 0; i < (int)a[6]; i++) {
        const long long *m = a + 7 + 6 * i;
        const int type = (int)m[0] - GGUF_BASE;
        if (gguf != (m[0] >= GGUF_BASE) ||
            (gguf && (!blocks_supported() || !gguf_row_bytes(type, (int)a[3]) || a[3] % gguf_block_weights(type)))) {
            PyErr_SetString(PyExc_ValueError, "GGUF matrices mixed with others, or of a type or width not read here");
            return NULL;
        }
        if (!gguf && m[0] != LEVELS && (m[0] != CODES || !codes_supported() ||
                                        ((const codes_layout *)(intptr_t)m[3])->chunks != a[4] / 64)) {
            PyErr_SetString(PyExc_ValueError, "a matrix in a format this CPU does not read, or of another group");
            return NULL;
        }
        w[i] = (matrix){(int)m[0], (const void *)(intptr_t)m[1], (const uint16_t *)(intptr_t)m[2],
                        (const void *)(intptr_t)m[3], (float *)(intptr_t)m[4], (int)m[5]};
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = gemm((const uint8_t *)(intptr_t)a[0], (const float *)(intptr_t)a[1], (int)a[2], (int)a[3], (int)a[4], w,
              (int)a[6], a[5] > 0 ? (int)a[5] : 1);
    Py_END_ALLOW_THREADS
    if (rc < 0) return PyErr_NoMemory();
#endif
    Py_RETURN_NONE;
}

static PyObject *py_codes_layout(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[7];
    /* out (codes_layout_size() bytes), group, split, bits_hi, bits_lo, levels_hi (int8), levels_lo; step */
    double step;
    if (ints_then_floats(args, n, 7, a, 1, &step) < 0) return NULL;
#ifdef WREN_X86
    if (fill_codes_layout((codes_layout *)(intptr_t)a[0], (int)a[1], (int)a[2], (int)a[3], (int)a[4],
                          (const int8_t *)(intptr_t)a[5], (const int8_t *)(intptr_t)a[6], (float)step) == 0)
        Py_RETURN_TRUE;
#endif
    Py_RETURN_FALSE;
}

static PyObject *py_codes_layout_size(PyObject *self, PyObject *unused) {
#ifdef WREN_X86
    return PyLong_FromSize_t(sizeof(codes_layout));
#else
    return PyLong_FromLong(0);
#endif
}

static PyObject *py_codes_supported(PyObject *self, PyObject *unused) { return PyBool_FromLong(codes_supported()); }

#ifdef WREN_X86
static PyObject *run_attention(const attention_args *a, long long out, long long threads) {
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = attend_one(a, (float *)(intptr_t)out, threads > 0 ? (int)threads : 1);
    Py_END_ALLOW_THREADS
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}
#endif

static PyObject *py_attend_one(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[16];
    /* q, keys, values, dtype, H, Hkv, D, S, head_stride, slot_stride, slot_pos, slot_valid (0: none), qpos,
       window (0: none), out, threads; then scale and softcap (0: none) as floats */
    double f[2]; /* scale, softcap */
    if (ints_then_floats(args, n, 16, a, 2, f) < 0) return NULL;
    const double scale = f[0], softcap = f[1];
    if (need_vnni() < 0) return NULL;
    if (a[3] < KV_F32 || a[3] > KV_BF16 || a[4] < 1 || a[5] < 1 || a[4] % a[5] || a[6] < 16 || a[6] % 16 || a[7] < 0) {
        PyErr_SetString(PyExc_ValueError, "bad attention shapes (head_dim must be a multiple of 16)");
        return NULL;
    }
#ifdef WREN_X86
    attention_args args_ = {(const float *)(intptr_t)a[0], (const void *)(intptr_t)a[1], (const void *)(intptr_t)a[2],
                            (int)a[3], (int)a[4], (int)a[5], (int)a[6], (int)a[7], a[8], a[9],
                            (const int64_t *)(intptr_t)a[10], (const uint8_t *)(intptr_t)a[11], a[12], a[13],
                            (float)scale, (float)softcap, a[8], a[9]};
    return run_attention(&args_, a[14], a[15]);
#else
    Py_RETURN_NONE;
#endif
}

static PyObject *py_attend_codes(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[24];
    /* q (rotated into the keys' frame), keys, values (codes), H, Hkv, D, S, key head and slot strides, value
       head and slot strides (bytes), key scales, value scales (fp16), scale head stride, key layout, value
       layout, key centroids, value centroids, slot_pos, slot_valid (0: none), qpos, window (0: none), out (in
       the values' frame), threads; then scale and softcap (0: none) as floats */
    double f[2];
    if (ints_then_floats(args, n, 24, a, 2, f) < 0 || need_vbmi() < 0) return NULL;
#ifdef WREN_X86
    const codes_layout *kl = layout_for(a[14], a[5]), *vl = kl ? layout_for(a[15], a[5]) : NULL;
    if (!vl) return NULL;
    if (a[3] < 1 || a[4] < 1 || a[3] % a[4] || a[6] < 0) {
        PyErr_SetString(PyExc_ValueError, "bad attention shapes");
        return NULL;
    }
    attention_args args_ = {(const float *)(intptr_t)a[0], (const void *)(intptr_t)a[1], (const void *)(intptr_t)a[2],
                            KV_CODES, (int)a[3], (int)a[4], (int)a[5], (int)a[6], a[7], a[8],
                            (const int64_t *)(intptr_t)a[18], (const uint8_t *)(intptr_t)a[19], a[20], a[21],
                            (float)f[0], (float)f[1], a[9], a[10], (const uint16_t *)(intptr_t)a[11],
                            (const uint16_t *)(intptr_t)a[12], a[13], kl, vl, (const float *)(intptr_t)a[16],
                            (const float *)(intptr_t)a[17]};
    return run_attention(&args_, a[22], a[23]);
#else
    Py_RETURN_NONE;
#endif
}

static PyObject *py_rotate_rows(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[7];
    /* x (float32 [N, D], in place), N, D, signs [2, D], divisor (0: none), inverse, threads */
    if (as_ints(args, n, 7, a) < 0) return NULL;
    if (need_vnni() < 0) return NULL;
    if (a[2] < 16 || a[2] > MAX_GROUP || (a[2] & (a[2] - 1)) || a[1] < 0) {
        PyErr_SetString(PyExc_ValueError, "D must be a power of two from 16 to 4096");
        return NULL;
    }
#ifdef WREN_X86
    Py_BEGIN_ALLOW_THREADS
    rotate_rows((float *)(intptr_t)a[0], a[1], (int)a[2], (const float *)(intptr_t)a[3], (const float *)(intptr_t)a[4],
                (int)a[5], a[6] > 0 ? (int)a[6] : 1);
    Py_END_ALLOW_THREADS
#endif
    Py_RETURN_NONE;
}

static PyObject *py_encode_rows(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[11];
    /* x (float32 [N, D]), N, D, channel (0: none), signs [2, D], layout, centroids, midpoints, codes, scales,
       threads */
    if (as_ints(args, n, 11, a) < 0 || need_vbmi() < 0) return NULL;
#ifdef WREN_X86
    const codes_layout *L = layout_for(a[5], a[2]);
    if (!L) return NULL;
    if ((a[2] & (a[2] - 1)) || a[1] < 0) { /* the rotation is one Walsh-Hadamard block */
        PyErr_SetString(PyExc_ValueError, "D must be a power of two");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    encode_rows((const float *)(intptr_t)a[0], a[1], (int)a[2], (const float *)(intptr_t)a[3],
                (const float *)(intptr_t)a[4], L, (const float *)(intptr_t)a[6], (const float *)(intptr_t)a[7],
                (uint8_t *)(intptr_t)a[8], (uint16_t *)(intptr_t)a[9], a[10] > 0 ? (int)a[10] : 1);
    Py_END_ALLOW_THREADS
#endif
    Py_RETURN_NONE;
}

static PyObject *py_decode_rows(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[7];
    /* codes [N, bytes], N, D, layout, centroids, out (float32 [N, D]), threads */
    if (as_ints(args, n, 7, a) < 0 || need_vbmi() < 0) return NULL;
#ifdef WREN_X86
    const codes_layout *L = layout_for(a[3], a[2]);
    if (!L) return NULL;
    if (a[1] < 0) {
        PyErr_SetString(PyExc_ValueError, "N must not be negative");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    decode_rows((const uint8_t *)(intptr_t)a[0], a[1], (int)a[2], L, (const float *)(intptr_t)a[4],
                (float *)(intptr_t)a[5], a[6] > 0 ? (int)a[6] : 1);
    Py_END_ALLOW_THREADS
#endif
    Py_RETURN_NONE;
}

static PyObject *py_rms_norm(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[11];
    /* x, rows, dim, weight (0: none), cos (0: none), sin, heads, residual (0: none), out, threads; offset, eps */
    double f[2]; /* offset, eps */
    if (ints_then_floats(args, n, 10, a, 2, f) < 0) return NULL;
    const double offset = f[0], eps = f[1];
    if (a[2] < 1 || a[2] > MAX_GROUP || (a[4] && (a[2] % 2 || a[6] < 1))) {
        PyErr_SetString(PyExc_ValueError, "bad norm shapes (dim up to 4096, even with RoPE)");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rms_norm((const float *)(intptr_t)a[0], (int)a[1], (int)a[2], (const float *)(intptr_t)a[3], (float)offset,
             (float)eps, (const float *)(intptr_t)a[4], (const float *)(intptr_t)a[5], (int)a[6],
             (const float *)(intptr_t)a[7], (float *)(intptr_t)a[8], a[9] > 0 ? (int)a[9] : 1);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

#ifdef WREN_X86
/* 0 if decode_layer_rows can run plan p (with scratch_bytes of scratch for `rows` rows), else -1 with the error set */
static int check_plan(const long long *p, long long scratch_bytes, int rows) {
    if (p[P_HIDDEN] > MAX_GROUP || p[P_HEAD_DIM] > MAX_GROUP) {
        PyErr_SetString(PyExc_ValueError, "decode_layer takes hidden and head_dim up to 4096");
        return -1;
    }
    if (p[P_KV_DTYPE] == KV_CODES &&
        (!codes_supported() || p[P_HEAD_DIM] % 64 || PTR(const codes_layout *, P_KEY_LAYOUT)->chunks * 64 != p[P_HEAD_DIM] ||
         PTR(const codes_layout *, P_VALUE_LAYOUT)->chunks * 64 != p[P_HEAD_DIM])) {
        PyErr_SetString(PyExc_ValueError, "the decode plan's TurboQuant cache does not fit its head_dim or this CPU");
        return -1;
    }
    if (p[P_QKV_COUNT] < 1 || p[P_QKV_COUNT] > 3 || p[P_PLE_DIM] < 0 || p[P_PLE_DIM] > p[P_WIDTH]) {
        PyErr_SetString(PyExc_ValueError, "the decode plan projects 1 to 3 of q, k, v, and a per-layer input no wider "
                                          "than its MLP");
        return -1;
    }
    if (scratch_bytes < 4LL * rows * scratch_floats((int)p[P_HIDDEN], (int)p[P_HEADS], (int)p[P_KV_HEADS],
                                                     (int)p[P_HEAD_DIM], (int)p[P_WIDTH]) || p[P_HEAD_DIM] % 16) {
        PyErr_SetString(PyExc_ValueError, "the decode plan's scratch is too small or its head_dim not a multiple of 16");
        return -1;
    }
    return 0;
}
#endif

static PyObject *py_decode_layer(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[7];
    /* plan (int64 [P_FIELDS]), floats (float64 [F_FIELDS]), x, cos, sin, position, threads */
    if (as_ints(args, n, 7, a) < 0) return NULL;
    if (need_vnni() < 0) return NULL;
#ifdef WREN_X86
    const long long *p = (const long long *)(intptr_t)a[0];
    if (check_plan(p, p[P_SCRATCH_BYTES], 1) < 0) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = decode_layer_rows(&p, 1, (const double *)(intptr_t)a[1], (float *)(intptr_t)a[2],
                           (const float *)(intptr_t)a[3], (const float *)(intptr_t)a[4], &a[5], PTR(float *, P_SCRATCH),
                           0, a[6] > 0 ? (int)a[6] : 1);
    Py_END_ALLOW_THREADS
    if (rc < 0) return PyErr_NoMemory();
#endif
    Py_RETURN_NONE;
}

static PyObject *py_decode_layer_rows(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[11];
    /* plans (int64 [rows] of plan addresses), rows, floats, x [rows, hidden], cos, sin [rows, head_dim],
       positions (int64 [rows]), scratch, scratch bytes, in_order (rows are one sequence's tokens), threads */
    if (as_ints(args, n, 11, a) < 0) return NULL;
    if (need_vnni() < 0) return NULL;
#ifdef WREN_X86
    const long long *const *plans = (const long long *const *)(intptr_t)a[0];
    const int rows = (int)a[1];
    if (rows < 1) {
        PyErr_SetString(PyExc_ValueError, "decode_layer_rows takes one row or more");
        return NULL;
    }
    for (int r = 0; r < rows; r++) {
        const long long *p = plans[r];
        if (check_plan(p, a[8], rows) < 0) return NULL;
        for (int i = P_HIDDEN; i <= P_WIDTH; i++)
            if (p[i] != plans[0][i]) {
                PyErr_SetString(PyExc_ValueError, "decode_layer_rows takes plans of one model's layer");
                return NULL;
            }
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = decode_layer_rows(plans, rows, (const double *)(intptr_t)a[2], (float *)(intptr_t)a[3],
                           (const float *)(intptr_t)a[4], (const float *)(intptr_t)a[5],
                           (const long long *)(intptr_t)a[6], (float *)(intptr_t)a[7], a[9] != 0,
                           a[10] > 0 ? (int)a[10] : 1);
    Py_END_ALLOW_THREADS
    if (rc < 0) return PyErr_NoMemory();
#endif
    Py_RETURN_NONE;
}

static PyObject *py_plan_layout(PyObject *self, PyObject *unused) {
    /* the field indices decode_plan.py fills, so that the two never drift apart */
    static const struct {
        const char *name;
        int index;
    } fields[] = {
        {"hidden", P_HIDDEN},
        {"heads", P_HEADS},
        {"kv_heads", P_KV_HEADS},
        {"head_dim", P_HEAD_DIM},
        {"width", P_WIDTH},
        {"window", P_WINDOW},
        {"slots", P_SLOTS},
        {"ring", P_RING},
        {"kv_dtype", P_KV_DTYPE},
        {"keys", P_KEYS},
        {"values", P_VALUES},
        {"head_stride", P_HEAD_STRIDE},
        {"slot_stride", P_SLOT_STRIDE},
        {"slot_pos", P_SLOT_POS},
        {"value_head_stride", P_VALUE_HEAD_STRIDE},
        {"value_slot_stride", P_VALUE_SLOT_STRIDE},
        {"key_scales", P_KEY_SCALES},
        {"value_scales", P_VALUE_SCALES},
        {"scale_head_stride", P_SCALE_HEAD_STRIDE},
        {"key_channel_scale", P_KEY_CHANNEL_SCALE},
        {"kv_signs", P_KV_SIGNS},
        {"key_layout", P_KEY_LAYOUT},
        {"key_centroids", P_KEY_CENTROIDS},
        {"key_midpoints", P_KEY_MIDPOINTS},
        {"value_layout", P_VALUE_LAYOUT},
        {"value_centroids", P_VALUE_CENTROIDS},
        {"value_midpoints", P_VALUE_MIDPOINTS},
        {"input_norm", P_INPUT_NORM},
        {"post_attention_norm", P_POST_ATTENTION_NORM},
        {"pre_feedforward_norm", P_PRE_FEEDFORWARD_NORM},
        {"post_feedforward_norm", P_POST_FEEDFORWARD_NORM},
        {"q_norm", P_Q_NORM},
        {"k_norm", P_K_NORM},
        {"qkv", P_QKV},
        {"o", P_O},
        {"gate_up", P_GATE_UP},
        {"down", P_DOWN},
        {"qkv_count", P_QKV_COUNT},
        {"v_from_k", P_V_FROM_K},
        {"v_norm", P_V_NORM},
        {"ple_input", P_PLE_INPUT},
        {"ple_dim", P_PLE_DIM},
        {"ple_norm", P_PLE_NORM},
        {"ple_gate", P_PLE_GATE},
        {"ple_proj", P_PLE_PROJ},
        {"scratch", P_SCRATCH},
        {"scratch_bytes", P_SCRATCH_BYTES},
        {"fields", P_FIELDS},
        {"eps", F_EPS},
        {"offset", F_OFFSET},
        {"scale", F_SCALE},
        {"softcap", F_SOFTCAP},
        {"layer_scalar", F_LAYER_SCALAR},
        {"float_fields", F_FIELDS}};
    PyObject *layout = PyDict_New();
    for (size_t i = 0; layout && i < sizeof fields / sizeof fields[0]; i++) {
        PyObject *value = PyLong_FromLong(fields[i].index);
        if (!value || PyDict_SetItemString(layout, fields[i].name, value) < 0) Py_CLEAR(layout);
        Py_XDECREF(value);
    }
    return layout;
}

static PyObject *py_scratch_floats(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[5];
    if (as_ints(args, n, 5, a) < 0) return NULL;
#ifdef WREN_X86
    return PyLong_FromLongLong(scratch_floats((int)a[0], (int)a[1], (int)a[2], (int)a[3], (int)a[4]));
#else
    Py_RETURN_NONE;
#endif
}

static PyObject *py_gelu_mul(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[4];
    if (as_ints(args, n, 4, a) < 0) return NULL; /* gate, up, out, n */
    Py_BEGIN_ALLOW_THREADS
    gelu_mul((const float *)(intptr_t)a[0], (const float *)(intptr_t)a[1], (float *)(intptr_t)a[2], a[3]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_top_k(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[6];
    /* x (float32), n, k, values (float32 [k]), ids (int64 [k]), threads */
    if (as_ints(args, n, 6, a) < 0) return NULL;
    if (need_vnni() < 0) return NULL;
    if (a[2] < 1 || a[2] > a[1]) {
        PyErr_SetString(PyExc_ValueError, "top_k takes 1 <= k <= n");
        return NULL;
    }
#ifdef WREN_X86
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = top_k_floats((const float *)(intptr_t)a[0], a[1], (int)a[2], (float *)(intptr_t)a[3],
                      (int64_t *)(intptr_t)a[4], a[5] > 0 ? (int)a[5] : 1);
    Py_END_ALLOW_THREADS
    if (rc < 0) return PyErr_NoMemory();
    return PyBool_FromLong(rc == 0);
#endif
    Py_RETURN_FALSE;
}

static PyObject *py_sample_rows(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[11];
    /* logits (float32), rows, V, row stride, k (int64 [rows]), options (float64 [rows, S_FIELDS]), pen_at
       (int64 [rows + 1]), pen_ids, pen_counts (int64), out (int64 [rows]), threads */
    if (as_ints(args, n, 11, a) < 0) return NULL;
    if (need_vnni() < 0) return NULL;
#ifdef WREN_X86
    const int64_t *k = (const int64_t *)(intptr_t)a[4], *pen_at = (const int64_t *)(intptr_t)a[6];
    const int64_t *pen_ids = (const int64_t *)(intptr_t)a[7];
    for (long long r = 0; r < a[1]; r++) {
        int bad = k[r] < 1 || k[r] > a[2] || pen_at[r + 1] < pen_at[r];
        for (long long j = pen_at[r]; j < pen_at[r + 1] && !bad; j++) bad = pen_ids[j] < 0 || pen_ids[j] >= a[2];
        if (bad) {
            PyErr_SetString(PyExc_ValueError, "sample_rows takes 1 <= k <= V, ordered penalty offsets and ids in V");
            return NULL;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    sample_rows((const float *)(intptr_t)a[0], (int)a[1], a[2], a[3], k, (const double *)(intptr_t)a[5], pen_at,
                pen_ids, (const int64_t *)(intptr_t)a[8], (int64_t *)(intptr_t)a[9], a[10] > 0 ? (int)a[10] : 1);
    Py_END_ALLOW_THREADS
#endif
    Py_RETURN_NONE;
}

static PyObject *py_supported(PyObject *self, PyObject *unused) { return PyBool_FromLong(cpu_supported()); }

static PyObject *py_blocks_supported(PyObject *self, PyObject *unused) { return PyBool_FromLong(blocks_supported()); }

static PyObject *py_gguf_to_levels(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[9];
    if (as_ints(args, n, 9, a) < 0) return NULL; /* type, data, N, K, group, signs, levels, scales, threads */
    if (!blocks_supported()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU does not read GGUF blocks (AVX-512 VNNI, VL and F16C)");
        return NULL;
    }
#ifdef WREN_X86
    if (a[3] <= 0 || !gguf_row_bytes((int)a[0], (int)a[3]) || a[3] % gguf_block_weights((int)a[0]) || a[4] < 16 ||
        a[4] > MAX_GROUP || (a[4] & (a[4] - 1)) || a[3] % a[4]) {
        PyErr_SetString(PyExc_ValueError, "a GGUF type not read here, or a width its blocks or group do not divide");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = gguf_to_levels((int)a[0], (const uint8_t *)(intptr_t)a[1], a[2], (int)a[3], (int)a[4],
                        (const float *)(intptr_t)a[5], (int8_t *)(intptr_t)a[6], (uint16_t *)(intptr_t)a[7],
                        a[8] > 0 ? (int)a[8] : 1);
    Py_END_ALLOW_THREADS
    if (rc < 0) return PyErr_NoMemory();
#endif
    Py_RETURN_NONE;
}

static PyObject *py_gguf_dequantize(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[6];
    if (as_ints(args, n, 6, a) < 0) return NULL; /* type, data, N, K, out, threads */
    if (!blocks_supported()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU does not read GGUF blocks (AVX-512 VNNI, VL and F16C)");
        return NULL;
    }
#ifdef WREN_X86
    if (a[3] <= 0 || !gguf_row_bytes((int)a[0], (int)a[3]) || a[3] % gguf_block_weights((int)a[0])) {
        PyErr_SetString(PyExc_ValueError, "a GGUF type not read here, or a width its blocks do not divide");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    gguf_dequantize((int)a[0], (const uint8_t *)(intptr_t)a[1], a[2], (int)a[3], (float *)(intptr_t)a[4],
                    a[5] > 0 ? (int)a[5] : 1);
    Py_END_ALLOW_THREADS
#endif
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"rotate_quantize", (PyCFunction)(void (*)(void))py_rotate_quantize, METH_FASTCALL,
     "rotate_quantize(x, M, K, group, in_scale, signs, xq, xs, threads): addresses and sizes"},
    {"group_sums", (PyCFunction)(void (*)(void))py_group_sums, METH_FASTCALL,
     "group_sums(levels, N, K, group, sums, threads)"},
    {"gemm", (PyCFunction)(void (*)(void))py_gemm, METH_FASTCALL,
     "gemm(xq, xs, M, K, group, threads, count, then format, data, scale, extra, y, N per matrix)"},
    {"codes_layout", (PyCFunction)(void (*)(void))py_codes_layout, METH_FASTCALL,
     "codes_layout(out, group, split, bits_hi, bits_lo, levels_hi, levels_lo, step): False where gemm cannot read it"},
    {"codes_layout_size", py_codes_layout_size, METH_NOARGS, "bytes of a codes layout"},
    {"codes_supported", py_codes_supported, METH_NOARGS, "whether this CPU reads packed codes (AVX-512 VBMI)"},
    {"attend_one", (PyCFunction)(void (*)(void))py_attend_one, METH_FASTCALL,
     "attend_one(q, keys, values, dtype, H, Hkv, D, S, head_stride, slot_stride, slot_pos, slot_valid, qpos, "
     "window, out, threads, scale, softcap)"},
    {"attend_codes", (PyCFunction)(void (*)(void))py_attend_codes, METH_FASTCALL,
     "attend_codes(q, keys, values, H, Hkv, D, S, key strides, value strides, key scales, value scales, "
     "scale head stride, key layout, value layout, key centroids, value centroids, slot_pos, slot_valid, qpos, "
     "window, out, threads, scale, softcap): one query over a TurboQuant cache"},
    {"rotate_rows", (PyCFunction)(void (*)(void))py_rotate_rows, METH_FASTCALL,
     "rotate_rows(x, N, D, signs, divisor, inverse, threads): TurboQuant's Hadamard rotation of rows, in place"},
    {"encode_rows", (PyCFunction)(void (*)(void))py_encode_rows, METH_FASTCALL,
     "encode_rows(x, N, D, channel, signs, layout, centroids, midpoints, codes, scales, threads): the TQ cache codec"},
    {"decode_rows", (PyCFunction)(void (*)(void))py_decode_rows, METH_FASTCALL,
     "decode_rows(codes, N, D, layout, centroids, out, threads): a TurboQuant cache's vectors, unscaled"},
    {"rms_norm", (PyCFunction)(void (*)(void))py_rms_norm, METH_FASTCALL,
     "rms_norm(x, rows, dim, weight, cos, sin, heads, residual, out, threads, offset, eps)"},
    {"decode_layer", (PyCFunction)(void (*)(void))py_decode_layer, METH_FASTCALL,
     "decode_layer(plan, floats, x, cos, sin, position, threads): one Gemma 3 or 4 layer for one token"},
    {"decode_layer_rows", (PyCFunction)(void (*)(void))py_decode_layer_rows, METH_FASTCALL,
     "decode_layer_rows(plans, rows, floats, x, cos, sin, positions, scratch, scratch_bytes, in_order, threads): "
     "one layer for one token in each of several rows, each with its own plan's cache (in_order: one sequence's)"},
    {"plan_layout", py_plan_layout, METH_NOARGS, "the field indices of a decode_layer plan"},
    {"scratch_floats", (PyCFunction)(void (*)(void))py_scratch_floats, METH_FASTCALL,
     "scratch_floats(hidden, heads, kv_heads, head_dim, width)"},
    {"gelu_mul", (PyCFunction)(void (*)(void))py_gelu_mul, METH_FASTCALL, "gelu_mul(gate, up, out, n): float32"},
    {"sample_rows", (PyCFunction)(void (*)(void))py_sample_rows, METH_FASTCALL,
     "sample_rows(logits, rows, V, stride, k, options, pen_at, pen_ids, pen_counts, out, threads): each row's "
     "token through penalties, top_k, top_p, min_p, temperature and its uniform draw (-1: not decided here)"},
    {"top_k", (PyCFunction)(void (*)(void))py_top_k, METH_FASTCALL,
     "top_k(x, n, k, values, ids, threads): the k largest of float32 x [n], largest first, and their indices; "
     "False where fewer than k are above -inf"},
    {"supported", py_supported, METH_NOARGS, "whether this CPU runs gemm (AVX-512 VNNI)"},
    {"blocks_supported", py_blocks_supported, METH_NOARGS,
     "whether this CPU runs gemm on GGUF blocks in place (AVX-512 VNNI, VL and F16C)"},
    {"gguf_to_levels", (PyCFunction)(void (*)(void))py_gguf_to_levels, METH_FASTCALL,
     "gguf_to_levels(type, data, N, K, group, signs, levels, scales, threads): GGUF blocks as rotated int8 levels"},
    {"gguf_dequantize", (PyCFunction)(void (*)(void))py_gguf_dequantize, METH_FASTCALL,
     "gguf_dequantize(type, data, N, K, out, threads): GGUF blocks to float32"},
    {NULL, NULL, 0, NULL},
};

#ifdef WREN_AVX2
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native_avx2", "wren's compiled CPU kernels, for AVX2",
                                    -1, methods};

PyMODINIT_FUNC PyInit__native_avx2(void) {
#else
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "wren's compiled CPU kernels", -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
#endif
#ifdef WREN_X86
    init_unpack_tables();
#endif
#ifdef WREN_AVX2
    avx2_init_unpack();
#endif
    wide_vectors = cpu_supported();
    return PyModule_Create(&module);
}
