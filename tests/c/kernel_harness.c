/* Drives the C kernels directly, for the sanitizer build in tests/test_c_sanitizers.py: every
 * flag combination, both dtypes, lengths that end mid-vector, n = 0, pointers offset from
 * vector alignment, misaligned pointers, overlapping buffers, the multi-tensor entry point and
 * the roofline, loss-scaled steps (a scale with an exact reciprocal and one without), the
 * finiteness check, on 1 and 2 threads. Buffers are allocated at their exact size so that
 * AddressSanitizer sees any access past either end. Exit status 0 means every check held. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fastrms.h"

static int failures = 0;
#define CHECK(cond, ...)                                  \
    do {                                                  \
        if (!(cond)) {                                    \
            fprintf(stderr, "FAILED %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                 \
            fputc('\n', stderr);                          \
            ++failures;                                   \
        }                                                 \
    } while (0)

/* 4097: a loss-scaled step unscales blocks of 2048 elements; 4097 ends one past the second. */
static const size_t lengths[] = {0, 1, 2, 3, 7, 8, 15, 16, 17, 31, 33, 63, 65, 1000, 4097, 70001};
enum { NLENGTHS = sizeof(lengths) / sizeof(lengths[0]) };

static int valid_flags(unsigned f) {
    if ((f & FASTRMS_WD_COUPLED) && (f & FASTRMS_WD_DECOUPLED)) return 0;
    if ((f & FASTRMS_NESTEROV) && !(f & FASTRMS_MOMENTUM)) return 0;
    return 1;
}

/* `shift` elements of slack in front of each buffer move it off vector alignment. */
#define DEFINE_RUN(T, SFX)                                                                      \
    static T *alloc_##SFX(size_t n, size_t shift, T **base) {                                   \
        *base = malloc((n + shift) * sizeof(T) + 1);                                            \
        T *p = *base + shift;                                                                   \
        for (size_t i = 0; i < n; ++i) p[i] = (T)(0.25 + 0.001 * (double)(i % 97));             \
        return p;                                                                               \
    }                                                                                           \
    static void run_##SFX(unsigned flags, size_t n, size_t shift) {                             \
        /* The scale is 4 (exact reciprocal 0.25) on aligned runs, 3 (no exact one) on others. */ \
        struct fastrms_coeffs_##SFX c = {0.9, 0.1, 1e-8, -0.01, 0.01, 0.1, 0.9, 0.999,        \
                                         shift ? 3 : 4, shift ? 0 : 0.25};                      \
        T *bases[5];                                                                            \
        T *p = alloc_##SFX(n, shift, &bases[0]), *g = alloc_##SFX(n, shift, &bases[1]);         \
        T *s = alloc_##SFX(n, shift, &bases[2]), *b = alloc_##SFX(n, shift, &bases[3]);         \
        T *a = alloc_##SFX(n, shift, &bases[4]);                                                \
        T *bb = (flags & FASTRMS_MOMENTUM) ? b : NULL, *aa = (flags & FASTRMS_CENTERED) ? a : NULL; \
        int status = fastrms_update_##SFX(&c, flags, p, g, s, bb, aa, n);                       \
        CHECK(status == FASTRMS_OK, #SFX " update flags=%u n=%zu shift=%zu: status %d", flags,  \
              n, shift, status);                                                                \
        status = fastrms_roofline_##SFX(flags, p, g, s, bb, aa, n);                             \
        CHECK(status == FASTRMS_OK, #SFX " roofline flags=%u n=%zu: status %d", flags, n, status); \
        T *ps[2] = {p, s}, *gs[2] = {g, g}, *ss[2] = {s, p};                                    \
        size_t ls[2] = {n, 0};                                                                  \
        T *bs[2] = {bb, bb}, *as[2] = {aa, aa};                                                 \
        status = fastrms_update_multi_##SFX(&c, flags, ps, gs, ss,                              \
                                            (flags & FASTRMS_MOMENTUM) ? bs : NULL,             \
                                            (flags & FASTRMS_CENTERED) ? as : NULL, ls, 2);     \
        CHECK(status == FASTRMS_OK, #SFX " multi flags=%u n=%zu: status %d", flags, n, status); \
        const T scale = (flags & FASTRMS_GRAD_SCALE) ? c.grad_scale : (T)0.5;                   \
        CHECK(fastrms_all_finite_##SFX(g, n, scale) == 1, #SFX " finite n=%zu", n);           \
        CHECK(fastrms_all_finite_multi_##SFX(gs, ls, 2, scale) == 1, #SFX " finite multi");    \
        CHECK(fastrms_all_finite_##SFX(g, n, 0) == FASTRMS_BAD_SCALE, #SFX " zero scale");     \
        if (n > 0) {                                                                            \
            const T saved = g[n - 1];                                                           \
            g[n - 1] = (T)INFINITY;                                                             \
            CHECK(fastrms_all_finite_##SFX(g, n, scale) == 0, #SFX " inf missed n=%zu", n);   \
            CHECK(fastrms_all_finite_multi_##SFX(gs, ls, 2, scale) == 0, #SFX " inf missed");  \
            g[n - 1] = saved;                                                                   \
        }                                                                                       \
        if (n > 2) { /* n - 1 >= 2 elements: p and p + 1 then share memory */          \
            status = fastrms_update_##SFX(&c, flags, p, p + 1, s, bb, aa, n - 1);               \
            CHECK(status == FASTRMS_OVERLAP, #SFX " overlap not caught: status %d", status);   \
            T *odd = (T *)((char *)bases[0] + 1);                                               \
            status = fastrms_update_##SFX(&c, flags, odd, g, s, bb, aa, n - 1);                 \
            CHECK(status == FASTRMS_MISALIGNED, #SFX " misalignment not caught: %d", status);  \
        }                                                                                       \
        for (int k = 0; k < 5; ++k) free(bases[k]);                                             \
    }

DEFINE_RUN(float, f32)
DEFINE_RUN(double, f64)

int main(void) {
    CHECK(fastrms_update_f32(NULL, 1u << 10, NULL, NULL, NULL, NULL, NULL, 0) == FASTRMS_BAD_FLAGS,
          "unknown flag accepted");
    CHECK(fastrms_update_f64(NULL, FASTRMS_NESTEROV, NULL, NULL, NULL, NULL, NULL, 0) ==
              FASTRMS_BAD_FLAGS, "nesterov without momentum accepted");
    size_t runs = 0;
    for (int level = fastrms_max_simd_level(); level >= 0; --level) {
        fastrms_set_simd_level(level);
        for (int threads = 1; threads <= 2; ++threads) {
            fastrms_set_num_threads(threads);
            for (unsigned flags = 0; flags < 2 * FASTRMS_GRAD_SCALE; ++flags) {
                if (!valid_flags(flags)) continue;
                for (int k = 0; k < NLENGTHS; ++k) {
                    /* The largest length only for the threaded pass of a few flag sets. */
                    if (lengths[k] > 1000 && (threads == 1 || (flags & 0x1d))) continue;
                    for (size_t shift = 0; shift < 2; ++shift) {
                        run_f32(flags, lengths[k], shift);
                        run_f64(flags, lengths[k], shift);
                        runs += 2;
                    }
                }
            }
        }
    }
    printf("%zu kernel runs, %d failures\n", runs, failures);
    return failures != 0;
}
