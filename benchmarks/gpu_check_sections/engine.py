"""3. engine: every adapter kind and the base model in one mixed bfloat16 batch, against each request alone
and against peft's forward."""

from __future__ import annotations

import statistics
import time

import torch

from gpu_check_sections.context import Context
from gpu_check_sections.models import (ADAPTER_KINDS, agreement, build_adapters, build_model, generate, load_peft,
                                       make_engine, release, scored)


def compare_with_peft(ctx: Context, quantization: str, kinds: tuple[str, ...] = ADAPTER_KINDS) -> dict:
    """Every adapter kind and the base in one mixed batch vs each alone vs peft's forward."""
    from loraplex.server.train.greedy import greedy_decode

    s = ctx.sizes
    model_dir = build_model(ctx, s.hidden, s.layers, s.intermediate)
    adapters = build_adapters(ctx, model_dir, kinds)
    engine = make_engine(ctx, model_dir, quantization, slots=len(adapters))
    registration = {}
    for kind, path in adapters.items():
        started = time.perf_counter()
        engine.register_adapter(kind, str(path))
        registration[kind] = time.perf_counter() - started
    gen = torch.Generator().manual_seed(1)
    vocab = engine.runner.vocab_size
    prompts = {name: torch.randint(3, vocab, (s.prompt_len,), generator=gen).tolist() for name in ("base", *adapters)}
    requests = {name: (prompts[name], None if name == "base" else name) for name in prompts}
    mixed = generate(engine, requests, s.new_tokens)
    alone = {name: generate(engine, {name: request}, s.new_tokens)[name] for name, request in requests.items()}
    release(engine)
    rows = {}
    for name in requests:
        model = load_peft(ctx, model_dir, None if name == "base" else adapters[name], quantization)
        prompt = prompts[name]
        tokens, logprobs = mixed[name]
        peft_logprobs = scored(model, prompt, tokens, ctx.device)
        peft_tokens, _ = greedy_decode(model, prompt, s.new_tokens, None)
        del model
        rate_alone, first_alone = agreement(tokens, alone[name][0])
        rate_peft, first_peft = agreement(tokens, peft_tokens)
        common = len(tokens) if first_alone is None else first_alone
        rows[name] = dict(
            max_logprob_diff_vs_peft=max(abs(a - b) for a, b in zip(logprobs, peft_logprobs)),
            token_agreement_vs_peft=rate_peft, first_diff_vs_peft=first_peft,
            token_agreement_vs_alone=rate_alone, first_diff_vs_alone=first_alone,
            max_logprob_diff_vs_alone=max((abs(a - b) for a, b in zip(logprobs[:common], alone[name][1][:common])),
                                          default=0.0),
            register_s=registration.get(name))
    worst = max(row["max_logprob_diff_vs_peft"] for row in rows.values())
    return dict(ok=worst <= ctx.tolerance, tolerance=ctx.tolerance, worst_logprob_diff=worst,
                mean_token_agreement_vs_peft=statistics.mean(r["token_agreement_vs_peft"] for r in rows.values()),
                adapters=rows, model=str(model_dir))


def section_engine(ctx: Context) -> dict:
    return compare_with_peft(ctx, "none")
