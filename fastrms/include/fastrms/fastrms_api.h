/* fastrms_api.h: the fused RMSProp update for other compiled extensions (C, C++, Cython).
 *
 * fastrms publishes a table of function pointers in a PyCapsule, fastrms._C_API, the way NumPy's
 * C API and SciPy's cython_blas do: an extension gets the table once (fastrms_import_api(),
 * with the GIL, usually in its module init) and then calls the C kernel directly, with no Python
 * in between and without the GIL. Build against it with
 *
 *     include_dirs=[fastrms.get_include()]      #include "fastrms/fastrms_api.h"
 *
 * and nothing to link: the table carries the addresses.
 *
 * Versions. FASTRMS_API_VERSION is the version of this header. Entries are only ever appended
 * to struct fastrms_api, each new entry with a new version; none is ever moved or changed. A
 * table's `version` says up to which version its entries are filled and `size` how many bytes it
 * has, so an extension built against a newer header can run with an older fastrms as long as it
 * uses only entries the table has: fastrms_import_api() refuses a table older than
 * FASTRMS_API_MIN_VERSION (by default this header's version; define it lower before including
 * to accept older tables) and FASTRMS_API_HAS(api, entry) tells whether one entry is there.
 *
 * Coefficients. The kernels take coefficients, never hyperparameters: fastrms_api_coefficients_*
 * below turn hyperparameters into them. That function MIRRORS the one Python place that does it,
 * fastrms/_coefficients.py (coefficient_arithmetic and its value rules, in float64, each
 * coefficient then rounded once to the dtype); tests/test_c_api.py proves it gives the same
 * bits, flags and refusals over many inputs. Change both or neither. Alternatively, build the
 * struct from Python once: fastrms.kernel_coefficients(dtype, lr=...) returns .values (the
 * struct's fields in order) and .flags.
 *
 * Every kernel entry returns FASTRMS_OK or a negative code (csrc/fastrms.h) and writes nothing
 * unless it returns FASTRMS_OK: bad flags, a NULL buffer, overlapping buffers and buffers not
 * aligned to their element size are refused.
 */
#ifndef FASTRMS_API_H
#define FASTRMS_API_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The flags, return codes, coefficient structs and entry points of the C kernel. */
#include "fastrms.h"

#define FASTRMS_API_VERSION 1
#define FASTRMS_API_CAPSULE "fastrms._C_API"

/* The table, filled by fastrms/_c_api.py. The entries after `size` point at the functions of
 * csrc/fastrms.h of the same name with the "fastrms_" prefix, and behave as documented there. */
struct fastrms_api {
    /* -- version 1 -- */
    unsigned int version; /* entries up to this version are filled */
    unsigned int size;    /* sizeof the table as filled, in bytes */
    int (*update_f32)(const struct fastrms_coeffs_f32 *coeffs, unsigned flags, float *param,
                      const float *grad, float *square_avg, float *momentum_buffer,
                      float *grad_avg, size_t n);
    int (*update_f64)(const struct fastrms_coeffs_f64 *coeffs, unsigned flags, double *param,
                      const double *grad, double *square_avg, double *momentum_buffer,
                      double *grad_avg, size_t n);
    int (*update_multi_f32)(const struct fastrms_coeffs_f32 *coeffs, unsigned flags,
                            float **params, float **grads, float **square_avgs,
                            float **momentum_buffers, float **grad_avgs, const size_t *lengths,
                            size_t count);
    int (*update_multi_f64)(const struct fastrms_coeffs_f64 *coeffs, unsigned flags,
                            double **params, double **grads, double **square_avgs,
                            double **momentum_buffers, double **grad_avgs, const size_t *lengths,
                            size_t count);
    int (*all_finite_f32)(const float *grad, size_t n, float grad_scale);
    int (*all_finite_f64)(const double *grad, size_t n, double grad_scale);
    int (*all_finite_multi_f32)(float **grads, const size_t *lengths, size_t count,
                                float grad_scale);
    int (*all_finite_multi_f64)(double **grads, const size_t *lengths, size_t count,
                                double grad_scale);
    int (*roofline_f32)(unsigned flags, float *param, const float *grad, float *square_avg,
                        float *momentum_buffer, float *grad_avg, size_t n);
    int (*roofline_f64)(unsigned flags, double *param, const double *grad, double *square_avg,
                        double *momentum_buffer, double *grad_avg, size_t n);
    int (*simd_level)(void);
    int (*max_simd_level)(void);
    int (*set_simd_level)(int level);
    void (*set_num_threads)(int n);
    int (*get_num_threads)(void);
    int (*openmp_enabled)(void);
    size_t (*parallel_threshold)(void);
    /* -- later versions append here (16-bit storage formats, ...) -- */
};

/* The size of a version 1 table (its last entry's end): every table is at least this long. */
#define FASTRMS_API_V1_SIZE                                                                  \
    (offsetof(struct fastrms_api, parallel_threshold) + sizeof(size_t (*)(void)))

/* Whether a table has an entry (for entries newer than FASTRMS_API_MIN_VERSION). */
#define FASTRMS_API_HAS(api, entry)                                                          \
    ((api)->size >= offsetof(struct fastrms_api, entry) + sizeof((api)->entry))

/* -- Coefficients ------------------------------------------------------------------------- */

/* The hyperparameters of fastrms.rmsprop_update (int fields: 0 false, else true). grad_scale is
 * the loss scale to divide gradients by, 1 for none. */
struct fastrms_hyperparameters {
    double lr, alpha, eps, weight_decay, momentum, grad_scale;
    int centered, maximize, eps_in_sqrt, lr_in_momentum, nesterov, decoupled_weight_decay;
};

/* What fastrms_api_coefficients_* refuse, in the order Python checks (where it raises a
 * ValueError naming the same argument): a value not finite or out of its range (grad_scale: > 0),
 * nesterov without momentum, a coefficient that would be infinite in the dtype (from any of
 * them, grad_scale included), a grad_scale that is zero in the dtype (FASTRMS_BAD_GRAD_SCALE). */
#define FASTRMS_BAD_LR -20
#define FASTRMS_BAD_ALPHA -21
#define FASTRMS_BAD_EPS -22
#define FASTRMS_BAD_WEIGHT_DECAY -23
#define FASTRMS_BAD_MOMENTUM -24
#define FASTRMS_BAD_NESTEROV -25
#define FASTRMS_BAD_GRAD_SCALE -26
#define FASTRMS_COEFFICIENT_OVERFLOW -27

#if defined(__FAST_MATH__) && !defined(FASTRMS_API_NO_COEFFICIENTS)
#error "fastrms_api.h: the coefficient functions need IEEE arithmetic (no -ffast-math); define FASTRMS_API_NO_COEFFICIENTS to leave them out"
#endif

#ifndef FASTRMS_API_NO_COEFFICIENTS

/* 0 in range, else nonzero: _coefficients.range_violation for [lower, upper) or [lower, upper]. */
static inline int fastrms_api_out_of_range_(double value, double lower, double upper,
                                            int upper_open) {
    if (!isfinite(value)) return 1;
    if (value < lower) return 2;
    if (upper_open ? value >= upper : value > upper) return 3;
    return 0;
}

/* Rounded once to float32 (an IEEE conversion: to nearest even, inf beyond the range). */
static inline double fastrms_api_round_(double value, int float32) {
    return float32 ? (double)(float)value : value;
}

/* _coefficients._compute's value checks and coefficient_arithmetic, line for line: values
 * receives the ten coefficients in struct order, as doubles exact in the dtype. */
static inline int fastrms_api_coefficients_(const struct fastrms_hyperparameters *h, int float32,
                                            double values[10], unsigned *flags_out) {
    /* + 0.0: -0.0 counts as 0.0, as in Python. */
    const double lr = h->lr + 0.0, alpha = h->alpha + 0.0, eps = h->eps + 0.0;
    const double weight_decay = h->weight_decay + 0.0, momentum = h->momentum + 0.0;
    const double grad_scale = h->grad_scale;
    if (fastrms_api_out_of_range_(lr, 0.0, INFINITY, 0)) return FASTRMS_BAD_LR;
    if (fastrms_api_out_of_range_(alpha, 0.0, 1.0, 1)) return FASTRMS_BAD_ALPHA;
    if (fastrms_api_out_of_range_(eps, 0.0, INFINITY, 0)) return FASTRMS_BAD_EPS;
    if (fastrms_api_out_of_range_(weight_decay, 0.0, INFINITY, 0)) return FASTRMS_BAD_WEIGHT_DECAY;
    if (fastrms_api_out_of_range_(momentum, 0.0, INFINITY, 0)) return FASTRMS_BAD_MOMENTUM;
    if (h->nesterov && momentum == 0.0) return FASTRMS_BAD_NESTEROV;
    if (fastrms_api_out_of_range_(grad_scale, 0.0, INFINITY, 0) || grad_scale == 0.0)
        return FASTRMS_BAD_GRAD_SCALE;

    unsigned flags = 0;
    if (h->maximize) flags |= FASTRMS_MAXIMIZE;
    if (h->centered) flags |= FASTRMS_CENTERED;
    if (h->eps_in_sqrt) flags |= FASTRMS_EPS_IN_SQRT;
    if (weight_decay != 0.0) flags |= h->decoupled_weight_decay ? FASTRMS_WD_DECOUPLED : FASTRMS_WD_COUPLED;
    if (momentum != 0.0) {
        flags |= FASTRMS_MOMENTUM;
        if (h->lr_in_momentum) flags |= FASTRMS_LR_IN_MOMENTUM;
        if (h->nesterov) flags |= FASTRMS_NESTEROV;
    }
    /* Rounded to double on its own, as in Python: a compiler may not fuse it into 1 - lr * wd. */
    volatile double lr_times_weight_decay = lr * weight_decay;
    const double in_float64[9] = {alpha, 1.0 - alpha, eps, -lr, lr, weight_decay, momentum,
                                  1.0 - lr_times_weight_decay, grad_scale};
    for (int i = 0; i < 9; ++i) {
        values[i] = fastrms_api_round_(in_float64[i], float32);
        if (!isfinite(values[i])) return FASTRMS_COEFFICIENT_OVERFLOW;
    }
    const double scale = values[8];
    if (scale == 0.0) return FASTRMS_BAD_GRAD_SCALE;
    if (scale != 1.0) flags |= FASTRMS_GRAD_SCALE;
    /* A power of two has an exact reciprocal if the dtype holds it; multiplying by it gives
     * the division's bits. */
    const double inverse = 1.0 / scale;
    int exponent;
    const int exact = frexp(scale, &exponent) == 0.5 && isfinite(inverse) &&
                      fastrms_api_round_(inverse, float32) == inverse;
    values[9] = exact ? inverse : 0.0;
    *flags_out = flags;
    return FASTRMS_OK;
}

/* The coefficients and flags for float32 arrays (FASTRMS_OK, or a FASTRMS_BAD_* code and
 * nothing written). */
static inline int fastrms_api_coefficients_f32(const struct fastrms_hyperparameters *h,
                                               struct fastrms_coeffs_f32 *out, unsigned *flags) {
    double v[10];
    unsigned f;
    const int status = fastrms_api_coefficients_(h, 1, v, &f);
    if (status != FASTRMS_OK) return status;
    const struct fastrms_coeffs_f32 c = {(float)v[0], (float)v[1], (float)v[2], (float)v[3],
                                         (float)v[4], (float)v[5], (float)v[6], (float)v[7],
                                         (float)v[8], (float)v[9]};
    *out = c;
    *flags = f;
    return FASTRMS_OK;
}

/* The same for float64 arrays. */
static inline int fastrms_api_coefficients_f64(const struct fastrms_hyperparameters *h,
                                               struct fastrms_coeffs_f64 *out, unsigned *flags) {
    double v[10];
    unsigned f;
    const int status = fastrms_api_coefficients_(h, 0, v, &f);
    if (status != FASTRMS_OK) return status;
    const struct fastrms_coeffs_f64 c = {v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8],
                                         v[9]};
    *out = c;
    *flags = f;
    return FASTRMS_OK;
}

#endif /* FASTRMS_API_NO_COEFFICIENTS */

/* -- Getting the table (needs Python.h included first) ------------------------------------ */

#ifdef Py_PYTHON_H
#ifndef FASTRMS_API_MIN_VERSION
#define FASTRMS_API_MIN_VERSION FASTRMS_API_VERSION
#endif

/* The table, or NULL with a Python exception set (ImportError when fastrms, its C backend or a
 * recent enough table is missing). Call with the GIL held; the table lives as long as the
 * process. */
static inline const struct fastrms_api *fastrms_import_api(void) {
    const struct fastrms_api *api =
        (const struct fastrms_api *)PyCapsule_Import(FASTRMS_API_CAPSULE, 0);
    if (api == NULL) return NULL;
    if (api->version < FASTRMS_API_MIN_VERSION || api->size < FASTRMS_API_V1_SIZE) {
        PyErr_Format(PyExc_ImportError,
                     "fastrms C API version %u is older than version %d, which this extension "
                     "needs: upgrade fastrms", api->version, (int)FASTRMS_API_MIN_VERSION);
        return NULL;
    }
    return api;
}
#endif /* Py_PYTHON_H */

#ifdef __cplusplus
}
#endif

#endif /* FASTRMS_API_H */
