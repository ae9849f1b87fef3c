"""The side-by-side run of `loraplex bench`: (a) loraplex with mixed adapters, (b) loraplex on the base
model, (c) peft `generate` and (d) transformers `generate` in this process (`bench_local`), or (a) and
(b) through a running server (`bench_grpc`), in rounds that rotate their order; the result as a dict."""

from __future__ import annotations

import random
from pathlib import Path

from loraplex.server.bench.config import TARGETS, BenchConfig, bench_config_dict, engine_config, is_target_workload
from loraplex.server.bench.report import bandwidth_floor, machine_info
from loraplex.server.bench.workload import prepare
from loraplex.server.errors import UserError

SYSTEM_LABELS = {
    "mixed": "(a) loraplex, mixed adapters",
    "base": "(b) loraplex, base model",
    "peft": "(c) peft generate, adapter_names",
    "hf": "(d) transformers generate, base",
}


def bench_local(config: BenchConfig, workdir: Path, log) -> dict:
    from loraplex.server.bench.measure import median_ratio, round_orders, summarize
    from loraplex.server.bench.systems import GenerateSystem, LoraplexSystem, load_hf_model, load_peft_model
    from loraplex.server.bench.workload import draw_adapters, random_prompts

    model_dir, adapters = prepare(config, workdir, log)
    ids = list(adapters)
    log("loading loraplex" + (", peft" if config.peft else "") + (", transformers" if config.hf else ""))
    loraplex = LoraplexSystem.create(engine_config(config, model_dir, num_slots=len(ids)), adapters)
    pad = loraplex.engine.tokenizer.pad_token_id
    systems: dict[str, object] = {"mixed": loraplex, "base": loraplex}
    if config.peft:
        systems["peft"] = GenerateSystem(load_peft_model(model_dir, adapters, config.dtype, config.quantization,
                                                         config.device), config.device, pad)
    if config.hf:
        systems["hf"] = GenerateSystem(load_hf_model(model_dir, config.dtype, config.quantization, config.device),
                                       config.device, pad)

    rng = random.Random(config.seed)
    runs: dict[str, list] = {name: [] for name in systems}
    orders = round_orders(list(systems), config.warmup + config.rounds)
    for index, order in enumerate(orders):
        prompts = random_prompts(config.shape.vocab_size, config.batch, config.prompt_len, rng)
        picks = [ids[i] for i in draw_adapters(config.popularity, len(ids), config.batch, rng, config.zipf_s)]
        measured = index >= config.warmup
        label = f"round {index - config.warmup + 1}/{config.rounds}" if measured else f"warm-up {index + 1}"
        line = []
        for name in order:
            result = run_system(name, systems[name], prompts, picks, config.new_tokens)
            line.append(f"{name} {result.throughput:.1f}")
            if measured:
                runs[name].append(result)
        log(f"{label}: " + ", ".join(line) + " tok/s")

    summaries = {name: summarize(SYSTEM_LABELS[name], runs[name], systems[name].resident_bytes()).as_dict()
                 for name in systems}
    summaries["mixed"]["name"] += f" ({config.popularity})"
    result = {
        "mode": "local",
        "config": bench_config_dict(config),
        "machine": machine_info(config),
        "systems": summaries,
        "mixed_over_base": median_ratio(runs["mixed"], runs["base"]),
        "mixed_over_peft": median_ratio(runs["mixed"], runs["peft"]) if config.peft else None,
        "base_over_hf": median_ratio(runs["base"], runs["hf"]) if config.hf else None,
        "peft_over_hf": median_ratio(runs["peft"], runs["hf"]) if config.peft and config.hf else None,
        "targets": TARGETS if is_target_workload(config) else None,
    }
    result["bandwidth"] = bandwidth_floor(config, loraplex, adapters, summaries)
    loraplex.close()
    return result


def run_system(name: str, system, prompts, picks, new_tokens: int):
    if name == "mixed":
        return system.run(prompts, picks, new_tokens)
    if name == "base":
        return system.run(prompts, [None] * len(prompts), new_tokens)
    if name == "peft":
        return system.run(prompts, picks, new_tokens)
    return system.run(prompts, None, new_tokens)


def bench_grpc(config: BenchConfig, address: str, adapter_ids, admin_token, log) -> dict:
    from loraplex.server.bench.measure import median_ratio, round_orders, summarize
    from loraplex.server.bench.systems import GrpcSystem
    from loraplex.server.bench.workload import draw_adapters, random_prompts

    system = GrpcSystem(address, admin_token)
    ids = list(adapter_ids) if adapter_ids else system.adapter_ids()
    if not ids:
        raise UserError(f"the server at {address} has no LoRA adapter registered (or give --adapter-ids)")
    if config.popularity == "distinct" and len(ids) < config.batch:
        raise UserError(f"--popularity distinct needs at least --batch ({config.batch}) adapters; "
                        f"the server has {len(ids)}")
    rng = random.Random(config.seed)
    runs: dict[str, list] = {"mixed": [], "base": []}
    for index, order in enumerate(round_orders(["mixed", "base"], config.warmup + config.rounds)):
        prompts = random_prompts(config.shape.vocab_size, config.batch, config.prompt_len, rng)
        picks = [ids[i] for i in draw_adapters(config.popularity, len(ids), config.batch, rng, config.zipf_s)]
        line = []
        for name in order:
            result = system.run(prompts, picks if name == "mixed" else [None] * len(prompts), config.new_tokens)
            line.append(f"{name} {result.throughput:.1f}")
            if index >= config.warmup:
                runs[name].append(result)
        log(f"round {index + 1}: " + ", ".join(line) + " tok/s")
    summaries = {name: summarize(SYSTEM_LABELS[name] + " (gRPC)", runs[name], None).as_dict() for name in runs}
    return {
        "mode": "grpc",
        "address": address,
        "config": {**bench_config_dict(config), "adapters_used": len(ids)},
        "machine": machine_info(config),
        "systems": summaries,
        "mixed_over_base": median_ratio(runs["mixed"], runs["base"]),
        "mixed_over_peft": None,
        "base_over_hf": None,
        "peft_over_hf": None,
        "targets": None,
    }
