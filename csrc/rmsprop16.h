/* 16-bit parameters (float16, bfloat16) with float32 state: the codecs sit at the edges of the
 * float32 kernel. Each thread takes its slice a block at a time: the block's parameters (or
 * their float32 master copy) and gradients are widened into float32 buffers on the stack, the
 * float32 update body of rmsprop_kernel.h runs on them and on the float32 state as it is, and
 * the new parameters are narrowed back. The block stays in L1, so the memory traffic is that of
 * the 16-bit streams; no update loop is compiled again. Included once by rmsprop.c, after the
 * float32 instantiation of rmsprop_kernel.h. */

/* Elements per block. Small blocks keep every stream moving: the passes over a block touch one
 * stream at a time, and with blocks of 2048 the hardware prefetchers fell behind (measured at
 * 10^7 on one thread: 256 ran 20% faster than 2048, and 3-10% slower in cache). */
#define P16_BLOCK ((size_t)256)
/* The finiteness check reads one stream: its blocks can be larger. */
#define P16_FINITE_BLOCK ((size_t)2048)
#define FASTRMS_ALL_FORMATS 15u

/* The common case in one fused pass: bfloat16 params and grads, round to nearest even, no master
 * copy, no loss scale, at the AVX2 and AVX-512 levels (both run the AVX2 copy; the baseline
 * level keeps the block path). Widening is a shift and narrowing is bf16_nearest, both in
 * registers, in the float32 loop of rmsprop_kernel.h: the block pipeline below spends three
 * passes per block and its float32 arithmetic no longer overlaps the memory traffic (measured:
 * the block path ran no faster than float32 at 10^7). */
#define T float
#define SFX bf16
#define SQRT sqrtf
#define STORAGE uint16_t
#define WIDEN(h) f32_from_bits((uint32_t)(h) << 16)
#define NARROW(f) bf16_nearest(f32_bits(f))
#define COEFFS struct fastrms_coeffs_f32
#include "rmsprop_kernel.h"
#undef T
#undef SFX
#undef SQRT
#undef STORAGE
#undef WIDEN
#undef NARROW
#undef COEFFS
typedef void (*fused_bf16_fn)(const stream_set_bf16 *, size_t, size_t);

static int has_f16c = -1, has_avx512bf16 = -1;
static int conversion_instructions = 1;

static void detect_conversion_instructions(void) {
    if (has_f16c < 0) {
        __builtin_cpu_init();
        has_f16c = __builtin_cpu_supports("f16c") != 0;
        has_avx512bf16 = __builtin_cpu_supports("avx512bf16") != 0;
    }
}

int fastrms_set_conversion_instructions(int enabled) {
    conversion_instructions = enabled != 0;
    return conversion_instructions;
}

/* What the kernels at the current SIMD level use: one table of functions per call. */
typedef struct {
    decode_fn decode[2]; /* [bfloat16] */
    decode_pair_fn decode_pair[2];
    encode_fn nearest[2];
    encode_stochastic_fn stochastic[2];
    unscale_fn unscale;
    range_fn_f32 body;
    finite_fn_f32 finite;
    fused_bf16_fn fused_bf16; /* NULL: the block path (the baseline level) */
} codecs16;

static codecs16 codecs_now(void) {
    detect_conversion_instructions();
    const int level = simd_level();
    const int hardware = conversion_instructions;
    codecs16 c;
    if (level == SIMD_AVX512) {
        c = (codecs16){{decode_f16_avx512, decode_bf16_avx512},
                       {decode_pair_f16_avx512, decode_pair_bf16_avx512},
                       {encode_f16_nearest_avx512, encode_bf16_nearest_avx512},
                       {encode_f16_stochastic_avx512, encode_bf16_stochastic_avx512},
                       unscale_avx512,
                       update_avx512_body_f32,
                       finite_avx512_f32,
                       update_avx2_body_bf16};
        if (hardware && has_f16c) {
            c.decode[0] = decode_f16_f16c_avx512;
            c.decode_pair[0] = decode_pair_f16_f16c_avx512;
            c.nearest[0] = encode_f16_nearest_f16c_avx512;
        }
        if (hardware && has_avx512bf16) c.nearest[1] = encode_bf16_nearest_avx512bf16;
    } else if (level == SIMD_AVX2) {
        c = (codecs16){{decode_f16_avx2, decode_bf16_avx2},
                       {decode_pair_f16_avx2, decode_pair_bf16_avx2},
                       {encode_f16_nearest_avx2, encode_bf16_nearest_avx2},
                       {encode_f16_stochastic_avx2, encode_bf16_stochastic_avx2},
                       unscale_avx2,
                       update_avx2_body_f32,
                       finite_avx2_f32,
                       update_avx2_body_bf16};
        if (hardware && has_f16c) {
            c.decode[0] = decode_f16_f16c_avx2;
            c.decode_pair[0] = decode_pair_f16_f16c_avx2;
            c.nearest[0] = encode_f16_nearest_f16c_avx2;
        }
    } else {
        c = (codecs16){{decode_f16_baseline, decode_bf16_baseline},
                       {decode_pair_f16_baseline, decode_pair_bf16_baseline},
                       {encode_f16_nearest_baseline, encode_bf16_nearest_baseline},
                       {encode_f16_stochastic_baseline, encode_bf16_stochastic_baseline},
                       unscale_baseline,
                       update_baseline_body_f32,
                       finite_baseline_f32,
                       NULL};
    }
    return c;
}

int fastrms_conversion_instructions(void) {
    const codecs16 c = codecs_now();
    return (c.decode[0] == decode_f16_f16c_avx2 || c.decode[0] == decode_f16_f16c_avx512) |
           (c.nearest[1] == encode_bf16_nearest_avx512bf16) << 1;
}

typedef struct {
    const struct fastrms_coeffs_f32 *coeffs;
    const codecs16 *codecs;
    unsigned flags, formats;
    uint32_t k0, k1;
    uint16_t *param;
    const void *grad;
    float *square_avg, *momentum_buffer, *grad_avg, *master;
} p16_stream_set;

/* Narrow n values whose first has index `first` in its array. */
static void encode_p16(const codecs16 *c, unsigned formats, uint32_t k0, uint32_t k1,
                       const float *in, uint16_t *out, uint64_t first, size_t n) {
    const int bf16 = (formats & FASTRMS_PARAM_BF16) != 0;
    if (!(formats & FASTRMS_STOCHASTIC)) {
        c->nearest[bf16](in, out, n);
        return;
    }
    while (n) {
        /* The loops count in 32 bits: split where the counter's high word changes. */
        const uint64_t counter = bf16 ? first >> 1 : first;
        const uint64_t counters_left = ((uint64_t)1 << 32) - (uint32_t)counter;
        const uint64_t room = bf16 ? 2 * counters_left - (first & 1u) : counters_left;
        const size_t part = (uint64_t)n < room ? n : (size_t)room;
        c->stochastic[bf16](in, out, part, k0 ^ ((uint32_t)(counter >> 32) * 0x9E3779B9u), k1,
                            first);
        in += part;
        out += part;
        first += part;
        n -= part;
    }
}

static void p16_range(const p16_stream_set *x, size_t lo, size_t hi) {
    if (x->formats == FASTRMS_PARAM_BF16 && !(x->flags & FASTRMS_GRAD_SCALE) &&
        x->codecs->fused_bf16) {
        const stream_set_bf16 fused = {x->coeffs,     x->flags,          x->param,
                                       x->grad,       x->square_avg,     x->momentum_buffer,
                                       x->grad_avg};
        x->codecs->fused_bf16(&fused, lo, hi);
        return;
    }
    float param_block[P16_BLOCK] __attribute__((aligned(64)));
    float grad_block[P16_BLOCK] __attribute__((aligned(64)));
    const codecs16 *c = x->codecs;
    const unsigned formats = x->formats;
    const int bf16 = (formats & FASTRMS_PARAM_BF16) != 0;
    const int scaled = (x->flags & FASTRMS_GRAD_SCALE) != 0;
    const float grad_scale = x->coeffs->grad_scale, inverse = x->coeffs->grad_scale_inverse;
    stream_set_f32 block = {x->coeffs, x->flags & ~FASTRMS_GRAD_SCALE, NULL, NULL, NULL, NULL,
                            NULL};
    for (size_t start = lo; start < hi; start += P16_BLOCK) {
        const size_t n = hi - start < P16_BLOCK ? hi - start : P16_BLOCK;
        float *p = param_block;
        const float *g = grad_block;
        if (formats & FASTRMS_GRAD_F32)
            g = (const float *)x->grad + start;
        if (x->master)
            p = x->master + start;
        if (p == param_block && g == grad_block)
            c->decode_pair[bf16](x->param + start, (const uint16_t *)x->grad + start,
                                 param_block, grad_block, n);
        else if (p == param_block)
            c->decode[bf16](x->param + start, param_block, n);
        else if (g == grad_block)
            c->decode[bf16]((const uint16_t *)x->grad + start, grad_block, n);
        if (scaled) {
            c->unscale(g, grad_block, n, grad_scale, inverse);
            g = grad_block;
        }
        block.param = p;
        block.grad = g;
        block.square_avg = x->square_avg + start;
        block.momentum_buffer = x->momentum_buffer ? x->momentum_buffer + start : NULL;
        block.grad_avg = x->grad_avg ? x->grad_avg + start : NULL;
        c->body(&block, 0, n);
        encode_p16(c, formats, x->k0, x->k1, p, x->param + start, start, n);
    }
}

static int p16_check(unsigned flags, unsigned formats, const p16_stream_set *x, size_t n) {
    if (flags & ~FASTRMS_ALL_FLAGS) return FASTRMS_BAD_FLAGS;
    if ((flags & FASTRMS_WD_COUPLED) && (flags & FASTRMS_WD_DECOUPLED)) return FASTRMS_BAD_FLAGS;
    if ((flags & FASTRMS_NESTEROV) && !(flags & FASTRMS_MOMENTUM)) return FASTRMS_BAD_FLAGS;
    if (formats & ~FASTRMS_ALL_FORMATS) return FASTRMS_BAD_FORMATS;
    if ((formats & FASTRMS_MASTER) && (formats & FASTRMS_STOCHASTIC)) return FASTRMS_BAD_FORMATS;
    if (n == 0) return FASTRMS_OK;
    if (!x->param || !x->grad || !x->square_avg) return FASTRMS_NULL_BUFFER;
    if ((flags & FASTRMS_MOMENTUM) && !x->momentum_buffer) return FASTRMS_NULL_BUFFER;
    if ((flags & FASTRMS_CENTERED) && !x->grad_avg) return FASTRMS_NULL_BUFFER;
    if ((formats & FASTRMS_MASTER) && !x->master) return FASTRMS_NULL_BUFFER;
    const size_t grad_size = (formats & FASTRMS_GRAD_F32) ? sizeof(float) : sizeof(uint16_t);
    const void *buffers[6] = {x->param,
                              x->grad,
                              x->square_avg,
                              (flags & FASTRMS_MOMENTUM) ? x->momentum_buffer : NULL,
                              (flags & FASTRMS_CENTERED) ? x->grad_avg : NULL,
                              (formats & FASTRMS_MASTER) ? x->master : NULL};
    const size_t sizes[6] = {sizeof(uint16_t), grad_size, sizeof(float),
                             sizeof(float),    sizeof(float), sizeof(float)};
    for (int i = 0; i < 6; ++i)
        if ((uintptr_t)buffers[i] % sizes[i] != 0) return FASTRMS_MISALIGNED;
    for (int i = 0; i < 6; ++i) {
        if (!buffers[i]) continue;
        const uintptr_t a = (uintptr_t)buffers[i], a_end = a + n * sizes[i];
        for (int j = i + 1; j < 6; ++j) {
            if (!buffers[j]) continue;
            const uintptr_t b = (uintptr_t)buffers[j], b_end = b + n * sizes[j];
            if (a < b_end && b < a_end) return FASTRMS_OVERLAP;
        }
    }
    return FASTRMS_OK;
}

static p16_stream_set p16_streams(const struct fastrms_coeffs_f32 *coeffs, const codecs16 *c,
                                  unsigned flags, unsigned formats, uint64_t key,
                                  uint16_t *param, const void *grad, float *square_avg,
                                  float *momentum_buffer, float *grad_avg, float *master) {
    const p16_stream_set x = {coeffs,
                              c,
                              flags,
                              formats,
                              (uint32_t)key,
                              (uint32_t)(key >> 32),
                              param,
                              grad,
                              square_avg,
                              (flags & FASTRMS_MOMENTUM) ? momentum_buffer : NULL,
                              (flags & FASTRMS_CENTERED) ? grad_avg : NULL,
                              (formats & FASTRMS_MASTER) ? master : NULL};
    return x;
}

int fastrms_update_p16(const struct fastrms_coeffs_f32 *coeffs, unsigned flags, unsigned formats,
                       uint64_t key, uint16_t *param, const void *grad, float *square_avg,
                       float *momentum_buffer, float *grad_avg, float *master_param, size_t n) {
    const codecs16 c = codecs_now();
    const p16_stream_set x = p16_streams(coeffs, &c, flags, formats, key, param, grad,
                                         square_avg, momentum_buffer, grad_avg, master_param);
    const int status = p16_check(flags, formats, &x, n);
    if (status != FASTRMS_OK || n == 0) return status;
    const int threads = team_size(n);
    if (threads <= 1) {
        p16_range(&x, 0, n);
        return FASTRMS_OK;
    }
#pragma omp parallel num_threads(threads) if (n >= PARALLEL_THRESHOLD)
    {
        size_t lo, hi;
        thread_slice(n, &lo, &hi);
        if (lo < hi) p16_range(&x, lo, hi);
    }
    return FASTRMS_OK;
}

/* The tensors that intersect [lo, hi) of the concatenated element index space. */
static void p16_multi_range(const p16_stream_set *base, const uint64_t *keys, uint16_t **params,
                            void **grads, float **square_avgs, float **momentum_buffers,
                            float **grad_avgs, float **master_params, const size_t *lengths,
                            size_t count, size_t lo, size_t hi) {
    size_t start = 0;
    for (size_t k = 0; k < count && start < hi; start += lengths[k], ++k) {
        const size_t end = start + lengths[k];
        if (end <= lo) continue;
        const size_t from = lo > start ? lo - start : 0;
        const size_t to = (hi < end ? hi : end) - start;
        const uint64_t key = keys ? keys[k] : 0;
        const p16_stream_set x = p16_streams(
            base->coeffs, base->codecs, base->flags, base->formats, key, params[k], grads[k],
            square_avgs[k], momentum_buffers ? momentum_buffers[k] : NULL,
            grad_avgs ? grad_avgs[k] : NULL, master_params ? master_params[k] : NULL);
        p16_range(&x, from, to);
    }
}

int fastrms_update_multi_p16(const struct fastrms_coeffs_f32 *coeffs, unsigned flags,
                             unsigned formats, const uint64_t *keys, uint16_t **params,
                             void **grads, float **square_avgs, float **momentum_buffers,
                             float **grad_avgs, float **master_params, const size_t *lengths,
                             size_t count) {
    const codecs16 c = codecs_now();
    if ((formats & FASTRMS_STOCHASTIC) && !keys && count) return FASTRMS_NULL_BUFFER;
    if ((formats & FASTRMS_MASTER) && !master_params && count) return FASTRMS_NULL_BUFFER;
    size_t total = 0;
    for (size_t k = 0; k < count; ++k) {
        const p16_stream_set x = p16_streams(
            coeffs, &c, flags, formats, 0, params[k], grads[k], square_avgs[k],
            momentum_buffers ? momentum_buffers[k] : NULL, grad_avgs ? grad_avgs[k] : NULL,
            master_params ? master_params[k] : NULL);
        const int status = p16_check(flags, formats, &x, lengths[k]);
        if (status != FASTRMS_OK) return status;
        total += lengths[k];
    }
    if (total == 0) return FASTRMS_OK;
    const p16_stream_set base = p16_streams(coeffs, &c, flags, formats, 0, NULL, NULL, NULL,
                                            NULL, NULL, NULL);
    const int threads = team_size(total);
    if (threads <= 1) {
        p16_multi_range(&base, keys, params, grads, square_avgs, momentum_buffers, grad_avgs,
                        master_params, lengths, count, 0, total);
        return FASTRMS_OK;
    }
#pragma omp parallel num_threads(threads) if (total >= PARALLEL_THRESHOLD)
    {
        size_t lo, hi;
        thread_slice(total, &lo, &hi);
        if (lo < hi)
            p16_multi_range(&base, keys, params, grads, square_avgs, momentum_buffers,
                            grad_avgs, master_params, lengths, count, lo, hi);
    }
    return FASTRMS_OK;
}

/* -- the non-finite check of 16-bit gradients: widened a block at a time, then the float32
 * check (which reads the block from L1) ---------------------------------------------------- */

static int p16_finite_range(const codecs16 *c, int bf16, const uint16_t *grad, size_t lo,
                            size_t hi, float grad_scale, float bound) {
    float block[P16_FINITE_BLOCK] __attribute__((aligned(64)));
    for (size_t start = lo; start < hi; start += P16_FINITE_BLOCK) {
        const size_t n = hi - start < P16_FINITE_BLOCK ? hi - start : P16_FINITE_BLOCK;
        c->decode[bf16](grad + start, block, n);
        if (!c->finite(block, 0, n, grad_scale, bound)) return 0;
    }
    return 1;
}

static int p16_finite_multi_range(const codecs16 *c, int bf16, uint16_t **grads,
                                  const size_t *lengths, size_t count, size_t lo, size_t hi,
                                  float grad_scale, float bound) {
    size_t start = 0;
    for (size_t k = 0; k < count && start < hi; start += lengths[k], ++k) {
        const size_t end = start + lengths[k];
        if (end <= lo) continue;
        const size_t from = lo > start ? lo - start : 0;
        const size_t to = (hi < end ? hi : end) - start;
        if (!p16_finite_range(c, bf16, grads[k], from, to, grad_scale, bound)) return 0;
    }
    return 1;
}

int fastrms_all_finite_multi_p16(uint16_t **grads, const size_t *lengths, size_t count,
                                 unsigned formats, float grad_scale) {
    if (!(grad_scale > 0) || !isfinite(grad_scale)) return FASTRMS_BAD_SCALE;
    if (formats & ~FASTRMS_ALL_FORMATS) return FASTRMS_BAD_FORMATS;
    size_t total = 0;
    for (size_t k = 0; k < count; ++k) {
        if (lengths[k] && !grads[k]) return FASTRMS_NULL_BUFFER;
        if ((uintptr_t)grads[k] % sizeof(uint16_t) != 0) return FASTRMS_MISALIGNED;
        total += lengths[k];
    }
    const codecs16 c = codecs_now();
    const int bf16 = (formats & FASTRMS_PARAM_BF16) != 0;
    /* The float32 kernel's bound (see fastrms_all_finite_multi in rmsprop_kernel.h). */
    const float bound = grad_scale >= 1.0f ? FLT_MAX : FLT_MAX * grad_scale * (1.0f - 0x1p-20f);
    const int threads = team_size(total);
    if (threads <= 1)
        return p16_finite_multi_range(&c, bf16, grads, lengths, count, 0, total, grad_scale,
                                      bound);
    int all_finite = 1;
#pragma omp parallel num_threads(threads) if (total >= PARALLEL_THRESHOLD) \
    reduction(&& : all_finite)
    {
        size_t lo, hi;
        thread_slice(total, &lo, &hi);
        if (lo < hi)
            all_finite = p16_finite_multi_range(&c, bf16, grads, lengths, count, lo, hi,
                                                grad_scale, bound);
    }
    return all_finite;
}

/* -- the codecs alone ---------------------------------------------------------------------- */

int fastrms_decode_p16(unsigned formats, const uint16_t *in, float *out, size_t n) {
    if (formats & ~FASTRMS_ALL_FORMATS) return FASTRMS_BAD_FORMATS;
    if (n == 0) return FASTRMS_OK;
    if (!in || !out) return FASTRMS_NULL_BUFFER;
    if ((uintptr_t)in % sizeof(uint16_t) || (uintptr_t)out % sizeof(float))
        return FASTRMS_MISALIGNED;
    const codecs16 c = codecs_now();
    c.decode[(formats & FASTRMS_PARAM_BF16) != 0](in, out, n);
    return FASTRMS_OK;
}

int fastrms_encode_p16(unsigned formats, uint64_t key, uint64_t first_index, const float *in,
                       uint16_t *out, size_t n) {
    if (formats & ~FASTRMS_ALL_FORMATS) return FASTRMS_BAD_FORMATS;
    if (n == 0) return FASTRMS_OK;
    if (!in || !out) return FASTRMS_NULL_BUFFER;
    if ((uintptr_t)in % sizeof(float) || (uintptr_t)out % sizeof(uint16_t))
        return FASTRMS_MISALIGNED;
    const codecs16 c = codecs_now();
    encode_p16(&c, formats, (uint32_t)key, (uint32_t)(key >> 32), in, out, first_index, n);
    return FASTRMS_OK;
}

/* -- the roofline: 16-bit param and grad, float32 state, trivial arithmetic --------------- */

typedef struct {
    unsigned flags;
    uint16_t *param;
    const uint16_t *grad;
    float *square_avg, *momentum_buffer, *grad_avg;
} p16_roofline_set;

static ALWAYS_INLINE void p16_roofline_range(const p16_roofline_set *x, size_t lo, size_t hi) {
    uint16_t *restrict P = x->param;
    const uint16_t *restrict G = x->grad;
    float *restrict S = x->square_avg;
    float *restrict B = x->momentum_buffer;
    float *restrict A = x->grad_avg;
    const int centered = (x->flags & FASTRMS_CENTERED) != 0;
    const int momentum = (x->flags & FASTRMS_MOMENTUM) != 0;
#define ROOF_COMMON S[i] += (float)G[i]; P[i] = (uint16_t)(P[i] + G[i]);
    if (centered && momentum)
        for (size_t i = lo; i < hi; ++i) { A[i] += (float)G[i]; B[i] += (float)G[i]; ROOF_COMMON }
    else if (centered)
        for (size_t i = lo; i < hi; ++i) { A[i] += (float)G[i]; ROOF_COMMON }
    else if (momentum)
        for (size_t i = lo; i < hi; ++i) { B[i] += (float)G[i]; ROOF_COMMON }
    else
        for (size_t i = lo; i < hi; ++i) { ROOF_COMMON }
#undef ROOF_COMMON
}

static void p16_roofline_baseline(const p16_roofline_set *x, size_t lo, size_t hi) {
    p16_roofline_range(x, lo, hi);
}
static TARGET_AVX2 void p16_roofline_avx2(const p16_roofline_set *x, size_t lo, size_t hi) {
    p16_roofline_range(x, lo, hi);
}
static TARGET_AVX512 void p16_roofline_avx512(const p16_roofline_set *x, size_t lo, size_t hi) {
    p16_roofline_range(x, lo, hi);
}
typedef void (*p16_roofline_fn)(const p16_roofline_set *, size_t, size_t);
static const p16_roofline_fn p16_roofline_by_level[SIMD_LEVELS] = {
    p16_roofline_baseline, p16_roofline_avx2, p16_roofline_avx512};

int fastrms_roofline_p16(unsigned flags, uint16_t *param, const uint16_t *grad,
                         float *square_avg, float *momentum_buffer, float *grad_avg, size_t n) {
    const codecs16 c = codecs_now();
    const p16_stream_set check = p16_streams(NULL, &c, flags, 0, 0, param, grad, square_avg,
                                             momentum_buffer, grad_avg, NULL);
    const int status = p16_check(flags, 0, &check, n);
    if (status != FASTRMS_OK || n == 0) return status;
    const p16_roofline_set x = {flags, param, grad, square_avg, momentum_buffer, grad_avg};
    const p16_roofline_fn fn = p16_roofline_by_level[simd_level()];
    const int threads = team_size(n);
    if (threads <= 1) {
        fn(&x, 0, n);
        return FASTRMS_OK;
    }
#pragma omp parallel num_threads(threads) if (n >= PARALLEL_THRESHOLD)
    {
        size_t lo, hi;
        thread_slice(n, &lo, &hi);
        if (lo < hi) fn(&x, lo, hi);
    }
    return FASTRMS_OK;
}
