"""4. nf4: the engine section on an NF4 base, and the peak GPU memory of a long prefill."""

from __future__ import annotations

import time

import torch

from gpu_check_sections.context import NEEDS_CUDA, Context
from gpu_check_sections.engine import compare_with_peft
from gpu_check_sections.models import ADAPTER_KINDS, build_adapters, build_model, generate, make_engine, release


def section_nf4(ctx: Context) -> dict:
    # --smoke: the kinds whose 4-bit handling differs (DoRA's dequantized norms, LoRA/IA3 on unfused layers)
    result = compare_with_peft(ctx, "nf4", ("lora", "dora", "ia3") if ctx.smoke else ADAPTER_KINDS)
    s = ctx.sizes
    model_dir = build_model(ctx, s.hidden, s.layers, s.intermediate)
    engine = make_engine(ctx, model_dir, "nf4", slots=2, kv_tokens=s.prefill_tokens + 64)
    engine.register_adapter("dora", str(build_adapters(ctx, model_dir, ("dora",))["dora"]))
    prompt = torch.randint(3, engine.runner.vocab_size, (s.prefill_tokens,),
                           generator=torch.Generator().manual_seed(2)).tolist()
    if ctx.cuda:
        ctx.sync()
        torch.cuda.reset_peak_memory_stats(ctx.device)
        before = torch.cuda.memory_allocated(ctx.device)
    started = time.perf_counter()
    generate(engine, {"long": (prompt, "dora")}, 1)
    ctx.sync()
    release(engine)
    result["prefill_tokens"] = s.prefill_tokens
    result["prefill_s"] = time.perf_counter() - started
    if ctx.cuda:
        peak = torch.cuda.max_memory_allocated(ctx.device) - before
        result["prefill_peak_bytes_above_resident"] = peak
        result["prefill_peak_bytes_per_token"] = peak / s.prefill_tokens
        result["resident_bytes"] = before
    else:
        result["prefill_peak_bytes_above_resident"] = NEEDS_CUDA
    return result
