"""2. attention: the Triton paged attention kernel against the float32 reference, then its decode at
4,096-token contexts against the measured copy bandwidth and against the torch path."""

from __future__ import annotations

import torch

from gpu_check_sections.context import Context

# Paged attention at 4k contexts must read its K/V at this fraction of measured copy bandwidth or more.
ATTENTION_TARGET = 0.7


def section_attention(ctx: Context) -> dict:
    from types import SimpleNamespace

    from bench_common.attention import workload
    from bench_common.timing import copy_bandwidth, timer
    from loraplex.kernels.triton.paged_attention import decode_splits
    from loraplex.server.model import attention
    from loraplex.server.model.step_buffers import StepBuffers

    heads = dict(heads=32, kv_heads=8, head_dim=128) if ctx.cuda else dict(heads=4, kv_heads=2, head_dim=16)
    # (query_lens, kv_lens, window, skips): decode + chunks, a window, prefix padding hidden
    cases = [([1, 1, 7, 1, 16], [1, 37, 40, 130, 16], None, None),
             ([1, 5, 1], [50, 29, 9], 12, None),
             ([1, 3], [45, 23], None, [(13, 16), (13, 16)])]
    dtypes = (torch.float16, torch.float32) if ctx.smoke else (torch.bfloat16, torch.float16)
    rows = []
    for dtype in dtypes:
        tolerance = {torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float32: 1e-4}[dtype]
        for seed, (query_lens, kv_lens, window, skips) in enumerate(cases):
            load = workload(ctx.device, dtype, query_lens, kv_lens, **heads, window=window, skips=skips, seed=seed)
            error = (load.run().float() - load.reference()).abs().max().item()
            rows.append(dict(dtype=str(dtype).replace("torch.", ""), query_lens=query_lens, kv_lens=kv_lens,
                             window=window, prefix=skips is not None, max_abs_error=error, ok=error <= tolerance))

    batch, context = (64, 4096) if ctx.cuda else (2, 40)
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    load = workload(ctx.device, dtype, [1] * batch, [context] * batch, **heads, seed=7)
    bench = timer(ctx.device)
    kernel_s = bench(load.run)
    bandwidth = copy_bandwidth(ctx.device)
    fraction = load.kv_bytes / kernel_s / bandwidth
    # a small batch: its keys split over programs (decode_splits) to fill the GPU
    small = workload(ctx.device, dtype, [1] * 4, [context] * 4, **heads, seed=8)
    small_s = bench(small.run)

    # the torch path on the same batch: gathered blocks, one SDPA call
    cache = attention.PagedKVCache(1, load.k_cache.shape[0] // load.block_size, load.block_size,
                                   heads["kv_heads"], heads["head_dim"], dtype, ctx.device)
    cache.k[0], cache.v[0] = load.k_cache, load.v_cache
    buffers = StepBuffers(ctx.device)
    buffers.begin(8 * (4 * batch + 2 * sum(len(table) for table in load.tables) + 64))
    decode = attention.DecodeBatch.build(list(range(batch)), load.tables, load.kv_lens, load.block_size, buffers.put,
                                         attention.GATHER_MAX_ELEMENTS // (heads["kv_heads"] * heads["head_dim"]))
    buffers.send()
    meta = attention.AttentionMeta(cache, torch.empty(0, dtype=torch.long, device=ctx.device), [], decode=decode)
    query = load.q.transpose(0, 1)[None]
    module = SimpleNamespace(layer_idx=0)
    torch_s = bench(lambda: attention.attend(module, query, None, None, meta, None, None))
    failures = sum(not row["ok"] for row in rows)
    return dict(ok=failures == 0 and (fraction >= ATTENTION_TARGET or not ctx.cuda), failures=failures, cases=rows,
                decode_batch=batch, context=context, kv_bytes=load.kv_bytes, kernel_s=kernel_s,
                copy_bandwidth_gb_s=bandwidth / 1e9, kv_gb_s=load.kv_bytes / kernel_s / 1e9,
                fraction_of_copy_bandwidth=fraction, target=ATTENTION_TARGET, torch_path_s=torch_s,
                speedup_over_torch_path=torch_s / kernel_s, small_batch=4,
                small_batch_splits=decode_splits(4 * heads["kv_heads"], ctx.device), small_batch_s=small_s,
                small_batch_fraction_of_copy_bandwidth=small.kv_bytes / small_s / bandwidth)
