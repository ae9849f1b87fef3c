"""`loraplex bench` end to end on toy sizes: every mode runs, and its JSON carries the ratios.

Only the plumbing is checked (keys present, numbers positive); timings on a toy model mean nothing,
so nothing here asserts on speed.
"""

from __future__ import annotations

import json
import math

import pytest

from loraplex.server.cli import main

TINY = ["--hidden", "64", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--vocab", "300",
        "--prompt-len", "6", "--new-tokens", "3", "--rounds", "2", "--warmup", "0"]


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def run_bench(tmp_path, *args) -> dict:
    out = tmp_path / "result.json"
    assert main(["bench", *TINY, "--workdir", str(tmp_path / "work"), "--json", str(out), *args]) == 0
    return json.loads(out.read_text())


def test_local_bench_reports_every_system_and_ratio(tmp_path, capsys):
    result = run_bench(tmp_path, "--adapters", "4", "--batch", "3", "--ranks", "4,8", "--popularity", "zipf")
    for key in ("mixed_over_base", "mixed_over_peft", "base_over_hf", "peft_over_hf"):
        assert positive(result[key]), key
    assert set(result["systems"]) == {"mixed", "base", "peft", "hf"}
    for summary in result["systems"].values():
        assert len(summary["throughputs_tok_s"]) == 2
        assert all(positive(v) for v in (summary["throughput_tok_s"], summary["ttft_p50_s"],
                                           summary["itl_p99_s"], summary["peak_memory_bytes"]))
    assert positive(result["systems"]["mixed"]["decode_step_p50_s"])
    assert result["targets"] is None  # not the CPU target workload
    assert result["machine"]["cpu_count"] >= 1
    table = capsys.readouterr().out
    assert "(a)/(b) mixed_over_base" in table and "(d) transformers generate" in table

    again = run_bench(tmp_path, "--adapters", "4", "--batch", "3", "--ranks", "4,8", "--no-peft", "--no-hf")
    assert positive(again["mixed_over_base"]) and again["mixed_over_peft"] is None  # reused the workdir


def test_json_to_stdout_keeps_stdout_parseable(tmp_path, capsys):
    assert main(["bench", *TINY, "--workdir", str(tmp_path), "--adapters", "2", "--batch", "2", "--no-hf",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert positive(result["mixed_over_base"]) and positive(result["mixed_over_peft"])


def test_scale_bench_swaps_adapters_through_few_slots(tmp_path):
    result = run_bench(tmp_path, "--scale", "--scale-adapters", "12", "--scale-slots", "2", "--scale-host", "4",
                       "--scale-requests", "10", "--scale-concurrency", "4", "--scale-hidden", "64",
                       "--scale-layers", "1", "--scale-rank", "2")
    assert positive(result["swapped_over_resident"])
    assert result["loads"]["device"]["per_run"] > 0 and positive(result["loads"]["device"]["p50_s"])
    assert positive(result["register"]["p99_s"]) and result["disk_bytes"] > 0


def test_grpc_bench_drives_a_running_server(tmp_path, demo_model_dir):
    from loraplex.server.api.config import ServerConfig
    from loraplex.server.bench.workload import ALL_PROJECTIONS, build_adapters
    from tests.api.helpers import ServerThread, engine_config

    paths = build_adapters(demo_model_dir, tmp_path / "adapters", [4, 4], ALL_PROJECTIONS)
    config = ServerConfig(engine=engine_config(demo_model_dir), port=0, metrics_port=0,
                          adapters=tuple((f"x{i}", str(path)) for i, path in enumerate(paths)), warmup=False)
    server = ServerThread(config).start()
    try:
        result = run_bench(tmp_path, "--grpc", server.address, "--batch", "2", "--popularity", "uniform")
    finally:
        server.stop()
    assert positive(result["mixed_over_base"]) and result["mixed_over_peft"] is None
    assert result["config"]["adapters_used"] == 2  # found through ListAdapters
