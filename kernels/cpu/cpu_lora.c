/* CPU kernels for float32 serving (see native.py): LoRA shrink + expand fused per projection group
 * (below), decode attention and the decoder layers' element-wise steps (at the end of the file).
 *
 * LoRA:
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
 * blocks (4 in the shrink, 8 in the expand) so a weight row loaded once serves several tokens.
 *
 * Weights are float32, or bfloat16 (an opt-in storage format, --adapter-dtype bfloat16: half the
 * bytes to read; each weight is widened to float32 exactly, so only the stored values are rounded).
 * The body is cpu_lora_impl.h, included once per weight type.
 *
 * Work items are (segment, up to ITEM_TOKENS of its tokens), spread over OpenMP threads; every item
 * writes only its own tokens' rows of y, so items never race.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ITEM_TOKENS 16
#define TOKEN_BLOCK 4
#define EXP_TOKENS 8 /* tokens x 32 outputs a multi-token expand sums in registers at once */
#define MAX_SLICES 16
#define DOT_LANES 64   /* partial sums of a decode dot product (independent FMA chains) */
#define COL_BLOCK 64   /* outputs a decode expand sums in registers at once */
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

typedef float vpanel __attribute__((vector_size(64)));
#define PANEL 16

static inline vpanel vload(const float *p)
{
    vpanel v;
    memcpy(&v, p, sizeof v);
    return v;
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

/* ------------------------------------------------------------------------------------------------
 * Decode attention over the paged KV cache (server/model/attention.py's DecodeBatch), float32: one query
 * per sequence, every head, straight from the cache blocks (no gathered copy of the context):
 *
 *     out[b, h] = softmax_t(scale * q[b, h] . k[slot(b, t), h / G]) @ v[slot(b, t), h / G]
 *
 * for t in [max(0, len_b - window), len_b) (window 0: none), written to row q_rows[b] of out,, slot(b, t) = blocks[b * bps + t / bs] * bs
 * + t % bs, G = H / KVH query heads per key/value head. Threads split the (sequence, kv head) pairs.
 * ------------------------------------------------------------------------------------------------ */
int loraplex_decode_attention_f32(const float *q, const int64_t *q_rows, int64_t q_row_stride, int64_t q_head_stride,
                                  const float *k_cache, const float *v_cache, const int64_t *blocks,
                                  int64_t blocks_per_seq, int64_t block_size, const int64_t *lengths, int64_t B,
                                  int64_t H, int64_t KVH, int64_t D, int64_t window, float scale, float *out,
                                  int64_t out_row_stride, int64_t out_head_stride, int num_threads)
{
    if (B <= 0)
        return 0;
    const int64_t G = H / KVH, max_len = blocks_per_seq * block_size;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && B * KVH > 1)
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)(G * (max_len ? max_len : 1) + D));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < B * KVH; item++) {
            if (!scores)
                continue;
            const int64_t b = item / KVH, kvh = item % KVH;
            const int64_t len = lengths[b] < max_len ? lengths[b] : max_len;
            const int64_t start = window > 0 && len > window ? len - window : 0;
            const int64_t n = len - start;
            if (n <= 0)
                continue;
            const int64_t *table = blocks + b * blocks_per_seq;
            float *acc = scores + G * max_len;
            for (int64_t g = 0; g < G; g++) {
                const int64_t h = kvh * G + g;
                const float *qh = q + q_rows[b] * q_row_stride + h * q_head_stride;
                float *s = scores + g * max_len;
                float top = -INFINITY;
                for (int64_t t = start; t < len; t++) {
                    const int64_t slot = table[t / block_size] * block_size + t % block_size;
                    const float *kt = k_cache + (slot * KVH + kvh) * D;
                    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t d = 0; d < D; d++)
                        dot += qh[d] * kt[d];
                    dot *= scale;
                    s[t - start] = dot;
                    top = dot > top ? dot : top;
                }
                float total = 0.f;
                for (int64_t i = 0; i < n; i++) {
                    s[i] = expf(s[i] - top);
                    total += s[i];
                }
                const float inv = 1.f / total;
                for (int64_t d = 0; d < D; d++)
                    acc[d] = 0.f;
                for (int64_t t = start; t < len; t++) {
                    const int64_t slot = table[t / block_size] * block_size + t % block_size;
                    const float *vt = v_cache + (slot * KVH + kvh) * D;
                    const float p = s[t - start] * inv;
#pragma omp simd
                    for (int64_t d = 0; d < D; d++)
                        acc[d] += p * vt[d];
                }
                float *oh = out + q_rows[b] * out_row_stride + h * out_head_stride;
                for (int64_t d = 0; d < D; d++)
                    oh[d] = acc[d];
            }
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------------
 * The element-wise steps of a Llama-shaped decoder layer (the CPU backend's, for server/model/decoder.py),
 * float32, one call each instead of the 4-10 torch operations they take there:
 *
 *   add_rms_norm   h[r] += d[r] (d may be NULL), then out[r] = w * (h[r] / sqrt(mean(h[r]^2) + eps))
 *   rope_store     q and k rotated in place, x*cos + rotate_half(x)*sin (rotate_half(x) = [-x2, x1]),
 *                  then k and v copied into their cache slots ([slots, KVH, D] caches)
 *
 * Rows are split over threads only when there are enough of them (prefill); a decode step's 16 rows
 * run on the calling thread.
 * ------------------------------------------------------------------------------------------------ */
#define ROWS_PER_THREAD 64

int loraplex_add_rms_norm_f32(float *h, int64_t ldh, const float *d, int64_t ldd, const float *w, float eps,
                              float *out, int64_t ldo, int64_t rows, int64_t cols, int num_threads)
{
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1 && rows >= 2 * ROWS_PER_THREAD)
    for (int64_t r = 0; r < rows; r++) {
        float *hr = h + r * ldh;
        if (d) {
            const float *dr = d + r * ldd;
#pragma omp simd
            for (int64_t c = 0; c < cols; c++)
                hr[c] += dr[c];
        }
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t c = 0; c < cols; c++)
            ss += hr[c] * hr[c];
        const float inv = 1.f / sqrtf(ss / (float)cols + eps);
        float *o = out + r * ldo;
#pragma omp simd
        for (int64_t c = 0; c < cols; c++)
            o[c] = w[c] * (hr[c] * inv);
    }
    return 0;
}

static inline void rope_row(float *x, const float *cs, const float *sn, int64_t D)
{
    const int64_t half = D / 2;
    float x1[half > 0 ? half : 1];
    memcpy(x1, x, sizeof(float) * (size_t)half);
#pragma omp simd
    for (int64_t i = 0; i < half; i++)
        x[i] = x1[i] * cs[i] - x[half + i] * sn[i];
#pragma omp simd
    for (int64_t i = 0; i < half; i++)
        x[half + i] = x[half + i] * cs[half + i] + x1[i] * sn[half + i];
}

/* q [T, H, D] and k, v [T, KVH, D] (row and head strides given, unit stride along D); cos, sin [T, D]
 * rows cs_stride apart; slots [T] int64, -1: not stored. */
int loraplex_rope_store_f32(float *q, int64_t q_row, int64_t q_head, int64_t H, float *k, int64_t k_row,
                            int64_t k_head, const float *v, int64_t v_row, int64_t v_head, int64_t KVH, int64_t D,
                            const float *cos, const float *sin, int64_t cs_stride, float *k_cache, float *v_cache,
                            const int64_t *slots, int64_t T, int num_threads)
{
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1 && T >= 2 * ROWS_PER_THREAD)
    for (int64_t t = 0; t < T; t++) {
        const float *cs = cos + t * cs_stride, *sn = sin + t * cs_stride;
        for (int64_t h = 0; h < H; h++)
            rope_row(q + t * q_row + h * q_head, cs, sn, D);
        for (int64_t h = 0; h < KVH; h++) {
            float *kh = k + t * k_row + h * k_head;
            rope_row(kh, cs, sn, D);
            if (slots[t] >= 0) {
                memcpy(k_cache + (slots[t] * KVH + h) * D, kh, sizeof(float) * (size_t)D);
                memcpy(v_cache + (slots[t] * KVH + h) * D, v + t * v_row + h * v_head, sizeof(float) * (size_t)D);
            }
        }
    }
    return 0;
}
