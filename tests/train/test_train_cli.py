"""`loraplex train` through the real CLI entry point: a run that works, and every bad input ending in
one line `loraplex train: error: ...`, exit status 2 and no traceback."""

from __future__ import annotations

import json

import pytest
import torch

from loraplex.server.cli import main

from .conftest import PAIRS, write_jsonl


def run(capsys, *args):
    code = main(["train", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(capsys, args, *fragments):
    code, out, err = run(capsys, *args)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loraplex train: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def base_args(demo_model_dir, pairs_file, tmp_path):
    """Arguments of a valid run, to which each test adds one mistake."""
    return ["--model", demo_model_dir, "--data", pairs_file, "--out", tmp_path / "adapter"]


# A run that works, its progress bar and summary, and --overwrite.


def test_train_writes_adapter_progress_and_summary(capsys, base_args, tmp_path):
    code, out, err = run(capsys, *base_args, "--method", "lora", "--max-steps", 3, "--batch-size", 2)
    assert code == 0, err
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    summary = json.loads((adapter / "training_summary.json").read_text())
    assert summary["method"] == "lora" and summary["steps"] == 3 and summary["epochs"] == 1.5
    assert summary["examples"] == len(PAIRS) and summary["eval_loss"] is None
    assert "trained lora adapter" in out and f"{summary['trainable_params']:,} trainable" in out
    progress = [line for line in err.splitlines() if line.startswith("train [")]
    assert progress and progress[-1].startswith("train [########################] 3/3 epoch 2 loss ")


def test_quiet_hides_progress_and_overwrite_replaces(capsys, base_args, tmp_path):
    args = [*base_args, "--method", "ia3", "--max-steps", 2, "--quiet"]
    code, out, err = run(capsys, *args)
    assert code == 0 and "train [" not in err and "trained ia3 adapter" in out

    assert_user_error(capsys, args, "output directory", "exists and is not empty; pass --overwrite")

    (tmp_path / "adapter" / "notes.txt").write_text("mine")
    code, out, err = run(capsys, *base_args, "--method", "lora", "--max-steps", 2, "--quiet", "--overwrite")
    assert code == 0, err
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert (tmp_path / "adapter" / "notes.txt").read_text() == "mine"  # only adapter files are replaced


# Missing or wrong paths.


def test_missing_model_dir(capsys, base_args, tmp_path):
    args = [*base_args, "--method", "lora"]
    args[1] = tmp_path / "nowhere"
    assert_user_error(capsys, args, "model directory not found:", "nowhere")


def test_model_dir_without_config(capsys, base_args, tmp_path):
    args = [*base_args, "--method", "lora"]
    args[1] = tmp_path
    assert_user_error(capsys, args, "is not a model directory: it has no config.json")


def test_missing_data_file(capsys, base_args, tmp_path):
    args = [*base_args, "--method", "lora"]
    args[3] = tmp_path / "missing.jsonl"
    assert_user_error(capsys, args, "--data file not found:", "missing.jsonl")


def test_missing_eval_file(capsys, base_args, tmp_path):
    assert_user_error(capsys, [*base_args, "--method", "lora", "--eval-data", tmp_path / "e.jsonl"], "--eval-data file not found")


def test_out_is_a_file(capsys, base_args, tmp_path):
    (tmp_path / "adapter").write_text("x")
    assert_user_error(capsys, [*base_args, "--method", "lora"], "--out exists and is not a directory")


def test_out_is_the_model_dir(capsys, base_args, demo_model_dir):
    args = [*base_args, "--method", "lora", "--overwrite"]
    args[5] = demo_model_dir
    assert_user_error(capsys, args, "--out is the model directory")


# Malformed data: the file, the line and what is wrong.

# case: (lines of the file, message after "<file>")
BAD_DATA = {
    "not_json": (
        ['{"prompt": "a", "completion": "b"}', '{"prompt": "a" "completion": "b"}'],
        ":2: not valid JSON: Expecting ',' delimiter at column 16",
    ),
    "not_object": (['["prompt", "completion"]'], ":1: expected a JSON object, got an array"),
    "no_schema": (
        ['{"prompt": "a", "completion": "b"}', "", '{"question": "a", "answer": "b"}'],
        ':3: expected {"prompt": ..., "completion": ...} or {"text": ...}, got keys: "question", "answer"',
    ),
    "mixed_in_line": (
        ['{"prompt": "a", "completion": "b", "text": "c"}'],
        ':1: mixes "text" with "prompt"/"completion"',
    ),
    "mixed_in_file": (
        ['{"text": "a b c"}', '{"prompt": "a", "completion": "b"}'],
        ':2: a {"prompt", "completion"} example, but line 1 is {"text"}; use one schema per file',
    ),
    "no_completion": (['{"prompt": "a"}'], ':1: has no "completion"'),
    "not_string": (['{"prompt": "a", "completion": 3}'], ':1: "completion" must be a string, got a number'),
    "empty_completion": (['{"prompt": "a", "completion": ""}'], ':1: "completion" is empty'),
    "empty_text": (['{"text": ""}'], ':1: "text" is empty'),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_malformed_data(case, capsys, base_args, tmp_path):
    lines, message = BAD_DATA[case]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    args = [*base_args, "--method", "lora"]
    args[3] = path
    assert_user_error(capsys, args, f"{path}{message}")


def test_malformed_eval_data_names_that_file(capsys, base_args, tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{oops}\n')
    assert_user_error(capsys, [*base_args, "--method", "lora", "--eval-data", path], f"{path}:2: not valid JSON")


def test_invalid_utf8(capsys, base_args, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    args = [*base_args, "--method", "lora"]
    args[3] = path
    assert_user_error(capsys, args, f"{path}:2: not valid UTF-8")


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_dataset(content, capsys, base_args, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    args = [*base_args, "--method", "lora"]
    args[3] = path
    assert_user_error(capsys, args, f"data file {path} has no examples")


def test_prompt_longer_than_max_length(capsys, base_args, tmp_path):
    args = [*base_args, "--method", "lora", "--max-length", 4]
    args[3] = write_jsonl(tmp_path / "long.jsonl", PAIRS[:1])
    assert_user_error(
        capsys, args, f"{args[3]}:1: the prompt is", "tokens, which leaves no room for the completion within --max-length 4"
    )


# Options that do not fit the method, and bad values.

MISFITS = [
    ("ia3", ["--rank", "4"], "--rank does not apply to --method ia3"),
    ("prefix", ["--rank", "4"], "--rank does not apply to --method prefix"),
    ("prompt", ["--rank", "4"], "--rank does not apply to --method prompt"),
    ("adalora", ["--rank", "4"], "use --adalora-init-r and --adalora-target-r"),
    ("prompt", ["--alpha", "8"], "--alpha does not apply to --method prompt"),
    ("ia3", ["--dropout", "0.1"], "--dropout does not apply to --method ia3"),
    ("p-tuning", ["--rslora"], "--rslora does not apply to --method p-tuning"),
    ("prefix", ["--target-modules", "q_proj"], "--target-modules does not apply to --method prefix"),
    ("lora", ["--feedforward-modules", "down_proj"], "--feedforward-modules does not apply to --method lora"),
    ("lora", ["--num-virtual-tokens", "8"], "--num-virtual-tokens does not apply to --method lora"),
    ("qlora", ["--num-virtual-tokens", "8"], "--num-virtual-tokens does not apply to --method qlora"),
    ("prompt", ["--prefix-projection"], "--prefix-projection does not apply to --method prompt"),
    ("dora", ["--adalora-init-r", "8"], "--adalora-init-r does not apply to --method dora"),
]


@pytest.mark.parametrize("method,extra,message", MISFITS, ids=[f"{m}{e[0]}" for m, e, _ in MISFITS])
def test_option_does_not_fit_method(method, extra, message, capsys, base_args):
    assert_user_error(capsys, [*base_args, "--method", method, *extra], message)


BAD_VALUES = [
    ("lora", ["--rank", "0"], "--rank must be a positive integer, got 0"),
    ("lora", ["--alpha", "-1"], "--alpha must be a positive number, got -1.0"),
    ("lora", ["--dropout", "1.5"], "--dropout must be at least 0 and below 1, got 1.5"),
    ("lora", ["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    ("lora", ["--max-steps", "-3"], "--max-steps must be a positive integer, got -3"),
    ("lora", ["--lr", "0"], "--lr must be a positive number, got 0.0"),
    ("lora", ["--lr", "nan"], "--lr must be a positive number, got nan"),
    ("lora", ["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    ("lora", ["--max-length", "1"], "--max-length must be at least 2 tokens, got 1"),
    ("lora", ["--seed", "-1"], "--seed must be a non-negative integer, got -1"),
    ("lora", ["--target-modules", ","], "--target-modules needs at least one layer name"),
    ("prompt", ["--num-virtual-tokens", "0"], "--num-virtual-tokens must be a positive integer, got 0"),
    (
        "adalora",
        ["--adalora-init-r", "4", "--adalora-target-r", "6"],
        "--adalora-target-r (6) must not exceed --adalora-init-r (4)",
    ),
    (
        "ia3",
        ["--target-modules", "q_proj", "--feedforward-modules", "down_proj"],
        "--feedforward-modules down_proj must also be in --target-modules",
    ),
]


@pytest.mark.parametrize("method,extra,message", BAD_VALUES, ids=[f"{m}{e[0]}={e[1]}" for m, e, _ in BAD_VALUES])
def test_bad_value(method, extra, message, capsys, base_args):
    assert_user_error(capsys, [*base_args, "--method", method, *extra], message)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_unknown_target_module(method, capsys, base_args):
    assert_user_error(
        capsys,
        [*base_args, "--method", method, "--target-modules", "q_proj,qkv_proj"],
        "--target-modules: the model has no linear layer named 'qkv_proj'",
        "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
    )


def test_ia3_feedforward_module_not_adapted(capsys, base_args):
    assert_user_error(
        capsys,
        [*base_args, "--method", "ia3", "--feedforward-modules", "lm_head"],
        "--feedforward-modules lm_head must be among the adapted layers (q_proj, k_proj",
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(capsys, base_args):
    args = [*base_args, "--method", "lora", "--device", "cuda"]
    assert_user_error(capsys, args, "--device cuda, but no CUDA device is available")
    args = [*base_args, "--method", "lora", "--device", "cuda:1"]
    assert_user_error(capsys, args, "--device cuda:1, but no CUDA device is available")


def test_device_spelling_is_checked(capsys, base_args):
    for device in ("gpu", "cuda:", "cuda:x", "cpu:0"):
        args = [*base_args, "--method", "lora", "--device", device]
        assert_user_error(capsys, args, f"--device must be auto, cpu, cuda or cuda:N, got '{device}'")


def test_argparse_rejects_unknown_method_and_non_numbers(capsys, base_args):
    for extra in (["--method", "lokr"], ["--method", "lora", "--rank", "eight"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", *map(str, base_args), *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "loraplex train: error: argument" in err
