/* fastrms: the fused RMSProp update, float32 and float64, SIMD chosen at run time, OpenMP threads.
 * The arithmetic lives in rmsprop_kernel.h; this file holds what both element types share.
 * 16-bit parameters (codecs16.h, rmsprop16.h) reuse the float32 instantiation. */
#include <stddef.h>
#include <stdint.h>
#include <float.h>
#include <math.h>
#include <string.h>
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "fastrms.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))
#define NOINLINE __attribute__((noinline))
#define TARGET_AVX2 __attribute__((target("avx2")))
#define TARGET_AVX512 \
    __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,prefer-vector-width=512")))

#define FASTRMS_ALL_FLAGS 511u
enum { DECAY_NONE, DECAY_COUPLED, DECAY_DECOUPLED };
enum { MOMENTUM_NONE, MOMENTUM_TORCH, MOMENTUM_LR_INSIDE };
enum { SIMD_BASELINE, SIMD_AVX2, SIMD_AVX512, SIMD_LEVELS };

/* Below this many elements a thread team costs more than it saves (measured: see
 * docs/performance.md, "How automatic choice decides"). */
#define PARALLEL_THRESHOLD ((size_t)1 << 16)
/* Thread slices start on multiples of this many elements so that threads never share a line. */
#define SLICE_ALIGN ((size_t)16)

static int detected_simd_level = -1;
static int active_simd_level = -1;
/* 0 until fastrms_set_num_threads: then the team size follows OpenMP's own setting
 * (OMP_NUM_THREADS, omp_set_num_threads, and so threadpoolctl's limits) call by call. */
static int requested_threads = 0;
static int forked_child = 0;

static int detect_simd_level(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
        return SIMD_AVX512;
    if (__builtin_cpu_supports("avx2")) return SIMD_AVX2;
    return SIMD_BASELINE;
}

static int simd_level(void) {
    if (active_simd_level < 0) {
        detected_simd_level = detect_simd_level();
        active_simd_level = detected_simd_level;
    }
    return active_simd_level;
}

int fastrms_simd_level(void) { return simd_level(); }

int fastrms_max_simd_level(void) {
    simd_level();
    return detected_simd_level;
}

int fastrms_set_simd_level(int level) {
    const int best = fastrms_max_simd_level();
    active_simd_level = level < 0 ? 0 : (level > best ? best : level);
    return active_simd_level;
}

int fastrms_openmp_enabled(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

void fastrms_set_num_threads(int n) { requested_threads = n < 0 ? 0 : n; }

int fastrms_get_num_threads(void) {
    if (forked_child) return 1;
#ifdef _OPENMP
    return requested_threads ? requested_threads : omp_get_max_threads();
#else
    return 1;
#endif
}

void fastrms_after_fork_in_child(void) { forked_child = 1; }

size_t fastrms_parallel_threshold(void) { return PARALLEL_THRESHOLD; }

static int team_size(size_t n) {
    if (n < PARALLEL_THRESHOLD) return 1;
    const int threads = fastrms_get_num_threads();
    /* No more threads than slices: each thread gets at least a threshold's worth of work. */
    const size_t useful = n / (PARALLEL_THRESHOLD / 2);
    return (size_t)threads < useful ? threads : (int)useful;
}

#ifdef _OPENMP
/* The slice of [0, n) that belongs to the calling thread of the current team. */
static void thread_slice(size_t n, size_t *lo, size_t *hi) {
    const size_t threads = (size_t)omp_get_num_threads();
    const size_t t = (size_t)omp_get_thread_num();
    size_t per = (n + threads - 1) / threads;
    per = (per + SLICE_ALIGN - 1) / SLICE_ALIGN * SLICE_ALIGN;
    const size_t begin = per * t;
    *lo = begin < n ? begin : n;
    *hi = begin + per < n ? begin + per : n;
}
#else
static void thread_slice(size_t n, size_t *lo, size_t *hi) {
    *lo = 0;
    *hi = n;
}
#endif

/* FASTRMS_OVERLAP if any two of the non-NULL buffers, each nbytes long, share a byte. */
static int first_overlap(const void *const buffers[5], size_t nbytes) {
    for (int i = 0; i < 5; ++i) {
        if (!buffers[i]) continue;
        const uintptr_t a = (uintptr_t)buffers[i];
        for (int j = i + 1; j < 5; ++j) {
            if (!buffers[j]) continue;
            const uintptr_t b = (uintptr_t)buffers[j];
            if (a < b + nbytes && b < a + nbytes) return FASTRMS_OVERLAP;
        }
    }
    return FASTRMS_OK;
}

#define T float
#define SFX f32
#define SQRT sqrtf
#define ABS fabsf
#define T_MAX FLT_MAX
#include "rmsprop_kernel.h"
#undef T
#undef SFX
#undef SQRT
#undef ABS
#undef T_MAX

#define T double
#define SFX f64
#define SQRT sqrt
#define ABS fabs
#define T_MAX DBL_MAX
#include "rmsprop_kernel.h"
#undef T
#undef SFX
#undef SQRT
#undef ABS
#undef T_MAX

#include "codecs16.h"
#include "rmsprop16.h"
#include "compact_state.h"
