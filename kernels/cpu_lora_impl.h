/* The kernel body, included by cpu_lora.c once per weight type:
 *   WT       the pools' element type (float, or uint16_t holding bfloat16 bits)
 *   LOADW(w) one weight as float
 *   FN(name) the name with the type's suffix
 * x, y, v and every sum are float32 in both.
 */

/* v[t * ldv + j] = dot(A row j, x_t) for j < r and the nt tokens xr[0..nt). A's r rows are one
 * contiguous block, read row after row (one stream for the prefetchers), PREFETCH_BYTES ahead. */
static void FN(shrink_rows)(const WT *a, int64_t in, int r, const float *const *xr, int nt, float *v, int ldv)
{
    const int64_t row_bytes = in * (int64_t)sizeof(WT);
    for (int j = 0; j < r; j++) {
        const WT *row = a + (int64_t)j * in;
        prefetch_span((const char *)row + PREFETCH_BYTES, row_bytes);
        int t = 0;
        for (; t + TOKEN_BLOCK <= nt; t += TOKEN_BLOCK) {  /* a row loaded once serves 4 tokens */
            const float *x0 = xr[t], *x1 = xr[t + 1], *x2 = xr[t + 2], *x3 = xr[t + 3];
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
        for (; t < nt; t++) {  /* decode: DOT_LANES partial sums, independent FMA chains */
            const float *x0 = xr[t];
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

/* Expand for every slice of one slot:
 *   y_t[off_i : off_i + w_i] += scale_i * (v_i[t, :r_i] @ B_t[slot, :r_i, off_i : off_i + w_i])
 * v_i for token t at v[(i * ITEM_TOKENS + t) * R]; acc: TOKEN_BLOCK * out_total scratch.
 * One token (decode): COL_BLOCK outputs at a time, summed over the rank in registers. More tokens:
 * B_t[slot]'s rows in order (row j holds every slice's columns side by side), each row used by every
 * slice whose rank exceeds j and by 4 tokens at once, sums in acc. */
static void FN(expand_slot)(const WT *b, int64_t out_total, int64_t num_slices, const int *rank,
                            const int64_t *offsets, const int64_t *widths, const float *scale, const float *v,
                            int64_t R, float *const *yr, int nt, float *acc)
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
    int rmax = 0;
    for (int64_t i = 0; i < num_slices; i++)
        if (rank[i] > rmax)
            rmax = rank[i];
    for (int t = 0; t < nt; t += TOKEN_BLOCK) {
        int nb = nt - t < TOKEN_BLOCK ? nt - t : TOKEN_BLOCK;
        for (int64_t i = 0; i < num_slices; i++)
            if (rank[i] > 0)
                for (int u = 0; u < nb; u++)
                    memset(acc + u * out_total + offsets[i], 0, sizeof(float) * (size_t)widths[i]);
        for (int j = 0; j < rmax; j++) {
            const WT *row = b + (int64_t)j * out_total;
            for (int64_t i = 0; i < num_slices; i++)
                if (rank[i] > j + 1)
                    prefetch_span(row + out_total + offsets[i], widths[i] * (int64_t)sizeof(WT));
            for (int64_t i = 0; i < num_slices; i++) {
                if (rank[i] <= j)
                    continue;
                const WT *bi = row + offsets[i];
                const int64_t w = widths[i];
                const float *vi = v + (i * ITEM_TOKENS + t) * R + j;
                float *a0 = acc + offsets[i];
                if (nb == TOKEN_BLOCK) {
                    float *a1 = a0 + out_total, *a2 = a1 + out_total, *a3 = a2 + out_total;
                    float c0 = vi[0], c1 = vi[R], c2 = vi[2 * R], c3 = vi[3 * R];
#pragma omp simd
                    for (int64_t o = 0; o < w; o++) {
                        float bv = LOADW(bi[o]);
                        a0[o] += c0 * bv;
                        a1[o] += c1 * bv;
                        a2[o] += c2 * bv;
                        a3[o] += c3 * bv;
                    }
                } else {
                    for (int u = 0; u < nb; u++) {
                        float c = vi[u * R];
                        float *au = a0 + u * out_total;
#pragma omp simd
                        for (int64_t o = 0; o < w; o++)
                            au[o] += c * LOADW(bi[o]);
                    }
                }
            }
        }
        for (int64_t i = 0; i < num_slices; i++) {
            if (rank[i] <= 0)
                continue;
            const float s = scale[i];
            for (int u = 0; u < nb; u++) {
                float *yt = yr[t + u] + offsets[i];
                const float *au = acc + u * out_total + offsets[i];
#pragma omp simd
                for (int64_t o = 0; o < widths[i]; o++)
                    yt[o] += s * au[o];
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
        float *v = (float *)malloc(sizeof(float) * (size_t)(num_slices * ITEM_TOKENS * R + TOKEN_BLOCK * out_total));
        if (!v) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < num_items; it++) {
            if (!v)
                continue;
            float *acc = v + num_slices * ITEM_TOKENS * R;
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
                                yr, nt, acc);
        }
        free(v);
    }
    free(items);
    return failed ? -1 : 0;
}
