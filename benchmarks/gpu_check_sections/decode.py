"""5. decode: the decode step at batch 64 against its bandwidth floor, with 8 distinct adapters against the
base model, and the kernel launches and GPU-busy fraction of one step."""

from __future__ import annotations

import statistics
import time

import torch

from gpu_check_sections.context import NEEDS_CUDA, Context
from gpu_check_sections.models import build_model, generate, make_engine, release

DECODE_FLOOR_TARGET = 1.3  # decode step at batch 64, 64 distinct adapters: at most this times the bandwidth floor
MIXED_OVER_BASE_TARGET = 0.85  # decode throughput with 8 distinct adapters over the base model's, same batch


def section_decode(ctx: Context) -> dict:
    from bench_common.timing import copy_bandwidth
    from loraplex.server.bench.systems import LoraplexSystem
    from loraplex.server.bench.workload import ALL_PROJECTIONS, build_adapters as build_loras

    s = ctx.sizes
    model_dir = build_model(ctx, s.decode_hidden, s.decode_layers, s.decode_intermediate)
    root = ctx.work / "decode-adapters"
    paths = build_loras(model_dir, root, [16] * s.decode_batch, ALL_PROJECTIONS, save_dtype=ctx.dtype) \
        if not root.is_dir() else sorted(root.iterdir())
    engine = make_engine(ctx, model_dir, slots=s.decode_batch, kv_tokens=s.decode_batch * 128)
    for i, path in enumerate(paths):
        engine.register_adapter(f"a{i}", str(path))
    gen = torch.Generator().manual_seed(3)
    requests = {f"r{i}": (torch.randint(3, engine.runner.vocab_size, (32,), generator=gen).tolist(), f"a{i}")
                for i in range(s.decode_batch)}
    new_tokens = 16 if not ctx.smoke else 4

    def decode_median(batch: dict) -> tuple[float, int]:
        """Median time of the pure decode steps (every sequence one token) of `batch`, and their count."""
        times: list[float] = []

        def timed(stats, started):
            ctx.sync()
            if stats.num_tokens == s.decode_batch and stats.num_sequences == s.decode_batch:
                times.append(time.perf_counter() - started)

        generate(engine, batch, new_tokens, on_step=timed)
        return (statistics.median(times) if times else float("nan")), len(times)

    median, timed_steps = decode_median(requests)
    # the same batch on the base model, and with 8 distinct adapters (the throughput target's mix)
    base_median, _ = decode_median({rid: (prompt, None) for rid, (prompt, _) in requests.items()})
    mixed8 = {rid: (prompt, f"a{i % 8}") for i, (rid, (prompt, _)) in enumerate(requests.items())}
    mixed8_median, _ = decode_median(mixed8)
    base_bytes = LoraplexSystem(engine).model_bytes()  # what `loraplex bench` counts in its floor
    weights = [engine.get_adapter(f"a{i}") for i in range(s.decode_batch)]
    adapters_bytes = sum(info.size_bytes for info in weights)  # the host tier is in the serving dtype
    bandwidth = copy_bandwidth(ctx.device)
    floor = (base_bytes + adapters_bytes) / bandwidth
    result = dict(ok=bool(timed_steps), batch=s.decode_batch, distinct_adapters=s.decode_batch,
                  decode_graphs=engine.runner.decode_graphs is not None,
                  decode_steps_timed=timed_steps, step_s_median=median,
                  base_bytes=base_bytes, adapter_bytes=adapters_bytes, copy_bandwidth_gb_s=bandwidth / 1e9,
                  floor_s=floor, step_over_floor=median / floor, step_over_floor_target=DECODE_FLOOR_TARGET,
                  base_step_s_median=base_median, mixed8_step_s_median=mixed8_median,
                  mixed8_over_base_throughput=base_median / mixed8_median,
                  mixed8_over_base_target=MIXED_OVER_BASE_TARGET)
    result.update(profile_step(ctx, engine, requests))
    if not ctx.cuda:  # the profiler ran, but a CPU step launches no kernels
        result.update(kernel_launches_per_step=NEEDS_CUDA, copies_per_step=NEEDS_CUDA, gpu_busy_fraction=NEEDS_CUDA)
    release(engine)
    return result


def profile_step(ctx: Context, engine, requests) -> dict:
    """Kernel launches and GPU-busy fraction of one decode step of the same batch."""
    from torch.profiler import ProfilerActivity, profile

    from loraplex.server.engine.engine import GenerationRequest
    from loraplex.server.model.sampling import SamplingParams

    for rid, (prompt, adapter) in requests.items():
        engine.add_request(GenerationRequest(f"p-{rid}", prompt_token_ids=tuple(prompt), adapter_id=adapter,
                                             sampling=SamplingParams(max_new_tokens=8, ignore_eos=True)),
                           lambda output: None)
    batch = len(requests)
    for _ in range(64):  # through the prefill to the first decode steps of the whole batch
        stats = engine.step()
        if stats is not None and stats.num_tokens == batch and stats.num_sequences == batch:
            break
    engine.step()  # one more decode step, warm
    ctx.sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])) as prof:
        started = time.perf_counter()
        engine.step()
        ctx.sync()
        wall = time.perf_counter() - started
    device_events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    kernels = [e for e in device_events if not e.name.startswith(("Memcpy", "Memset"))]
    # kernels of one stream do not overlap, so their summed time is the time the GPU was busy (µs)
    busy = sum(getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0) for e in device_events) * 1e-6
    while engine.has_work():
        engine.step()
    return dict(kernel_launches_per_step=len(kernels), copies_per_step=len(device_events) - len(kernels),
                gpu_busy_fraction=busy / wall, profiled_step_s=wall)
