"""Units: tokenisation with completion-only labels, batching, TrainConfig, target detection, seeds."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import torch

from loraplex.server.errors import UserError
from loraplex.server.train import TrainConfig, train
from loraplex.server.train.data import IGNORE_INDEX, Example, collate, encode, encode_prompt, load_examples
from loraplex.server.train.progress import Progress

from .conftest import write_jsonl


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir)


def test_prompt_tokens_carry_no_loss_and_eos_ends_the_completion(tokenizer):
    prompt, completion = "Q: Where do fish live?\nA:", " In the sea!"
    (item,) = encode([Example(prompt, completion, "x:1")], tokenizer, 512)
    prompt_ids = encode_prompt(tokenizer, prompt)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    assert item.input_ids == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert item.labels == [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [tokenizer.eos_token_id]


def test_text_examples_learn_every_token(tokenizer):
    (item,) = encode([Example("", "Fish live in the sea.", "x:1")], tokenizer, 512)
    assert item.labels == item.input_ids and item.input_ids[-1] == tokenizer.eos_token_id


def test_long_examples_are_cut_at_max_length(tokenizer):
    prompt = "Q: Where do fish live?\nA:"
    n_prompt = len(encode_prompt(tokenizer, prompt))
    (item,) = encode([Example(prompt, " In the deep blue sea, far away!", "x:1")], tokenizer, n_prompt + 3)
    assert len(item.input_ids) == len(item.labels) == n_prompt + 3
    assert item.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and IGNORE_INDEX not in item.labels[n_prompt:]


def test_collate_right_pads_with_no_loss_on_padding():
    from loraplex.server.train.data import Encoded

    batch = collate([Encoded([5, 6, 7], [IGNORE_INDEX, 6, 7]), Encoded([8], [8])], pad_id=1, device="cpu")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_loader_skips_blank_lines_and_ignores_extra_keys(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"prompt": "a", "completion": "b", "id": 7}\n\n{"prompt": "", "completion": "c"}')
    examples = load_examples(path)
    assert [(e.prompt, e.completion, e.where) for e in examples] == [("a", "b", f"{path}:2"), ("", "c", f"{path}:4")]


def test_config_is_frozen_and_fills_method_defaults(tmp_path):
    config = TrainConfig(model=str(tmp_path), method="lora", data="d.jsonl", out="o", target_modules="q_proj, v_proj")
    assert config.model == tmp_path and config.data == Path("d.jsonl")
    assert config.target_modules == ("q_proj", "v_proj")
    assert (config.lora_rank, config.lora_alpha, config.lora_dropout, config.learning_rate) == (8, 16, 0.05, 1e-3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rank = 4
    assert TrainConfig(model="m", method="lora", data="d", out="o", rank=4).lora_alpha == 8
    assert TrainConfig(model="m", method="adalora", data="d", out="o").lora_alpha == 16
    assert TrainConfig(model="m", method="prefix", data="d", out="o").virtual_tokens == 20
    with pytest.raises(UserError, match="unknown method 'lokr'"):
        TrainConfig(model="m", method="lokr", data="d", out="o")


@pytest.mark.parametrize(
    "epochs,max_steps,expected",
    [(None, None, 3 * 5), (2, None, 2 * 5), (None, 7, 7), (2, 7, 7), (1, 7, 5)],
)
def test_total_steps(epochs, max_steps, expected):
    config = TrainConfig(model="m", method="lora", data="d", out="o", epochs=epochs, max_steps=max_steps)
    assert config.total_steps(steps_per_epoch=5) == expected


def test_default_targets_are_the_decoder_linears(demo_model_dir):
    from transformers import AutoModelForCausalLM

    from loraplex.server.train.methods import decoder_linear_names, mlp_down_projections

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    assert decoder_linear_names(model) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert mlp_down_projections(model) == ["down_proj"]


def _adapter_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


def test_same_seed_same_adapter_other_seed_other_adapter(demo_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "Fish live in the sea."}, {"text": "The sky is blue."}])
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / name
        train(TrainConfig(model=demo_model_dir, method="lora", data=data, out=out, max_steps=3, batch_size=1, seed=seed, quiet=True))
        runs[name] = _adapter_tensors(tmp_path / name)
    assert runs["a"].keys() == runs["c"].keys()
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def test_rslora_and_rank_reach_the_adapter_config(demo_model_dir, tmp_path):
    import json

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "Fish live in the sea."}])
    out = tmp_path / "a"
    options = {"rank": 4, "alpha": 12, "rslora": True, "target_modules": ("q_proj", "v_proj")}
    train(TrainConfig(model=demo_model_dir, method="lora", data=data, out=out, max_steps=1, quiet=True, **options))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 12, True)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert _adapter_tensors(out)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 4


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_one_line_on_a_terminal_and_prints_tenths_elsewhere():
    terminal = _Terminal()
    bar = Progress(50, stream=terminal)
    for step in range(1, 51):
        bar.update(step, 1, 2.0 - step / 100)
    bar.close()
    text = terminal.getvalue()
    assert text.count("\r") == 50 and text.endswith("\n") and text.count("\n") == 1
    assert "50/50 epoch 1 loss 1.5450" in text  # running mean of the last 10 losses

    log = io.StringIO()
    bar = Progress(50, stream=log)
    for step in range(1, 51):
        bar.update(step, 1, 1.0)
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1].startswith("train [########################] 50/50")

    silent = io.StringIO()
    bar = Progress(50, enabled=False, stream=silent)
    bar.update(1, 1, 1.0)
    bar.close()
    assert silent.getvalue() == ""
