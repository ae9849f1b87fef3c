"""`benchmarks/gpu_check.py --smoke`: every section of the prepared GPU check runs on CPU (tiny shapes,
float32, Triton interpreter), so its logic cannot rot before a GPU runs it; what needs CUDA says so."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
NEEDS_CUDA = "skipped: needs CUDA"


@pytest.fixture
def gpu_check(monkeypatch):
    """The script as a module, run in this process (what `python benchmarks/gpu_check.py --smoke` runs,
    without a second interpreter's imports); --smoke's settings are restored afterwards."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up there
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the script sets it to 1 on import; restored afterwards
    spec.loader.exec_module(module)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LORAPLEX_LORA_BACKEND", "triton")
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # --smoke runs single-threaded; the rest of the suite does not


def run_smoke(gpu_check, monkeypatch, out: Path, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--smoke", "--json", str(out), *args])
    return gpu_check.main()


def test_smoke_runs_every_section(gpu_check, monkeypatch, tmp_path):
    out = tmp_path / "result.json"
    code = run_smoke(gpu_check, monkeypatch, out)
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert code == 0, {name: section.get("traceback") for name, section in sections.items()}
    assert list(sections) == ["preflight", "kernels", "attention", "engine", "nf4", "decode", "load", "train"]
    assert all(section["status"] == "ok" for section in sections.values())
    assert report["environment"]["smoke"] is True
    assert list(report)[0] == "sections"
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set by the script before transformers was imported

    preflight = sections["preflight"]
    for check in ("c_compiler", "python_h", "accelerate"):
        assert preflight[check]["ok"] is True and preflight[check]["missing"] is None
    assert Path(preflight["c_compiler"]["path"]).is_file() and Path(preflight["python_h"]["path"]).is_file()
    assert preflight["missing"] == []

    kernels = sections["kernels"]
    assert kernels["cases"] and all(case["ok"] for case in kernels["cases"])
    assert kernels["cuda_graph"] == NEEDS_CUDA
    attention = sections["attention"]
    assert attention["cases"] and all(case["ok"] for case in attention["cases"])
    assert attention["kernel_s"] > 0 and attention["torch_path_s"] > 0 and attention["kv_bytes"] > 0
    assert attention["fraction_of_copy_bandwidth"] > 0  # interpreted on CPU: a number, not a measurement
    engine = sections["engine"]
    assert set(engine["adapters"]) == {"base", "lora", "dora", "adalora", "ia3", "prefix", "prompt", "p-tuning"}
    for row in engine["adapters"].values():  # float32: the mixed batch is peft's forward and each request alone
        assert row["max_logprob_diff_vs_peft"] <= engine["tolerance"] and row["token_agreement_vs_peft"] == 1.0
        assert row["first_diff_vs_alone"] is None
    nf4 = sections["nf4"]
    assert nf4["worst_logprob_diff"] <= nf4["tolerance"] and nf4["prefill_peak_bytes_above_resident"] == NEEDS_CUDA
    decode = sections["decode"]
    assert decode["decode_steps_timed"] > 0 and decode["step_s_median"] > 0 and decode["floor_s"] > 0
    assert decode["base_bytes"] > 0 and decode["adapter_bytes"] > 0
    assert decode["base_step_s_median"] > 0 and decode["mixed8_over_base_throughput"] > 0
    assert decode["decode_graphs"] is False  # CPU: every step eager
    assert decode["kernel_launches_per_step"] == NEEDS_CUDA and decode["gpu_busy_fraction"] == NEEDS_CUDA
    assert decode["profiled_step_s"] > 0  # the profiled decode step ran
    assert sections["load"]["load_s_median"] > 0 and sections["load"]["pcie_gb_s"] == NEEDS_CUDA
    assert 0 < sections["load"]["load_slot_returns_s_median"] <= sections["load"]["load_s_median"]
    for method in ("qlora", "dora"):
        trained = sections["train"][method]
        assert trained["loss_falls"] and trained["served_tokens"] > 0 and trained["token_agreement_vs_peft"] == 1.0


def test_a_failing_section_is_recorded_and_the_next_runs(gpu_check, monkeypatch, tmp_path):
    def broken(ctx):
        raise RuntimeError("planted failure")

    out = tmp_path / "result.json"
    monkeypatch.setattr(gpu_check, "SECTIONS", (("kernels", broken), ("load", gpu_check.section_load)))
    assert run_smoke(gpu_check, monkeypatch, out) == 1
    sections = json.loads(out.read_text())["sections"]
    assert sections["kernels"]["status"] == "error" and "planted failure" in sections["kernels"]["traceback"]
    assert sections["load"]["status"] == "ok"
    assert list(sections) == ["preflight", "kernels", "load"]  # preflight runs whatever the sections


def test_preflight_says_plainly_what_is_missing(gpu_check, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate raises ImportError
    preflight = gpu_check.section_preflight(None)
    assert preflight["ok"] is False and preflight["python_h"]["ok"] is True
    assert not preflight["c_compiler"]["ok"] and not preflight["accelerate"]["ok"]
    assert len(preflight["missing"]) == 2
    assert "no C compiler" in preflight["missing"][0] and "Triton launch on CUDA fails" in preflight["missing"][0]
    assert "accelerate does not import" in preflight["missing"][1] and "nf4" in preflight["missing"][1]


def test_without_cuda_the_full_run_refuses_and_points_to_smoke(monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    run = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--smoke" in run.stderr
