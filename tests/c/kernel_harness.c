/* Drives the C kernels directly, for the sanitizer build in tests/test_c_sanitizers.py: every
 * flag combination, both dtypes, lengths that end mid-vector, n = 0, pointers offset from
 * vector alignment, misaligned pointers, overlapping buffers, the multi-tensor entry point and
 * the roofline, loss-scaled steps (a scale with an exact reciprocal and one without), the
 * finiteness check, on 1 and 2 threads; then the 16-bit entry points (every format word, a set
 * of flags, the codecs alone, the counter split of stochastic rounding at 2^32 and 2^33);
 * then compact state (bfloat16 and blockwise8 state with float32 and bfloat16 params, the
 * blockwise8 codecs, the compact roofline, overlap between codes and scales).
 * Buffers are allocated at their exact size so that
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

/* 16-bit params: `formats` as in fastrms.h; param and 16-bit grad hold bit patterns of every
 * kind (NaNs, infinities, subnormals) as they come. */
static void run_p16(unsigned flags, unsigned formats, size_t n, size_t shift) {
    struct fastrms_coeffs_f32 c = {0.9f, 0.1f, 1e-8f, -0.01f, 0.01f, 0.1f, 0.9f, 0.999f,
                                   shift ? 3.0f : 4.0f, shift ? 0.0f : 0.25f};
    uint16_t *pbase = malloc((n + shift) * sizeof(uint16_t) + 1), *p = pbase + shift;
    uint16_t *gbase = malloc((n + shift) * sizeof(uint16_t) + 1), *g16 = gbase + shift;
    float *fbases[5];
    float *g32 = alloc_f32(n, shift, &fbases[0]), *s = alloc_f32(n, shift, &fbases[1]);
    float *b = alloc_f32(n, shift, &fbases[2]), *a = alloc_f32(n, shift, &fbases[3]);
    float *m = alloc_f32(n, shift, &fbases[4]);
    for (size_t i = 0; i < n; ++i) {
        p[i] = (uint16_t)(i * 2654435761u >> 7);
        g16[i] = (uint16_t)(i * 40503u + 7);
    }
    const void *g = (formats & FASTRMS_GRAD_F32) ? (const void *)g32 : (const void *)g16;
    float *bb = (flags & FASTRMS_MOMENTUM) ? b : NULL, *aa = (flags & FASTRMS_CENTERED) ? a : NULL;
    float *mm = (formats & FASTRMS_MASTER) ? m : NULL;
    const uint64_t key = 0x9E3779B97F4A7C15u ^ n;
    int status = fastrms_update_p16(&c, flags, formats, key, p, g, s, bb, aa, mm, n);
    CHECK(status == FASTRMS_OK, "p16 update flags=%u formats=%u n=%zu: %d", flags, formats, n,
          status);
    uint16_t *ps[2] = {p, p};
    void *gs[2] = {(void *)g, (void *)g};
    float *ss[2] = {s, s}, *bs[2] = {bb, bb}, *as[2] = {aa, aa}, *ms[2] = {mm, mm};
    const uint64_t keys[2] = {key, key + 1};
    size_t ls[2] = {n, 0};
    status = fastrms_update_multi_p16(&c, flags, formats, keys, ps, gs, ss,
                                      (flags & FASTRMS_MOMENTUM) ? bs : NULL,
                                      (flags & FASTRMS_CENTERED) ? as : NULL,
                                      (formats & FASTRMS_MASTER) ? ms : NULL, ls, 2);
    CHECK(status == FASTRMS_OK, "p16 multi flags=%u formats=%u n=%zu: %d", flags, formats, n,
          status);
    if (!(formats & FASTRMS_GRAD_F32)) {
        uint16_t *g16s[2] = {g16, g16};
        status = fastrms_all_finite_multi_p16(g16s, ls, 2, formats, c.grad_scale);
        CHECK(status == 0 || status == 1, "p16 finite: %d", status);
        status = fastrms_roofline_p16(flags, p, g16, s, bb, aa, n);
        CHECK(status == FASTRMS_OK, "p16 roofline n=%zu: %d", n, status);
    }
    CHECK(fastrms_decode_p16(formats, p, s, n) == FASTRMS_OK, "decode n=%zu", n);
    /* Stochastic rounding's 32-bit counters split where their high word changes. */
    const uint64_t firsts[3] = {0, ((uint64_t)1 << 32) - n / 2, ((uint64_t)1 << 33) - n / 2 - 1};
    for (int k = 0; k < 3; ++k)
        CHECK(fastrms_encode_p16(formats, key, firsts[k], s, p, n) == FASTRMS_OK, "encode");
    if (n > 2) {
        status = fastrms_update_p16(&c, flags, formats, key, p, g, (float *)(void *)(p + 1), bb,
                                    aa, mm, n - 1);
        CHECK(status == FASTRMS_OVERLAP || status == FASTRMS_MISALIGNED,
              "p16 overlap not caught: %d", status);
        status = fastrms_update_p16(&c, flags, formats, key, (uint16_t *)((char *)pbase + 1), g,
                                    s, bb, aa, mm, n - 1);
        CHECK(status == FASTRMS_MISALIGNED, "p16 misalignment not caught: %d", status);
    }
    free(pbase);
    free(gbase);
    for (int k = 0; k < 5; ++k) free(fbases[k]);
}

static size_t run_p16_all(void) {
    static const unsigned flag_sets[] = {
        0, FASTRMS_MOMENTUM | FASTRMS_CENTERED | FASTRMS_GRAD_SCALE,
        FASTRMS_WD_COUPLED | FASTRMS_MAXIMIZE | FASTRMS_EPS_IN_SQRT,
        FASTRMS_MOMENTUM | FASTRMS_NESTEROV | FASTRMS_LR_IN_MOMENTUM | FASTRMS_WD_DECOUPLED |
            FASTRMS_GRAD_SCALE};
    size_t runs = 0;
    CHECK(fastrms_update_p16(NULL, 0, 16, 0, NULL, NULL, NULL, NULL, NULL, NULL, 0) ==
              FASTRMS_BAD_FORMATS, "unknown format accepted");
    CHECK(fastrms_update_p16(NULL, 0, FASTRMS_MASTER | FASTRMS_STOCHASTIC, 0, NULL, NULL, NULL,
                             NULL, NULL, NULL, 0) == FASTRMS_BAD_FORMATS,
          "master with stochastic rounding accepted");
    for (int hardware = 1; hardware >= 0; --hardware) {
        fastrms_set_conversion_instructions(hardware);
        for (unsigned formats = 0; formats <= 15; ++formats) {
            if ((formats & FASTRMS_MASTER) && (formats & FASTRMS_STOCHASTIC)) continue;
            for (size_t f = 0; f < sizeof flag_sets / sizeof flag_sets[0]; ++f)
                for (int k = 0; k < NLENGTHS; ++k)
                    for (size_t shift = 0; shift < 2; ++shift) {
                        if (lengths[k] > 4097 && (f || shift)) continue;
                        run_p16(flag_sets[f], formats, lengths[k], shift);
                        ++runs;
                    }
        }
    }
    return runs;
}

/* Compact state: each state stream float32 (0), bfloat16 (1) or blockwise8 (2), as `kinds`
 * (two bits per stream); scales exactly ceil(n / 256) long. */
static void run_compact(unsigned flags, int bf16_param, unsigned kinds, size_t n) {
    struct fastrms_coeffs_f32 c = {0.9f, 0.1f, 1e-8f, -0.01f, 0.01f, 0.1f, 0.9f, 0.999f, 3.0f,
                                   0.0f};
    const size_t blocks = (n + FASTRMS_B8_BLOCK - 1) / FASTRMS_B8_BLOCK;
    const size_t item = bf16_param ? 2 : 4;
    void *p = malloc(n ? n * item : 1), *g = malloc(n ? n * item : 1);
    void *states[3];
    float *scales[3];
    unsigned formats = bf16_param ? FASTRMS_PARAM_BF16 : FASTRMS_PARAM_F32;
    static const unsigned bits[3][2] = {{FASTRMS_SQUARE_AVG_BF16, FASTRMS_SQUARE_AVG_B8},
                                        {FASTRMS_MOMENTUM_BUFFER_BF16, FASTRMS_MOMENTUM_BUFFER_B8},
                                        {FASTRMS_GRAD_AVG_BF16, FASTRMS_GRAD_AVG_B8}};
    for (int j = 0; j < 3; ++j) {
        const unsigned kind = (kinds >> (2 * j)) & 3u;
        const size_t size = kind == 0 ? 4 : (kind == 1 ? 2 : 1);
        states[j] = calloc(n ? n * size : 1, 1);
        scales[j] = calloc(blocks ? blocks : 1, sizeof(float));
        if (kind) formats |= bits[j][kind - 1];
    }
    for (size_t i = 0; i < n; ++i) {
        if (bf16_param) {
            ((uint16_t *)p)[i] = (uint16_t)(0x3F80u + (i % 97));
            ((uint16_t *)g)[i] = (uint16_t)(i * 40503u + 7);
        } else {
            ((float *)p)[i] = (float)i * 0.25f;
            ((float *)g)[i] = (float)(i % 13) - 6.0f;
        }
    }
    int status = fastrms_update_compact(&c, flags, formats, 0, p, g, states, scales, NULL, n);
    CHECK(status == FASTRMS_OK, "compact flags=%u formats=%u n=%zu: %d", flags, formats, n,
          status);
    status = fastrms_roofline_compact(flags, formats, p, g, states, scales, n);
    CHECK(status == FASTRMS_OK, "compact roofline n=%zu: %d", n, status);
    if (n) {
        float *values = malloc(n * sizeof(float));
        uint8_t *codes = malloc(n);
        float *own_scales = malloc(blocks * sizeof(float));
        for (size_t i = 0; i < n; ++i) values[i] = (float)i - 3.5f;
        CHECK(fastrms_encode_b8(1, values, codes, own_scales, n) == FASTRMS_OK, "encode_b8");
        CHECK(fastrms_decode_b8(1, codes, own_scales, values, n) == FASTRMS_OK, "decode_b8");
        free(values);
        free(codes);
        free(own_scales);
    }
    if (n > FASTRMS_B8_BLOCK && ((kinds & 3u) == 2u)) {
        /* square_avg's scales inside its own codes: refused before anything is written. */
        float *saved = scales[0];
        scales[0] = (float *)states[0];
        status = fastrms_update_compact(&c, flags, formats, 0, p, g, states, scales, NULL, n);
        CHECK(status == FASTRMS_OVERLAP || status == FASTRMS_MISALIGNED,
              "compact overlap not caught: %d", status);
        scales[0] = saved;
    }
    free(p);
    free(g);
    for (int j = 0; j < 3; ++j) {
        free(states[j]);
        free(scales[j]);
    }
}

static size_t run_compact_all(void) {
    static const unsigned flag_sets[] = {
        0, FASTRMS_MOMENTUM | FASTRMS_CENTERED | FASTRMS_GRAD_SCALE,
        FASTRMS_MOMENTUM | FASTRMS_NESTEROV | FASTRMS_WD_COUPLED | FASTRMS_MAXIMIZE};
    static const unsigned kind_sets[] = {2u | 2u << 2 | 2u << 4, 1u | 2u << 2 | 0u << 4,
                                         0u | 1u << 2 | 2u << 4, 2u | 0u << 2 | 1u << 4};
    static const size_t compact_lengths[] = {0, 1, 255, 256, 257, 1000, 4097, 70001};
    size_t runs = 0;
    CHECK(fastrms_update_compact(NULL, 0, 1u << 14, 0, NULL, NULL, NULL, NULL, NULL, 0) ==
              FASTRMS_BAD_FORMATS, "unknown compact format accepted");
    for (int bf16 = 0; bf16 < 2; ++bf16)
        for (size_t f = 0; f < sizeof flag_sets / sizeof flag_sets[0]; ++f)
            for (size_t k = 0; k < sizeof kind_sets / sizeof kind_sets[0]; ++k)
                for (size_t l = 0; l < sizeof compact_lengths / sizeof compact_lengths[0]; ++l) {
                    if (compact_lengths[l] > 4097 && (f || k)) continue;
                    run_compact(flag_sets[f], bf16, kind_sets[k], compact_lengths[l]);
                    ++runs;
                }
    return runs;
}

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
            runs += run_p16_all();
            runs += run_compact_all();
        }
    }
    printf("%zu kernel runs, %d failures\n", runs, failures);
    return failures != 0;
}
