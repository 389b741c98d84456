/* The common compact-state steps in one fused loop per block, by hand in AVX2: float32 params
 * and grads, or bfloat16 params and grads rounded to nearest even (no master copy, no loss
 * scale), with a blockwise8 square_avg and, with momentum, a blockwise8 momentum_buffer; not
 * centered. Each vector of a block is loaded (bfloat16: interleaved with zeros in registers),
 * its codes decoded (integer bit operations and the scale's multiply), updated in SPEC's order
 * line by line (the same IEEE operations as rmsprop_kernel.h; intrinsics are not contracted
 * into FMAs under -ffp-contract=off), the parameter stored (bfloat16: round to nearest even in
 * registers), and the new state kept in a 1 KiB scratch on the stack while its absmax is taken
 * in the same loop. The block's codes are written 32 at a time inside the next block's loop
 * (two scratch slots), where the integer work runs beside that block's divisions. The generic
 * driver (compact_blocks) decodes every stream into scratch, runs the float32 body on it and
 * takes two more passes per state (about 1 ns per element per thread in cache, against 0.6
 * with float32 and 0.8-0.9 with bfloat16 params here, measured in a standalone harness); it
 * keeps every other combination, the baseline SIMD level, and the last, partial block of a
 * buffer, so the fused loops only ever see whole blocks of 256.
 *
 * Compile-time: the parameter format, the momentum form and the weight decay form (2 x 3 x 3
 * copies); run time, branch-free in registers: maximize (a sign flip), eps placement,
 * nesterov (fused_step8). The AVX-512 level runs these AVX2 loops, as it runs the fused
 * bfloat16 loop of rmsprop16.h (no machine here has AVX-512 to measure a wider copy on).
 * Included by compact_state.h after the generic driver. */

/* 16 bfloat16 -> float32 in two vectors, elements {0-3, 8-11} and {4-7, 12-15}: interleaving
 * zeros below the values within each 128-bit lane needs no lane-crossing permute; the state
 * codes are decoded in the same order and the parameters packed back by one in-lane pack. */
static ALWAYS_INLINE TARGET_AVX2 void fused_widen16_bf16(const uint16_t *in, __m256 *lo,
                                                         __m256 *hi) {
    const __m256i h = _mm256_loadu_si256((const __m256i *)in);
    *lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), h));
    *hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), h));
}

/* bf16_nearest of codecs16.h without its NaN select: round to nearest even in 32-bit lanes. */
static ALWAYS_INLINE TARGET_AVX2 __m256i fused_round_bf16(__m256 v) {
    const __m256i x = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    const __m256i biased = _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7FFF)), lsb);
    return _mm256_srli_epi32(biased, 16);
}

/* The inverse of fused_widen16_bf16's order: one in-lane pack puts the 16 back in order. A
 * NaN (one compare finds it in either vector) is rare: those 16 go through bf16_nearest. */
static ALWAYS_INLINE TARGET_AVX2 void fused_narrow16_bf16(uint16_t *out, __m256 lo, __m256 hi) {
    if (__builtin_expect(_mm256_movemask_ps(_mm256_cmp_ps(lo, hi, _CMP_UNORD_Q)) != 0, 0)) {
        float lanes[16];
        _mm256_storeu_ps(lanes, lo);
        _mm256_storeu_ps(lanes + 8, hi);
        for (int e = 0; e < 16; ++e) /* element e sits in lane (e & 3) + (e & 8 ? 4 : 0) */
            out[e] = bf16_nearest(f32_bits(lanes[(e & 4 ? 8 : 0) + (e & 3) + (e & 8 ? 4 : 0)]));
        return;
    }
    _mm256_storeu_si256((__m256i *)out,
                        _mm256_packus_epi32(fused_round_bf16(lo), fused_round_bf16(hi)));
}

/* 16 codes -> their 32-bit values in fused_widen16_bf16's order (byte shuffles of the 16 bytes
 * broadcast to both lanes). */
static ALWAYS_INLINE TARGET_AVX2 void fused_codes16_lane_order(const uint8_t *codes, __m256i *lo,
                                                               __m256i *hi) {
    const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)codes));
    const __m256i lo_order = _mm256_setr_epi8(0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1,
                                              -1, -1, 8, -1, -1, -1, 9, -1, -1, -1, 10, -1, -1, -1,
                                              11, -1, -1, -1);
    const __m256i hi_order = _mm256_setr_epi8(4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1,
                                              -1, -1, 12, -1, -1, -1, 13, -1, -1, -1, 14, -1, -1,
                                              -1, 15, -1, -1, -1);
    *lo = _mm256_shuffle_epi8(bytes, lo_order);
    *hi = _mm256_shuffle_epi8(bytes, hi_order);
}

static ALWAYS_INLINE TARGET_AVX2 uint32_t fused_max8_u32(__m256i v) {
    __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4E));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xB1));
    return (uint32_t)_mm_cvtsi128_si32(m);
}

/* A block's new state, waiting in scratch for its codes: the encode runs one block later, so
 * that the block's absmax, its reciprocal and the loop's last divisions are done by then. */
typedef struct {
    float values[B8_BLOCK] __attribute__((aligned(32)));
    float scale, inverse;
    int usable; /* b8_block_scale's rule: 0 for an all-zero block or one holding NaN or inf */
} fused_pending;

static ALWAYS_INLINE void fused_take_scale(fused_pending *q, uint32_t top) {
    q->usable = !(top >= 0x7F800000u || top == 0);
    q->scale = q->usable ? f32_from_bits(top) : (top ? f32_from_bits(0x7FC00000u) : 0.0f);
    q->inverse = 1.0f / (q->usable ? q->scale : 1.0f);
}

/* b8_encode_scaled_avx2's codes of 32 values; lane_order: the values are in
 * fused_widen16_bf16's order, 16 at a time. */
static ALWAYS_INLINE TARGET_AVX2 void fused_encode32(const float *values, __m256 inv,
                                                     uint8_t *codes, int is_signed,
                                                     const int lane_order) {
    const __m256i c0 = b8_codes_avx2(_mm256_load_ps(values), inv, is_signed);
    const __m256i c1 = b8_codes_avx2(_mm256_load_ps(values + 8), inv, is_signed);
    const __m256i c2 = b8_codes_avx2(_mm256_load_ps(values + 16), inv, is_signed);
    const __m256i c3 = b8_codes_avx2(_mm256_load_ps(values + 24), inv, is_signed);
    const __m256i bytes =
        _mm256_packus_epi16(_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
    _mm256_storeu_si256((__m256i *)codes,
                        lane_order ? _mm256_permute4x64_epi64(bytes, 0xD8)
                                   : _mm256_permutevar8x32_epi32(
                                         bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

/* A pending block's codes; returns its scale. */
static ALWAYS_INLINE TARGET_AVX2 float fused_encode(const fused_pending *q, uint8_t *codes,
                                                    int is_signed, const int lane_order) {
    if (!q->usable) {
        memset(codes, 0, B8_BLOCK);
        return q->scale;
    }
    const __m256 inv = _mm256_set1_ps(q->inverse);
    for (size_t i = 0; i < B8_BLOCK; i += 32)
        fused_encode32(q->values + i, inv, codes + i, is_signed, lane_order);
    return q->scale;
}

/* Start writing the pending block's codes: its scale now, its codes (or the zeros of a block
 * that has none) 32 at a time in the next block's loop. Returns where they go, or NULL. */
static ALWAYS_INLINE TARGET_AVX2 uint8_t *fused_begin_encode(const fused_pending *q,
                                                            uint8_t *codes, float *scale,
                                                            __m256 *inv) {
    *scale = q->scale;
    if (!q->usable) {
        memset(codes, 0, B8_BLOCK);
        return NULL;
    }
    *inv = _mm256_set1_ps(q->inverse);
    return codes;
}

typedef struct {
    __m256 alpha, one_minus_alpha, neg_lr, lr, weight_decay, momentum, decay, flip;
    __m256 eps_inside, eps_outside; /* eps and -0.0 (x + -0.0 is x, bit for bit), or swapped */
    __m256 nesterov;                /* all ones with nesterov */
} fused_coeffs;

/* SPEC's update of eight elements, line by line; the new b only with momentum. The run-time
 * options are branch-free: a branch per option per vector made the loop front-end bound
 * (measured: about 1 ns per element in cache against 0.5 for the float32 step). eps goes in
 * as d = sqrt(v + eps_inside) + eps_outside, one of them -0.0, which adds nothing to any
 * value (-0.0 and NaNs included); nesterov selects its step with a blend. */
static ALWAYS_INLINE TARGET_AVX2 void fused_step8(const fused_coeffs *k, const int momentum_form,
                                                  const int decay_form, __m256 *p_io, __m256 g,
                                                  __m256 s_old, __m256 b_old, __m256 *s_out,
                                                  __m256 *b_out) {
    __m256 p = *p_io;
    g = _mm256_xor_ps(g, k->flip); /* maximize: -g is g with its sign bit flipped */
    if (decay_form == DECAY_COUPLED) {
        const __m256 wd_p = _mm256_mul_ps(k->weight_decay, p);
        g = _mm256_add_ps(g, wd_p);
    } else if (decay_form == DECAY_DECOUPLED) {
        p = _mm256_mul_ps(p, k->decay);
    }
    const __m256 s_decayed = _mm256_mul_ps(s_old, k->alpha);
    const __m256 g_scaled = _mm256_mul_ps(k->one_minus_alpha, g);
    const __m256 g_sq = _mm256_mul_ps(g_scaled, g);
    const __m256 s = _mm256_add_ps(s_decayed, g_sq);
    *s_out = s;
    const __m256 v_eps = _mm256_add_ps(s, k->eps_inside);
    const __m256 root = _mm256_sqrt_ps(v_eps);
    const __m256 d = _mm256_add_ps(root, k->eps_outside);
    if (momentum_form == MOMENTUM_NONE) {
        const __m256 num = _mm256_mul_ps(k->neg_lr, g);
        const __m256 delta = _mm256_div_ps(num, d);
        p = _mm256_add_ps(p, delta);
    } else {
        __m256 u;
        if (momentum_form == MOMENTUM_TORCH) {
            u = _mm256_div_ps(g, d);
        } else {
            const __m256 num = _mm256_mul_ps(k->lr, g);
            u = _mm256_div_ps(num, d);
        }
        const __m256 b_decayed = _mm256_mul_ps(b_old, k->momentum);
        const __m256 b = _mm256_add_ps(b_decayed, u);
        *b_out = b;
        const __m256 look_ahead = _mm256_mul_ps(k->momentum, b);
        const __m256 step = _mm256_blendv_ps(b, _mm256_add_ps(u, look_ahead), k->nesterov);
        if (momentum_form == MOMENTUM_TORCH) {
            const __m256 delta = _mm256_mul_ps(k->neg_lr, step);
            p = _mm256_add_ps(p, delta);
        } else {
            p = _mm256_sub_ps(p, step);
        }
    }
    *p_io = p;
}

static ALWAYS_INLINE TARGET_AVX2 void fused_range(const compact_set *x, size_t block_lo,
                                                  size_t block_hi, const int bf16_param,
                                                  const int momentum_form, const int decay_form) {
    const int with_b = momentum_form != MOMENTUM_NONE;
    fused_pending s_pending[2], b_pending[2];
    const struct fastrms_coeffs_f32 *c = x->coeffs;
    const unsigned f = x->flags;
    const __m256 eps = _mm256_set1_ps(c->eps), no_eps = _mm256_set1_ps(-0.0f);
    const int eps_in_sqrt = (f & FASTRMS_EPS_IN_SQRT) != 0;
    const fused_coeffs k = {
        _mm256_set1_ps(c->alpha), _mm256_set1_ps(c->one_minus_alpha), _mm256_set1_ps(c->neg_lr),
        _mm256_set1_ps(c->lr), _mm256_set1_ps(c->weight_decay), _mm256_set1_ps(c->momentum),
        _mm256_set1_ps(c->decay),
        _mm256_castsi256_ps(_mm256_set1_epi32((f & FASTRMS_MAXIMIZE) ? (int)0x80000000u : 0)),
        eps_in_sqrt ? eps : no_eps, eps_in_sqrt ? no_eps : eps,
        _mm256_castsi256_ps(_mm256_set1_epi32((f & FASTRMS_NESTEROV) ? -1 : 0))};
    const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF);
    uint8_t *const S8 = (uint8_t *)x->state[0];
    uint8_t *const B8 = with_b ? (uint8_t *)x->state[1] : NULL;
    float *const s_scales = x->scales[0];
    float *const b_scales = with_b ? x->scales[1] : NULL;
    size_t pending = SIZE_MAX; /* the block whose codes are still to be written */
    int slot = 0;
    for (size_t blk = block_lo; blk < block_hi; ++blk) {
        const size_t start = blk * B8_BLOCK;
        if (x->n - start < B8_BLOCK) { /* the buffer's last, partial block */
            compact_blocks(x, blk, blk + 1);
            continue;
        }
        float *const P32 = (float *)x->param + start;
        const float *const G32 = (const float *)x->grad + start;
        uint16_t *const P16 = (uint16_t *)x->param + start;
        const uint16_t *const G16 = (const uint16_t *)x->grad + start;
        const uint8_t *const s_codes = S8 + start;
        const uint8_t *const b_codes = with_b ? B8 + start : NULL;
        float *const s_new = s_pending[slot].values;
        float *const b_new = b_pending[slot].values;
        const __m256 s_scale = _mm256_set1_ps(s_scales[blk]);
        const __m256 b_scale = _mm256_set1_ps(with_b ? b_scales[blk] : 0.0f);
        /* The previous block's codes are written 32 at a time in this block's loop: integer
         * work beside this block's divisions, instead of a pass of its own after them. */
        const fused_pending *const s_prev = &s_pending[!slot], *const b_prev = &b_pending[!slot];
        uint8_t *s_prev_codes = NULL, *b_prev_codes = NULL;
        __m256 s_prev_inv = _mm256_setzero_ps(), b_prev_inv = _mm256_setzero_ps();
        if (pending != SIZE_MAX) {
            s_prev_codes = fused_begin_encode(s_prev, S8 + pending * B8_BLOCK,
                                              &s_scales[pending], &s_prev_inv);
            if (with_b)
                b_prev_codes = fused_begin_encode(b_prev, B8 + pending * B8_BLOCK,
                                                  &b_scales[pending], &b_prev_inv);
        }
        __m256i s_top = _mm256_setzero_si256(), b_top = _mm256_setzero_si256();
        for (size_t i = 0; i < B8_BLOCK; i += 32) {
            for (size_t j = i; j < i + 32; j += 16) {
                __m256 p[2], g[2], s_old[2];
                __m256 b_old[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
                if (bf16_param) {
                    __m256i codes[2];
                    fused_widen16_bf16(G16 + j, &g[0], &g[1]);
                    fused_widen16_bf16(P16 + j, &p[0], &p[1]);
                    fused_codes16_lane_order(s_codes + j, &codes[0], &codes[1]);
                    s_old[0] = b8_code_values_avx2(codes[0], s_scale, 0);
                    s_old[1] = b8_code_values_avx2(codes[1], s_scale, 0);
                    if (with_b) {
                        fused_codes16_lane_order(b_codes + j, &codes[0], &codes[1]);
                        b_old[0] = b8_code_values_avx2(codes[0], b_scale, 1);
                        b_old[1] = b8_code_values_avx2(codes[1], b_scale, 1);
                    }
                } else {
                    for (int h = 0; h < 2; ++h) {
                        g[h] = _mm256_loadu_ps(G32 + j + 8 * h);
                        p[h] = _mm256_loadu_ps(P32 + j + 8 * h);
                        s_old[h] = b8_values_avx2(s_codes + j + 8 * h, s_scale, 0);
                        if (with_b) b_old[h] = b8_values_avx2(b_codes + j + 8 * h, b_scale, 1);
                    }
                }
                for (int h = 0; h < 2; ++h) {
                    __m256 s, b;
                    fused_step8(&k, momentum_form, decay_form, &p[h], g[h], s_old[h], b_old[h],
                                &s, &b);
                    _mm256_store_ps(s_new + j + 8 * h, s);
                    s_top = _mm256_max_epu32(s_top,
                                             _mm256_and_si256(_mm256_castps_si256(s), magnitude));
                    if (with_b) {
                        _mm256_store_ps(b_new + j + 8 * h, b);
                        b_top = _mm256_max_epu32(
                            b_top, _mm256_and_si256(_mm256_castps_si256(b), magnitude));
                    }
                }
                if (bf16_param) {
                    fused_narrow16_bf16(P16 + j, p[0], p[1]);
                } else {
                    _mm256_storeu_ps(P32 + j, p[0]);
                    _mm256_storeu_ps(P32 + j + 8, p[1]);
                }
            }
            if (s_prev_codes)
                fused_encode32(s_prev->values + i, s_prev_inv, s_prev_codes + i, 0, bf16_param);
            if (with_b && b_prev_codes)
                fused_encode32(b_prev->values + i, b_prev_inv, b_prev_codes + i, 1, bf16_param);
        }
        fused_take_scale(&s_pending[slot], fused_max8_u32(s_top));
        if (with_b) fused_take_scale(&b_pending[slot], fused_max8_u32(b_top));
        pending = blk;
        slot = !slot;
    }
    if (pending != SIZE_MAX) {
        s_scales[pending] = fused_encode(&s_pending[!slot], S8 + pending * B8_BLOCK, 0,
                                         bf16_param);
        if (with_b)
            b_scales[pending] = fused_encode(&b_pending[!slot], B8 + pending * B8_BLOCK, 1,
                                             bf16_param);
    }
}

/* One copy per parameter format, momentum form and weight decay form (18). */
#define FUSED_INSTANCE(name, bf16_param, momentum_form, decay_form)                           \
    static NOINLINE TARGET_AVX2 void name(const compact_set *x, size_t lo, size_t hi) {       \
        fused_range(x, lo, hi, bf16_param, momentum_form, decay_form);                        \
    }
#define FUSED_DECAY_FORMS(name, bf16_param, momentum_form)                                    \
    FUSED_INSTANCE(name##_no_decay, bf16_param, momentum_form, DECAY_NONE)                    \
    FUSED_INSTANCE(name##_coupled, bf16_param, momentum_form, DECAY_COUPLED)                  \
    FUSED_INSTANCE(name##_decoupled, bf16_param, momentum_form, DECAY_DECOUPLED)
FUSED_DECAY_FORMS(fused_f32_plain, 0, MOMENTUM_NONE)
FUSED_DECAY_FORMS(fused_f32_torch, 0, MOMENTUM_TORCH)
FUSED_DECAY_FORMS(fused_f32_lr_inside, 0, MOMENTUM_LR_INSIDE)
FUSED_DECAY_FORMS(fused_bf16_plain, 1, MOMENTUM_NONE)
FUSED_DECAY_FORMS(fused_bf16_torch, 1, MOMENTUM_TORCH)
FUSED_DECAY_FORMS(fused_bf16_lr_inside, 1, MOMENTUM_LR_INSIDE)
#undef FUSED_DECAY_FORMS
#undef FUSED_INSTANCE

#define FUSED_BY_DECAY(name) {name##_no_decay, name##_coupled, name##_decoupled}
/* [bfloat16 params][momentum form][decay form] */
static const compact_blocks_fn fused_by_kind[2][3][3] = {
    {FUSED_BY_DECAY(fused_f32_plain), FUSED_BY_DECAY(fused_f32_torch),
     FUSED_BY_DECAY(fused_f32_lr_inside)},
    {FUSED_BY_DECAY(fused_bf16_plain), FUSED_BY_DECAY(fused_bf16_torch),
     FUSED_BY_DECAY(fused_bf16_lr_inside)}};
#undef FUSED_BY_DECAY

/* The fused loop for these (valid) flags and formats at this SIMD level, or NULL: the generic
 * driver. The formats of streams the flags leave unused are not read. */
static compact_blocks_fn compact_fused_fn(unsigned flags, unsigned formats, int level) {
    if (level < SIMD_AVX2 || (flags & (FASTRMS_CENTERED | FASTRMS_GRAD_SCALE))) return NULL;
    const unsigned param_formats = formats & ((1u << COMPACT_STATE_SHIFT) - 1u);
    if (param_formats != FASTRMS_PARAM_F32 && param_formats != FASTRMS_PARAM_BF16) return NULL;
    if (state_format(formats, 0) != STATE_B8) return NULL;
    const int with_momentum = (flags & FASTRMS_MOMENTUM) != 0;
    if (with_momentum && state_format(formats, 1) != STATE_B8) return NULL;
    const int form = !with_momentum ? MOMENTUM_NONE
                     : (flags & FASTRMS_LR_IN_MOMENTUM) ? MOMENTUM_LR_INSIDE
                                                        : MOMENTUM_TORCH;
    const int decay = (flags & FASTRMS_WD_COUPLED)     ? DECAY_COUPLED
                      : (flags & FASTRMS_WD_DECOUPLED) ? DECAY_DECOUPLED
                                                       : DECAY_NONE;
    return fused_by_kind[param_formats == FASTRMS_PARAM_BF16][form][decay];
}
