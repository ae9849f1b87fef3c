/* LoRA shrink + expand for CPU serving in float32, fused per projection group (see native.py).
 *
 * For every segment (one adapter slot, its tokens) and every slice i the slot targets (rank r > 0):
 *
 *     v[t, :r]               = x[t] @ A[i, slot, :r]^T                    (shrink, fp32)
 *     y[t, off_i : off_i+w_i] += scale[i, slot] * (v[t, :r] @ B_t[slot, :r, off_i : off_i+w_i])
 *
 * the same math as kernels/ops.py's lora_apply, with v in a small per-thread buffer instead of a
 * [slices, T, R] tensor. Only the first r rows of a slot are read; tokens outside every segment
 * (slot -1) and rank-0 slices leave y untouched.
 *
 * Why: a decode step reads every adapter's weights once to multiply them by one token (a matrix-
 * vector product per adapter). torch's batched matmul packs its operands first and pays a fixed
 * cost per call; this loop streams each weight row once from memory straight into the dot products
 * (decode) and reuses it from cache across a segment's tokens (prefill). Tokens are handled in
 * blocks of 4 so a weight row loaded once serves 4 tokens.
 *
 * Weights are float32, or bfloat16 (an opt-in storage format, --adapter-dtype bfloat16: half the
 * bytes to read; each weight is widened to float32 exactly, so only the stored values are rounded).
 * The body is cpu_lora_impl.h, included once per weight type.
 *
 * Work items are (segment, up to ITEM_TOKENS of its tokens), spread over OpenMP threads; every item
 * writes only its own tokens' rows of y, so items never race.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ITEM_TOKENS 16
#define TOKEN_BLOCK 4
#define MAX_SLICES 16
#define DOT_LANES 64   /* partial sums of a decode dot product (independent FMA chains) */
#define COL_BLOCK 64   /* outputs a decode expand sums in registers at once */
#define EXP_COLS 32    /* outputs x 4 tokens a multi-token expand sums in registers at once */
/* how far ahead of the row being read the next rows are requested (bytes) */
#define PREFETCH_BYTES 4096
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)

static inline float bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ask for every cache line of [p, p + bytes) (into L2: it is read once, soon) */
static inline void prefetch_span(const void *p, int64_t bytes)
{
    const char *c = (const char *)p;
    for (int64_t o = 0; o < bytes; o += 64)
        __builtin_prefetch(c + o, 0, 2);
}

#define WT float
#define LOADW(w) (w)
#define FN(name) CAT(name, f32)
#include "cpu_lora_impl.h"
#undef WT
#undef LOADW
#undef FN

#define WT uint16_t
#define LOADW(w) bf16_to_f32(w)
#define FN(name) CAT(name, bf16)
#include "cpu_lora_impl.h"
#undef WT
#undef LOADW
#undef FN
