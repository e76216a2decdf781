/* deq(W) of an INT8 weight with one fp32 scale per block of a row (leantune/kernels/int8_linear.py):
 *   out[r, c] = q[r, c] * s[r * blocks_per_row + c / block]
 * in fp32 arithmetic, then rounded to the output type (bf16: nearest even), the same bits as the torch reference
 * (q.float() * s, then .to(dtype)) in one pass instead of four. Rows [row0, row0 + rows) of an (m, cols) matrix. */
#include <stdint.h>
#include "bf16.h"

#define AS_FLOAT(x) (x)

/* one function per output type: OUT_T the element type, CONVERT the fp32 -> OUT_T rounding */
#define INT8_DEQUANT(NAME, OUT_T, CONVERT)                                                                  \
    void NAME(const int8_t *q, const float *s, OUT_T *out, int64_t rows, int64_t cols, int64_t block) {    \
        int64_t per_row = (cols + block - 1) / block;                                                       \
        for (int64_t r = 0; r < rows; ++r) {                                                                \
            const int8_t *qr = q + r * cols;                                                                \
            OUT_T *o = out + r * cols;                                                                      \
            for (int64_t b = 0; b < per_row; ++b) {                                                         \
                float scale = s[r * per_row + b];                                                           \
                int64_t end = (b + 1) * block < cols ? (b + 1) * block : cols;                              \
                for (int64_t c = b * block; c < end; ++c) o[c] = CONVERT((float)qr[c] * scale);            \
            }                                                                                               \
        }                                                                                                   \
    }

INT8_DEQUANT(int8_dequant_f32, float, AS_FLOAT)
INT8_DEQUANT(int8_dequant_bf16, uint16_t, to_bf16)
