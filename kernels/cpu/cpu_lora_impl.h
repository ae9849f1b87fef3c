/* The kernel body, included by cpu_lora.c once per weight type:
 *   WT       the pools' element type (float, or uint16_t holding bfloat16 bits)
 *   LOADW(w) one weight as float
 *   FN(name) the name with the type's suffix
 * x, y, v and every sum are float32 in both.
 */

/* v[t * ldv + j] = dot(A row j, x_t) for j < r and the nt tokens xr[0..nt); A's r rows are one
 * contiguous block. */
static void FN(shrink_rows)(const WT *a, int64_t in, int r, const float *const *xr, int nt, float *v, int ldv)
{
    const int64_t row_bytes = in * (int64_t)sizeof(WT);
    int t = 0;
    /* blocks of 4 tokens x 4 rows: 16 sums in registers, each weight and x value loaded once per block */
    for (; t + TOKEN_BLOCK <= nt; t += TOKEN_BLOCK) {
        const float *x0 = xr[t], *x1 = xr[t + 1], *x2 = xr[t + 2], *x3 = xr[t + 3];
        int j = 0;
        for (; j < r; j += 4) {
            const int nj = r - j < 4 ? r - j : 4;
            const WT *r0 = a + (int64_t)j * in;
            const WT *r1 = nj > 1 ? r0 + in : r0, *r2 = nj > 2 ? r0 + 2 * in : r0, *r3 = nj > 3 ? r0 + 3 * in : r0;
            if (t == 0) /* later token blocks find these rows in cache */
                prefetch_span((const char *)r0 + PREFETCH_BYTES, 4 * row_bytes);
            float s00 = 0.f, s01 = 0.f, s02 = 0.f, s03 = 0.f, s10 = 0.f, s11 = 0.f, s12 = 0.f, s13 = 0.f;
            float s20 = 0.f, s21 = 0.f, s22 = 0.f, s23 = 0.f, s30 = 0.f, s31 = 0.f, s32 = 0.f, s33 = 0.f;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)
            for (int64_t k = 0; k < in; k++) {
                const float w0 = LOADW(r0[k]), w1 = LOADW(r1[k]), w2 = LOADW(r2[k]), w3 = LOADW(r3[k]);
                const float y0 = x0[k], y1 = x1[k], y2 = x2[k], y3 = x3[k];
                s00 += w0 * y0; s01 += w1 * y0; s02 += w2 * y0; s03 += w3 * y0;
                s10 += w0 * y1; s11 += w1 * y1; s12 += w2 * y1; s13 += w3 * y1;
                s20 += w0 * y2; s21 += w1 * y2; s22 += w2 * y2; s23 += w3 * y2;
                s30 += w0 * y3; s31 += w1 * y3; s32 += w2 * y3; s33 += w3 * y3;
            }
            const float sums[4][4] = {{s00, s01, s02, s03}, {s10, s11, s12, s13},
                                      {s20, s21, s22, s23}, {s30, s31, s32, s33}};
            for (int u = 0; u < 4; u++)
                for (int q = 0; q < nj; q++)
                    v[(t + u) * ldv + j + q] = sums[u][q];
        }
    }
    /* the last tokens (decode: the only one): each row once, DOT_LANES partial sums (independent
     * FMA chains); rows in order, one stream for the prefetchers, PREFETCH_BYTES ahead */
    for (; t < nt; t++) {
        const float *x0 = xr[t];
        for (int j = 0; j < r; j++) {
            const WT *row = a + (int64_t)j * in;
            prefetch_span((const char *)row + PREFETCH_BYTES, row_bytes);
            float part[DOT_LANES] = {0.f};
            int64_t k = 0;
            for (; k + DOT_LANES <= in; k += DOT_LANES) {
#pragma omp simd
                for (int l = 0; l < DOT_LANES; l++)
                    part[l] += LOADW(row[k + l]) * x0[k + l];
            }
            float s0 = 0.f;
            for (; k < in; k++)
                s0 += LOADW(row[k]) * x0[k];
#pragma omp simd reduction(+ : s0)
            for (int l = 0; l < DOT_LANES; l++)
                s0 += part[l];
            v[t * ldv + j] = s0;
        }
    }
}

/* 16 weights as float32 (a row chunk of B) */
static inline vpanel FN(loadw16)(const WT *p)
{
    float f[PANEL];
    for (int l = 0; l < PANEL; l++)
        f[l] = LOADW(p[l]);
    return vload(f);
}

/* Expand for every slice of one slot:
 *   y_t[off_i : off_i + w_i] += scale_i * (v_i[t, :r_i] @ B_t[slot, :r_i, off_i : off_i + w_i])
 * v_i for token t at v[(i * ITEM_TOKENS + t) * R]. One token (decode): COL_BLOCK outputs at a time,
 * summed over the rank in registers. More tokens: blocks of EXP_TOKENS tokens x 32 outputs. */
static void FN(expand_slot)(const WT *b, int64_t out_total, int64_t num_slices, const int *rank,
                            const int64_t *offsets, const int64_t *widths, const float *scale, const float *v,
                            int64_t R, float *const *yr, int nt)
{
    if (nt == 1) {
        for (int64_t i = 0; i < num_slices; i++) {
            const int r = rank[i];
            if (r <= 0)
                continue;
            const float *vi = v + i * ITEM_TOKENS * R;
            const WT *bi = b + offsets[i];
            float *yt = yr[0] + offsets[i];
            const float s = scale[i];
            const int64_t w = widths[i];
            int64_t o = 0;
            for (; o + COL_BLOCK <= w; o += COL_BLOCK) {
                float accv[COL_BLOCK] = {0.f};
                for (int j = 0; j < r; j++) {
                    const WT *bj = bi + (int64_t)j * out_total + o;
                    __builtin_prefetch((const char *)bj + PREFETCH_BYTES / 4, 0, 2);
                    const float c = vi[j];
#pragma omp simd
                    for (int l = 0; l < COL_BLOCK; l++)
                        accv[l] += c * LOADW(bj[l]);
                }
#pragma omp simd
                for (int l = 0; l < COL_BLOCK; l++)
                    yt[o + l] += s * accv[l];
            }
            for (; o < w; o++) {
                float a = 0.f;
                for (int j = 0; j < r; j++)
                    a += vi[j] * LOADW(bi[(int64_t)j * out_total + o]);
                yt[o] += s * a;
            }
        }
        return;
    }
    /* more tokens: blocks of EXP_TOKENS tokens x 2 panels of 16 outputs summed in vector registers over
     * the rank; two vector loads of a row of B serve EXP_TOKENS tokens */
    for (int64_t i = 0; i < num_slices; i++) {
        const int r = rank[i];
        if (r <= 0)
            continue;
        const WT *bi = b + offsets[i];
        const float s = scale[i];
        const int64_t w = widths[i];
        for (int t = 0; t < nt; t += EXP_TOKENS) {
            const int nb = nt - t < EXP_TOKENS ? nt - t : EXP_TOKENS;
            const float *vu[EXP_TOKENS];
            for (int u = 0; u < EXP_TOKENS; u++)
                vu[u] = v + (i * ITEM_TOKENS + t + (u < nb ? u : 0)) * R;
            int64_t o = 0;
            for (; o + 2 * PANEL <= w; o += 2 * PANEL) {
                vpanel c0[EXP_TOKENS], c1[EXP_TOKENS];
                for (int u = 0; u < EXP_TOKENS; u++)
                    c0[u] = c1[u] = (vpanel){0};
                for (int j = 0; j < r; j++) {
                    const WT *bj = bi + (int64_t)j * out_total + o;
                    const vpanel b0 = FN(loadw16)(bj), b1 = FN(loadw16)(bj + PANEL);
#pragma GCC unroll 8
                    for (int u = 0; u < EXP_TOKENS; u++) {
                        c0[u] += vu[u][j] * b0;
                        c1[u] += vu[u][j] * b1;
                    }
                }
                for (int u = 0; u < nb; u++) {
                    float *yt = yr[t + u] + offsets[i] + o;
                    const vpanel y0 = vload(yt) + s * c0[u], y1 = vload(yt + PANEL) + s * c1[u];
                    memcpy(yt, &y0, sizeof y0);
                    memcpy(yt + PANEL, &y1, sizeof y1);
                }
            }
            for (; o < w; o++) {
                for (int u = 0; u < nb; u++) {
                    float sum = 0.f;
                    for (int j = 0; j < r; j++)
                        sum += vu[u][j] * LOADW(bi[(int64_t)j * out_total + o]);
                    yr[t + u][offsets[i] + o] += s * sum;
                }
            }
        }
    }
}

/* Returns 0; -1 when scratch memory could not be allocated (y then partly updated: callers treat
 * it as fatal); -2 for more than MAX_SLICES slices (nothing done). */
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
    if (num_slices > MAX_SLICES)
        return -2;
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
    int failed = 0;

#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && num_items > 1)
    {
        float *v = (float *)malloc(sizeof(float) * (size_t)(num_slices * ITEM_TOKENS * R));
        if (!v) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < num_items; it++) {
            if (!v)
                continue;
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
            int rank[MAX_SLICES];
            float scale[MAX_SLICES];
            int any = 0;
            for (int64_t i = 0; i < num_slices; i++) {
                int r = widths[i] > 0 ? ranks[i * S + slot] : 0;
                rank[i] = r < 0 ? 0 : r > R ? (int)R : r;
                scale[i] = scalings[i * S + slot];
                if (rank[i] > 0) {
                    FN(shrink_rows)(A + ((i * S + slot) * R) * in, in, rank[i], xr, nt, v + i * ITEM_TOKENS * R, (int)R);
                    any = 1;
                }
            }
            if (any)
                FN(expand_slot)(B_t + slot * R * out_total, out_total, num_slices, rank, offsets, widths, scale, v, R,
                                yr, nt);
        }
        free(v);
    }
    free(items);
    return failed ? -1 : 0;
}
