/* The fused RMSProp update for one element type. Included by rmsprop.c once per type with
 * T (the element type), SFX (the name suffix) and SQRT (the correctly rounded square root)
 * defined. The update order is the contract's, line by line; every line is its own rounding step
 * because the build passes -ffp-contract=off.
 *
 * Parameters and gradients may be stored narrower than T (rmsprop16.h: bfloat16 with float32
 * arithmetic): the includer then also defines STORAGE (their element type), WIDEN(v) (exact
 * conversion to T, done in registers) and NARROW(v) (T back to STORAGE), and COEFFS (the
 * coefficient struct of T). Only the element loop and its per-level copies are emitted then:
 * one fused pass, no block buffers, the same arithmetic line by line. */

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define NAME(base) CAT(base, SFX)

#ifdef STORAGE
#define P_STORE_T STORAGE
#define LOAD_P(v) WIDEN(v)
#define STORE_P(v) NARROW(v)
#define COEFFS_T COEFFS
#else
#define P_STORE_T T
#define LOAD_P(v) (v)
#define STORE_P(v) (v)
#define COEFFS_T struct NAME(fastrms_coeffs)
#endif

typedef struct {
    const COEFFS_T *coeffs;
    unsigned flags;
    P_STORE_T *param;
    const P_STORE_T *grad;
    T *square_avg;
    T *momentum_buffer;
    T *grad_avg;
} NAME(stream_set);

/* The element loop. Every argument after `hi` is a compile-time constant at each call site below,
 * so the compiler emits one straight, vectorised loop per option combination; `maximize` is the
 * exception, a run-time sign flip that costs one blend and saves doubling the code. */
static ALWAYS_INLINE void NAME(update_range)(const NAME(stream_set) *x, size_t lo, size_t hi,
                                             const int maximize, const int centered,
                                             const int eps_in_sqrt, const int momentum_form,
                                             const int nesterov, const int decay_form) {
    P_STORE_T *restrict P = x->param;
    const P_STORE_T *restrict G = x->grad;
    T *restrict S = x->square_avg;
    T *restrict B = x->momentum_buffer;
    T *restrict A = x->grad_avg;
    const T alpha = x->coeffs->alpha, one_minus_alpha = x->coeffs->one_minus_alpha;
    const T eps = x->coeffs->eps, neg_lr = x->coeffs->neg_lr, lr = x->coeffs->lr;
    const T weight_decay = x->coeffs->weight_decay, momentum = x->coeffs->momentum;
    const T decay = x->coeffs->decay;

    for (size_t i = lo; i < hi; ++i) {
        T g = LOAD_P(G[i]);
        if (maximize) g = -g;
        T p = LOAD_P(P[i]);
        if (decay_form == DECAY_COUPLED) {
            const T wd_p = weight_decay * p;
            g = g + wd_p;
        } else if (decay_form == DECAY_DECOUPLED) {
            p = p * decay;
        }
        const T s_decayed = S[i] * alpha;
        const T g_scaled = one_minus_alpha * g;
        const T g_sq = g_scaled * g;
        const T s = s_decayed + g_sq;
        S[i] = s;
        T v = s;
        if (centered) {
            const T a_old = A[i];
            const T diff = g - a_old;
            const T step_a = one_minus_alpha * diff;
            const T a = a_old + step_a;
            A[i] = a;
            const T a_sq = a * a;
            v = s - a_sq;
        }
        T d;
        if (eps_in_sqrt) {
            const T v_eps = v + eps;
            d = SQRT(v_eps);
        } else {
            const T root = SQRT(v);
            d = root + eps;
        }
        if (momentum_form == MOMENTUM_NONE) {
            const T num = neg_lr * g;
            const T delta = num / d;
            p = p + delta;
        } else {
            T u;
            if (momentum_form == MOMENTUM_TORCH) {
                u = g / d;
            } else {
                const T num = lr * g;
                u = num / d;
            }
            const T b_decayed = B[i] * momentum;
            const T b = b_decayed + u;
            B[i] = b;
            T step = b;
            if (nesterov) {
                const T look_ahead = momentum * b;
                step = u + look_ahead;
            }
            if (momentum_form == MOMENTUM_TORCH) {
                const T delta = neg_lr * step;
                p = p + delta;
            } else {
                p = p - step;
            }
        }
        P[i] = STORE_P(p);
    }
}

/* Unfold the run-time flags into compile-time constants, one level per option. */
static ALWAYS_INLINE void NAME(by_decay)(const NAME(stream_set) *x, size_t lo, size_t hi, int mx,
                                         int c, int e, int m, int nv) {
    const unsigned f = x->flags;
    if (f & FASTRMS_WD_COUPLED)
        NAME(update_range)(x, lo, hi, mx, c, e, m, nv, DECAY_COUPLED);
    else if (f & FASTRMS_WD_DECOUPLED)
        NAME(update_range)(x, lo, hi, mx, c, e, m, nv, DECAY_DECOUPLED);
    else
        NAME(update_range)(x, lo, hi, mx, c, e, m, nv, DECAY_NONE);
}

static ALWAYS_INLINE void NAME(by_momentum)(const NAME(stream_set) *x, size_t lo, size_t hi,
                                            int mx, int c, int e) {
    const unsigned f = x->flags;
    const int nesterov = (f & FASTRMS_NESTEROV) != 0;
    if (!(f & FASTRMS_MOMENTUM))
        NAME(by_decay)(x, lo, hi, mx, c, e, MOMENTUM_NONE, 0);
    else if (f & FASTRMS_LR_IN_MOMENTUM) {
        if (nesterov) NAME(by_decay)(x, lo, hi, mx, c, e, MOMENTUM_LR_INSIDE, 1);
        else NAME(by_decay)(x, lo, hi, mx, c, e, MOMENTUM_LR_INSIDE, 0);
    } else {
        if (nesterov) NAME(by_decay)(x, lo, hi, mx, c, e, MOMENTUM_TORCH, 1);
        else NAME(by_decay)(x, lo, hi, mx, c, e, MOMENTUM_TORCH, 0);
    }
}

static ALWAYS_INLINE void NAME(by_flags)(const NAME(stream_set) *x, size_t lo, size_t hi) {
    const unsigned f = x->flags;
    const int mx = (f & FASTRMS_MAXIMIZE) != 0;
    if (f & FASTRMS_CENTERED) {
        if (f & FASTRMS_EPS_IN_SQRT) NAME(by_momentum)(x, lo, hi, mx, 1, 1);
        else NAME(by_momentum)(x, lo, hi, mx, 1, 0);
    } else {
        if (f & FASTRMS_EPS_IN_SQRT) NAME(by_momentum)(x, lo, hi, mx, 0, 1);
        else NAME(by_momentum)(x, lo, hi, mx, 0, 0);
    }
}

#ifdef STORAGE
/* One AVX2 copy of the narrow-storage loop, the includer's to dispatch: every copy of these 60
 * loop variants costs about 20 s of build time, and at the sizes where it matters the step is
 * bound by memory, which AVX2's width already saturates. */
static NOINLINE TARGET_AVX2 void NAME(update_avx2_body)(const NAME(stream_set) * x, size_t lo,
                                                        size_t hi) {
    NAME(by_flags)(x, lo, hi);
}
#else /* STORAGE: the rest is the plain T kernel's */

/* Same streams as the update, trivial arithmetic: the speed limit of the memory system. */
static ALWAYS_INLINE void NAME(roofline_range)(const NAME(stream_set) *x, size_t lo, size_t hi) {
    T *restrict P = x->param;
    const T *restrict G = x->grad;
    T *restrict S = x->square_avg;
    T *restrict B = x->momentum_buffer;
    T *restrict A = x->grad_avg;
    const int centered = (x->flags & FASTRMS_CENTERED) != 0;
    const int momentum = (x->flags & FASTRMS_MOMENTUM) != 0;
    if (centered && momentum)
        for (size_t i = lo; i < hi; ++i) { S[i] += G[i]; A[i] += G[i]; B[i] += G[i]; P[i] += S[i]; }
    else if (centered)
        for (size_t i = lo; i < hi; ++i) { S[i] += G[i]; A[i] += G[i]; P[i] += S[i]; }
    else if (momentum)
        for (size_t i = lo; i < hi; ++i) { S[i] += G[i]; B[i] += G[i]; P[i] += S[i]; }
    else
        for (size_t i = lo; i < hi; ++i) { S[i] += G[i]; P[i] += S[i]; }
}

/* -- Loss-scaled steps ---------------------------------------------------------------------
 * The gradient is unscaled a block at a time into a buffer on the stack (it stays in L1), and
 * the ordinary loop runs on the buffer: the bits of dividing first, as docs/contract.md asks,
 * without a second copy of every loop variant. A power-of-two scale has an exact reciprocal, and then a
 * multiplication gives the division's bits at a fraction of its cost. */

#define UNSCALE_BLOCK ((size_t)2048)

static ALWAYS_INLINE void NAME(unscale_block)(const T *restrict grad, T *restrict out, size_t n,
                                              T grad_scale, T exact_inverse) {
    if (exact_inverse != (T)0)
        for (size_t i = 0; i < n; ++i) out[i] = grad[i] * exact_inverse;
    else
        for (size_t i = 0; i < n; ++i) out[i] = grad[i] / grad_scale;
}

static ALWAYS_INLINE void NAME(unscaled_blocks)(void (*body)(const NAME(stream_set) *, size_t,
                                                             size_t),
                                                const NAME(stream_set) *x, size_t lo, size_t hi) {
    T unscaled[UNSCALE_BLOCK] __attribute__((aligned(64)));
    const T grad_scale = x->coeffs->grad_scale, exact_inverse = x->coeffs->grad_scale_inverse;
    NAME(stream_set) block = *x;
    block.grad = unscaled;
    for (size_t start = lo; start < hi; start += UNSCALE_BLOCK) {
        const size_t n = hi - start < UNSCALE_BLOCK ? hi - start : UNSCALE_BLOCK;
        NAME(unscale_block)(x->grad + start, unscaled, n, grad_scale, exact_inverse);
        block.param = x->param + start;
        block.square_avg = x->square_avg + start;
        if (x->momentum_buffer) block.momentum_buffer = x->momentum_buffer + start;
        if (x->grad_avg) block.grad_avg = x->grad_avg + start;
        body(&block, 0, n);
    }
}

/* One copy of each range function per instruction set; the table is indexed by SIMD level. */
#define UPDATE_FOR_LEVEL(level, target)                                                        \
    static NOINLINE target void NAME(update_##level##_body)(const NAME(stream_set) * x,       \
                                                            size_t lo, size_t hi) {           \
        NAME(by_flags)(x, lo, hi);                                                            \
    }                                                                                         \
    static target void NAME(update_##level)(const NAME(stream_set) * x, size_t lo, size_t hi) { \
        if (x->flags & FASTRMS_GRAD_SCALE)                                                    \
            NAME(unscaled_blocks)(NAME(update_##level##_body), x, lo, hi);                    \
        else                                                                                  \
            NAME(update_##level##_body)(x, lo, hi);                                           \
    }
UPDATE_FOR_LEVEL(baseline, )
UPDATE_FOR_LEVEL(avx2, TARGET_AVX2)
UPDATE_FOR_LEVEL(avx512, TARGET_AVX512)
#undef UPDATE_FOR_LEVEL

static void NAME(roofline_baseline)(const NAME(stream_set) *x, size_t lo, size_t hi) {
    NAME(roofline_range)(x, lo, hi);
}
static TARGET_AVX2 void NAME(roofline_avx2)(const NAME(stream_set) *x, size_t lo, size_t hi) {
    NAME(roofline_range)(x, lo, hi);
}
static TARGET_AVX512 void NAME(roofline_avx512)(const NAME(stream_set) *x, size_t lo, size_t hi) {
    NAME(roofline_range)(x, lo, hi);
}

typedef void (*NAME(range_fn))(const NAME(stream_set) *, size_t, size_t);
static const NAME(range_fn) NAME(update_by_level)[SIMD_LEVELS] = {
    NAME(update_baseline), NAME(update_avx2), NAME(update_avx512)};
static const NAME(range_fn) NAME(roofline_by_level)[SIMD_LEVELS] = {
    NAME(roofline_baseline), NAME(roofline_avx2), NAME(roofline_avx512)};

/* Run fn over n elements, split in cache-line-aligned slices over the thread team. */
static void NAME(run_split)(NAME(range_fn) fn, const NAME(stream_set) *x, size_t n) {
    const int threads = team_size(n);
    if (threads <= 1) {
        fn(x, 0, n);
        return;
    }
#pragma omp parallel num_threads(threads) if (n >= PARALLEL_THRESHOLD)
    {
        size_t lo, hi;
        thread_slice(n, &lo, &hi);
        if (lo < hi) fn(x, lo, hi);
    }
}

static int NAME(check_streams)(unsigned flags, const NAME(stream_set) *x, size_t n) {
    if (flags & ~FASTRMS_ALL_FLAGS) return FASTRMS_BAD_FLAGS;
    if ((flags & FASTRMS_WD_COUPLED) && (flags & FASTRMS_WD_DECOUPLED)) return FASTRMS_BAD_FLAGS;
    if ((flags & FASTRMS_NESTEROV) && !(flags & FASTRMS_MOMENTUM)) return FASTRMS_BAD_FLAGS;
    if (n == 0) return FASTRMS_OK;
    if (!x->param || !x->grad || !x->square_avg) return FASTRMS_NULL_BUFFER;
    if ((flags & FASTRMS_MOMENTUM) && !x->momentum_buffer) return FASTRMS_NULL_BUFFER;
    if ((flags & FASTRMS_CENTERED) && !x->grad_avg) return FASTRMS_NULL_BUFFER;
    const void *buffers[5] = {x->param, x->grad, x->square_avg,
                              (flags & FASTRMS_MOMENTUM) ? x->momentum_buffer : NULL,
                              (flags & FASTRMS_CENTERED) ? x->grad_avg : NULL};
    for (int i = 0; i < 5; ++i)
        if ((uintptr_t)buffers[i] % sizeof(T) != 0) return FASTRMS_MISALIGNED;
    return first_overlap(buffers, n * sizeof(T));
}

int NAME(fastrms_update)(const struct NAME(fastrms_coeffs) *coeffs, unsigned flags, T *param,
                         const T *grad, T *square_avg, T *momentum_buffer, T *grad_avg,
                         size_t n) {
    const NAME(stream_set) x = {coeffs, flags, param, grad, square_avg, momentum_buffer, grad_avg};
    const int status = NAME(check_streams)(flags, &x, n);
    if (status != FASTRMS_OK || n == 0) return status;
    NAME(run_split)(NAME(update_by_level)[simd_level()], &x, n);
    return FASTRMS_OK;
}

int NAME(fastrms_roofline)(unsigned flags, T *param, const T *grad, T *square_avg,
                           T *momentum_buffer, T *grad_avg, size_t n) {
    const NAME(stream_set) x = {NULL, flags, param, grad, square_avg, momentum_buffer, grad_avg};
    const int status = NAME(check_streams)(flags, &x, n);
    if (status != FASTRMS_OK || n == 0) return status;
    NAME(run_split)(NAME(roofline_by_level)[simd_level()], &x, n);
    return FASTRMS_OK;
}

/* Walk the tensors that intersect [lo, hi) of the concatenated element index space. */
static void NAME(multi_range)(NAME(range_fn) fn, const NAME(stream_set) *base, T **params,
                              T **grads, T **square_avgs, T **momentum_buffers, T **grad_avgs,
                              const size_t *lengths, size_t count, size_t lo, size_t hi) {
    size_t start = 0;
    for (size_t k = 0; k < count && start < hi; start += lengths[k], ++k) {
        const size_t end = start + lengths[k];
        if (end <= lo) continue;
        const size_t from = lo > start ? lo - start : 0;
        const size_t to = (hi < end ? hi : end) - start;
        NAME(stream_set) x = *base;
        x.param = params[k];
        x.grad = grads[k];
        x.square_avg = square_avgs[k];
        x.momentum_buffer = momentum_buffers ? momentum_buffers[k] : NULL;
        x.grad_avg = grad_avgs ? grad_avgs[k] : NULL;
        fn(&x, from, to);
    }
}

int NAME(fastrms_update_multi)(const struct NAME(fastrms_coeffs) *coeffs, unsigned flags,
                               T **params, T **grads, T **square_avgs, T **momentum_buffers,
                               T **grad_avgs, const size_t *lengths, size_t count) {
    size_t total = 0;
    for (size_t k = 0; k < count; ++k) {
        const NAME(stream_set) x = {coeffs,
                                    flags,
                                    params[k],
                                    grads[k],
                                    square_avgs[k],
                                    momentum_buffers ? momentum_buffers[k] : NULL,
                                    grad_avgs ? grad_avgs[k] : NULL};
        const int status = NAME(check_streams)(flags, &x, lengths[k]);
        if (status != FASTRMS_OK) return status;
        total += lengths[k];
    }
    if (total == 0) return FASTRMS_OK;
    const NAME(stream_set) base = {coeffs, flags, NULL, NULL, NULL, NULL, NULL};
    const NAME(range_fn) fn = NAME(update_by_level)[simd_level()];
    const int threads = team_size(total);
    if (threads <= 1) {
        NAME(multi_range)(fn, &base, params, grads, square_avgs, momentum_buffers, grad_avgs,
                          lengths, count, 0, total);
        return FASTRMS_OK;
    }
#pragma omp parallel num_threads(threads) if (total >= PARALLEL_THRESHOLD)
    {
        size_t lo, hi;
        thread_slice(total, &lo, &hi);
        if (lo < hi)
            NAME(multi_range)(fn, &base, params, grads, square_avgs, momentum_buffers, grad_avgs,
                              lengths, count, lo, hi);
    }
    return FASTRMS_OK;
}

/* -- The non-finite check of a loss-scaled step --------------------------------------------
 * Is every grad / grad_scale finite in T? A single compare per element decides almost every
 * element: below `bound` the quotient cannot overflow. Elements beyond it (inf, NaN, or huge
 * values when grad_scale < 1) are rare; their block is re-checked with the exact division the
 * update performs. */

#define FINITE_BLOCK ((size_t)4096)

static ALWAYS_INLINE int NAME(any_beyond)(const T *restrict G, size_t lo, size_t hi, T bound) {
    int beyond = 0;
    for (size_t i = lo; i < hi; ++i) beyond |= !(ABS(G[i]) <= bound);
    return beyond;
}

static ALWAYS_INLINE int NAME(finite_range)(const T *G, size_t lo, size_t hi, T grad_scale,
                                            T bound) {
    for (size_t start = lo; start < hi; start += FINITE_BLOCK) {
        const size_t end = hi - start > FINITE_BLOCK ? start + FINITE_BLOCK : hi;
        if (!NAME(any_beyond)(G, start, end, bound)) continue;
        for (size_t i = start; i < end; ++i) {
            const T unscaled = G[i] / grad_scale;
            if (!isfinite(unscaled)) return 0;
        }
    }
    return 1;
}

static int NAME(finite_baseline)(const T *G, size_t lo, size_t hi, T s, T bound) {
    return NAME(finite_range)(G, lo, hi, s, bound);
}
static TARGET_AVX2 int NAME(finite_avx2)(const T *G, size_t lo, size_t hi, T s, T bound) {
    return NAME(finite_range)(G, lo, hi, s, bound);
}
static TARGET_AVX512 int NAME(finite_avx512)(const T *G, size_t lo, size_t hi, T s, T bound) {
    return NAME(finite_range)(G, lo, hi, s, bound);
}
typedef int (*NAME(finite_fn))(const T *, size_t, size_t, T, T);
static const NAME(finite_fn) NAME(finite_by_level)[SIMD_LEVELS] = {
    NAME(finite_baseline), NAME(finite_avx2), NAME(finite_avx512)};

/* 1 if every element of [lo, hi) of the concatenated tensors passes, else 0. */
static int NAME(finite_multi_range)(NAME(finite_fn) fn, T **grads, const size_t *lengths,
                                    size_t count, size_t lo, size_t hi, T grad_scale, T bound) {
    size_t start = 0;
    for (size_t k = 0; k < count && start < hi; start += lengths[k], ++k) {
        const size_t end = start + lengths[k];
        if (end <= lo) continue;
        const size_t from = lo > start ? lo - start : 0;
        const size_t to = (hi < end ? hi : end) - start;
        if (!fn(grads[k], from, to, grad_scale, bound)) return 0;
    }
    return 1;
}

int NAME(fastrms_all_finite_multi)(T **grads, const size_t *lengths, size_t count, T grad_scale) {
    if (!(grad_scale > 0) || !isfinite(grad_scale)) return FASTRMS_BAD_SCALE;
    size_t total = 0;
    for (size_t k = 0; k < count; ++k) {
        if (lengths[k] && !grads[k]) return FASTRMS_NULL_BUFFER;
        if ((uintptr_t)grads[k] % sizeof(T) != 0) return FASTRMS_MISALIGNED;
        total += lengths[k];
    }
    /* |g| <= bound guarantees a finite g / grad_scale: bound / grad_scale < T_MAX, whatever the
     * two roundings of the product (each at most half an ulp, far inside the 2^-20 margin). */
    const T bound = grad_scale >= (T)1 ? T_MAX : T_MAX * grad_scale * ((T)1 - (T)0x1p-20);
    const NAME(finite_fn) fn = NAME(finite_by_level)[simd_level()];
    const int threads = team_size(total);
    if (threads <= 1)
        return NAME(finite_multi_range)(fn, grads, lengths, count, 0, total, grad_scale, bound);
    int all_finite = 1;
#pragma omp parallel num_threads(threads) if (total >= PARALLEL_THRESHOLD) \
    reduction(&& : all_finite)
    {
        size_t lo, hi;
        thread_slice(total, &lo, &hi);
        if (lo < hi)
            all_finite = NAME(finite_multi_range)(fn, grads, lengths, count, lo, hi, grad_scale,
                                                  bound);
    }
    return all_finite;
}

int NAME(fastrms_all_finite)(const T *grad, size_t n, T grad_scale) {
    T *grads[1] = {(T *)grad};
    return NAME(fastrms_all_finite_multi)(grads, &n, 1, grad_scale);
}

#endif /* STORAGE */

#undef P_STORE_T
#undef LOAD_P
#undef STORE_P
#undef COEFFS_T
#undef NAME
#undef CAT
#undef CAT_
