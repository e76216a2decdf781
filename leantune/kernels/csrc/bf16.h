/* bfloat16 <-> float for the CPU kernels in this folder (included by each .c; part of every build's cache key). */
#ifndef LEANTUNE_BF16_H
#define LEANTUNE_BF16_H

#include <stdint.h>
#include <string.h>

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* float -> bfloat16, round to nearest even; NaN -> 0x7FC0 (as c10::BFloat16 does). */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded); /* a select, not a branch: vectorizes */
}

#endif
