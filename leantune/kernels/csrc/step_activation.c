/* CPU kernels of the 2-bit step activations (ReGELU2 / ReSiLU2), called through ctypes by
 * leantune/kernels/cpu_native.py. Same contract, and the same bits, as the torch reference in activations.py:
 *
 *   code(x) = [x > c1] + [x > c2] + [x > c3]   compared in float (double for fp64; bf16 is widened exactly;
 *             fp16 reads a 65,536-entry table of the codes of all its bit patterns, built by the caller)
 *   packing:  element i in bits 2*(i % 4) .. 2*(i % 4) + 1 of byte i / 4; unused fields of the last byte are 0
 *   backward: dx_i = dy_i * s[code_i], s = (0, s1, s2, s3), product in float (double for fp64), one rounding
 *
 * The main loops take 16 elements (one 32-bit word of codes) per step, a shape compilers vectorize. Every
 * function handles elements [0, n) of contiguous buffers; callers split work between threads on multiples of
 * 16 elements, so no two calls write the same byte.
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define CODE(v, c1, c2, c3) ((uint32_t)(((v) > (c1)) + ((v) > (c2)) + ((v) > (c3))))
#define SLOPE(c, s1, s2, s3) ((c) == 3 ? (s3) : ((c) == 2 ? (s2) : ((c) == 1 ? (s1) : 0)))

static inline void store_word(uint8_t *out, uint32_t word) { /* little-endian: code j lands in byte j / 4 */
    for (int k = 0; k < 4; k++) out[k] = (uint8_t)(word >> (8 * k));
}

/* ---------------------------------------------------------------------------------------------- forward: codes */

#define FLAGS_BODY(VALUE)                                                                                  \
    int64_t blocks = n / 16;                                                                               \
    for (int64_t i = 0; i < blocks; i++) {                                                                 \
        uint32_t word = 0;                                                                                 \
        for (int j = 0; j < 16; j++) {                                                                     \
            int64_t e = 16 * i + j;                                                                        \
            word |= (VALUE) << (2 * j);                                                                    \
        }                                                                                                  \
        store_word(out + 4 * i, word);                                                                     \
    }                                                                                                      \
    if (n % 16) {                                                                                          \
        uint32_t word = 0;                                                                                 \
        for (int64_t e = 16 * blocks; e < n; e++) word |= (VALUE) << (2 * (e % 16));                      \
        for (int64_t k = 0; k < (n % 16 + 3) / 4; k++) out[4 * blocks + k] = (uint8_t)(word >> (8 * k));       \
    }

void step_flags_f32(const float *x, uint8_t *out, int64_t n, float c1, float c2, float c3) {
    FLAGS_BODY(CODE(x[e], c1, c2, c3))
}

void step_flags_f64(const double *x, uint8_t *out, int64_t n, double c1, double c2, double c3) {
    FLAGS_BODY(CODE(x[e], c1, c2, c3))
}

void step_flags_bf16(const uint16_t *x, uint8_t *out, int64_t n, float c1, float c2, float c3) {
    FLAGS_BODY(CODE(from_bf16(x[e]), c1, c2, c3))
}

void step_flags_table16(const uint16_t *x, const uint8_t *table, uint8_t *out, int64_t n) {
    FLAGS_BODY((uint32_t)table[x[e]])
}

/* ---------------------------------------------------------------------------------------------- backward */

#define BACKWARD_BODY(STORE)                                                                               \
    int64_t blocks = n / 16;                                                                               \
    for (int64_t i = 0; i < blocks; i++) {                                                                 \
        uint32_t word = (uint32_t)codes[4 * i] | (uint32_t)codes[4 * i + 1] << 8                           \
                        | (uint32_t)codes[4 * i + 2] << 16 | (uint32_t)codes[4 * i + 3] << 24;             \
        for (int j = 0; j < 16; j++) {                                                                     \
            int64_t e = 16 * i + j;                                                                        \
            uint32_t c = (word >> (2 * j)) & 3u;                                                           \
            STORE;                                                                                         \
        }                                                                                                  \
    }                                                                                                      \
    for (int64_t e = 16 * blocks; e < n; e++) {                                                            \
        uint32_t c = ((uint32_t)codes[e / 4] >> (2 * (e % 4))) & 3u;                                       \
        STORE;                                                                                             \
    }

void step_backward_f32(const float *dy, const uint8_t *codes, float *dx, int64_t n, float s1, float s2, float s3) {
    BACKWARD_BODY(dx[e] = dy[e] * SLOPE(c, s1, s2, s3))
}

void step_backward_f64(const double *dy, const uint8_t *codes, double *dx, int64_t n, double s1, double s2,
                       double s3) {
    BACKWARD_BODY(dx[e] = dy[e] * SLOPE(c, s1, s2, s3))
}

void step_backward_bf16(const uint16_t *dy, const uint8_t *codes, uint16_t *dx, int64_t n, float s1, float s2,
                        float s3) {
    BACKWARD_BODY(dx[e] = to_bf16(from_bf16(dy[e]) * SLOPE(c, s1, s2, s3)))
}
