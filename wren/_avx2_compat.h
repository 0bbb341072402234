/* The AVX2 build's stand-ins for the AVX-512 intrinsics _native.c and _gguf_blocks.h use: SIMDe's, as their own
   names (SIMDE_ENABLE_NATIVE_ALIASES: a 512-bit vector is two 256-bit registers), and below the few SIMDe lacks
   or emulates slowly. Included only by the AVX2 build (WREN_AVX2), after immintrin.h. */
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

/* VNNI's acc + 4-byte dot products of unsigned a and signed b, exact (no saturation): the even and the odd bytes
   widened to 16 bits, multiplied and summed in pairs by vpmaddwd (SIMDe's widens every byte to 32 bits). */
static inline __attribute__((always_inline)) __m256i avx2_dpbusd256(__m256i acc, __m256i a, __m256i b) {
    const __m256i a_even = _mm256_and_si256(a, _mm256_set1_epi16(0x00FF)), a_odd = _mm256_srli_epi16(a, 8);
    const __m256i b_even = _mm256_srai_epi16(_mm256_slli_epi16(b, 8), 8), b_odd = _mm256_srai_epi16(b, 8);
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(a_even, b_even), _mm256_madd_epi16(a_odd, b_odd)));
}

/* A 256-bit (acc, a, b) product on each half of 512-bit vectors. */
#define AVX2_ON_HALVES(name, product)                                                                         \
    static inline __attribute__((always_inline)) simde__m512i name(simde__m512i acc, simde__m512i a,          \
                                                                   simde__m512i b) {                         \
        simde__m512i_private r = simde__m512i_to_private(acc), x = simde__m512i_to_private(a),                \
                             y = simde__m512i_to_private(b);                                                  \
        r.m256i[0] = product(r.m256i[0], x.m256i[0], y.m256i[0]);                                             \
        r.m256i[1] = product(r.m256i[1], x.m256i[1], y.m256i[1]);                                             \
        return simde__m512i_from_private(r);                                                                  \
    }

AVX2_ON_HALVES(avx2_dpbusd, avx2_dpbusd256)

/* acc + 4-byte dot products of signed a and signed b, where no b is -128: vpmaddubsw of |a| and b given a's
   sign (a pair is at most 2 * 128 * 127: no saturation), its pairs summed by vpmaddwd. */
static inline __attribute__((always_inline)) __m256i avx2_signed_dot256(__m256i acc, __m256i a, __m256i b) {
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(a), _mm256_sign_epi8(b, a));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

AVX2_ON_HALVES(avx2_signed_dot, avx2_signed_dot256)
#undef _mm256_dpbusd_epi32
#define _mm256_dpbusd_epi32(acc, a, b) avx2_dpbusd256(acc, a, b)

static inline float avx2_sum8(__m256 s) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

static inline float avx2_reduce_add_ps(simde__m512 v) {
    simde__m512_private p = simde__m512_to_private(v);
    return avx2_sum8(_mm256_add_ps(p.m256[0], p.m256[1]));
}

static inline simde__m512 avx2_of_floats(__m256 lo, __m256 hi) {
    simde__m512_private r;
    r.m256[0] = lo, r.m256[1] = hi;
    return simde__m512_from_private(r);
}
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps(v) avx2_reduce_add_ps(v)

/* Only the bytes the mask selects are read (a prefix, as the codes kernels' masks are, in one copy). */
static inline simde__m512i avx2_maskz_loadu_epi8(uint64_t mask, const void *p) {
    uint8_t bytes[64] = {0};
    if ((mask & (mask + 1)) == 0)
        memcpy(bytes, p, (size_t)__builtin_popcountll(mask));
    else
        for (int i = 0; i < 64; i++)
            if (mask >> i & 1) bytes[i] = ((const uint8_t *)p)[i];
    return simde_mm512_loadu_si512(bytes);
}
#undef _mm512_maskz_loadu_epi8
#define _mm512_maskz_loadu_epi8(mask, p) avx2_maskz_loadu_epi8(mask, p)

/* --- What this SIMDe lacks, on two halves ---------------------------------------------------------------- */
#define AVX2_HALVES(type, v) type##_private v##_ = type##_to_private(v)

static inline long long avx2_reduce_add_epi64(simde__m512i v) {
    AVX2_HALVES(simde__m512i, v);
    const __m256i s = _mm256_add_epi64(v_.m256i[0], v_.m256i[1]);
    const __m128i h = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    return _mm_cvtsi128_si64(h) + _mm_extract_epi64(h, 1);
}
#undef _mm512_reduce_add_epi64
#define _mm512_reduce_add_epi64(v) avx2_reduce_add_epi64(v)

/* 8 int32 of a 256-bit half truncated to their low byte / low 16 bits, in order, in the low 8 / 16 bytes */
static inline __m128i avx2_low_bytes(__m256i v) {
    const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i b = _mm256_shuffle_epi8(v, pick);
    return _mm_unpacklo_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
}

static inline __m128i avx2_low_words(__m256i v) {
    const __m256i pick = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i b = _mm256_shuffle_epi8(v, pick);
    return _mm_unpacklo_epi64(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
}

static inline __m128i avx2_cvtepi32_epi8(simde__m512i v) {
    AVX2_HALVES(simde__m512i, v);
    return _mm_unpacklo_epi64(avx2_low_bytes(v_.m256i[0]), avx2_low_bytes(v_.m256i[1]));
}
#undef _mm512_cvtepi32_epi8
#define _mm512_cvtepi32_epi8(v) avx2_cvtepi32_epi8(v)

static inline __m256i avx2_cvtepi32_epi16(simde__m512i v) {
    AVX2_HALVES(simde__m512i, v);
    return _mm256_set_m128i(avx2_low_words(v_.m256i[1]), avx2_low_words(v_.m256i[0]));
}
#undef _mm512_cvtepi32_epi16
#define _mm512_cvtepi32_epi16(v) avx2_cvtepi32_epi16(v)

static inline simde__m512i avx2_of_halves(__m256i lo, __m256i hi) {
    simde__m512i_private r;
    r.m256i[0] = lo, r.m256i[1] = hi;
    return simde__m512i_from_private(r);
}

static inline simde__m512i avx2_cvtepi8_epi32(__m128i v) {
    return avx2_of_halves(_mm256_cvtepi8_epi32(v), _mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v, v)));
}
#undef _mm512_cvtepi8_epi32
#define _mm512_cvtepi8_epi32(v) avx2_cvtepi8_epi32(v)

static inline simde__m512i avx2_cvtepu8_epi32(__m128i v) {
    return avx2_of_halves(_mm256_cvtepu8_epi32(v), _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(v, v)));
}
#undef _mm512_cvtepu8_epi32
#define _mm512_cvtepu8_epi32(v) avx2_cvtepu8_epi32(v)

static inline simde__m512i avx2_cvtepu8_epi16(__m256i v) {
    return avx2_of_halves(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(v)),
                          _mm256_cvtepu8_epi16(_mm256_extracti128_si256(v, 1)));
}
#undef _mm512_cvtepu8_epi16
#define _mm512_cvtepu8_epi16(v) avx2_cvtepu8_epi16(v)

#define AVX2_CVTPS_PH(v, rounding)                                                                            \
    __extension__({                                                                                           \
        simde__m512_private v_ = simde__m512_to_private(v);                                                   \
        _mm256_set_m128i(_mm256_cvtps_ph(v_.m256[1], rounding), _mm256_cvtps_ph(v_.m256[0], rounding));       \
    })
#undef _mm512_cvtps_ph
#define _mm512_cvtps_ph(v, rounding) AVX2_CVTPS_PH(v, rounding)

static inline simde__m512 avx2_mask3_fmadd_ps(simde__m512 a, simde__m512 b, simde__m512 c, uint16_t k) {
    return simde_mm512_mask_mov_ps(c, k, simde_mm512_fmadd_ps(a, b, c));
}
#undef _mm512_mask3_fmadd_ps
#define _mm512_mask3_fmadd_ps(a, b, c, k) avx2_mask3_fmadd_ps(a, b, c, k)

/* Bytes whose bit is set in the 32-bit mask k: 0xFF, else 0. */
static inline __m256i avx2_byte_mask(uint32_t k) {
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)k),
                                               _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                                2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
}

static inline uint32_t avx2_test_epi8_mask(__m256i a, __m256i b) {
    const __m256i zero = _mm256_cmpeq_epi8(_mm256_and_si256(a, b), _mm256_setzero_si256());
    return ~(uint32_t)_mm256_movemask_epi8(zero);
}
#undef _mm256_test_epi8_mask
#define _mm256_test_epi8_mask(a, b) avx2_test_epi8_mask(a, b)

static inline __m256i avx2_mask_add_epi8(__m256i src, uint32_t k, __m256i a, __m256i b) {
    return _mm256_blendv_epi8(src, _mm256_add_epi8(a, b), avx2_byte_mask(k));
}
#undef _mm256_mask_add_epi8
#define _mm256_mask_add_epi8(src, k, a, b) avx2_mask_add_epi8(src, k, a, b)

/* Masked float loads and stores touch only the selected lanes (SIMDe's read and write all 16: past the end of
   a buffer). */
static inline __m256i avx2_lane_mask(uint32_t k8) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)k8), bit), bit);
}

static inline simde__m512 avx2_maskz_loadu_ps(uint16_t k, const void *p) {
    simde__m512_private r;
    r.m256[0] = _mm256_maskload_ps((const float *)p, avx2_lane_mask(k & 0xFF));
    r.m256[1] = _mm256_maskload_ps((const float *)p + 8, avx2_lane_mask(k >> 8));
    return simde__m512_from_private(r);
}
#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps(k, p) avx2_maskz_loadu_ps(k, p)

static inline void avx2_mask_storeu_ps(void *p, uint16_t k, simde__m512 v) {
    AVX2_HALVES(simde__m512, v);
    _mm256_maskstore_ps((float *)p, avx2_lane_mask(k & 0xFF), v_.m256[0]);
    _mm256_maskstore_ps((float *)p + 8, avx2_lane_mask(k >> 8), v_.m256[1]);
}
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps(p, k, v) avx2_mask_storeu_ps(p, k, v)

/* --- The codes kernels' unpack (unpack_chunk) without VBMI ---------------------------------------------------
   64 codes of `bits` (1-6) bits, 8 to a run of `bits` bytes, little-endian, through the 64-entry table
   (repeated every 2^bits entries). Each code lies in the 16-bit window at its first byte: a byte shuffle
   puts every code's window in a 16-bit element, a multiply by 2^(8 - offset) and a shift by 8 leave the code
   in the element's low bits (what lies above is ignored by the table), 16 codes a register. */
static uint8_t avx2_window_of[7][16] __attribute__((aligned(16)));
static uint16_t avx2_scale_of[7][8] __attribute__((aligned(16)));

static void avx2_init_unpack(void) {
    for (int bits = 1; bits <= 6; bits++)
        for (int j = 0; j < 8; j++) {
            const int first = j * bits / 8, offset = j * bits % 8;
            avx2_window_of[bits][2 * j] = (uint8_t)first;
            avx2_window_of[bits][2 * j + 1] = (uint8_t)(first + 1);
            avx2_scale_of[bits][j] = (uint16_t)(1 << (8 - offset));
        }
}

/* A 64-entry table as 4 registers, each one of its 16-byte quarters in both 128-bit lanes (vpshufb's reach). */
static inline __attribute__((always_inline)) void avx2_table_quarters(const uint8_t *table, __m128i flip,
                                                                      __m256i *quarters) {
    for (int i = 0; i < 4; i++)
        quarters[i] =
            _mm256_broadcastsi128_si256(_mm_xor_si128(_mm_loadu_si128((const __m128i *)(table + 16 * i)), flip));
}

static inline __attribute__((always_inline)) __m256i avx2_lookup(__m256i codes, const __m256i *quarters, int bits) {
    if (bits <= 4) /* the table repeats every 16 entries */
        return _mm256_shuffle_epi8(quarters[0], _mm256_and_si256(codes, _mm256_set1_epi8(15)));
    const __m256i at = _mm256_and_si256(codes, _mm256_set1_epi8(63));
    const __m256i q0 = _mm256_shuffle_epi8(quarters[0], at), q1 = _mm256_shuffle_epi8(quarters[1], at),
                  q2 = _mm256_shuffle_epi8(quarters[2], at), q3 = _mm256_shuffle_epi8(quarters[3], at);
    const __m256i bit4 = _mm256_slli_epi64(at, 3), bit5 = _mm256_slli_epi64(at, 2); /* to each byte's top bit */
    return _mm256_blendv_epi8(_mm256_blendv_epi8(q0, q1, bit4), _mm256_blendv_epi8(q2, q3, bit4), bit5);
}

/* The 64 codes at src through the table (as avx2_table_quarters holds it): codes 0-31 in *lo, 32-63 in *hi. */
static inline __attribute__((always_inline)) void avx2_unpack64(const uint8_t *src, int bits, const __m256i *quarters,
                                                                int tail, __m256i *lo, __m256i *hi) {
    uint8_t copy[96] __attribute__((aligned(32))); /* (the loads below reach 16 bytes past 64) */
    if (tail) { /* only the chunk's own 8 * bits bytes (2 * bits dwords) are read: masked loads, no call */
        const int dwords = 2 * bits;
        const uint32_t first = (1u << (dwords < 8 ? dwords : 8)) - 1;
        const uint32_t second = dwords > 8 ? (1u << (dwords - 8)) - 1 : 0;
        _mm256_store_si256((__m256i *)copy,
                           _mm256_maskload_epi32((const int *)(const void *)src, avx2_lane_mask(first)));
        _mm256_store_si256((__m256i *)(copy + 32),
                           _mm256_maskload_epi32((const int *)(const void *)(src + 32), avx2_lane_mask(second)));
        _mm256_store_si256((__m256i *)(copy + 64), _mm256_setzero_si256());
        src = copy;
    }
    const __m256i window = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)avx2_window_of[bits]));
    const __m256i scale = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)avx2_scale_of[bits]));
    __m256i sixteen[4];
    for (int q = 0; q < 4; q++) { /* runs 2q and 2q + 1, one a 128-bit half */
        const __m256i raw = _mm256_loadu2_m128i((const __m128i *)(src + (2 * q + 1) * bits),
                                                (const __m128i *)(src + 2 * q * bits));
        sixteen[q] = _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(raw, window), scale), 8);
    }
    /* packus interleaves the halves: 0-7, 16-23, 8-15, 24-31, put back in order */
    *lo = avx2_lookup(_mm256_permute4x64_epi64(_mm256_packus_epi16(sixteen[0], sixteen[1]), 0xD8), quarters, bits);
    *hi = avx2_lookup(_mm256_permute4x64_epi64(_mm256_packus_epi16(sixteen[2], sixteen[3]), 0xD8), quarters, bits);
}

static inline __attribute__((always_inline)) simde__m512i avx2_unpack_chunk(const uint8_t *src, int bits,
                                                                            simde__m512i table, int tail) {
    AVX2_HALVES(simde__m512i, table);
    uint8_t bytes[64];
    memcpy(bytes, table_.m256i, 64);
    __m256i quarters[4];
    avx2_table_quarters(bytes, _mm_setzero_si128(), quarters);
    simde__m512i_private out;
    avx2_unpack64(src, bits, quarters, tail, &out.m256i[0], &out.m256i[1]);
    return simde__m512i_from_private(out);
}

/* table[index] for indices below 16 (as vpermb would look them up in a 64-byte table) */
static inline __attribute__((always_inline)) simde__m512i avx2_lookup16(simde__m512i index, simde__m512i table) {
    AVX2_HALVES(simde__m512i, index);
    AVX2_HALVES(simde__m512i, table);
    const __m256i sixteen = _mm256_broadcastsi128_si256(table_.m128i[0]);
    return avx2_of_halves(_mm256_shuffle_epi8(sixteen, index_.m256i[0]), _mm256_shuffle_epi8(sixteen, index_.m256i[1]));
}
