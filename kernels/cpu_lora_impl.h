/* The kernel body, included by cpu_lora.c once per weight type:
 *   WT       the pools' element type (float, or uint16_t holding bfloat16 bits)
 *   LOADW(w) one weight as float
 *   FN(name) the name with the type's suffix
 * x, y, v and every sum are float32 in both.
 */
/* v[t * ldv + j] = dot(A row j, x_t) for j < r and the nt tokens xr[0..nt). */
static void FN(shrink_rows)(const WT *a, int64_t in, int r, const float *const *xr, int nt, float *v, int ldv)
{
    int t = 0;
    for (; t + TOKEN_BLOCK <= nt; t += TOKEN_BLOCK) {
        const float *x0 = xr[t], *x1 = xr[t + 1], *x2 = xr[t + 2], *x3 = xr[t + 3];
        for (int j = 0; j < r; j++) {
            const WT *row = a + (int64_t)j * in;
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int64_t k = 0; k < in; k++) {
                float w = LOADW(row[k]);
                s0 += w * x0[k];
                s1 += w * x1[k];
                s2 += w * x2[k];
                s3 += w * x3[k];
            }
            v[(t + 0) * ldv + j] = s0;
            v[(t + 1) * ldv + j] = s1;
            v[(t + 2) * ldv + j] = s2;
            v[(t + 3) * ldv + j] = s3;
        }
    }
    for (; t < nt; t++) {
        const float *x0 = xr[t];
        int j = 0;
        for (; j + 4 <= r; j += 4) {  /* four rows at once: independent accumulators */
            const WT *r0 = a + (int64_t)j * in, *r1 = r0 + in, *r2 = r1 + in, *r3 = r2 + in;
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int64_t k = 0; k < in; k++) {
                float xv = x0[k];
                s0 += LOADW(r0[k]) * xv;
                s1 += LOADW(r1[k]) * xv;
                s2 += LOADW(r2[k]) * xv;
                s3 += LOADW(r3[k]) * xv;
            }
            v[t * ldv + j] = s0;
            v[t * ldv + j + 1] = s1;
            v[t * ldv + j + 2] = s2;
            v[t * ldv + j + 3] = s3;
        }
        for (; j < r; j++) {
            const WT *row = a + (int64_t)j * in;
            float s0 = 0.f;
#pragma omp simd reduction(+ : s0)
            for (int64_t k = 0; k < in; k++)
                s0 += LOADW(row[k]) * x0[k];
            v[t * ldv + j] = s0;
        }
    }
}

/* y_t[:w] += scale * (v[t, :r] @ B rows), B row j at b + j * ldb; acc: TOKEN_BLOCK * w scratch. */
static void FN(expand_rows)(const WT *b, int64_t ldb, int r, int64_t w, const float *v, int ldv, float scale,
                        float *const *yr, int nt, float *acc)
{
    int t = 0;
    for (; t < nt; t += TOKEN_BLOCK) {
        int nb = nt - t < TOKEN_BLOCK ? nt - t : TOKEN_BLOCK;
        memset(acc, 0, sizeof(float) * (size_t)(TOKEN_BLOCK * w));
        float *a0 = acc, *a1 = acc + w, *a2 = acc + 2 * w, *a3 = acc + 3 * w;
        for (int j = 0; j < r; j++) {
            const WT *row = b + (int64_t)j * ldb;
            if (nb == TOKEN_BLOCK) {
                float c0 = v[(t + 0) * ldv + j], c1 = v[(t + 1) * ldv + j];
                float c2 = v[(t + 2) * ldv + j], c3 = v[(t + 3) * ldv + j];
#pragma omp simd
                for (int64_t o = 0; o < w; o++) {
                    float bv = LOADW(row[o]);
                    a0[o] += c0 * bv;
                    a1[o] += c1 * bv;
                    a2[o] += c2 * bv;
                    a3[o] += c3 * bv;
                }
            } else {
                for (int u = 0; u < nb; u++) {
                    float c = v[(t + u) * ldv + j];
                    float *au = acc + u * w;
#pragma omp simd
                    for (int64_t o = 0; o < w; o++)
                        au[o] += c * LOADW(row[o]);
                }
            }
        }
        for (int u = 0; u < nb; u++) {
            float *yt = yr[t + u];
            const float *au = acc + u * w;
#pragma omp simd
            for (int64_t o = 0; o < w; o++)
                yt[o] += scale * au[o];
        }
    }
}

/* Returns 0, or -1 when scratch memory could not be allocated (y then partly updated: callers
 * treat it as fatal). */
int FN(loraplex_lora_apply)(
    const float *x, int64_t x_stride,          /* [T, in], rows x_stride apart */
    float *y, int64_t y_stride,                /* [T, out_total], rows y_stride apart */
    const WT *A, const WT *B_t,                /* [n, S, R, in], [S, R, out_total], contiguous */
    int64_t num_slices, int64_t S, int64_t R, int64_t in, int64_t out_total,
    const int32_t *ranks, const float *scalings,          /* [n, S] */
    const int64_t *offsets, const int64_t *widths,        /* [n] */
    const int32_t *seg_slot, const int32_t *seg_start, const int32_t *seg_len, int64_t num_segments,
    const int32_t *order,                      /* positions -> token rows; NULL: identity */
    int num_threads)
{
    /* work items: (segment, first token position, tokens) */
    int64_t num_items = 0;
    for (int64_t s = 0; s < num_segments; s++)
        num_items += (seg_len[s] + ITEM_TOKENS - 1) / ITEM_TOKENS;
    int64_t *items = (int64_t *)malloc(sizeof(int64_t) * 3 * (size_t)(num_items ? num_items : 1));
    if (!items)
        return -1;
    int64_t n_it = 0;
    for (int64_t s = 0; s < num_segments; s++)
        for (int64_t p = 0; p < seg_len[s]; p += ITEM_TOKENS) {
            items[3 * n_it] = s;
            items[3 * n_it + 1] = seg_start[s] + p;
            items[3 * n_it + 2] = seg_len[s] - p < ITEM_TOKENS ? seg_len[s] - p : ITEM_TOKENS;
            n_it++;
        }
    int64_t max_w = 0;
    for (int64_t i = 0; i < num_slices; i++)
        if (widths[i] > max_w)
            max_w = widths[i];
    int failed = 0;

#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && num_items > 1)
    {
        float *v = (float *)malloc(sizeof(float) * (size_t)(ITEM_TOKENS * R + TOKEN_BLOCK * max_w));
        if (!v) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < num_items; it++) {
            if (!v)
                continue;
            float *acc = v + ITEM_TOKENS * R;
            int64_t seg = items[3 * it], pos = items[3 * it + 1];
            int nt = (int)items[3 * it + 2];
            int64_t slot = seg_slot[seg];
            if (slot < 0 || slot >= S)
                continue;
            const float *xr[ITEM_TOKENS];
            float *yr[ITEM_TOKENS];
            for (int u = 0; u < nt; u++) {
                int64_t row = order ? order[pos + u] : pos + u;
                xr[u] = x + row * x_stride;
                yr[u] = y + row * y_stride;
            }
            for (int64_t i = 0; i < num_slices; i++) {
                int r = ranks[i * S + slot];
                if (r <= 0 || widths[i] == 0)
                    continue;
                if (r > R)
                    r = (int)R;
                FN(shrink_rows)(A + ((i * S + slot) * R) * in, in, r, xr, nt, v, (int)R);
                float *yo[ITEM_TOKENS];
                for (int u = 0; u < nt; u++)
                    yo[u] = yr[u] + offsets[i];
                FN(expand_rows)(B_t + slot * R * out_total + offsets[i], out_total, r, widths[i], v, (int)R,
                            scalings[i * S + slot], yo, nt, acc);
            }
        }
        free(v);
    }
    free(items);
    return failed ? -1 : 0;
}
