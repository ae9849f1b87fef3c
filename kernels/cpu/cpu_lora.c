/* CPU kernels for float32 serving (see native.py): LoRA shrink + expand fused per projection group
 * (below), the base projections' GEMM and decode attention (at the end of the file).
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
#ifndef GEMM_PREFETCH
#define GEMM_PREFETCH 8192 /* bytes ahead in a panel's stream */
#endif

static inline vpanel vload(const float *p)
{
    vpanel v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* the first n (<= PANEL) values of p, zeros after */
static inline vpanel vload_n(const float *p, int n)
{
    vpanel v = {0};
    memcpy(&v, p, sizeof(float) * (size_t)n);
    return v;
}

static inline void vstore_n(float *p, vpanel v, int n)
{
    memcpy(p, &v, sizeof(float) * (size_t)n);
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
 * The base projections' GEMM, y[M, N] = x[M, K] @ W^T + bias, float32, for the fused groups of a
 * float32 CPU model (server/adapters/lora.py). W is kept in panels of PANEL output columns,
 *
 *     Wp[p][k][c] = W[p * PANEL + c][k]     P = ceil(N / PANEL) rounded up to even, zero beyond N
 *
 * so that one vector load gives PANEL columns' weights for one k. The x rows are copied once per call
 * into blocks of RB rows transposed ([K][RB], zero rows past M), and a register block of RB rows x
 * 2 panels (2 * RB vector accumulators) runs over k: per k, two weight loads and RB broadcasts feed
 * 2 * RB FMAs. Threads split the panel pairs; every row block of a pair reuses its weights from cache,
 * so W is read from memory once per call.
 *
 * Why: a decode step multiplies ~16 rows by every weight once; oneDNN's packed GEMM reached 6 GB/s
 * of weights there on the 2-core VM, this loop 9-17 GB/s (docs/benchmarks.md); for prefill-sized
 * M (hundreds of rows) it runs at 0.9-0.95 of oneDNN.
 * ------------------------------------------------------------------------------------------------ */
/* RB rows (xt: [K][RB]) x panels w0, w1; stores rows [0, mm) of columns [0, n0) and [PANEL, PANEL + n1) */
#define GEMM_BLOCK(RBN)                                                                                   \
    static void gemm_block_##RBN(const float *xt, int64_t K, const float *w0, const float *w1,           \
                                 const float *bias, float *y, int64_t ldy, int mm, int n0, int n1)        \
    {                                                                                                     \
        vpanel a0[RBN], a1[RBN];                                                                          \
        for (int m = 0; m < RBN; m++) {                                                                   \
            a0[m] = (vpanel){0};                                                                          \
            a1[m] = (vpanel){0};                                                                          \
        }                                                                                                 \
        for (int64_t k = 0; k < K; k++) {                                                                 \
            const vpanel wa = vload(w0 + k * PANEL), wb = vload(w1 + k * PANEL);                          \
            __builtin_prefetch((const char *)(w0 + k * PANEL) + GEMM_PREFETCH, 0, 2);                     \
            __builtin_prefetch((const char *)(w1 + k * PANEL) + GEMM_PREFETCH, 0, 2);                     \
            const float *xk = xt + k * RBN;                                                               \
            _Pragma("GCC unroll 16") for (int m = 0; m < RBN; m++)                                        \
            {                                                                                             \
                const float xv = xk[m];                                                                   \
                a0[m] += xv * wa;                                                                         \
                a1[m] += xv * wb;                                                                         \
            }                                                                                             \
        }                                                                                                 \
        const vpanel b0 = bias ? vload_n(bias, n0) : (vpanel){0};                                         \
        const vpanel b1 = bias && n1 ? vload_n(bias + PANEL, n1) : (vpanel){0};                           \
        for (int m = 0; m < mm; m++) {                                                                    \
            vstore_n(y + m * ldy, a0[m] + b0, n0);                                                        \
            if (n1)                                                                                       \
                vstore_n(y + m * ldy + PANEL, a1[m] + b1, n1);                                            \
        }                                                                                                 \
    }
GEMM_BLOCK(8)
GEMM_BLOCK(12)

/* Returns 0, or -1 when the scratch could not be allocated (y untouched). */
int loraplex_linear_f32(const float *x, int64_t ldx, const float *Wp, const float *bias, float *y, int64_t ldy,
                        int64_t M, int64_t N, int64_t K, int num_threads)
{
    if (M <= 0 || N <= 0)
        return 0;
    /* 8-row blocks for decode-sized M (less padding), 12 for more rows (fewer weight re-reads) */
    const int rb = M <= 16 ? 8 : 12;
    const int64_t blocks = (M + rb - 1) / rb;
    const int64_t pairs = ((N + PANEL - 1) / PANEL + 1) / 2;
    float *xt = (float *)malloc(sizeof(float) * (size_t)(blocks * K * rb));
    if (!xt)
        return -1;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && (pairs > 1 || blocks > 1))
    {
        /* x into row blocks, transposed (every thread a share: serial, it cost 0.14 of a prefill GEMM
         * at 2 threads) */
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            float *dst = xt + b * K * rb;
            const int mm = M - b * rb < rb ? (int)(M - b * rb) : rb;
            for (int m = 0; m < rb; m++) {
                const float *src = x + (b * rb + m) * ldx;
                if (m < mm)
                    for (int64_t k = 0; k < K; k++)
                        dst[k * rb + m] = src[k];
                else
                    for (int64_t k = 0; k < K; k++)
                        dst[k * rb + m] = 0.f;
            }
        }
#pragma omp for schedule(static)
        for (int64_t pp = 0; pp < pairs; pp++) {
            const float *w0 = Wp + 2 * pp * K * PANEL, *w1 = w0 + K * PANEL;
            const int64_t col = 2 * pp * PANEL;
            const int n0 = N - col >= PANEL ? PANEL : (int)(N - col);
            const int n1 = N - col - PANEL >= PANEL ? PANEL : (N - col - PANEL > 0 ? (int)(N - col - PANEL) : 0);
            for (int64_t b = 0; b < blocks; b++) {
                const int mm = M - b * rb < rb ? (int)(M - b * rb) : rb;
                const float *bc = bias ? bias + col : NULL;
                if (rb == 8)
                    gemm_block_8(xt + b * K * rb, K, w0, w1, bc, y + b * rb * ldy + col, ldy, mm, n0, n1);
                else
                    gemm_block_12(xt + b * K * rb, K, w0, w1, bc, y + b * rb * ldy + col, ldy, mm, n0, n1);
            }
        }
    }
    free(xt);
    return 0;
}

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
 * The element-wise steps of a Llama-shaped decoder layer (server/model/decoder.py), float32, one call each
 * instead of the 4-10 torch operations they take there:
 *
 *   add_rms_norm   h[r] += d[r] (d may be NULL), then out[r] = w * (h[r] / sqrt(mean(h[r]^2) + eps))
 *   rope_store     q and k rotated in place, x*cos + rotate_half(x)*sin (rotate_half(x) = [-x2, x1]),
 *                  then k and v copied into their cache slots ([slots, KVH, D] caches)
 *   silu_mul       out[r] = silu(g[r]) * u[r]
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

/* e^x for x <= 0 (below -87 clamped to e^-87, a normal float), within ~2 ulp: Cephes' expf
 * polynomial, written so that the loops around it vectorize (the C library's expf is a scalar call) */
static inline float exp_nonpositive(float x)
{
    x = x > -87.f ? x : -87.f;
    const int32_t ni = (int32_t)(x * 1.44269504088896341f + 127.5f) - 127; /* nearest (the sum is > 0) */
    const float n = (float)ni;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.f;
    const int32_t bits = (ni + 127) << 23; /* 2^n */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* silu(g) * u with e = e^-|g| in (0, 1]: g / (1 + e) for g >= 0, g·e / (1 + e) below (the same value).
 * Nothing overflows and no intermediate is subnormal (a subnormal result of g / (1 + e^88), computed
 * for every vector lane, would slow the loop down through microcode assists). */
int loraplex_silu_mul_f32(const float *g, int64_t ldg, const float *u, int64_t ldu, float *out, int64_t ldo,
                          int64_t rows, int64_t cols, int num_threads)
{
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1 && rows >= 2 * ROWS_PER_THREAD)
    for (int64_t r = 0; r < rows; r++) {
        const float *gr = g + r * ldg, *ur = u + r * ldu;
        float *o = out + r * ldo;
#pragma omp simd
        for (int64_t c = 0; c < cols; c++) {
            const float x = gr[c], a = x < 0.f ? x : -x;
            const float e = a > -87.f ? exp_nonpositive(a) : 0.f; /* below: silu(x) is 0 in float */
            o[c] = x * (x < 0.f ? e : 1.f) / (1.f + e) * ur[c];
        }
    }
    return 0;
}
