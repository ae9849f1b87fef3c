"""`loraplex bench --shared-prefix`: what prefix caching buys on repeated prompts, and what it costs elsewhere.

Each adapter has a system prompt of its own (`--system-len` tokens); every request is one adapter's
system prompt followed by a short user turn (`--prompt-len` tokens). One engine runs, in every round,
alternating their order:

    (a) the shared-prefix batch with prefix caching
    (b) the same batch with `cache_prompt` off (every prompt computed from its first token)
    (c) the default workload (random prompts: nothing to share) with prefix caching
    (d) the same default batch with `cache_prompt` off

(a)/(b) is the gain (TTFT and throughput), (c)/(d) the cost of looking up and naming blocks that
never hit. The warm-up rounds fill the cache with the system prompts, as a server that has seen each
tenant before.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraplex.server.bench.config import BenchConfig

TARGETS = {"ttft_cached_over_uncached": 0.3, "throughput_cached_over_uncached": 1.5,
           "default_cached_over_uncached": 0.98}
"""TTFT at most 0.3x, throughput at least 1.5x on shared prefixes; at most 2 % slower without them."""
LABELS = {
    "shared_cached": "(a) shared prefixes, prefix caching",
    "shared_uncached": "(b) shared prefixes, cache_prompt off",
    "default_cached": "(c) default workload, prefix caching",
    "default_uncached": "(d) default workload, cache_prompt off",
}


def bench_prefix(config: BenchConfig, system_len: int, workdir: Path, log) -> dict:
    from loraplex.server.bench.config import bench_config_dict, engine_config
    from loraplex.server.bench.measure import median_ratio, round_orders, summarize
    from loraplex.server.bench.report import machine_info
    from loraplex.server.bench.systems import LoraplexSystem
    from loraplex.server.bench.workload import draw_adapters, prepare, random_prompts

    model_dir, adapters = prepare(config, workdir, log)
    ids = list(adapters)
    engine = engine_config(config, model_dir, num_slots=len(ids))
    # room for every system prompt in the cache, beside a round's running requests
    per_request = system_len + config.prompt_len + config.new_tokens
    engine = replace(engine, cache=replace(engine.cache, num_tokens=len(ids) * system_len + 2 * config.batch * per_request))
    log("loading loraplex")
    system = LoraplexSystem.create(engine, adapters)
    rng = random.Random(config.seed)
    system_prompts = {adapter_id: prompt for adapter_id, prompt in
                      zip(ids, random_prompts(config.shape.vocab_size, len(ids), system_len, rng))}
    runs: dict[str, list] = {name: [] for name in LABELS}
    looked_up = hit = 0
    for index, order in enumerate(round_orders(list(LABELS), config.warmup + config.rounds)):
        picks = [ids[i] for i in draw_adapters(config.popularity, len(ids), config.batch, rng, config.zipf_s)]
        turns = random_prompts(config.shape.vocab_size, config.batch, config.prompt_len, rng)
        batches = {
            "shared": [system_prompts[a] + turn for a, turn in zip(picks, turns)],
            "default": random_prompts(config.shape.vocab_size, config.batch, config.prompt_len, rng),
        }
        measured = index >= config.warmup
        line = []
        for name in order:
            workload, caching = name.split("_")
            before = system.engine.snapshot()
            result = system.run(batches[workload], picks, config.new_tokens, cache_prompt=caching == "cached")
            if measured and name == "shared_cached":
                after = system.engine.snapshot()
                looked_up += sum(after.prefix_cache_queries.values()) - sum(before.prefix_cache_queries.values())
                hit += sum(after.prefix_cache_hits.values()) - sum(before.prefix_cache_hits.values())
            line.append(f"{name} {result.throughput:.1f} tok/s, TTFT p50 {statistics.median(result.ttfts) * 1e3:.0f} ms")
            if measured:
                runs[name].append(result)
        log(("round " if measured else "warm-up ") + f"{index + 1}: " + "; ".join(line))
    system.close()

    def ttft_ratio(a: str, b: str) -> float:
        return statistics.median(statistics.median(x.ttfts) / statistics.median(y.ttfts)
                                 for x, y in zip(runs[a], runs[b]))

    return {
        "mode": "shared-prefix",
        "config": {**bench_config_dict(config), "system_len": system_len},
        "machine": machine_info(config),
        "systems": {name: summarize(LABELS[name], runs[name], None).as_dict() for name in LABELS},
        "shared_hit_rate": hit / looked_up if looked_up else None,
        "ttft_cached_over_uncached": ttft_ratio("shared_cached", "shared_uncached"),
        "throughput_cached_over_uncached": median_ratio(runs["shared_cached"], runs["shared_uncached"]),
        "default_cached_over_uncached": median_ratio(runs["default_cached"], runs["default_uncached"]),
        "targets": TARGETS,
    }


def render_prefix(result: dict) -> str:
    from loraplex.server.bench.report import _ms

    config, machine = result["config"], result["machine"]
    shape = config["shape"]
    lines = [
        f"loraplex bench --shared-prefix: Llama {shape['hidden_size']} x {shape['num_layers']} layers, "
        f"{config['dtype']} on {config['device']} [{machine.get('gpu') or machine['cpu']}, {machine['cpu_count']} "
        f"cores, {machine['threads']} thread(s)]; {config['num_adapters']} adapters with a {config['system_len']}-token "
        f"system prompt each; batch {config['batch']} ({config['popularity']}), user turn {config['prompt_len']} "
        f"tokens, {config['new_tokens']} new tokens; median of {config['rounds']} rounds",
        "",
        "| system | tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for s in result["systems"].values():
        lines.append(f"| {s['name']} | {s['throughput_tok_s']:.1f} | {_ms(s['ttft_p50_s'])} | {_ms(s['ttft_p99_s'])} | "
                     f"{_ms(s['itl_p50_s'])} | {_ms(s['itl_p99_s'])} |")
    if result["shared_hit_rate"] is not None:
        lines += ["", f"(a) took {result['shared_hit_rate']:.0%} of its prompt tokens from the prefix cache"]
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    for key, label, at_most in (("ttft_cached_over_uncached", "(a)/(b) TTFT p50", True),
                                ("throughput_cached_over_uncached", "(a)/(b) throughput", False),
                                ("default_cached_over_uncached", "(c)/(d) throughput", False)):
        target, value = result["targets"][key], result[key]
        met = value <= target if at_most else value >= target
        lines.append(f"| {label} | {value:.2f} | {'<=' if at_most else '>='} {target:g} {'met' if met else 'MISSED'} |")
    return "\n".join(lines)
