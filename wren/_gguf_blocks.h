/* A GGUF's quantized weights multiplied in place: the formats GGUF_BASE + ggml type of `gemm` (_native.c).

   llama.cpp's block formats hold each run of 32 (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) or 256 (Q4_K, Q5_K, Q6_K)
   weights as small unsigned integers q with a float scale, and an offset, per block or sub-block:
     w = ws * q + wo      (ws, wo per 32 weights; Q2_K's, Q3_K's and Q6_K's per 16)
   so a row times an input x is  sum_blocks ws * <q, x> + wo * sum(x).  The input is quantized per block of
   32, unrotated (rotate_quantize without signs): x = xs * xi with xi int8. Each row is read once, as stored
   (4.5-8.5 bits a weight), its q unpacked to bytes in registers 64 at a time, and VNNI multiplies those
   unsigned bytes by the signed input: <q, xi> per 4 weights in each 32-bit lane. A lane is then scaled by
   its block's ws (a vector of the blocks' scales, permuted to their lanes) times its xs (`lanes`, made once
   per input row). Offsets that are a fixed multiple of ws (Q4_0's -8 ws, Q5_0's -16 ws) are one more VNNI
   product, of that multiple with the input; Q8_0's signed q takes the unsigned input xi + 128 and drops
   128 * sum(q) the same way; the others' (K-quant mins, Q3_K's -4 ws, Q6_K's -32 ws) take the input's sums
   per sub-block as a vector per super-block.

   The layouts are ggml's (ggml-common.h), as wren/weights/gguf_quants.py decodes them. */

enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13,
       T_Q6_K = 14 };

#ifdef WREN_AVX2
#define BLOCKS
#else
#define BLOCKS __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c")))
#endif

/* (weights, bytes) of one block of a ggml type gemm reads in place; 0 weights for any other type. */
static void gguf_block_size(int type, int *weights, int *bytes) {
    static const short sizes[][3] = {{T_Q4_0, 32, 18}, {T_Q4_1, 32, 20}, {T_Q5_0, 32, 22}, {T_Q5_1, 32, 24},
                                     {T_Q8_0, 32, 34}, {T_Q2_K, 256, 84},  {T_Q3_K, 256, 110}, {T_Q4_K, 256, 144},
                                     {T_Q5_K, 256, 176}, {T_Q6_K, 256, 210}};
    *weights = *bytes = 0;
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++)
        if (sizes[i][0] == type) *weights = sizes[i][1], *bytes = sizes[i][2];
}

static int gguf_block_weights(int type) {
    int weights, bytes;
    gguf_block_size(type, &weights, &bytes);
    return weights;
}

static size_t gguf_row_bytes(int type, int K) {
    int weights, bytes;
    gguf_block_size(type, &weights, &bytes);
    return weights ? (size_t)K / weights * bytes : 0;
}

BLOCKS static inline float half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* One input row as the GGUF formats read it (block_input makes them once per row). */
typedef struct {
    const int8_t *x;     /* [K] the int8 input xi */
    const uint8_t *xu;   /* [K] xi + 128, VNNI's unsigned operand (the quantized input as given) */
    const float *lanes;  /* [K / 4] xs of each 4-weight lane */
    const float *sums16; /* [K / 16] xs * the sum of xi over each run of 16 */
    const float *sums32; /* [K / 32] the same over each block of 32 */
} block_in;

/* Floats block_input writes per input row of K (besides K bytes of x). */
#define BLOCK_INPUT_FLOATS(K) ((K) / 4 + (K) / 16 + (K) / 32)

BLOCKS static void block_input(const uint8_t *xq, const float *xs, int K, int8_t *x, float *floats) {
    const __m128i flip = _mm_set1_epi8((char)0x80);
    float *lanes = floats, *sums16 = lanes + K / 4, *sums32 = sums16 + K / 16;
    for (int i = 0; i < K; i += 16) {
        const __m128i u = _mm_loadu_si128((const __m128i *)(xq + i));
        _mm_storeu_si128((__m128i *)(x + i), _mm_xor_si128(u, flip));
        const __m128i wide = _mm_sad_epu8(u, _mm_setzero_si128());
        const float scale = xs[i / 32];
        sums16[i / 16] = scale * (float)(_mm_extract_epi16(wide, 0) + _mm_extract_epi16(wide, 4) - 16 * 128);
        _mm_storeu_ps(lanes + i / 4, _mm_set1_ps(scale));
    }
    for (int b = 0; b < K / 32; b++) sums32[b] = sums16[2 * b] + sums16[2 * b + 1];
}

/* 32 weights' q of a 16-byte run of nibbles: the low nibbles are weights 0-15, the high ones 16-31. */
BLOCKS static inline __m256i nibbles32(const uint8_t *qs) {
    const __m128i v = _mm_loadu_si128((const __m128i *)qs), mask = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
}

/* q (bytes) of one block of 32 of the 32-weight formats, its ws and wo (Q8_0's q as q + 128). */
BLOCKS static inline __attribute__((always_inline)) __m256i block32(int type, const uint8_t *p, float *ws, float *wo) {
    uint32_t qh;
    switch (type) {
    case T_Q8_0:
        *ws = half(p), *wo = -128.0f * *ws;
        return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(p + 2)), _mm256_set1_epi8((char)0x80));
    case T_Q4_0:
        *ws = half(p), *wo = -8.0f * *ws;
        return nibbles32(p + 2);
    case T_Q4_1:
        *ws = half(p), *wo = half(p + 2);
        return nibbles32(p + 4);
    case T_Q5_0:
        memcpy(&qh, p + 2, 4);
        *ws = half(p), *wo = -16.0f * *ws;
        return _mm256_or_si256(nibbles32(p + 6), _mm256_maskz_mov_epi8(qh, _mm256_set1_epi8(0x10)));
    default: /* T_Q5_1 */
        memcpy(&qh, p + 4, 4);
        *ws = half(p), *wo = half(p + 2);
        return _mm256_or_si256(nibbles32(p + 8), _mm256_maskz_mov_epi8(qh, _mm256_set1_epi8(0x10)));
    }
}

/* The fp16 scales at p0 and p1 as a vector: lanes 0-7 the first, 8-15 the second (two blocks of 32). */
BLOCKS static inline __m512 pair_scales(const uint8_t *p0, const uint8_t *p1) {
    uint16_t h0, h1;
    memcpy(&h0, p0, 2), memcpy(&h1, p1, 2);
    const __m128 d = _mm_cvtph_ps(_mm_cvtsi32_si128((int)((uint32_t)h0 | (uint32_t)h1 << 16)));
    const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(d));
}

/* f + the 16 lanes of acc, each times its ws (`scales`) and xs: the step every format ends a chunk of 64 with. */
BLOCKS static inline __m512 scaled(__m512 f, __m512i acc, __m512 scales, const float *lanes) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(scales, _mm512_loadu_ps(lanes)), f);
}

/* The kernels below take up to ROWS_AT_ONCE input rows at a time: each 64 weights are unpacked, and their
   scales made, once for all of them (a server step of a few sequences; from GGUF_TILE_ROWS input rows on,
   gguf_tiles unpacks a block of 16 rows once for all of them instead). */
#define ROWS_AT_ONCE 4

/* Q8_0, Q4_0 and Q5_0, whose offset is a fixed multiple of ws: two blocks of 32 a step, their q made in one
   512-bit register, times `count` input rows into out[r]; an odd last block is row_blocks32's. */
BLOCKS static inline __attribute__((always_inline)) void rows_fixed_offset(int type, const uint8_t *row, int K,
                                                                          size_t ahead, int count,
                                                                          const block_in *in, float *out,
                                                                          int *done) {
    int weights, bytes;
    gguf_block_size(type, &weights, &bytes);
    const __m512i zero = _mm512_setzero_si512(), mask = _mm512_set1_epi8(0x0F);
    const __m512i bias = _mm512_set1_epi8((char)(type == T_Q8_0 ? 0x80 : type == T_Q5_0 ? 16 : 8));
    __m512 f[ROWS_AT_ONCE];
    for (int r = 0; r < count; r++) f[r] = _mm512_setzero_ps();
    int b = 0;
    for (; b + 2 <= K / 32; b += 2) {
        const uint8_t *p0 = row + (size_t)b * bytes, *p1 = p0 + bytes;
        _mm_prefetch((const char *)(p0 + ahead), _MM_HINT_T0);
        const __m512 scales = pair_scales(p0, p1);
        if (type == T_Q8_0) { /* <xi + 128, q> - <128, q> */
            const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(p0 + 2))),
                                                 _mm256_loadu_si256((const __m256i *)(p1 + 2)), 1);
            const __m512i q128 = dpbusd(zero, bias, q);
            for (int r = 0; r < count; r++)
                f[r] = scaled(f[r], _mm512_sub_epi32(dpbusd(zero, _mm512_loadu_si512(in[r].xu + 32 * b), q), q128),
                              scales, in[r].lanes + 8 * b);
        } else { /* <q, xi> - <8 or 16, xi> */
            const int at = type == T_Q5_0 ? 6 : 2;
            const __m128i qs0 = _mm_loadu_si128((const __m128i *)(p0 + at));
            const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(qs0),
                                                      _mm_loadu_si128((const __m128i *)(p1 + at)), 1);
            const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
            /* [low 0 | low 1 | high 0 | high 1] -> [low 0 | high 0 | low 1 | high 1]: weights in order */
            __m512i q = _mm512_and_si512(_mm512_shuffle_i64x2(both, both, _MM_SHUFFLE(3, 1, 2, 0)), mask);
            if (type == T_Q5_0) {
                uint32_t h0, h1;
                memcpy(&h0, p0 + 2, 4), memcpy(&h1, p1 + 2, 4);
                const __mmask64 high = (uint64_t)h0 | (uint64_t)h1 << 32;
                q = _mm512_or_si512(q, _mm512_maskz_mov_epi8(high, _mm512_set1_epi8(0x10)));
            }
            for (int r = 0; r < count; r++) {
                const __m512i x = _mm512_loadu_si512(in[r].x + 32 * b);
                f[r] = scaled(f[r], _mm512_sub_epi32(dpbusd(zero, q, x), dpbusd(zero, bias, x)), scales,
                              in[r].lanes + 8 * b);
            }
        }
    }
    for (int r = 0; r < count; r++) out[r] = _mm512_reduce_add_ps(f[r]);
    *done = b;
}

/* Blocks [first, K / 32) of a row of a 32-weight format times one input row, a block at a time:
   ws * <q, xi> * xs + wo * sum(x). */
BLOCKS static inline __attribute__((always_inline)) float row_blocks32(int type, const uint8_t *row, int K, int first,
                                                                      const block_in *in) {
    int weights, bytes;
    gguf_block_size(type, &weights, &bytes);
    float total = 0.0f;
    for (int b = first; b < K / 32; b++) {
        float ws, wo;
        const __m256i q = block32(type, row + (size_t)b * bytes, &ws, &wo);
        const __m256i x = _mm256_loadu_si256((const __m256i *)(in->x + 32 * b));
        const __m256i acc = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, x);
        const __m128i pair = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        const __m128i two = _mm_add_epi32(pair, _mm_shuffle_epi32(pair, _MM_SHUFFLE(1, 0, 3, 2)));
        const int dot = _mm_cvtsi128_si32(two) + _mm_extract_epi32(two, 1);
        total += ws * in->lanes[8 * b] * (float)dot + wo * in->sums32[b];
    }
    return total;
}

/* Q4_K / Q5_K: 8 six-bit scales and mins of a super-block's 12 bytes: scales 0-3 (mins 0-3) the low 6 bits
   of bytes 0-3 (4-7); scales 4-7 bytes 8-11's low nibbles and bytes 0-3's top 2 bits, mins 4-7 their high
   nibbles and bytes 4-7's top 2 bits. Four bytes a word: a byte at a time was half a decode step's work. */
static inline void k_scales(const uint8_t *s, uint8_t *sc, uint8_t *mn) {
    uint32_t a, b, c;
    memcpy(&a, s, 4), memcpy(&b, s + 4, 4), memcpy(&c, s + 8, 4);
    const uint32_t six = 0x3F3F3F3F, nibble = 0x0F0F0F0F, top = 0x30303030;
    const uint32_t words[4] = {a & six, (c & nibble) | ((a >> 2) & top),  /* scales */
                               b & six, ((c >> 4) & nibble) | ((b >> 2) & top)}; /* mins */
    memcpy(sc, words, 8), memcpy(mn, words + 2, 8);
}

/* 8 bytes as 8 floats in the low half of a vector. */
BLOCKS static inline __m512 bytes_as_floats(const uint8_t *b) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)b)));
}

/* q of a Q4_K / Q5_K super-block's run c (0-3) of 32 bytes of nibbles: the low ones sub-block 2c, the high
   ones 2c + 1; Q5_K's bit 4 of weight j of sub-block k is bit k of qh[j]. */
BLOCKS static inline __attribute__((always_inline)) void k45_run(const uint8_t *p, int five, int c, __m256i *lo,
                                                                __m256i *hi) {
    const __m256i mask = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    const __m256i v = _mm256_loadu_si256((const __m256i *)(p + (five ? 48 : 16) + 32 * c));
    *lo = _mm256_and_si256(v, mask), *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    if (five) {
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(p + 16));
        *lo = _mm256_or_si256(*lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * c), one), 4));
        *hi = _mm256_or_si256(*hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * c + 1), one), 4));
    }
}

/* A row of Q4_K or Q5_K times `count` input rows, a super-block of 256 at a time: its 8 scales d * sc as a
   vector, each run's two permuted to their lanes; its mins' offset, dmin * mn . sums32, as a vector too. */
BLOCKS static inline __attribute__((always_inline)) void rows_q45_k(int type, const uint8_t *row, int K, size_t ahead,
                                                                   int count, const block_in *in, float *out) {
    const int five = type == T_Q5_K, bytes = five ? 176 : 144;
    __m512 f[ROWS_AT_ONCE], offset[ROWS_AT_ONCE];
    for (int r = 0; r < count; r++) f[r] = offset[r] = _mm512_setzero_ps();
    for (int sb = 0; sb < K / 256; sb++) {
        const uint8_t *p = row + (size_t)sb * bytes;
        for (int at = 0; at < bytes; at += 64) _mm_prefetch((const char *)(p + ahead + at), _MM_HINT_T0);
        uint8_t sc[8], mn[8];
        k_scales(p + 4, sc, mn);
        const __m512 scales = _mm512_mul_ps(_mm512_set1_ps(half(p)), bytes_as_floats(sc));
        const __m512 mins = _mm512_mul_ps(_mm512_set1_ps(half(p + 2)), bytes_as_floats(mn));
        for (int r = 0; r < count; r++)
            offset[r] = _mm512_mask3_fmadd_ps(mins, _mm512_maskz_loadu_ps(0xFF, in[r].sums32 + 8 * sb), offset[r], 0xFF);
        for (int c = 0; c < 4; c++) {
            __m256i lo, hi;
            k45_run(p, five, c, &lo, &hi);
            const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            const int u = 2 * c, v = 2 * c + 1; /* the run's two sub-blocks: lanes 0-7, 8-15 */
            const __m512 run_scales = _mm512_permutexvar_ps(
                _mm512_set_epi32(v, v, v, v, v, v, v, v, u, u, u, u, u, u, u, u), scales);
            for (int r = 0; r < count; r++) {
                const __m512i acc = dpbusd(_mm512_setzero_si512(), q, _mm512_loadu_si512(in[r].x + 256 * sb + 64 * c));
                f[r] = scaled(f[r], acc, run_scales, in[r].lanes + 64 * sb + 16 * c);
            }
        }
    }
    for (int r = 0; r < count; r++) out[r] = _mm512_reduce_add_ps(f[r]) - _mm512_reduce_add_ps(offset[r]);
}

/* Q3_K: its 16 six-bit scales of 12 bytes (scale k's low nibble: byte k's low one for k < 8, byte k - 8's
   high one after; its high 2 bits: bits 2(k / 4) of byte 8 + k % 4), as signed bytes sc - 32. */
BLOCKS static inline __m128i q3_scales(const uint8_t *s) {
    uint64_t nibbles;
    uint32_t t;
    memcpy(&nibbles, s, 8), memcpy(&t, s + 8, 4);
    const uint64_t nibble = 0x0F0F0F0F0F0F0F0Full;
    const uint32_t two = 0x03030303;
    const uint64_t high0 = (uint64_t)((t >> 2) & two) << 32 | (t & two);
    const uint64_t high1 = (uint64_t)((t >> 6) & two) << 32 | ((t >> 4) & two);
    const __m128i sc = _mm_set_epi64x((long long)(((nibbles >> 4) & nibble) | high1 << 4),
                                      (long long)((nibbles & nibble) | high0 << 4));
    return _mm_sub_epi8(sc, _mm_set1_epi8(32));
}

/* The K-quants of 16 sub-blocks of 16 (Q2_K, Q3_K, Q6_K): w = scale * q - min for each sub-block. Their
   scales and mins as two vectors (Q3_K's min 4 scale and Q6_K's 32 scale, as their q are q + 4, q + 32). */
BLOCKS static inline __attribute__((always_inline)) void k16_scales(int type, const uint8_t *p, __m512 *scales,
                                                                   __m512 *mins) {
    if (type == T_Q6_K) {
        const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 192)));
        *scales = _mm512_mul_ps(_mm512_set1_ps(half(p + 208)), _mm512_cvtepi32_ps(sc));
        *mins = _mm512_mul_ps(_mm512_set1_ps(32.0f), *scales);
    } else if (type == T_Q3_K) {
        const __m512i sc = _mm512_cvtepi8_epi32(q3_scales(p + 96));
        *scales = _mm512_mul_ps(_mm512_set1_ps(half(p + 108)), _mm512_cvtepi32_ps(sc));
        *mins = _mm512_mul_ps(_mm512_set1_ps(4.0f), *scales);
    } else { /* Q2_K: a byte a sub-block, the scale its low nibble, the min its high one */
        const __m512i s = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)), mask = _mm512_set1_epi32(15);
        *scales = _mm512_mul_ps(_mm512_set1_ps(half(p + 80)), _mm512_cvtepi32_ps(_mm512_and_si512(s, mask)));
        *mins = _mm512_mul_ps(_mm512_set1_ps(half(p + 82)), _mm512_cvtepi32_ps(_mm512_srli_epi32(s, 4)));
    }
}

/* q of a 16-sub-block K-quant super-block's half h (128 weights) in four runs of 32 (run k: weights
   128h + 32k ...).
   Q6_K: 64 bytes of low nibbles (bytes 0-31: runs 0 low, 2 high; bytes 32-63: runs 1 low, 3 high) and
   32 bytes of 2-bit high parts (bits 2k-2k+1 of byte j: run k's weight j).
   Q2_K / Q3_K: 32 bytes of 2-bit q (bits 2k-2k+1 of byte j: run k's weight j); Q3_K's bit 2 of run k's
   weight j is bit 4h + k of hmask[j]. */
BLOCKS static inline __attribute__((always_inline)) void k16_half(int type, const uint8_t *p, int h, __m256i q[4]) {
    const __m256i mask = _mm256_set1_epi8(0x0F), three = _mm256_set1_epi8(3);
    if (type == T_Q6_K) {
        const uint8_t *ql = p + 64 * h;
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(p + 128 + 32 * h));
        const __m256i l0 = _mm256_loadu_si256((const __m256i *)ql), l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
        q[0] = _mm256_and_si256(l0, mask), q[1] = _mm256_and_si256(l1, mask);
        q[2] = _mm256_and_si256(_mm256_srli_epi16(l0, 4), mask);
        q[3] = _mm256_and_si256(_mm256_srli_epi16(l1, 4), mask);
        for (int k = 0; k < 4; k++)
            q[k] = _mm256_or_si256(q[k], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), three), 4));
        return;
    }
    const __m256i v = _mm256_loadu_si256((const __m256i *)(p + (type == T_Q3_K ? 32 : 16) + 32 * h));
    for (int k = 0; k < 4; k++) q[k] = _mm256_and_si256(_mm256_srli_epi16(v, 2 * k), three);
    if (type == T_Q3_K) { /* + 4 where the weight's hmask bit is set */
        const __m256i hm = _mm256_loadu_si256((const __m256i *)p), four = _mm256_set1_epi8(4);
        for (int k = 0; k < 4; k++)
            q[k] = _mm256_mask_add_epi8(q[k], _mm256_test_epi8_mask(hm, _mm256_set1_epi8((char)(1 << (4 * h + k)))),
                                        q[k], four);
    }
}

/* A row of Q2_K, Q3_K or Q6_K times `count` input rows: per super-block its 16 scales as a vector, four of
   them permuted to each chunk's lanes, and the offset mins . sums16. */
BLOCKS static inline __attribute__((always_inline)) void rows_k16(int type, const uint8_t *row, int K, size_t ahead,
                                                                 int count, const block_in *in, float *out) {
    int weights, bytes;
    gguf_block_size(type, &weights, &bytes);
    __m512 f[ROWS_AT_ONCE], offset[ROWS_AT_ONCE];
    for (int r = 0; r < count; r++) f[r] = offset[r] = _mm512_setzero_ps();
    for (int sb = 0; sb < K / 256; sb++) {
        const uint8_t *p = row + (size_t)sb * bytes;
        for (int at = 0; at < bytes; at += 64) _mm_prefetch((const char *)(p + ahead + at), _MM_HINT_T0);
        __m512 scales, mins;
        k16_scales(type, p, &scales, &mins);
        for (int r = 0; r < count; r++)
            offset[r] = _mm512_fmadd_ps(mins, _mm512_loadu_ps(in[r].sums16 + 16 * sb), offset[r]);
        for (int h = 0; h < 2; h++) {
            __m256i q[4];
            k16_half(type, p, h, q);
            for (int c = 0; c < 2; c++) {
                const int r0 = 8 * h + 4 * c, r1 = r0 + 1, r2 = r0 + 2, r3 = r0 + 3; /* the chunk's runs of 16 */
                const __m512i q64 = _mm512_inserti64x4(_mm512_castsi256_si512(q[2 * c]), q[2 * c + 1], 1);
                const __m512 run_scales = _mm512_permutexvar_ps(
                    _mm512_set_epi32(r3, r3, r3, r3, r2, r2, r2, r2, r1, r1, r1, r1, r0, r0, r0, r0), scales);
                const int at = 256 * sb + 64 * (2 * h + c);
                for (int r = 0; r < count; r++) {
                    const __m512i acc = dpbusd(_mm512_setzero_si512(), q64, _mm512_loadu_si512(in[r].x + at));
                    f[r] = scaled(f[r], acc, run_scales, in[r].lanes + at / 4);
                }
            }
        }
    }
    for (int r = 0; r < count; r++) out[r] = _mm512_reduce_add_ps(f[r]) - _mm512_reduce_add_ps(offset[r]);
}

BLOCKS static inline __attribute__((always_inline)) void rows_of(int type, const uint8_t *row, int K, size_t ahead,
                                                                int count, const block_in *in, float *out) {
    if (type == T_Q6_K || type == T_Q3_K || type == T_Q2_K) {
        rows_k16(type, row, K, ahead, count, in, out);
    } else if (type == T_Q4_K || type == T_Q5_K) {
        rows_q45_k(type, row, K, ahead, count, in, out);
    } else {
        int done = 0;
        for (int r = 0; r < count; r++) out[r] = 0.0f;
        if (type == T_Q8_0 || type == T_Q4_0 || type == T_Q5_0)
            rows_fixed_offset(type, row, K, ahead, count, in, out, &done);
        for (int r = 0; r < count; r++) out[r] += row_blocks32(type, row, K, done, in + r);
    }
}

/* One row of a GGUF matrix times `count` (1 to ROWS_AT_ONCE) input rows into out[r]. ahead: bytes from the row
   to the one this thread reads 16 rows on (the next block), whose bytes each step asks for as it reads its
   own: the hardware's prefetch alone left decode at half the memory's speed (measured, as for the codes'
   kernel: PREFETCH_BLOCKS). Each type, and one input row or four, its own copy. */
BLOCKS static void gguf_rows(int type, const uint8_t *row, int K, size_t ahead, int count, const block_in *in,
                             float *out) {
#define GGUF_TYPE_CASE(T) \
    case T: \
        if (count == 1) rows_of(T, row, K, ahead, 1, in, out); \
        else if (count == ROWS_AT_ONCE) rows_of(T, row, K, ahead, ROWS_AT_ONCE, in, out); \
        else rows_of(T, row, K, ahead, count, in, out); \
        break;
    switch (type) {
        GGUF_TYPE_CASE(T_Q6_K)
        GGUF_TYPE_CASE(T_Q4_K)
        GGUF_TYPE_CASE(T_Q5_K)
        GGUF_TYPE_CASE(T_Q8_0)
        GGUF_TYPE_CASE(T_Q4_0)
        GGUF_TYPE_CASE(T_Q4_1)
        GGUF_TYPE_CASE(T_Q5_0)
        GGUF_TYPE_CASE(T_Q5_1)
        GGUF_TYPE_CASE(T_Q3_K)
        GGUF_TYPE_CASE(T_Q2_K)
    }
#undef GGUF_TYPE_CASE
}

/* The input rows as block_in: x [M, K], xq [M, K], floats [M, BLOCK_INPUT_FLOATS(K)]. */
static inline block_in input_row(const int8_t *x, const uint8_t *xq, const float *floats, int K, int m) {
    const float *lanes = floats + (size_t)m * BLOCK_INPUT_FLOATS(K);
    return (block_in){x + (size_t)m * K, xq + (size_t)m * K, lanes, lanes + K / 4, lanes + K / 4 + K / 16};
}

/* Rows [n0, n0 + 16) of a GGUF matrix (or its last, shorter block) for every input row, ROWS_AT_ONCE input
   rows at a time. */
BLOCKS static void gguf_block(const int8_t *x, const uint8_t *xq, const float *floats, int M, int K, const matrix *w,
                              int b) {
    const int type = w->format - GGUF_BASE, n0 = b * 16, n1 = w->N - n0 < 16 ? w->N : n0 + 16;
    const size_t row_bytes = gguf_row_bytes(type, K);
    for (int m0 = 0; m0 < M; m0 += ROWS_AT_ONCE) {
        const int count = M - m0 < ROWS_AT_ONCE ? M - m0 : ROWS_AT_ONCE;
        block_in in[ROWS_AT_ONCE];
        for (int r = 0; r < count; r++) in[r] = input_row(x, xq, floats, K, m0 + r);
        for (int n = n0; n < n1; n++) {
            float out[ROWS_AT_ONCE];
            gguf_rows(type, (const uint8_t *)w->data + (size_t)n * row_bytes, K, m0 ? 0 : 16 * row_bytes, count, in,
                      out);
            for (int r = 0; r < count; r++) w->y[(size_t)(m0 + r) * w->N + n] = out[r];
        }
    }
}

/* --- Several input rows: a block of 16 rows unpacked once into the levels' tiles ------------------------
   gguf_block reads each row's blocks for every ROWS_AT_ONCE input rows and scales every 64 products per input
   row: ~6 instructions a 64 weights a row. From GGUF_TILE_ROWS input rows, a block of 16 rows is unpacked once
   into tile_rows' layout instead (q as bytes, each 4 weights of the 16 rows a 64-byte vector): one VNNI per
   16 rows x 4 weights per input row, each group's scales (ws of the 16 rows) applied once per group. A fixed
   offset (wo = -bias * ws: Q8_0, Q4_0, Q5_0, Q3_K, Q6_K) is the accumulator's start, -bias times the group's
   integer input sum (`corr`); a float one (Q4_1, Q5_1, Q4_K, Q5_K, Q2_K: mins) is added after, wo times the
   input's sum, a vector of 16 rows per block and input row. A group is a block of 32 (the input's own), or
   Q6_K's sub-block of 16: Q2_K's and Q3_K's small
   integer sub-scales are multiplied into their q (sc * q <= 45; (q - 4) * sc + 124 in [0, 252]), so that
   their super-block's d is the scale of each of its groups of 32, which halves the scaling per weight. */

#define GGUF_TILE_ROWS 12

/* The group of a type's tiles: the weights that share one scale. */
static int gguf_tile_group(int type) { return type == T_Q6_K ? 16 : 32; }

/* The bias of a type's q in tiles whose offset is a fixed multiple of its scale (w = ws * (q - bias)), or 0. */
static int gguf_tile_bias(int type) {
    switch (type) {
    case T_Q8_0: return 128;
    case T_Q4_0: return 8;
    case T_Q5_0: return 16;
    case T_Q3_K: return 124; /* (q - 4) * sc + 124: gguf_unit */
    case T_Q6_K: return 32;
    default: return 0;
    }
}

/* 32 q bytes times sub-scales a (the first 16) and b (the last 16), each less `less` first, plus `plus`. */
BLOCKS static inline __m256i times_sub_scales(__m256i q, int a, int b, int less, int plus) {
    const __m512i scales = _mm512_inserti64x4(_mm512_set1_epi16((short)a), _mm256_set1_epi16((short)b), 1);
    const __m512i wide = _mm512_sub_epi16(_mm512_cvtepu8_epi16(q), _mm512_set1_epi16((short)less));
    return _mm512_cvtepi16_epi8(_mm512_add_epi16(_mm512_mullo_epi16(wide, scales), _mm512_set1_epi16((short)plus)));
}

/* q (bytes) of unit u of a row, the ws of each of its groups and the wo of each 16 of its weights: a unit is a
   super-block of 256 for the K-quants, two blocks of 32 for the others (K need not be a multiple of 256). */
BLOCKS static inline __attribute__((always_inline)) void gguf_unit(int type, const uint8_t *row, int u, uint8_t *q,
                                                                  float *ws, float *wo16) {
    int weights, bytes;
    gguf_block_size(type, &weights, &bytes);
    if (weights == 32) {
        const uint8_t *p = row + (size_t)2 * u * bytes;
        float wo[2];
        _mm256_storeu_si256((__m256i *)q, block32(type, p, ws, wo));
        _mm256_storeu_si256((__m256i *)(q + 32), block32(type, p + bytes, ws + 1, wo + 1));
        for (int i = 0; i < 4; i++) wo16[i] = wo[i / 2];
        return;
    }
    const uint8_t *p = row + (size_t)u * bytes;
    if (type == T_Q4_K || type == T_Q5_K) {
        uint8_t sc[8], mn[8];
        k_scales(p + 4, sc, mn);
        const float d = half(p), dmin = half(p + 2);
        for (int c = 0; c < 4; c++) {
            __m256i lo, hi;
            k45_run(p, type == T_Q5_K, c, &lo, &hi);
            _mm256_storeu_si256((__m256i *)(q + 64 * c), lo), _mm256_storeu_si256((__m256i *)(q + 64 * c + 32), hi);
        }
        for (int i = 0; i < 8; i++) ws[i] = d * sc[i], wo16[2 * i] = wo16[2 * i + 1] = -dmin * mn[i];
        return;
    }
    int8_t sub[16]; /* Q2_K's and Q3_K's integer sub-scales, multiplied into q */
    if (type == T_Q6_K) {
        __m512 scales, mins;
        k16_scales(type, p, &scales, &mins);
        _mm512_storeu_ps(ws, scales), _mm512_storeu_ps(wo16, _mm512_sub_ps(_mm512_setzero_ps(), mins));
    } else if (type == T_Q3_K) { /* w = d * sc * (q - 4) = d * (q' - 124) */
        _mm_storeu_si128((__m128i *)sub, q3_scales(p + 96));
        const float d = half(p + 108);
        for (int i = 0; i < 16; i++) wo16[i] = -124.0f * d, ws[i / 2] = d;
    } else { /* Q2_K: w = d * (sc * q) - dmin * m */
        const float d = half(p + 80), dmin = half(p + 82);
        for (int i = 0; i < 16; i++) sub[i] = (int8_t)(p[i] & 15), wo16[i] = -dmin * (float)(p[i] >> 4), ws[i / 2] = d;
    }
    for (int h = 0; h < 2; h++) {
        __m256i runs[4];
        k16_half(type, p, h, runs);
        for (int k = 0; k < 4; k++) {
            const int r = 8 * h + 2 * k; /* the run of 32's first sub-block */
            if (type == T_Q3_K) runs[k] = times_sub_scales(runs[k], sub[r], sub[r + 1], 4, 124);
            if (type == T_Q2_K) runs[k] = times_sub_scales(runs[k], sub[r], sub[r + 1], 0, 0);
            _mm256_storeu_si256((__m256i *)(q + 128 * h + 32 * k), runs[k]);
        }
    }
}

/* Floats of gguf_tiles' scratch after its 16 K + 64 bytes of tiles: the 16 rows' ws of every group (K / 16 at
   most) and their wo of every 16 weights. */
#define GGUF_TILE_FLOATS(K) (2 * 16 * ((K) / 16))

/* Rows [n0, n0 + 16) of a GGUF matrix (or its last, shorter block), K a multiple of 64, for every input row.
   xs: the input's scale of each of its groups [M, K / group]; corr: -bias times each group's sum of x (zeros
   for a type of float offsets). */
BLOCKS static void gguf_tiles(const int8_t *x, const uint8_t *xq, const float *floats, const float *xs,
                              const int32_t *corr, int M, int K, const matrix *w, int b, uint8_t *scratch) {
    const int type = w->format - GGUF_BASE, group = gguf_tile_group(type), groups = K / group;
    const int N = w->N, n0 = b * 16, rows = N - n0 < 16 ? N - n0 : 16;
    const size_t row_bytes = gguf_row_bytes(type, K);
    uint8_t *tiles = (uint8_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    float *block_scales = (float *)(tiles + (size_t)16 * K), *offsets = block_scales + (size_t)16 * groups;
    const int unit = gguf_block_weights(type) == 256 ? 256 : 64, per_unit = unit / group;
    uint8_t q[16][256] __attribute__((aligned(64)));
    for (int u = 0; u < K / unit; u++) {
        for (int r = 0; r < 16; r++) {
            float ws[16] = {0}, wo16[16] = {0};
            if (r < rows) gguf_unit(type, (const uint8_t *)w->data + (size_t)(n0 + r) * row_bytes, u, q[r], ws, wo16);
            else memset(q[r], 0, sizeof(q[r])); /* rows past N: zero weights */
            for (int i = 0; i < per_unit; i++) block_scales[(size_t)(u * per_unit + i) * 16 + r] = ws[i];
            for (int i = 0; i < unit / 16; i++) offsets[(size_t)(u * unit / 16 + i) * 16 + r] = wo16[i];
        }
        for (int c = 0; c < unit / 64; c++) {
            __m512i v[16];
            for (int r = 0; r < 16; r++) v[r] = _mm512_load_si512(q[r] + 64 * c);
            transpose16(v);
            uint8_t *t = tiles + (size_t)(u * unit + 64 * c) * 16;
            for (int j = 0; j < 16; j++) _mm512_store_si512(t + 64 * j, v[j]);
        }
    }
    tile_rows(tiles, block_scales, groups, group, x, xs, corr, M, K, 1.0f, w->y + n0, N, rows);
    if (gguf_tile_bias(type)) return;
    const __mmask16 valid = (__mmask16)((1u << rows) - 1);
    const int step = type == T_Q2_K ? 1 : 2, blocks = K / 16 / step; /* the float offsets: per 16 (Q2_K) or 32 */
    for (int m = 0; m < M; m++) {
        const block_in in = input_row(x, xq, floats, K, m);
        const float *sums = step == 1 ? in.sums16 : in.sums32;
        __m512 part[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int j = 0; j < blocks; j++) /* four sums: one would wait on each fma before the next */
            part[j & 3] = _mm512_fmadd_ps(_mm512_loadu_ps(offsets + (size_t)j * step * 16), _mm512_set1_ps(sums[j]),
                                          part[j & 3]);
        const __m512 total = _mm512_add_ps(_mm512_add_ps(part[0], part[1]), _mm512_add_ps(part[2], part[3]));
        float *out = w->y + (size_t)m * N + n0;
        _mm512_mask_storeu_ps(out, valid, _mm512_add_ps(_mm512_maskz_loadu_ps(valid, out), total));
    }
}

/* --- Dequantizing (prefill: PyTorch's float32 matmul on a slice of rows, wren/quant/blocks.py) ---------- */

/* out[0..15] = ws * q + wo for 16 weights' q (bytes), one rounding each (as the dequantized weight). */
BLOCKS static inline void put16(float *out, __m128i q, float ws, float wo) {
    _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q)), _mm512_set1_ps(ws),
                                          _mm512_set1_ps(wo)));
}

BLOCKS static inline void put32(float *out, __m256i q, float ws, float wo) {
    put16(out, _mm256_castsi256_si128(q), ws, wo);
    put16(out + 16, _mm256_extracti128_si256(q, 1), ws, wo);
}

/* One row of a GGUF matrix [K] as float32 (wren/weights/gguf_quants.py's dequantize, to the last bit but for
   K-quant scales, whose two products it rounds once). */
BLOCKS static inline __attribute__((always_inline)) void dequantize_row(int type, const uint8_t *row, int K,
                                                                         float *out) {
    if (type == T_Q4_K || type == T_Q5_K) {
        const int five = type == T_Q5_K;
        for (int sb = 0; sb < K / 256; sb++, out += 256) {
            const uint8_t *p = row + (size_t)sb * (five ? 176 : 144);
            const float d = half(p), dmin = half(p + 2);
            uint8_t sc[8], mn[8];
            k_scales(p + 4, sc, mn);
            for (int c = 0; c < 4; c++) {
                __m256i lo, hi;
                k45_run(p, five, c, &lo, &hi);
                put32(out + 64 * c, lo, d * sc[2 * c], -dmin * mn[2 * c]);
                put32(out + 64 * c + 32, hi, d * sc[2 * c + 1], -dmin * mn[2 * c + 1]);
            }
        }
    } else if (type == T_Q6_K || type == T_Q3_K || type == T_Q2_K) {
        int weights, bytes;
        gguf_block_size(type, &weights, &bytes);
        for (int sb = 0; sb < K / 256; sb++, out += 256) {
            const uint8_t *p = row + (size_t)sb * bytes;
            __m512 scale_vector, min_vector;
            float scales[16], mins[16];
            k16_scales(type, p, &scale_vector, &min_vector);
            _mm512_storeu_ps(scales, scale_vector), _mm512_storeu_ps(mins, min_vector);
            for (int h = 0; h < 2; h++) {
                __m256i q[4];
                k16_half(type, p, h, q);
                for (int k = 0; k < 4; k++) {
                    const int r = 8 * h + 2 * k; /* the run of 32's first run of 16 */
                    put16(out + 128 * h + 32 * k, _mm256_castsi256_si128(q[k]), scales[r], -mins[r]);
                    put16(out + 128 * h + 32 * k + 16, _mm256_extracti128_si256(q[k], 1), scales[r + 1], -mins[r + 1]);
                }
            }
        }
    } else {
        int weights, bytes;
        gguf_block_size(type, &weights, &bytes);
        for (int b = 0; b < K / 32; b++) {
            float ws, wo;
            const __m256i q = block32(type, row + (size_t)b * bytes, &ws, &wo);
            put32(out + 32 * b, q, ws, wo);
        }
    }
}

BLOCKS static void dequantize_row_of(int type, const uint8_t *row, int K, float *out) {
    switch (type) { /* the common types their own copies, the type a constant */
    case T_Q8_0: dequantize_row(T_Q8_0, row, K, out); break;
    case T_Q5_0: dequantize_row(T_Q5_0, row, K, out); break;
    case T_Q4_K: dequantize_row(T_Q4_K, row, K, out); break;
    case T_Q6_K: dequantize_row(T_Q6_K, row, K, out); break;
    default: dequantize_row(type, row, K, out);
    }
}

/* rows [N, row bytes] of a GGUF matrix -> out [N, K] float32, rows in parallel. */
BLOCKS static void gguf_dequantize(int type, const uint8_t *data, long long N, int K, float *out, int threads) {
    const size_t row_bytes = gguf_row_bytes(type, K);
#pragma omp parallel for schedule(static) num_threads(threads) if (N >= 16)
    for (long long n = 0; n < N; n++) dequantize_row_of(type, data + (size_t)n * row_bytes, K, out + (size_t)n * K);
}
