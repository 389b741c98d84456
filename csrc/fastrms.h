/* fastrms C API. This header is read verbatim by csrc/build_ffi.py for ffi.cdef, so it holds
 * declarations and integer #defines only (no include guards, no expressions). */

/* Option flags: a bitwise OR of these. */
#define FASTRMS_MAXIMIZE 1
#define FASTRMS_CENTERED 2
#define FASTRMS_EPS_IN_SQRT 4
#define FASTRMS_WD_COUPLED 8
#define FASTRMS_WD_DECOUPLED 16
#define FASTRMS_MOMENTUM 32
#define FASTRMS_LR_IN_MOMENTUM 64
#define FASTRMS_NESTEROV 128
#define FASTRMS_GRAD_SCALE 256

/* Return codes. Nothing is written unless the code is FASTRMS_OK. */
#define FASTRMS_OK 0
#define FASTRMS_BAD_FLAGS -1
#define FASTRMS_NULL_BUFFER -2
#define FASTRMS_OVERLAP -3
#define FASTRMS_MISALIGNED -4
#define FASTRMS_BAD_SCALE -5

/* Coefficients, already rounded to the array dtype by fastrms/_coefficients.py. grad_scale is
 * 1 unless FASTRMS_GRAD_SCALE is set; grad_scale_inverse is 1 / grad_scale when that is exact in
 * the dtype (a power of two), else 0. */
struct fastrms_coeffs_f32 {
    float alpha, one_minus_alpha, eps, neg_lr, lr, weight_decay, momentum, decay, grad_scale,
        grad_scale_inverse;
};
struct fastrms_coeffs_f64 {
    double alpha, one_minus_alpha, eps, neg_lr, lr, weight_decay, momentum, decay, grad_scale,
        grad_scale_inverse;
};

/* One fused pass over n elements. momentum_buffer and grad_avg may be NULL when their flag is off. */
int fastrms_update_f32(const struct fastrms_coeffs_f32 *coeffs, unsigned flags, float *param,
                       const float *grad, float *square_avg, float *momentum_buffer,
                       float *grad_avg, size_t n);
int fastrms_update_f64(const struct fastrms_coeffs_f64 *coeffs, unsigned flags, double *param,
                       const double *grad, double *square_avg, double *momentum_buffer,
                       double *grad_avg, size_t n);

/* Many tensors in one call and one thread team: entry k has lengths[k] elements. Arrays of
 * pointers for unused streams may be NULL. The streams of each entry are checked for overlap;
 * overlap between different entries is the caller's to rule out. */
int fastrms_update_multi_f32(const struct fastrms_coeffs_f32 *coeffs, unsigned flags,
                             float **params, float **grads, float **square_avgs,
                             float **momentum_buffers, float **grad_avgs,
                             const size_t *lengths, size_t count);
int fastrms_update_multi_f64(const struct fastrms_coeffs_f64 *coeffs, unsigned flags,
                             double **params, double **grads, double **square_avgs,
                             double **momentum_buffers, double **grad_avgs,
                             const size_t *lengths, size_t count);

/* The non-finite check of a (loss-scaled) step: 1 when every gradient element divided by
 * grad_scale (1 for none) is finite in the dtype, 0 when one is not, or a negative return code.
 * Reads only; one thread team for all the tensors. */
int fastrms_all_finite_f32(const float *grad, size_t n, float grad_scale);
int fastrms_all_finite_f64(const double *grad, size_t n, double grad_scale);
int fastrms_all_finite_multi_f32(float **grads, const size_t *lengths, size_t count,
                                 float grad_scale);
int fastrms_all_finite_multi_f64(double **grads, const size_t *lengths, size_t count,
                                 double grad_scale);

/* The roofline: the same streams as the update (chosen by the CENTERED and MOMENTUM flags),
 * the same threading, trivial arithmetic. Benchmarks divide by its time. */
int fastrms_roofline_f32(unsigned flags, float *param, const float *grad, float *square_avg,
                         float *momentum_buffer, float *grad_avg, size_t n);
int fastrms_roofline_f64(unsigned flags, double *param, const double *grad, double *square_avg,
                         double *momentum_buffer, double *grad_avg, size_t n);

/* SIMD level picked at load time: 0 baseline x86-64 (SSE2), 1 AVX2, 2 AVX-512. */
int fastrms_simd_level(void);
int fastrms_max_simd_level(void);
/* Use a lower level (tests prove all levels give the same bits). Returns the level now in use. */
int fastrms_set_simd_level(int level);

/* n = 0: follow OpenMP's setting (OMP_NUM_THREADS, omp_set_num_threads) call by call. */
void fastrms_set_num_threads(int n);
int fastrms_get_num_threads(void);
int fastrms_openmp_enabled(void);
size_t fastrms_parallel_threshold(void);
/* Called in a child after fork(): GNU OpenMP's thread pool does not survive fork. */
void fastrms_after_fork_in_child(void);

/* -- 16-bit parameters: float16 or bfloat16 param (and grad), float32 state ------------------
 * Each element is widened to float32 (exact), updated by the float32 kernel with float32
 * coefficients, and the new value narrowed to 16 bits. `formats` is a bitwise OR of these: */
#define FASTRMS_PARAM_BF16 1  /* param is bfloat16; else float16 */
#define FASTRMS_GRAD_F32 2    /* grad is float32; else the param's 16-bit format */
#define FASTRMS_STOCHASTIC 4  /* stochastic rounding with the key; else round to nearest even */
#define FASTRMS_MASTER 8      /* master_param (float32) is updated; param gets its nearest value */
#define FASTRMS_BAD_FORMATS -6

/* `key`: the stochastic rounding key (fastrms/_codecs.py stochastic_key); its random bits for
 * element i come from (key, i), whatever the threads and SIMD level. master_param may be NULL
 * unless FASTRMS_MASTER is set; FASTRMS_MASTER and FASTRMS_STOCHASTIC exclude each other. */
int fastrms_update_p16(const struct fastrms_coeffs_f32 *coeffs, unsigned flags, unsigned formats,
                       uint64_t key, uint16_t *param, const void *grad, float *square_avg,
                       float *momentum_buffer, float *grad_avg, float *master_param, size_t n);
/* Many tensors in one call and one thread team; keys may be NULL unless FASTRMS_STOCHASTIC. */
int fastrms_update_multi_p16(const struct fastrms_coeffs_f32 *coeffs, unsigned flags,
                             unsigned formats, const uint64_t *keys, uint16_t **params,
                             void **grads, float **square_avgs, float **momentum_buffers,
                             float **grad_avgs, float **master_params, const size_t *lengths,
                             size_t count);
/* fastrms_all_finite_multi_f32 for 16-bit gradients (FASTRMS_PARAM_BF16 in formats: bfloat16). */
int fastrms_all_finite_multi_p16(uint16_t **grads, const size_t *lengths, size_t count,
                                 unsigned formats, float grad_scale);
/* The codecs alone: widen n values; narrow n values (element i with the random bits of index
 * first_index + i). Only FASTRMS_PARAM_BF16 and FASTRMS_STOCHASTIC of formats are read. */
int fastrms_decode_p16(unsigned formats, const uint16_t *in, float *out, size_t n);
int fastrms_encode_p16(unsigned formats, uint64_t key, uint64_t first_index, const float *in,
                       uint16_t *out, size_t n);
/* The roofline of the 16-bit update: 16-bit param and grad, float32 state. */
int fastrms_roofline_p16(unsigned flags, uint16_t *param, const uint16_t *grad,
                         float *square_avg, float *momentum_buffer, float *grad_avg, size_t n);
/* 0: the portable conversions only; 1 (default): F16C and AVX512-BF16 instructions where the
 * CPU has them and the SIMD level allows. Same bits either way. Returns the setting now. */
int fastrms_set_conversion_instructions(int enabled);
/* Bit 0: F16C is used now; bit 1: AVX512-BF16 is used now. */
int fastrms_conversion_instructions(void);

/* -- compact state: bfloat16 arrays or blockwise8 buffers (uint8 codes, one float32 scale per
 * block of 256; the format: fastrms/_blockwise.py) for square_avg, momentum_buffer, grad_avg,
 * with float32 or 16-bit params. `formats`: the 16-bit bits above, or FASTRMS_PARAM_F32 for a
 * float32 param and grad, OR one format per state stream (none of its bits: float32). */
#define FASTRMS_PARAM_F32 16
#define FASTRMS_SQUARE_AVG_BF16 256
#define FASTRMS_SQUARE_AVG_B8 512
#define FASTRMS_MOMENTUM_BUFFER_BF16 1024
#define FASTRMS_MOMENTUM_BUFFER_B8 2048
#define FASTRMS_GRAD_AVG_BF16 4096
#define FASTRMS_GRAD_AVG_B8 8192
#define FASTRMS_B8_BLOCK 256

/* states[3]: square_avg, momentum_buffer, grad_avg (float *, uint16_t * or uint8_t * codes;
 * unused ones may be NULL); scales[3]: the float32 scales of the blockwise8 ones (ceil(n / 256)
 * each). One pass: each block is decoded, updated in float32, encoded with a new scale. */
int fastrms_update_compact(const struct fastrms_coeffs_f32 *coeffs, unsigned flags,
                           unsigned formats, uint64_t key, void *param, const void *grad,
                           void **states, float **scales, float *master_param, size_t n);
/* 1 if fastrms_update_compact runs these flags and formats in one of its fused loops at the
 * current SIMD level (csrc/compact_fused.h), 0 if in the generic block driver. Same bits. */
int fastrms_compact_fused(unsigned flags, unsigned formats);
/* The blockwise8 codec alone (is_signed: the momentum_buffer / grad_avg code). */
int fastrms_decode_b8(int is_signed, const uint8_t *codes, const float *scales, float *out,
                      size_t n);
int fastrms_encode_b8(int is_signed, const float *in, uint8_t *codes, float *scales, size_t n);
/* The roofline of the compact update: the same streams, trivial arithmetic. */
int fastrms_roofline_compact(unsigned flags, unsigned formats, void *param, const void *grad,
                             void **states, float **scales, size_t n);
