/* wren's compiled CPU kernels for TurboQuant weights at batch 1 and small batches.

   Built by pip from source when a C compiler is there (setup.py marks it optional); without it, or on a CPU
   without AVX-512 VNNI, wren uses PyTorch's kernels instead (wren/native.py decides).

   A TurboQuant linear layer multiplies the input, rotated per group, by int8 levels (cpu_kernels.py):
     y[m, n] = row_scale[n] * sum_k rot(x[m])[k] * level[n, k].
   Two steps here (then decode attention and RMSNorm, further down):
   1. rotate_quantize: per group of the input, the column scales, the two signed Walsh-Hadamard rounds the
      codes were made with, and int8 quantization with one float scale per group (as llama.cpp's Q8 blocks:
      ~0.6% error on a rotated, near-Gaussian group). Done once per input, shared by q/k/v and gate/up.
   2. gemm_q8: int8 x int8 dot products with AVX-512 VNNI (64 multiply-adds an instruction), so a 1-byte
      weight is read at memory speed rather than converted to float first. VNNI multiplies unsigned by
      signed bytes, so the input is stored as value + 128 and 128 x each row's sum of levels per group
      (group_sums, once per weight) is taken back off, 16 rows at a time.

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
#endif

#define MAX_GROUP 4096

static float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Unnormalised Walsh-Hadamard transform of n (a power of two) floats, the Sylvester order. */
static void fwht(float *a, int n) {
    for (int h = 1; h < n; h <<= 1)
        for (int i = 0; i < n; i += 2 * h)
            for (int j = i; j < i + h; j++) {
                float u = a[j], v = a[j + h];
                a[j] = u + v;
                a[j + h] = u - v;
            }
}

/* x [M, K] fp32 -> xq [M, K] as unsigned bytes (the int8 value + 128, what VNNI multiplies), xs [M, K/group].
   in_scale [K] (or NULL) divides out the columns' importance scaling; signs [2, group] are the rounds'. */
static void rotate_quantize(const float *x, int M, int K, int group, const float *in_scale, const float *signs,
                            uint8_t *xq, float *xs) {
    const int groups = K / group;
    const float norm = 1.0f / (float)group; /* two normalised transforms: (1/sqrt(group))^2 */
    float buf[MAX_GROUP];
    for (int m = 0; m < M; m++) {
        for (int g = 0; g < groups; g++) {
            const float *src = x + (size_t)m * K + (size_t)g * group;
            const float *col = in_scale ? in_scale + (size_t)g * group : NULL;
            for (int i = 0; i < group; i++) buf[i] = (col ? src[i] * col[i] : src[i]) * signs[i];
            fwht(buf, group);
            for (int i = 0; i < group; i++) buf[i] *= signs[group + i];
            fwht(buf, group);
            float amax = 0.0f;
            for (int i = 0; i < group; i++) {
                buf[i] *= norm;
                float a = fabsf(buf[i]);
                amax = a > amax ? a : amax;
            }
            const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
            uint8_t *dst = xq + (size_t)m * K + (size_t)g * group;
            for (int i = 0; i < group; i++) {
                int q = (int)lrintf(buf[i] * inverse);
                q = q > 127 ? 127 : (q < -127 ? -127 : q);
                dst[i] = (uint8_t)(q + 128);
            }
            xs[(size_t)m * groups + g] = amax / 127.0f;
        }
    }
}

/* sums [ceil(N / 16), groups, 16] = 128 * the sum of each row's levels over each group: what the +128 of the
   input adds to a row's dot product, taken back off; laid out as gemm_q8 reads it, 16 rows a block in one
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
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

/* One weight row's sum over groups of xs_g * <x_g + 128, level_g>; `chunks` = group / 64. */
VNNI static inline __attribute__((always_inline)) __m512 row_dot(const int8_t *w, int K, int chunks, const uint8_t *xq,
                                                                 const float *xs) {
    __m512 f = _mm512_setzero_ps();
    for (int g = 0, k = 0; k < K; g++) {
        __m512i a = _mm512_setzero_si512();
        for (int c = 0; c < chunks; c++, k += 64)
            a = _mm512_dpbusd_epi32(a, _mm512_loadu_si512(xq + k), _mm512_loadu_si512(w + k));
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
            a0 = _mm512_dpbusd_epi32(a0, xv, _mm512_loadu_si512(w + k));
            a1 = _mm512_dpbusd_epi32(a1, xv, _mm512_loadu_si512(w1 + k));
            a2 = _mm512_dpbusd_epi32(a2, xv, _mm512_loadu_si512(w2 + k));
            a3 = _mm512_dpbusd_epi32(a3, xv, _mm512_loadu_si512(w3 + k));
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

/* y [M, N] = row_scale[n] * sum_g xs[m, g] * (<xq[m, g], level[n, g]> - sums of n's block [g, n % 16]), rows
   16 at a time so the correction and the scales are applied as 16-wide vectors. group: a multiple of 64. */
VNNI static void gemm_q8(const uint8_t *xq, const float *xs, int M, int K, int group, const int8_t *levels,
                         const uint16_t *row_scale, const float *sums, float *y, int N, int threads) {
    const int groups = K / group, chunks = group / 64;
    const int blocks = (N + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < blocks; b++) {
        const int n0 = b * 16;
        for (int m = 0; m < M; m++) {
            const uint8_t *xm = xq + (size_t)m * K;
            const float *sm = xs + (size_t)m * groups;
            float *ym = y + (size_t)m * N;
            if (n0 + 16 <= N) {
                float acc[16];
                for (int r = 0; r < 16; r += 4) four_rows(levels + (size_t)(n0 + r) * K, K, chunks, xm, sm, acc + r);
                __m512 v = _mm512_loadu_ps(acc);
                for (int g = 0; g < groups; g++)
                    v = _mm512_fnmadd_ps(_mm512_set1_ps(sm[g]), _mm512_loadu_ps(sums + ((size_t)b * groups + g) * 16), v);
                const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(row_scale + n0))), 16));
                _mm512_storeu_ps(ym + n0, _mm512_mul_ps(v, scale));
            } else {
                for (int n = n0; n < N; n++) {
                    float v = _mm512_reduce_add_ps(row_dot(levels + (size_t)n * K, K, chunks, xm, sm));
                    for (int g = 0; g < groups; g++) v -= sm[g] * sums[((size_t)b * groups + g) * 16 + (n - n0)];
                    ym[n] = v * bf16_to_float(row_scale[n]);
                }
            }
        }
    }
}

/* --- Attention of one new query over a dense KV cache (decode, batch 1) ---------------------------------
   q [H, D] fp32; keys/values: Hkv heads of S slots of D elements (fp32, fp16 or bf16) at the given strides;
   slot_pos [S] the position each slot holds (-1: empty); slot_valid [S] (or NULL) 0 for padding. A slot is
   seen if 0 <= pos <= qpos, pos > qpos - window (window > 0) and valid: the mask `attention_mask` builds.
   Each thread takes a run of slots for every head and keeps a running max, sum and weighted sum of values
   (as flash-decoding does); the runs are merged at the end. out [H, D] fp32; a head that sees no slot gets
   zeros, as `attend` gives. */

enum { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2 };

VNNI static inline __m512 load16(const void *base, int dtype, size_t i) {
    if (dtype == KV_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i)));
    if (dtype == KV_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i))), 16));
    return _mm512_loadu_ps((const float *)base + i);
}

static size_t elem_size(int dtype) { return dtype == KV_F32 ? 4 : 2; }

typedef struct {
    const float *q;
    const void *keys, *values;
    int dtype, H, Hkv, D, S;
    long long head_stride, slot_stride;
    const int64_t *slot_pos;
    const uint8_t *slot_valid;
    long long qpos, window;
    float scale, softcap;
} attention_args;

/* Slots [s0, s1) for every head: max m[h], sum l[h] of exp(score - m), acc[h] = sum exp(score - m) v. */
VNNI static void attend_run(const attention_args *a, int s0, int s1, float *scores, float *m, float *l, float *acc) {
    const int H = a->H, D = a->D, group = a->H / a->Hkv;
    const size_t es = elem_size(a->dtype);
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
            const char *k = (const char *)a->keys + ((size_t)kh * a->head_stride + (size_t)s * a->slot_stride) * es;
            for (int h = kh * group; h < (kh + 1) * group; h++) {
                float score = -INFINITY;
                if (seen) {
                    __m512 dot = _mm512_setzero_ps();
                    for (int d = 0; d < D; d += 16) dot = _mm512_fmadd_ps(_mm512_loadu_ps(a->q + (size_t)h * D + d),
                                                                          load16(k, a->dtype, d), dot);
                    score = _mm512_reduce_add_ps(dot) * a->scale;
                    if (a->softcap > 0.0f) score = tanhf(score / a->softcap) * a->softcap;
                }
                scores[(size_t)(s - s0) * H + h] = score;
                if (score > m[h]) m[h] = score;
            }
        }
    }
    for (int s = s0; s < s1; s++) {
        for (int kh = 0; kh < a->Hkv; kh++) {
            const char *v = (const char *)a->values + ((size_t)kh * a->head_stride + (size_t)s * a->slot_stride) * es;
            for (int h = kh * group; h < (kh + 1) * group; h++) {
                const float score = scores[(size_t)(s - s0) * H + h];
                if (score == -INFINITY) continue;
                const float w = expf(score - m[h]);
                l[h] += w;
                float *o = acc + (size_t)h * D;
                const __m512 wv = _mm512_set1_ps(w);
                for (int d = 0; d < D; d += 16)
                    _mm512_storeu_ps(o + d, _mm512_fmadd_ps(wv, load16(v, a->dtype, d), _mm512_loadu_ps(o + d)));
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
        float *h = cos ? buf : o;
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
            for (int i = 0; i < dim; i++) o[i] += res[i];
        }
    }
}

static int cpu_supported(void) {
#ifdef WREN_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

/* --- Python bindings: addresses and sizes as ints; the caller (native.py) checks shapes and dtypes. --- */

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

static PyObject *py_rotate_quantize(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[8];
    if (as_ints(args, n, 8, a) < 0) return NULL;
    /* x, M, K, group, in_scale (0: none), signs, xq, xs */
    if (a[3] < 1 || a[3] > MAX_GROUP || a[2] % a[3] || (a[3] & (a[3] - 1))) {
        PyErr_SetString(PyExc_ValueError, "group must be a power of two up to 4096 that divides K");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rotate_quantize((const float *)(intptr_t)a[0], (int)a[1], (int)a[2], (int)a[3], (const float *)(intptr_t)a[4],
                    (const float *)(intptr_t)a[5], (uint8_t *)(intptr_t)a[6], (float *)(intptr_t)a[7]);
    Py_END_ALLOW_THREADS
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

static PyObject *py_gemm_q8(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[11];
    if (as_ints(args, n, 11, a) < 0) return NULL;
    /* xq, xs, M, K, group, levels, row_scale, sums, y, N, threads */
    if (!cpu_supported()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU has no AVX-512 VNNI");
        return NULL;
    }
    if (a[4] < 64 || a[4] % 64 || a[3] % a[4]) {
        PyErr_SetString(PyExc_ValueError, "group must be a multiple of 64 that divides K");
        return NULL;
    }
#ifdef WREN_X86
    Py_BEGIN_ALLOW_THREADS
    gemm_q8((const uint8_t *)(intptr_t)a[0], (const float *)(intptr_t)a[1], (int)a[2], (int)a[3], (int)a[4],
            (const int8_t *)(intptr_t)a[5], (const uint16_t *)(intptr_t)a[6], (const float *)(intptr_t)a[7],
            (float *)(intptr_t)a[8], (int)a[9], a[10] > 0 ? (int)a[10] : 1);
    Py_END_ALLOW_THREADS
#endif
    Py_RETURN_NONE;
}

static PyObject *py_attend_one(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[16];
    /* q, keys, values, dtype, H, Hkv, D, S, head_stride, slot_stride, slot_pos, slot_valid (0: none), qpos,
       window (0: none), out, threads; then scale and softcap (0: none) as floats */
    if (n != 18) {
        PyErr_Format(PyExc_TypeError, "expected 18 arguments, got %zd", n);
        return NULL;
    }
    if (as_ints(args, 16, 16, a) < 0) return NULL;
    const double scale = PyFloat_AsDouble(args[16]), softcap = PyFloat_AsDouble(args[17]);
    if (PyErr_Occurred()) return NULL;
    if (!cpu_supported()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU has no AVX-512 VNNI");
        return NULL;
    }
    if (a[3] < KV_F32 || a[3] > KV_BF16 || a[4] < 1 || a[5] < 1 || a[4] % a[5] || a[6] < 16 || a[6] % 16 || a[7] < 0) {
        PyErr_SetString(PyExc_ValueError, "bad attention shapes (head_dim must be a multiple of 16)");
        return NULL;
    }
#ifdef WREN_X86
    attention_args args_ = {(const float *)(intptr_t)a[0], (const void *)(intptr_t)a[1], (const void *)(intptr_t)a[2],
                            (int)a[3], (int)a[4], (int)a[5], (int)a[6], (int)a[7], a[8], a[9],
                            (const int64_t *)(intptr_t)a[10], (const uint8_t *)(intptr_t)a[11], a[12], a[13],
                            (float)scale, (float)softcap};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = attend_one(&args_, (float *)(intptr_t)a[14], a[15] > 0 ? (int)a[15] : 1);
    Py_END_ALLOW_THREADS
    if (rc < 0) return PyErr_NoMemory();
#endif
    Py_RETURN_NONE;
}

static PyObject *py_rms_norm(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[11];
    /* x, rows, dim, weight (0: none), cos (0: none), sin, heads, residual (0: none), out, threads; offset, eps */
    if (n != 12) {
        PyErr_Format(PyExc_TypeError, "expected 12 arguments, got %zd", n);
        return NULL;
    }
    if (as_ints(args, 10, 10, a) < 0) return NULL;
    const double offset = PyFloat_AsDouble(args[10]), eps = PyFloat_AsDouble(args[11]);
    if (PyErr_Occurred()) return NULL;
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

static PyObject *py_supported(PyObject *self, PyObject *unused) { return PyBool_FromLong(cpu_supported()); }

static PyMethodDef methods[] = {
    {"rotate_quantize", (PyCFunction)(void (*)(void))py_rotate_quantize, METH_FASTCALL,
     "rotate_quantize(x, M, K, group, in_scale, signs, xq, xs): addresses and sizes"},
    {"group_sums", (PyCFunction)(void (*)(void))py_group_sums, METH_FASTCALL,
     "group_sums(levels, N, K, group, sums, threads)"},
    {"gemm_q8", (PyCFunction)(void (*)(void))py_gemm_q8, METH_FASTCALL,
     "gemm_q8(xq, xs, M, K, group, levels, row_scale, sums, y, N, threads): addresses and sizes"},
    {"attend_one", (PyCFunction)(void (*)(void))py_attend_one, METH_FASTCALL,
     "attend_one(q, keys, values, dtype, H, Hkv, D, S, head_stride, slot_stride, slot_pos, slot_valid, qpos, "
     "window, out, threads, scale, softcap)"},
    {"rms_norm", (PyCFunction)(void (*)(void))py_rms_norm, METH_FASTCALL,
     "rms_norm(x, rows, dim, weight, cos, sin, heads, residual, out, threads, offset, eps)"},
    {"supported", py_supported, METH_NOARGS, "whether this CPU runs gemm_q8 (AVX-512 VNNI)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "wren's compiled CPU kernels", -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
