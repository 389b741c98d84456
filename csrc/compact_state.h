/* Compact optimizer state (bfloat16 arrays, blockwise8 buffers) with float32 or 16-bit
 * parameters. The common combinations run the fused loops of compact_fused.h; this file holds
 * the codecs and the generic block driver. Each thread takes whole blocks of 256 elements (the
 * blockwise8 block): every stream of the block is decoded into float32 scratch on the stack
 * (or used in place when it is float32), the float32 update body of rmsprop_kernel.h runs on
 * it, and the results are encoded back: 16-bit params as rmsprop16.h does, bfloat16 state by
 * round to nearest even, blockwise8 state with a new absmax scale. The format is defined in
 * fastrms/_blockwise.py; these loops are its bit operations. Included once by rmsprop.c, after
 * rmsprop16.h. */

#define B8_BLOCK ((size_t)256)
#define B8_UNSIGNED_MAX 240
#define B8_SIGNED_MAX 120
#define B8_UNSIGNED_BIAS 1792 /* 112 * 16 */
#define B8_SIGNED_BIAS 896    /* 112 * 8 */
#define B8_EXPONENT_BASE (112u << 23)
/* formats: the 16-bit ones of rmsprop16.h, FASTRMS_PARAM_F32, and two bits per state stream
 * (square_avg, momentum_buffer, grad_avg) from bit 8: 0 float32, 1 bfloat16, 2 blockwise8. */
#define COMPACT_STATE_SHIFT 8
#define COMPACT_ALL_FORMATS 0x3F1Fu
enum { STATE_F32, STATE_BF16, STATE_B8 };

static ALWAYS_INLINE int32_t b8_max(int32_t a, int32_t b) { return a > b ? a : b; }
static ALWAYS_INLINE int32_t b8_min(int32_t a, int32_t b) { return a < b ? a : b; }

static ALWAYS_INLINE void b8_decode(const uint8_t *restrict codes, float scale,
                                    float *restrict out, size_t n, int is_signed) {
    if (is_signed) {
        for (size_t i = 0; i < n; ++i) {
            const uint32_t c = codes[i], m = c & 127u;
            const uint32_t bits = (m ? (m << 20) + B8_EXPONENT_BASE : 0u) | ((c >> 7) << 31);
            out[i] = f32_from_bits(bits) * scale;
        }
    } else {
        for (size_t i = 0; i < n; ++i) {
            const uint32_t c = codes[i];
            out[i] = f32_from_bits(c ? (c << 19) + B8_EXPONENT_BASE : 0u) * scale;
        }
    }
}

/* The scale rule of every encoder: *scale = the block's largest magnitude, and 1; or 0 for a
 * block that needs no codes (all zero: scale 0; a NaN or an infinity: scale NaN), whose codes
 * it sets to 0. */
static ALWAYS_INLINE int b8_block_scale(const float *restrict in, uint8_t *restrict codes,
                                        size_t n, float *scale) {
    uint32_t top = 0;
    for (size_t i = 0; i < n; ++i) {
        const uint32_t b = f32_bits(in[i]) & 0x7FFFFFFFu;
        top = b > top ? b : top;
    }
    if (top >= 0x7F800000u || top == 0) {
        memset(codes, 0, n);
        *scale = top ? f32_from_bits(0x7FC00000u) : 0.0f;
        return 0;
    }
    *scale = f32_from_bits(top);
    return 1;
}

/* Encode n values; returns the block's scale (NaN for a block holding a NaN or an infinity). */
static ALWAYS_INLINE float b8_encode(const float *restrict in, uint8_t *restrict codes,
                                     size_t n, int is_signed) {
    float scale;
    if (!b8_block_scale(in, codes, n, &scale)) return scale;
    const float inv = 1.0f / scale;
    /* Branch-free (min / max / masks), so that GCC vectorises both loops. */
    if (is_signed) {
        for (size_t i = 0; i < n; ++i) {
            const uint32_t x = f32_bits(in[i]);
            const uint32_t rb = f32_bits(in[i] * inv) & 0x7FFFFFFFu;
            const int32_t r = (int32_t)((rb + 0x7FFFFu + ((rb >> 20) & 1u)) >> 20) - B8_SIGNED_BIAS;
            const int32_t m = b8_min(b8_max(r, 0), B8_SIGNED_MAX);
            const uint32_t sign = (x >> 31) & (uint32_t)(m != 0);
            codes[i] = (uint8_t)((uint32_t)m | (sign << 7));
        }
    } else {
        for (size_t i = 0; i < n; ++i) {
            const float x = in[i];
            const uint32_t rb = f32_bits(x * inv) & 0x7FFFFFFFu;
            const int32_t r = (int32_t)((rb + 0x3FFFFu + ((rb >> 19) & 1u)) >> 19) - B8_UNSIGNED_BIAS;
            const int32_t c = b8_min(b8_max(r, 1), B8_UNSIGNED_MAX);
            codes[i] = (uint8_t)(c & -(int32_t)(x > 0.0f));
        }
    }
    return scale;
}

/* AVX2 by hand: GCC's own vectorisation of the loops above ran at 0.2-0.6 ns per element
 * (measured; widening bytes and packing them back cost most). The same integer operations, so
 * the same bits; the tails (n % 32) go through the portable loops. */

/* Eight codes, one per 32-bit lane, -> their float32 values times the block's scale. A zero
 * code (magnitude) decodes to 0: vpsignd keeps a lane where the code is > 0 and zeroes it
 * where it is 0, one instruction for the compare and mask. */
static ALWAYS_INLINE TARGET_AVX2 __m256 b8_code_values_avx2(__m256i c, __m256 scale,
                                                            int is_signed) {
    const __m256i base = _mm256_set1_epi32((int)B8_EXPONENT_BASE);
    __m256i bits;
    if (is_signed) {
        const __m256i m = _mm256_and_si256(c, _mm256_set1_epi32(127));
        bits = _mm256_sign_epi32(_mm256_add_epi32(_mm256_slli_epi32(m, 20), base), m);
        bits = _mm256_or_si256(bits, _mm256_and_si256(_mm256_slli_epi32(c, 24),
                                                      _mm256_set1_epi32((int)0x80000000u)));
    } else {
        bits = _mm256_sign_epi32(_mm256_add_epi32(_mm256_slli_epi32(c, 19), base), c);
    }
    return _mm256_mul_ps(_mm256_castsi256_ps(bits), scale);
}

/* Eight codes -> their float32 values times the block's scale. */
static ALWAYS_INLINE TARGET_AVX2 __m256 b8_values_avx2(const uint8_t *codes, __m256 scale,
                                                       int is_signed) {
    return b8_code_values_avx2(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)codes)),
                               scale, is_signed);
}

static TARGET_AVX2 void b8_decode_avx2_by_hand(const uint8_t *restrict codes, float scale,
                                                 float *restrict out, size_t n, int is_signed) {
    const __m256 vscale = _mm256_set1_ps(scale);
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, b8_values_avx2(codes + i, vscale, is_signed));
    if (i < n) b8_decode(codes + i, scale, out + i, n - i, is_signed);
}

/* The codes of eight values (each in its 32-bit lane) by the rules of b8_encode, for a block
 * whose scale is finite and positive; the caller packs them with unsigned saturation. The
 * exponent rebase is folded into the rounding add (an arithmetic shift: the same integer,
 * as the bias is a multiple of the shifted unit). Unsigned: vpsignd by x's bits turns the
 * code of an x <= 0 (-0.0 included) into 0 or a negative that the pack saturates to 0.
 * Signed: the sign bit, 128, kept by vpsignd only where the magnitude is nonzero. */
static ALWAYS_INLINE TARGET_AVX2 __m256i b8_codes_avx2(__m256 x, __m256 inv, int is_signed) {
    const __m256i one = _mm256_set1_epi32(1);
    __m256i rb = _mm256_castps_si256(_mm256_mul_ps(x, inv));
    if (is_signed) {
        rb = _mm256_and_si256(rb, _mm256_set1_epi32(0x7FFFFFFF));
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(rb, 20), one);
        const __m256i half = _mm256_set1_epi32(0x7FFFF - (B8_SIGNED_BIAS << 20));
        const __m256i r = _mm256_srai_epi32(_mm256_add_epi32(_mm256_add_epi32(rb, half), odd), 20);
        const __m256i m = _mm256_min_epi32(_mm256_max_epi32(r, _mm256_setzero_si256()),
                                           _mm256_set1_epi32(B8_SIGNED_MAX));
        const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(x), 24),
                                              _mm256_set1_epi32(128));
        return _mm256_or_si256(m, _mm256_sign_epi32(sign, m));
    }
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(rb, 19), one);
    const __m256i half = _mm256_set1_epi32(0x3FFFF - (B8_UNSIGNED_BIAS << 19));
    const __m256i r = _mm256_srai_epi32(_mm256_add_epi32(_mm256_add_epi32(rb, half), odd), 19);
    const __m256i c =
        _mm256_min_epi32(_mm256_max_epi32(r, one), _mm256_set1_epi32(B8_UNSIGNED_MAX));
    return _mm256_sign_epi32(c, _mm256_castps_si256(x));
}

/* The codes of n values of a block whose (positive, finite) scale is known. */
static ALWAYS_INLINE TARGET_AVX2 void b8_encode_scaled_avx2(const float *restrict in,
                                                            uint8_t *restrict codes, size_t n,
                                                            float scale, int is_signed) {
    const __m256 inv = _mm256_set1_ps(1.0f / scale);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m256i c0 = b8_codes_avx2(_mm256_loadu_ps(in + i), inv, is_signed);
        const __m256i c1 = b8_codes_avx2(_mm256_loadu_ps(in + i + 8), inv, is_signed);
        const __m256i c2 = b8_codes_avx2(_mm256_loadu_ps(in + i + 16), inv, is_signed);
        const __m256i c3 = b8_codes_avx2(_mm256_loadu_ps(in + i + 24), inv, is_signed);
        const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(c0, c1),
                                                  _mm256_packus_epi32(c2, c3));
        _mm256_storeu_si256((__m256i *)(codes + i), _mm256_permutevar8x32_epi32(bytes, order));
    }
    if (i < n) {
        /* The tail with this block's scale: the portable loop's second half. */
        const float inverse = 1.0f / scale;
        for (; i < n; ++i) {
            const float x = in[i];
            const uint32_t rb = f32_bits(x * inverse) & 0x7FFFFFFFu;
            if (is_signed) {
                const int32_t r =
                    (int32_t)((rb + 0x7FFFFu + ((rb >> 20) & 1u)) >> 20) - B8_SIGNED_BIAS;
                const int32_t m = b8_min(b8_max(r, 0), B8_SIGNED_MAX);
                const uint32_t negative = (f32_bits(x) >> 31) & (uint32_t)(m != 0);
                codes[i] = (uint8_t)((uint32_t)m | (negative << 7));
            } else {
                const int32_t r =
                    (int32_t)((rb + 0x3FFFFu + ((rb >> 19) & 1u)) >> 19) - B8_UNSIGNED_BIAS;
                codes[i] = (uint8_t)(b8_min(b8_max(r, 1), B8_UNSIGNED_MAX) & -(int32_t)(x > 0.0f));
            }
        }
    }
}

static TARGET_AVX2 float b8_encode_avx2_by_hand(const float *restrict in, uint8_t *restrict codes,
                                                size_t n, int is_signed) {
    float scale;
    if (b8_block_scale(in, codes, n, &scale))
        b8_encode_scaled_avx2(in, codes, n, scale, is_signed);
    return scale;
}

typedef void (*b8_decode_fn)(const uint8_t *, float, float *, size_t);
typedef float (*b8_encode_fn)(const float *, uint8_t *, size_t);

#define B8_INSTANCES(level, target)                                                          \
    static target void b8_decode_unsigned_##level(const uint8_t *c, float s, float *o,         \
                                                  size_t n) {                                  \
        b8_decode(c, s, o, n, 0);                                                              \
    }                                                                                          \
    static target void b8_decode_signed_##level(const uint8_t *c, float s, float *o, size_t n) { \
        b8_decode(c, s, o, n, 1);                                                              \
    }                                                                                          \
    static target float b8_encode_unsigned_##level(const float *in, uint8_t *c, size_t n) {    \
        return b8_encode(in, c, n, 0);                                                         \
    }                                                                                          \
    static target float b8_encode_signed_##level(const float *in, uint8_t *c, size_t n) {      \
        return b8_encode(in, c, n, 1);                                                         \
    }
B8_INSTANCES(baseline, )
B8_INSTANCES(avx512, TARGET_AVX512)
#undef B8_INSTANCES
static TARGET_AVX2 void b8_decode_unsigned_avx2(const uint8_t *c, float s, float *o, size_t n) {
    b8_decode_avx2_by_hand(c, s, o, n, 0);
}
static TARGET_AVX2 void b8_decode_signed_avx2(const uint8_t *c, float s, float *o, size_t n) {
    b8_decode_avx2_by_hand(c, s, o, n, 1);
}
static TARGET_AVX2 float b8_encode_unsigned_avx2(const float *in, uint8_t *c, size_t n) {
    return b8_encode_avx2_by_hand(in, c, n, 0);
}
static TARGET_AVX2 float b8_encode_signed_avx2(const float *in, uint8_t *c, size_t n) {
    return b8_encode_avx2_by_hand(in, c, n, 1);
}

static const b8_decode_fn b8_decoders[SIMD_LEVELS][2] = {
    {b8_decode_unsigned_baseline, b8_decode_signed_baseline},
    {b8_decode_unsigned_avx2, b8_decode_signed_avx2},
    {b8_decode_unsigned_avx512, b8_decode_signed_avx512}};
static const b8_encode_fn b8_encoders[SIMD_LEVELS][2] = {
    {b8_encode_unsigned_baseline, b8_encode_signed_baseline},
    {b8_encode_unsigned_avx2, b8_encode_signed_avx2},
    {b8_encode_unsigned_avx512, b8_encode_signed_avx512}};

typedef struct {
    const struct fastrms_coeffs_f32 *coeffs;
    const codecs16 *codecs;
    b8_decode_fn decode8[2];
    b8_encode_fn encode8[2];
    unsigned flags, formats;
    uint32_t k0, k1;
    void *param;
    const void *grad;
    void *state[3];
    float *scales[3];
    float *master;
    size_t n;
} compact_set;

static ALWAYS_INLINE unsigned state_format(unsigned formats, int j) {
    return (formats >> (COMPACT_STATE_SHIFT + 2 * j)) & 3u;
}

static void compact_blocks(const compact_set *x, size_t block_lo, size_t block_hi) {
    float param_block[B8_BLOCK] __attribute__((aligned(64)));
    float grad_block[B8_BLOCK] __attribute__((aligned(64)));
    float state_block[3][B8_BLOCK] __attribute__((aligned(64)));
    const codecs16 *c = x->codecs;
    const unsigned formats = x->formats;
    const int f32_param = (formats & FASTRMS_PARAM_F32) != 0;
    const int bf16 = (formats & FASTRMS_PARAM_BF16) != 0;
    const int grad_f32 = f32_param || (formats & FASTRMS_GRAD_F32);
    const int scaled = (x->flags & FASTRMS_GRAD_SCALE) != 0;
    const float grad_scale = x->coeffs->grad_scale, inverse = x->coeffs->grad_scale_inverse;
    stream_set_f32 block = {x->coeffs, x->flags & ~FASTRMS_GRAD_SCALE, NULL, NULL, NULL, NULL,
                            NULL};
    float **outputs[3] = {&block.square_avg, &block.momentum_buffer, &block.grad_avg};
    for (size_t k = block_lo; k < block_hi; ++k) {
        const size_t start = k * B8_BLOCK;
        const size_t n = x->n - start < B8_BLOCK ? x->n - start : B8_BLOCK;
        float *p = param_block;
        const float *g = grad_f32 ? (const float *)x->grad + start : grad_block;
        if (f32_param)
            p = (float *)x->param + start;
        else if (x->master)
            p = x->master + start;
        const uint16_t *param16 = (const uint16_t *)x->param + start;
        const uint16_t *grad16 = (const uint16_t *)x->grad + start;
        if (p == param_block && g == grad_block)
            c->decode_pair[bf16](param16, grad16, param_block, grad_block, n);
        else if (p == param_block)
            c->decode[bf16](param16, param_block, n);
        else if (g == grad_block)
            c->decode[bf16](grad16, grad_block, n);
        if (scaled) {
            c->unscale(g, grad_block, n, grad_scale, inverse);
            g = grad_block;
        }
        block.param = p;
        block.grad = g;
        for (int j = 0; j < 3; ++j) {
            if (!x->state[j]) {
                *outputs[j] = NULL;
                continue;
            }
            const unsigned format = state_format(formats, j);
            if (format == STATE_F32) {
                *outputs[j] = (float *)x->state[j] + start;
                continue;
            }
            *outputs[j] = state_block[j];
            if (format == STATE_BF16)
                c->decode[1]((const uint16_t *)x->state[j] + start, state_block[j], n);
            else
                x->decode8[j != 0]((const uint8_t *)x->state[j] + start, x->scales[j][k],
                                   state_block[j], n);
        }
        c->body(&block, 0, n);
        if (!f32_param) encode_p16(c, formats, x->k0, x->k1, p, (uint16_t *)x->param + start,
                                   start, n);
        for (int j = 0; j < 3; ++j) {
            if (!x->state[j]) continue;
            const unsigned format = state_format(formats, j);
            if (format == STATE_BF16)
                c->nearest[1](state_block[j], (uint16_t *)x->state[j] + start, n);
            else if (format == STATE_B8)
                x->scales[j][k] =
                    x->encode8[j != 0](state_block[j], (uint8_t *)x->state[j] + start, n);
        }
    }
}

static size_t compact_item_size(unsigned format) {
    return format == STATE_F32 ? sizeof(float) : (format == STATE_BF16 ? 2 : 1);
}

static int compact_check(const compact_set *x) {
    const unsigned flags = x->flags, formats = x->formats;
    const size_t n = x->n;
    if (flags & ~FASTRMS_ALL_FLAGS) return FASTRMS_BAD_FLAGS;
    if ((flags & FASTRMS_WD_COUPLED) && (flags & FASTRMS_WD_DECOUPLED)) return FASTRMS_BAD_FLAGS;
    if ((flags & FASTRMS_NESTEROV) && !(flags & FASTRMS_MOMENTUM)) return FASTRMS_BAD_FLAGS;
    if (formats & ~COMPACT_ALL_FORMATS) return FASTRMS_BAD_FORMATS;
    if ((formats & FASTRMS_MASTER) && (formats & FASTRMS_STOCHASTIC)) return FASTRMS_BAD_FORMATS;
    if ((formats & FASTRMS_PARAM_F32) &&
        (formats & (FASTRMS_PARAM_BF16 | FASTRMS_STOCHASTIC | FASTRMS_MASTER)))
        return FASTRMS_BAD_FORMATS;
    for (int j = 0; j < 3; ++j)
        if (state_format(formats, j) > STATE_B8) return FASTRMS_BAD_FORMATS;
    if (n == 0) return FASTRMS_OK;
    if (!x->param || !x->grad || !x->state[0]) return FASTRMS_NULL_BUFFER;
    if ((flags & FASTRMS_MOMENTUM) && !x->state[1]) return FASTRMS_NULL_BUFFER;
    if ((flags & FASTRMS_CENTERED) && !x->state[2]) return FASTRMS_NULL_BUFFER;
    if ((formats & FASTRMS_MASTER) && !x->master) return FASTRMS_NULL_BUFFER;
    const size_t blocks = (n + B8_BLOCK - 1) / B8_BLOCK;
    const int f32_param = (formats & FASTRMS_PARAM_F32) != 0;
    const void *buffers[9] = {x->param, x->grad, x->master, x->state[0], x->state[1],
                              x->state[2], NULL, NULL, NULL};
    size_t sizes[9] = {f32_param ? 4 : 2, (f32_param || (formats & FASTRMS_GRAD_F32)) ? 4 : 2,
                       4, 4, 4, 4, 4, 4, 4};
    size_t lengths[9] = {n, n, n, n, n, n, blocks, blocks, blocks};
    for (int j = 0; j < 3; ++j) {
        if (!x->state[j]) continue;
        const unsigned format = state_format(formats, j);
        sizes[3 + j] = compact_item_size(format);
        if (format == STATE_B8) {
            if (!x->scales[j]) return FASTRMS_NULL_BUFFER;
            buffers[6 + j] = x->scales[j];
        }
    }
    for (int i = 0; i < 9; ++i)
        if ((uintptr_t)buffers[i] % sizes[i] != 0) return FASTRMS_MISALIGNED;
    for (int i = 0; i < 9; ++i) {
        if (!buffers[i]) continue;
        const uintptr_t a = (uintptr_t)buffers[i], a_end = a + lengths[i] * sizes[i];
        for (int j = i + 1; j < 9; ++j) {
            if (!buffers[j]) continue;
            const uintptr_t b = (uintptr_t)buffers[j], b_end = b + lengths[j] * sizes[j];
            if (a < b_end && b < a_end) return FASTRMS_OVERLAP;
        }
    }
    return FASTRMS_OK;
}

#ifdef _OPENMP
static void block_slice(size_t blocks, size_t *lo, size_t *hi) {
    const size_t threads = (size_t)omp_get_num_threads(), t = (size_t)omp_get_thread_num();
    *lo = blocks * t / threads;
    *hi = blocks * (t + 1) / threads;
}
#else
static void block_slice(size_t blocks, size_t *lo, size_t *hi) {
    *lo = 0;
    *hi = blocks;
}
#endif

typedef void (*compact_blocks_fn)(const compact_set *, size_t, size_t);

static void compact_run(compact_blocks_fn fn, const compact_set *x) {
    const size_t blocks = (x->n + B8_BLOCK - 1) / B8_BLOCK;
    const int threads = team_size(x->n);
    if (threads <= 1) {
        fn(x, 0, blocks);
        return;
    }
#pragma omp parallel num_threads(threads) if (x->n >= PARALLEL_THRESHOLD)
    {
        size_t lo, hi;
        block_slice(blocks, &lo, &hi);
        if (lo < hi) fn(x, lo, hi);
    }
}

static compact_set compact_streams(const struct fastrms_coeffs_f32 *coeffs, const codecs16 *c,
                                   unsigned flags, unsigned formats, uint64_t key, void *param,
                                   const void *grad, void **states, float **scales,
                                   float *master, size_t n) {
    const int level = simd_level();
    compact_set x = {coeffs, c, {b8_decoders[level][0], b8_decoders[level][1]},
                     {b8_encoders[level][0], b8_encoders[level][1]}, flags, formats,
                     (uint32_t)key, (uint32_t)(key >> 32), param, grad, {NULL, NULL, NULL},
                     {NULL, NULL, NULL}, (formats & FASTRMS_MASTER) ? master : NULL, n};
    const int used[3] = {1, (flags & FASTRMS_MOMENTUM) != 0, (flags & FASTRMS_CENTERED) != 0};
    for (int j = 0; j < 3; ++j) {
        if (!used[j] || !states) continue;
        x.state[j] = states[j];
        x.scales[j] = (state_format(formats, j) == STATE_B8 && scales) ? scales[j] : NULL;
    }
    return x;
}

#include "compact_fused.h"

int fastrms_update_compact(const struct fastrms_coeffs_f32 *coeffs, unsigned flags,
                           unsigned formats, uint64_t key, void *param, const void *grad,
                           void **states, float **scales, float *master_param, size_t n) {
    const codecs16 c = codecs_now();
    const compact_set x = compact_streams(coeffs, &c, flags, formats, key, param, grad, states,
                                          scales, master_param, n);
    const int status = compact_check(&x);
    if (status != FASTRMS_OK || n == 0) return status;
    const compact_blocks_fn fused = compact_fused_fn(flags, formats, simd_level());
    compact_run(fused ? fused : compact_blocks, &x);
    return FASTRMS_OK;
}

int fastrms_compact_fused(unsigned flags, unsigned formats) {
    return compact_fused_fn(flags, formats, simd_level()) != NULL;
}

/* -- the codec alone, and the roofline over the same streams ------------------------------ */

int fastrms_decode_b8(int is_signed, const uint8_t *codes, const float *scales, float *out,
                      size_t n) {
    if (n == 0) return FASTRMS_OK;
    if (!codes || !scales || !out) return FASTRMS_NULL_BUFFER;
    const b8_decode_fn fn = b8_decoders[simd_level()][is_signed != 0];
    for (size_t start = 0, k = 0; start < n; start += B8_BLOCK, ++k)
        fn(codes + start, scales[k], out + start, n - start < B8_BLOCK ? n - start : B8_BLOCK);
    return FASTRMS_OK;
}

int fastrms_encode_b8(int is_signed, const float *in, uint8_t *codes, float *scales, size_t n) {
    if (n == 0) return FASTRMS_OK;
    if (!codes || !scales || !in) return FASTRMS_NULL_BUFFER;
    const b8_encode_fn fn = b8_encoders[simd_level()][is_signed != 0];
    for (size_t start = 0, k = 0; start < n; start += B8_BLOCK, ++k)
        scales[k] = fn(in + start, codes + start, n - start < B8_BLOCK ? n - start : B8_BLOCK);
    return FASTRMS_OK;
}

/* Trivial arithmetic on every stream, a block at a time, one stream after the other (as the
 * update touches them): the bytes the compact update moves, at the memory's speed. */
static ALWAYS_INLINE void compact_roofline_blocks(const compact_set *x, size_t block_lo,
                                                  size_t block_hi) {
    const int f32_param = (x->formats & FASTRMS_PARAM_F32) != 0;
    for (size_t k = block_lo; k < block_hi; ++k) {
        const size_t start = k * B8_BLOCK;
        const size_t n = x->n - start < B8_BLOCK ? x->n - start : B8_BLOCK;
        if (f32_param) {
            float *restrict P = (float *)x->param + start;
            const float *restrict G = (const float *)x->grad + start;
            for (size_t i = 0; i < n; ++i) P[i] += G[i];
        } else {
            uint16_t *restrict P = (uint16_t *)x->param + start;
            const uint16_t *restrict G = (const uint16_t *)x->grad + start;
            for (size_t i = 0; i < n; ++i) P[i] = (uint16_t)(P[i] + G[i]);
        }
        for (int j = 0; j < 3; ++j) {
            if (!x->state[j]) continue;
            const unsigned format = state_format(x->formats, j);
            if (format == STATE_F32) {
                float *restrict S = (float *)x->state[j] + start;
                for (size_t i = 0; i < n; ++i) S[i] += 1.0f;
            } else if (format == STATE_BF16) {
                uint16_t *restrict S = (uint16_t *)x->state[j] + start;
                for (size_t i = 0; i < n; ++i) S[i] = (uint16_t)(S[i] + 1u);
            } else {
                uint8_t *restrict S = (uint8_t *)x->state[j] + start;
                for (size_t i = 0; i < n; ++i) S[i] = (uint8_t)(S[i] + 1u);
                x->scales[j][k] += 1.0f;
            }
        }
    }
}

static void compact_roofline_baseline(const compact_set *x, size_t lo, size_t hi) {
    compact_roofline_blocks(x, lo, hi);
}
static TARGET_AVX2 void compact_roofline_avx2(const compact_set *x, size_t lo, size_t hi) {
    compact_roofline_blocks(x, lo, hi);
}
static TARGET_AVX512 void compact_roofline_avx512(const compact_set *x, size_t lo, size_t hi) {
    compact_roofline_blocks(x, lo, hi);
}
static const compact_blocks_fn compact_roofline_by_level[SIMD_LEVELS] = {
    compact_roofline_baseline, compact_roofline_avx2, compact_roofline_avx512};

int fastrms_roofline_compact(unsigned flags, unsigned formats, void *param, const void *grad,
                             void **states, float **scales, size_t n) {
    const codecs16 c = codecs_now();
    const compact_set x = compact_streams(NULL, &c, flags, formats, 0, param, grad, states,
                                          scales, NULL, n);
    const int status = compact_check(&x);
    if (status != FASTRMS_OK || n == 0) return status;
    compact_run(compact_roofline_by_level[simd_level()], &x);
    return FASTRMS_OK;
}
