/* The 16-bit codecs (float16, bfloat16 <-> float32) and the stochastic rounding bits, in C.
 * fastrms/_codecs.py defines them; every function here gives its bits. Included once by
 * rmsprop.c. The portable element functions are branch-free integer code that GCC vectorises
 * for each SIMD level; F16C and AVX512-BF16 loops replace some of them where the CPU has the
 * instructions, and hand the rare lanes the instructions treat differently (NaN payloads,
 * bfloat16 subnormal inputs) to the portable code, so that the bits never depend on the CPU. */

static ALWAYS_INLINE uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static ALWAYS_INLINE float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* -- element functions ------------------------------------------------------------------- */

/* float16 -> float32 bits, exact; NaN payloads kept (NumPy: a signalling NaN stays one). */
static ALWAYS_INLINE uint32_t f16_widen(uint32_t h) {
    const uint32_t sign = (h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    const uint32_t normal = ((e + 112u) << 23) | (m << 13);
    const uint32_t special = 0x7F800000u | (m << 13);
    const uint32_t subnormal = f32_bits((float)(int32_t)m * 0x1p-24f); /* exact: m < 2^10 */
    return sign | (e == 31u ? special : (e == 0u ? subnormal : normal));
}

/* The float16 NaN NumPy writes for a float32 NaN: its top ten payload bits, never zero. */
static ALWAYS_INLINE uint32_t f16_nan(uint32_t x) {
    const uint32_t payload = (x & 0x7FFFFFu) >> 13;
    return ((x >> 16) & 0x8000u) | 0x7C00u | payload | (payload == 0u);
}

/* float32 bits -> float16, round to nearest even (NumPy's npy_floatbits_to_halfbits). */
static ALWAYS_INLINE uint16_t f16_nearest(uint32_t x) {
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t a = x & 0x7FFFFFFFu;
    const uint32_t normal = (a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13;
    /* Below 2^-14 the result is the significand shifted right by 126 - e (14..24), rounded;
     * below 2^-25 it is 0 (shift 25 keeps nothing, whatever the lanes not taken compute). */
    const uint32_t e = a >> 23;
    const uint32_t shift = (e < 102u || e > 112u) ? 25u : 126u - e;
    const uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
    const uint32_t subnormal = (m + (1u << (shift - 1u)) - 1u + ((m >> shift) & 1u)) >> shift;
    const uint32_t value = a >= 0x477FF000u ? 0x7C00u : (a >= 0x38800000u ? normal : subnormal);
    return (uint16_t)(a > 0x7F800000u ? f16_nan(x) : (sign | value));
}

/* float32 bits -> bfloat16, round to nearest even; NaN -> the quiet NaN of its sign (ml_dtypes).
 * The NaN select is made on the 32-bit value before the one shift: GCC then vectorises it as one
 * blend in 32-bit lanes, where selecting between two 16-bit results cost it a second narrowing
 * (measured in the fused bfloat16 loop, in cache: 0.61 against 0.76 ns/element). The same bits
 * as selecting after the shift, checked over all 2^32 inputs. */
static ALWAYS_INLINE uint16_t bf16_nearest(uint32_t x) {
    const uint32_t biased = x + 0x7FFFu + ((x >> 16) & 1u);
    const uint32_t nan = (x & 0x80000000u) | 0x7FC00000u;
    return (uint16_t)(((x & 0x7FFFFFFFu) > 0x7F800000u ? nan : biased) >> 16);
}

/* Stochastic rounding with 32 random bits r (fastrms/_codecs.py encode_stochastic). */
static ALWAYS_INLINE uint16_t bf16_stochastic(uint32_t x, uint32_t r) {
    const uint32_t rounded = (x + (r & 0xFFFFu)) >> 16;
    const uint32_t nan = ((x >> 16) & 0x8000u) | 0x7FC0u;
    return (uint16_t)((x & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
}

static ALWAYS_INLINE uint16_t f16_stochastic(uint32_t x, uint32_t r) {
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t a = x & 0x7FFFFFFFu;
    /* |x| >= 2^-14: 13 dropped bits. */
    const uint32_t truncated = (a + (r & 0x1FFFu)) & 0xFFFFE000u;
    const uint32_t normal = truncated >= 0x47800000u ? 0x7C00u : (truncated - 0x38000000u) >> 13;
    /* |x| < 2^-14: n = m / 2^s units of 2^-24, rounded with min(s, 31) random bits. */
    const uint32_t e = a >> 23;
    const uint32_t m = (a & 0x7FFFFFu) | (e ? 0x800000u : 0u);
    const uint32_t s = 126u - (e ? e : 1u);
    const uint32_t kept = s < 31u ? s : 31u;
    const uint32_t excess = s - kept;
    const uint32_t dropped = excess < 31u ? excess : 31u;
    const uint32_t units = ((m >> dropped) + (r & ((1u << kept) - 1u))) >> kept;
    const uint32_t value = a >= 0x38800000u ? normal : units;
    return (uint16_t)(a > 0x7F800000u ? f16_nan(x) : (sign | value));
}

/* hash-prospector's triple32: a 32-bit permutation with near-ideal avalanche. */
static ALWAYS_INLINE uint32_t triple32(uint32_t x) {
    x ^= x >> 17;
    x *= 0xED5AD4BBu;
    x ^= x >> 11;
    x *= 0xAC4C1B51u;
    x ^= x >> 15;
    x *= 0x31848BABu;
    x ^= x >> 14;
    return x;
}

/* k0 already holds the counter's high word (k0 ^ high * 0x9E3779B9). */
static ALWAYS_INLINE uint32_t random_bits(uint32_t k0, uint32_t k1, uint32_t counter_low) {
    return triple32(counter_low ^ k0) ^ k1;
}

/* -- loops, one copy per SIMD level ------------------------------------------------------- */

typedef void (*decode_fn)(const uint16_t *, float *, size_t);
/* Two streams at once (the param and the gradient of a block): one pass, not two. */
typedef void (*decode_pair_fn)(const uint16_t *, const uint16_t *, float *, float *, size_t);
typedef void (*encode_fn)(const float *, uint16_t *, size_t);
/* (in, out, n, k0, k1, counter): k0 holds the counter's high word; `counter` is the 64-bit
 * index of in[0] (float16: its counter is the element index; bfloat16: the element index, the
 * counter being index / 2), and the callee's 32-bit counter arithmetic does not wrap. */
typedef void (*encode_stochastic_fn)(const float *, uint16_t *, size_t, uint32_t, uint32_t,
                                     uint64_t);
typedef void (*unscale_fn)(const float *, float *, size_t, float, float);

/* bfloat16 takes 16 random bits per element: element i the low (even i) or high (odd i) half
 * of the bits of counter i / 2, which halves the hashing. */
static ALWAYS_INLINE void bf16_stochastic_pairs(const float *restrict in, uint16_t *restrict out,
                                                size_t n, uint32_t k0, uint32_t k1,
                                                uint64_t first) {
    size_t i = 0;
    if (n && (first & 1u)) {
        const uint32_t r = random_bits(k0, k1, (uint32_t)(first >> 1));
        out[0] = bf16_stochastic(f32_bits(in[0]), r >> 16);
        i = 1;
    }
    const uint32_t pair0 = (uint32_t)((first + i) >> 1);
    for (size_t k = 0; i + 2 <= n; i += 2, ++k) {
        const uint32_t r = random_bits(k0, k1, pair0 + (uint32_t)k);
        out[i] = bf16_stochastic(f32_bits(in[i]), r);
        out[i + 1] = bf16_stochastic(f32_bits(in[i + 1]), r >> 16);
    }
    if (i < n)
        out[i] = bf16_stochastic(f32_bits(in[i]),
                                 random_bits(k0, k1, (uint32_t)((first + i) >> 1)));
}

#define F16_CODECS_FOR_LEVEL(level, target)                                                   \
    static target void decode_f16_##level(const uint16_t *restrict in, float *restrict out,   \
                                          size_t n) {                                         \
        for (size_t i = 0; i < n; ++i) out[i] = f32_from_bits(f16_widen(in[i]));              \
    }                                                                                         \
    static target void decode_pair_f16_##level(const uint16_t *restrict a,                    \
                                               const uint16_t *restrict b,                    \
                                               float *restrict a_out, float *restrict b_out,  \
                                               size_t n) {                                    \
        for (size_t i = 0; i < n; ++i) {                                                      \
            a_out[i] = f32_from_bits(f16_widen(a[i]));                                        \
            b_out[i] = f32_from_bits(f16_widen(b[i]));                                        \
        }                                                                                     \
    }                                                                                         \
    static target void encode_f16_nearest_##level(const float *restrict in,                   \
                                                  uint16_t *restrict out, size_t n) {         \
        for (size_t i = 0; i < n; ++i) out[i] = f16_nearest(f32_bits(in[i]));                 \
    }                                                                                         \
    static target void encode_f16_stochastic_##level(const float *restrict in,                \
                                                     uint16_t *restrict out, size_t n,        \
                                                     uint32_t k0, uint32_t k1,                \
                                                     uint64_t first) {                        \
        const uint32_t low = (uint32_t)first;                                                 \
        for (size_t i = 0; i < n; ++i)                                                        \
            out[i] = f16_stochastic(f32_bits(in[i]), random_bits(k0, k1, low + (uint32_t)i)); \
    }                                                                                         \
    /* The loss-scaled gradient block; in may be out (an exact reciprocal: the same bits). */ \
    static target void unscale_##level(const float *in, float *out, size_t n, float scale,    \
                                       float inverse) {                                       \
        if (inverse != 0.0f)                                                                  \
            for (size_t i = 0; i < n; ++i) out[i] = in[i] * inverse;                          \
        else                                                                                  \
            for (size_t i = 0; i < n; ++i) out[i] = in[i] / scale;                            \
    }
#define BF16_CODECS_FOR_LEVEL(level, target)                                                  \
    static target void decode_bf16_##level(const uint16_t *restrict in, float *restrict out,  \
                                           size_t n) {                                        \
        for (size_t i = 0; i < n; ++i) out[i] = f32_from_bits((uint32_t)in[i] << 16);         \
    }                                                                                         \
    static target void decode_pair_bf16_##level(const uint16_t *restrict a,                   \
                                                const uint16_t *restrict b,                   \
                                                float *restrict a_out, float *restrict b_out, \
                                                size_t n) {                                   \
        for (size_t i = 0; i < n; ++i) {                                                      \
            a_out[i] = f32_from_bits((uint32_t)a[i] << 16);                                   \
            b_out[i] = f32_from_bits((uint32_t)b[i] << 16);                                   \
        }                                                                                     \
    }                                                                                         \
    static target void encode_bf16_nearest_##level(const float *restrict in,                  \
                                                   uint16_t *restrict out, size_t n) {        \
        for (size_t i = 0; i < n; ++i) out[i] = bf16_nearest(f32_bits(in[i]));                \
    }                                                                                         \
    static target void encode_bf16_stochastic_##level(const float *restrict in,               \
                                                      uint16_t *restrict out, size_t n,       \
                                                      uint32_t k0, uint32_t k1,               \
                                                      uint64_t first) {                       \
        bf16_stochastic_pairs(in, out, n, k0, k1, first);                                     \
    }
F16_CODECS_FOR_LEVEL(baseline, )
F16_CODECS_FOR_LEVEL(avx2, TARGET_AVX2)
F16_CODECS_FOR_LEVEL(avx512, TARGET_AVX512)
BF16_CODECS_FOR_LEVEL(baseline, )
BF16_CODECS_FOR_LEVEL(avx512, TARGET_AVX512)
#undef F16_CODECS_FOR_LEVEL
#undef BF16_CODECS_FOR_LEVEL

/* -- bfloat16 at the AVX2 level, written out: GCC's vectorisation of the loops above spends
 * about twice the instructions (widening through 16-bit lanes and back, the NaN select done on
 * every vector), and these loops share the vector units with the float32 update. -------- */

/* 16 bfloat16 -> float32: interleave zeros below each value, in element order. */
static ALWAYS_INLINE TARGET_AVX2 void widen16_bf16_avx2(const uint16_t *in, float *out) {
    const __m256i h = _mm256_permute4x64_epi64(_mm256_loadu_si256((const __m256i *)in), 0xD8);
    _mm256_storeu_si256((__m256i *)out, _mm256_unpacklo_epi16(_mm256_setzero_si256(), h));
    _mm256_storeu_si256((__m256i *)(out + 8), _mm256_unpackhi_epi16(_mm256_setzero_si256(), h));
}

static TARGET_AVX2 void decode_bf16_avx2(const uint16_t *restrict in, float *restrict out,
                                         size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) widen16_bf16_avx2(in + i, out + i);
    for (; i < n; ++i) out[i] = f32_from_bits((uint32_t)in[i] << 16);
}

static TARGET_AVX2 void decode_pair_bf16_avx2(const uint16_t *restrict a,
                                              const uint16_t *restrict b, float *restrict a_out,
                                              float *restrict b_out, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        widen16_bf16_avx2(a + i, a_out + i);
        widen16_bf16_avx2(b + i, b_out + i);
    }
    for (; i < n; ++i) {
        a_out[i] = f32_from_bits((uint32_t)a[i] << 16);
        b_out[i] = f32_from_bits((uint32_t)b[i] << 16);
    }
}

static ALWAYS_INLINE TARGET_AVX2 __m256i bf16_round_avx2(__m256i x) {
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    const __m256i biased = _mm256_add_epi32(x, _mm256_set1_epi32(0x7FFF));
    return _mm256_srli_epi32(_mm256_add_epi32(biased, lsb), 16);
}

/* Two vectors of 32-bit results (each < 2^16) -> 16 uint16 in element order. */
static ALWAYS_INLINE TARGET_AVX2 void store_halves_avx2(uint16_t *out, __m256i a, __m256i b) {
    _mm256_storeu_si256((__m256i *)out,
                        _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8));
}

static ALWAYS_INLINE TARGET_AVX2 int any_nan_avx2(__m256 a, __m256 b) {
    return _mm256_movemask_ps(
        _mm256_or_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q), _mm256_cmp_ps(b, b, _CMP_UNORD_Q)));
}

/* A vector holding a NaN (rare) goes through the element function. */
static TARGET_AVX2 void encode_bf16_nearest_avx2(const float *restrict in, uint16_t *restrict out,
                                                 size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 a = _mm256_loadu_ps(in + i), b = _mm256_loadu_ps(in + i + 8);
        if (any_nan_avx2(a, b)) {
            for (size_t j = i; j < i + 16; ++j) out[j] = bf16_nearest(f32_bits(in[j]));
            continue;
        }
        store_halves_avx2(out + i, bf16_round_avx2(_mm256_castps_si256(a)),
                          bf16_round_avx2(_mm256_castps_si256(b)));
    }
    for (; i < n; ++i) out[i] = bf16_nearest(f32_bits(in[i]));
}

static ALWAYS_INLINE TARGET_AVX2 __m256i triple32_avx2(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 17));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0xED5AD4BBu));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 11));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0xAC4C1B51u));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x31848BABu));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 14));
}

static TARGET_AVX2 void encode_bf16_stochastic_avx2(const float *restrict in,
                                                    uint16_t *restrict out, size_t n,
                                                    uint32_t k0, uint32_t k1, uint64_t first) {
    size_t i = 0;
    if (first & 1u) { /* start on a pair */
        bf16_stochastic_pairs(in, out, n < 1 ? n : 1, k0, k1, first);
        i = 1;
    }
    const __m256i key0 = _mm256_set1_epi32((int)k0), key1 = _mm256_set1_epi32((int)k1);
    __m256i counter = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)((first + i) >> 1)),
                                       _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (; i + 16 <= n; i += 16) {
        const __m256 a = _mm256_loadu_ps(in + i), b = _mm256_loadu_ps(in + i + 8);
        const __m256i bits =
            _mm256_xor_si256(triple32_avx2(_mm256_xor_si256(counter, key0)), key1);
        counter = _mm256_add_epi32(counter, _mm256_set1_epi32(8));
        if (any_nan_avx2(a, b)) {
            bf16_stochastic_pairs(in + i, out + i, 16, k0, k1, first + i);
            continue;
        }
        /* Lane k holds the bits of elements 2k (low half) and 2k + 1 (high half). */
        const __m256i ra = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(bits));
        const __m256i rb = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(bits, 1));
        store_halves_avx2(out + i,
                          _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(a), ra), 16),
                          _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(b), rb), 16));
    }
    if (i < n) bf16_stochastic_pairs(in + i, out + i, n - i, k0, k1, first + i);
}

/* -- F16C (vcvtph2ps / vcvtps2ph) and AVX512-BF16 (vcvtneps2bf16) ------------------------- */

#define TARGET_AVX2_F16C __attribute__((target("avx2,f16c")))
#define TARGET_AVX512_F16C \
    __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,f16c,prefer-vector-width=512")))
#define TARGET_AVX512_BF16                                                                  \
    __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx512bf16,"                 \
                          "prefer-vector-width=512")))

/* vcvtph2ps quiets a signalling NaN, NumPy does not: a vector holding a NaN goes portable. */
static ALWAYS_INLINE TARGET_AVX2_F16C void decode_f16_hw(const uint16_t *restrict in,
                                                          float *restrict out, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128((const __m128i *)(in + i));
        const __m128i magnitude = _mm_and_si128(h, _mm_set1_epi16(0x7FFF));
        if (_mm_movemask_epi8(_mm_cmpgt_epi16(magnitude, _mm_set1_epi16(0x7C00)))) {
            for (size_t j = i; j < i + 8; ++j) out[j] = f32_from_bits(f16_widen(in[j]));
        } else {
            _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
        }
    }
    for (; i < n; ++i) out[i] = f32_from_bits(f16_widen(in[i]));
}

/* vcvtps2ph sets the quiet bit of a NaN, NumPy keeps the payload as it is: NaNs go portable.
 * Everything else (ties, subnormal results, overflow to infinity) is IEEE round to nearest
 * even, which is what NumPy computes. */
static ALWAYS_INLINE TARGET_AVX2_F16C void encode_f16_nearest_hw(const float *restrict in,
                                                                 uint16_t *restrict out,
                                                                 size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(in + i);
        if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q))) {
            for (size_t j = i; j < i + 8; ++j) out[j] = f16_nearest(f32_bits(in[j]));
        } else {
            _mm_storeu_si128((__m128i *)(out + i),
                             _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
        }
    }
    for (; i < n; ++i) out[i] = f16_nearest(f32_bits(in[i]));
}

static TARGET_AVX2_F16C void decode_f16_f16c_avx2(const uint16_t *restrict in,
                                                  float *restrict out, size_t n) {
    decode_f16_hw(in, out, n);
}
static TARGET_AVX2_F16C void decode_pair_f16_f16c_avx2(const uint16_t *restrict a,
                                                       const uint16_t *restrict b,
                                                       float *restrict a_out,
                                                       float *restrict b_out, size_t n) {
    decode_f16_hw(a, a_out, n);
    decode_f16_hw(b, b_out, n);
}
static TARGET_AVX2_F16C void encode_f16_nearest_f16c_avx2(const float *restrict in,
                                                          uint16_t *restrict out, size_t n) {
    encode_f16_nearest_hw(in, out, n);
}
static TARGET_AVX512_F16C void decode_f16_f16c_avx512(const uint16_t *restrict in,
                                                      float *restrict out, size_t n) {
    decode_f16_hw(in, out, n);
}
static TARGET_AVX512_F16C void decode_pair_f16_f16c_avx512(const uint16_t *restrict a,
                                                           const uint16_t *restrict b,
                                                           float *restrict a_out,
                                                           float *restrict b_out, size_t n) {
    decode_f16_hw(a, a_out, n);
    decode_f16_hw(b, b_out, n);
}
static TARGET_AVX512_F16C void encode_f16_nearest_f16c_avx512(const float *restrict in,
                                                              uint16_t *restrict out, size_t n) {
    encode_f16_nearest_hw(in, out, n);
}

/* vcvtneps2bf16 rounds to nearest even but reads subnormal inputs as zero and writes its own
 * NaN: vectors holding either take the portable path. Not run on the development machine
 * (AMD Zen 3 has no AVX512-BF16): the tests check this path only where the CPU has it. */
static TARGET_AVX512_BF16 void encode_bf16_nearest_avx512bf16(const float *restrict in,
                                                              uint16_t *restrict out, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(in + i);
        const __m512i magnitude =
            _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF));
        const __mmask16 nan = _mm512_cmpgt_epu32_mask(magnitude, _mm512_set1_epi32(0x7F800000));
        const __mmask16 subnormal = _mm512_cmplt_epu32_mask(
            _mm512_sub_epi32(magnitude, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x007FFFFF));
        if (nan | subnormal) {
            for (size_t j = i; j < i + 16; ++j) out[j] = bf16_nearest(f32_bits(in[j]));
        } else {
            const __m256bh narrowed = _mm512_cvtneps_pbh(v);
            memcpy(out + i, &narrowed, sizeof narrowed);
        }
    }
    for (; i < n; ++i) out[i] = bf16_nearest(f32_bits(in[i]));
}
