/* CPU backward of MS-LayerNorm / MS-RMSNorm from the saved output y and per-row rstd, called through ctypes by
 * leantune/kernels/cpu_native.py (same formulas as reference_ms_norm_backward in norms.py):
 *
 *   g  = dy                    (+ dout * w when the caller also used gamma * y + beta: BERT's post-norm residual)
 *   LN:   dx = rstd * (g - mean(g) - mean(g * y) * y)
 *   RMS:  dx = rstd * (g - mean(g * y) * y)
 *
 * One row at a time (it stays in L1 between the two passes); sums in float (double for fp64) over 16 partial
 * accumulators, which keeps rounding error low and lets compilers vectorize without -ffast-math; one rounding
 * of dx to the output type. Callers split rows between threads.
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define LANES 16

#define IDENTITY(v) (v)

#define MS_NORM_BACKWARD(NAME, T, ACC, LOAD, STORE)                                                          \
    void NAME(const T *dy, const T *dout, const T *w, const T *y, const ACC *rstd, T *dx, int64_t rows,        \
              int64_t h, int layernorm) {                                                                      \
        for (int64_t r = 0; r < rows; r++) {                                                                   \
            const T *dyr = dy + r * h, *yr = y + r * h, *dor = dout ? dout + r * h : 0;                        \
            T *out = dx + r * h;                                                                               \
            ACC sg[LANES] = {0}, sgy[LANES] = {0};                                                             \
            int64_t j = 0;                                                                                     \
            for (; j + LANES <= h; j += LANES)                                                                 \
                for (int k = 0; k < LANES; k++) {                                                              \
                    ACC g = LOAD(dyr[j + k]);                                                                  \
                    if (dor) g += LOAD(dor[j + k]) * LOAD(w[j + k]);                                           \
                    sg[k] += g;                                                                                \
                    sgy[k] += g * LOAD(yr[j + k]);                                                             \
                }                                                                                              \
            for (int k = 0; j < h; j++, k++) {                                                                 \
                ACC g = LOAD(dyr[j]);                                                                          \
                if (dor) g += LOAD(dor[j]) * LOAD(w[j]);                                                       \
                sg[k] += g;                                                                                    \
                sgy[k] += g * LOAD(yr[j]);                                                                     \
            }                                                                                                  \
            ACC sum_g = 0, sum_gy = 0;                                                                         \
            for (int k = 0; k < LANES; k++) {                                                                  \
                sum_g += sg[k];                                                                                \
                sum_gy += sgy[k];                                                                              \
            }                                                                                                  \
            ACC mean_g = layernorm ? sum_g / (ACC)h : (ACC)0, mean_gy = sum_gy / (ACC)h, s = rstd[r];          \
            for (j = 0; j < h; j++) {                                                                          \
                ACC g = LOAD(dyr[j]);                                                                          \
                if (dor) g += LOAD(dor[j]) * LOAD(w[j]);                                                       \
                out[j] = STORE(s * (g - mean_g - mean_gy * LOAD(yr[j])));                                      \
            }                                                                                                  \
        }                                                                                                      \
    }

MS_NORM_BACKWARD(ms_norm_backward_f32, float, float, IDENTITY, IDENTITY)
MS_NORM_BACKWARD(ms_norm_backward_f64, double, double, IDENTITY, IDENTITY)
MS_NORM_BACKWARD(ms_norm_backward_bf16, uint16_t, float, from_bf16, to_bf16)
