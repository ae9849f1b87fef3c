"""1. kernels: Triton shrink/expand in bfloat16 and float16 against the float32 reference, and one CUDA graph
captured once and replayed with new slots."""

from __future__ import annotations

import torch

from gpu_check_sections.context import NEEDS_CUDA, Context


def section_kernels(ctx: Context) -> dict:
    from bench_common.lora_checks import CASES, SMOKE_CASES, check_case, check_graph

    cases, dtypes = CASES, (torch.bfloat16, torch.float16)
    if ctx.smoke:  # the interpreter computes bfloat16 wrongly: float16 and float32 only
        cases, dtypes = SMOKE_CASES, (torch.float16, torch.float32)
    rows = []
    for dtype in dtypes:
        for seed, (tokens, hidden, widths, mix) in enumerate(cases):
            error = check_case(tokens, hidden, widths, mix, dtype, ctx.device, seed=seed)
            rows.append(dict(dtype=str(dtype).replace("torch.", ""), tokens=tokens, hidden=hidden,
                             widths=list(widths), mix=mix, ok=error is None, error=error))
    graph = check_graph(ctx.device) if ctx.cuda else NEEDS_CUDA
    failures = sum(not row["ok"] for row in rows) + (graph not in (None, NEEDS_CUDA))
    return dict(ok=failures == 0, failures=failures, cases=rows,
                cuda_graph="ok" if graph is None else graph)
