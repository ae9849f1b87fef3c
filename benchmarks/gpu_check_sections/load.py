"""6. load: host -> device adapter load time against the PCIe floor, and how long load_slot holds the step loop."""

from __future__ import annotations

import statistics
import time

import torch

from gpu_check_sections.context import NEEDS_CUDA, Context
from gpu_check_sections.models import build_model, make_engine, release


def section_load(ctx: Context) -> dict:
    from loraplex.server.adapters.loader import load_adapter

    s = ctx.sizes
    model_dir = build_model(ctx, s.decode_hidden, s.decode_layers, s.decode_intermediate)
    root = ctx.work / "decode-adapters"
    if not root.is_dir():
        from loraplex.server.bench.workload import ALL_PROJECTIONS, build_adapters as build_loras

        build_loras(model_dir, root, [16], ALL_PROJECTIONS, save_dtype=ctx.dtype)
    engine = make_engine(ctx, model_dir, slots=2, kv_tokens=256)
    runner = engine.runner
    weights = runner.host_tier(load_adapter(sorted(root.iterdir())[0], runner.base_spec, max_rank=16))
    element = torch.finfo(runner.adapter_dtype).bits // 8
    device_bytes = sum(m.a.numel() + m.b.numel() for m in weights.lora.values()) * element
    times, returned = [], []
    for _ in range(5):
        ctx.sync()
        started = time.perf_counter()
        runner.load_slot(0, weights)
        returned.append(time.perf_counter() - started)
        ctx.sync()
        times.append(time.perf_counter() - started)
    result = dict(ok=True, adapter_device_bytes=device_bytes, host_bytes=weights.size_bytes,
                  host_pinned=all(t.is_pinned() for t in weights.tensors()) if ctx.cuda else NEEDS_CUDA,
                  load_s_median=statistics.median(times), load_s_all=times,
                  load_slot_returns_s_median=statistics.median(returned))
    if ctx.cuda:
        pinned = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
        target = torch.empty_like(pinned, device=ctx.device)
        target.copy_(pinned, non_blocking=True)
        ctx.sync()
        started = time.perf_counter()
        for _ in range(5):
            target.copy_(pinned, non_blocking=True)
        ctx.sync()
        bandwidth = 5 * pinned.numel() / (time.perf_counter() - started)
        floor = device_bytes / bandwidth
        result.update(pcie_gb_s=bandwidth / 1e9, floor_s=floor, load_over_floor=result["load_s_median"] / floor,
                      target_met=result["load_s_median"] <= 2 * floor)
    else:
        result["pcie_gb_s"] = NEEDS_CUDA
    release(engine)
    return result
