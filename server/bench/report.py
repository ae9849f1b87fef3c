"""What `loraplex bench` prints: the tables, the machine it ran on, and the bandwidth floor of a decode step."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraplex.server.bench.config import BenchConfig


def bandwidth_floor(config: BenchConfig, system, adapters: dict[str, Path], summaries: dict) -> dict:
    """Decode step time against the time to stream its bytes once at the measured copy bandwidth.

    Bytes per decode step: the base model's weights as stored, plus every distinct adapter of the
    step once (its own rank, in the serving dtype). KV-cache reads are left out (small here).
    """
    import torch

    base = system.model_bytes()
    stored = config.dtype if config.adapter_dtype == "auto" else config.adapter_dtype
    element = torch.finfo(getattr(torch, stored)).bits // 8
    per_adapter = [adapter_elements(path) * element for path in adapters.values()]
    distinct = min(config.batch, len(adapters)) if config.popularity == "distinct" else None
    adapter_bytes = sum(sorted(per_adapter)[:distinct]) if distinct else None
    bandwidth = copy_bandwidth(torch.device(config.device))
    floor_base = base / bandwidth
    mixed_step = summaries["mixed"]["decode_step_p50_s"]
    base_step = summaries["base"]["decode_step_p50_s"]
    result = {
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "base_weight_bytes": base,
        "adapter_bytes_per_decode_step": adapter_bytes,
        "floor_base_s": floor_base,
        "base_decode_step_s": base_step,
        "base_step_over_floor": base_step / floor_base if base_step else None,
    }
    if adapter_bytes is not None:
        floor_mixed = (base + adapter_bytes) / bandwidth
        result.update(floor_mixed_s=floor_mixed, mixed_decode_step_s=mixed_step,
                      mixed_step_over_floor=mixed_step / floor_mixed if mixed_step else None)
    return result


def adapter_elements(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            count = 1
            for dim in shape:
                count *= dim
            total += count
    return total


def copy_bandwidth(device, nbytes: int = 256 * 2**20) -> float:
    """Bytes moved per second (read + write) by a large tensor copy, best of 5."""
    import torch

    from loraplex.server.bench.measure import now, synchronize

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        synchronize(device)
        start = now()
        dst.copy_(src)
        synchronize(device)
        best = min(best, now() - start)
    return 2 * nbytes / best


def machine_info(config: BenchConfig) -> dict:
    import torch

    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}
    if config.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(config.device))
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def render(result: dict) -> str:
    config, machine = result["config"], result["machine"]
    shape = config["shape"]
    where = machine.get("gpu") or f"{machine['cpu']}, {machine['cpu_count']} cores, {machine['threads']} thread(s)"
    lines = [
        f"loraplex bench ({result['mode']}): Llama {shape['hidden_size']} x {shape['num_layers']} layers, "
        f"{config['dtype']}, quantization {config['quantization']}, on {config['device']} [{where}]"
        + (f"; loraplex stores adapters in {config['adapter_dtype']}" if config.get("adapter_dtype", "auto") != "auto"
           else ""),
        f"{config['num_adapters']} adapters, ranks {','.join(map(str, config['ranks']))}, on "
        f"{','.join(t.replace('_proj', '') for t in config['targets'])}; popularity {config['popularity']}; "
        f"batch {config['batch']}, prompt {config['prompt_len']}, {config['new_tokens']} new tokens; "
        f"median of {config['rounds']} rounds",
        "",
        "| system | tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) | peak mem (MiB) | decode step p50 (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for summary in result["systems"].values():
        lines.append(
            f"| {summary['name']} | {summary['throughput_tok_s']:.1f} | {_ms(summary['ttft_p50_s'])} | "
            f"{_ms(summary['ttft_p99_s'])} | {_ms(summary['itl_p50_s'])} | {_ms(summary['itl_p99_s'])} | "
            f"{_mib(summary['peak_memory_bytes'])} | {_ms(summary['decode_step_p50_s'])} |")
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    targets = result.get("targets") or {}
    for key, label in (("mixed_over_base", "(a)/(b) mixed_over_base"), ("mixed_over_peft", "(a)/(c) mixed_over_peft"),
                       ("base_over_hf", "(b)/(d) base_over_hf"), ("peft_over_hf", "(c)/(d) peft_over_hf")):
        if result.get(key) is not None:
            target = targets.get(key)
            mark = "" if target is None else (f">= {target:g} " + ("met" if result[key] >= target else "MISSED"))
            lines.append(f"| {label} | {result[key]:.2f} | {mark} |")
    floor = result.get("bandwidth")
    if floor:
        lines.append("")
        text = (f"copy bandwidth {floor['copy_bandwidth_gb_s']:.1f} GB/s; base weights {floor['base_weight_bytes'] / 2**20:.0f} MiB"
                f" -> floor {floor['floor_base_s'] * 1e3:.2f} ms/step, base decode step x{_x(floor['base_step_over_floor'])}")
        if floor.get("floor_mixed_s") is not None:
            text += (f"; + {floor['adapter_bytes_per_decode_step'] / 2**20:.0f} MiB of adapters -> floor "
                     f"{floor['floor_mixed_s'] * 1e3:.2f} ms/step, mixed decode step x{_x(floor['mixed_step_over_floor'])}")
        lines.append(text)
    return "\n".join(lines)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render_scale(result: dict) -> str:
    config, machine = result["config"], result["machine"]
    lines = [
        f"loraplex bench --scale: Llama {config['hidden_size']} x {config['num_layers']} layers, "
        f"{config['num_adapters']} registered rank-{config['rank']} adapters (all 7 projections), zipf s={config['zipf_s']}; "
        f"{config['requests']} requests, {config['concurrency']} running at once, prompt {config['prompt_len']}, "
        f"{config['new_tokens']} new tokens; median of {config['rounds']} rounds [{machine['cpu']}, "
        f"{machine['cpu_count']} cores, {machine['threads']} thread(s)]",
        "",
        "| engine | device slots | host tier | tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in ("swapping", "resident"):
        s = result["systems"][key]
        lines.append(f"| {s['name']} | {s['slots']} | {s['host']} | {s['throughput_tok_s']:.1f} | {_ms(s['ttft_p50_s'])} | "
                     f"{_ms(s['ttft_p99_s'])} | {_ms(s['itl_p50_s'])} | {_ms(s['itl_p99_s'])} |")
    lines += ["", f"swapping / all-resident throughput: {result['swapped_over_resident']:.2f} (target >= 0.7: "
                  f"{'met' if result['swapped_over_resident'] >= 0.7 else 'MISSED'})", "",
              "| adapter load | count per run | p50 (ms) | p99 (ms) |", "|---|---|---|---|"]
    for tier, label in (("host", "disk -> host memory (read, validate, convert)"),
                        ("device", "host -> device slot (copy into the pools)")):
        loads = result["loads"][tier]
        lines.append(f"| {label} | {loads['per_run']:.0f} | {_ms(loads['p50_s'])} | {_ms(loads['p99_s'])} |")
    lines.append(f"\nregistration of {config['num_adapters']} adapters: p50 {_ms(result['register']['p50_s'])} ms, "
                 f"p99 {_ms(result['register']['p99_s'])} ms; {result['disk_bytes'] / 2**20:.0f} MiB on disk")
    return "\n".join(lines)
