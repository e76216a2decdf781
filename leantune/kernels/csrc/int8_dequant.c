/* deq(W) of an INT8 weight with one fp32 scale per block of a row (leantune/kernels/int8_linear.py):
 *   out[r, c] = q[r, c] * s[r * blocks_per_row + c / block]
 * in fp32 arithmetic, then rounded to the output type (bf16: nearest even), the same bits as the torch reference
 * (q.float() * s, then .to(dtype)) in one pass instead of four. Rows [row0, row0 + rows) of an (m, cols) matrix. */
#include <stdint.h>
#include "bf16.h"

void int8_dequant_f32(const int8_t *q, const float *s, float *out, int64_t rows, int64_t cols, int64_t block) {
    int64_t per_row = (cols + block - 1) / block;
    for (int64_t r = 0; r < rows; ++r) {
        const int8_t *qr = q + r * cols;
        float *o = out + r * cols;
        for (int64_t b = 0; b < per_row; ++b) {
            float scale = s[r * per_row + b];
            int64_t end = (b + 1) * block < cols ? (b + 1) * block : cols;
            for (int64_t c = b * block; c < end; ++c) o[c] = (float)qr[c] * scale;
        }
    }
}

void int8_dequant_bf16(const int8_t *q, const float *s, uint16_t *out, int64_t rows, int64_t cols, int64_t block) {
    int64_t per_row = (cols + block - 1) / block;
    for (int64_t r = 0; r < rows; ++r) {
        const int8_t *qr = q + r * cols;
        uint16_t *o = out + r * cols;
        for (int64_t b = 0; b < per_row; ++b) {
            float scale = s[r * per_row + b];
            int64_t end = (b + 1) * block < cols ? (b + 1) * block : cols;
            for (int64_t c = b * block; c < end; ++c) o[c] = to_bf16((float)qr[c] * scale);
        }
    }
}
