"""The demo model: real transformers checkpoints and tokenizer, deterministic, loadable in NF4."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from loraplex.server.cli import main
from loraplex.server.demo.model import SPEC_FILE, build_demo_model


def _digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_round_trip_through_from_pretrained(demo_model_factory, arch):
    path = demo_model_factory(arch)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == arch
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert 2e6 < sum(p.numel() for p in model.parameters()) < 10e6

    text = "Q: Where do fish live?\nA: In the sea — café naïve €5."
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text  # byte-level BPE: lossless, multi-byte characters included
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))
    assert torch.isfinite(logits).all()


def test_same_seed_same_files_and_other_seed_differs(tmp_path):
    first = build_demo_model(tmp_path / "a", seed=3, pretrain_steps=2, log=lambda *_: None)
    second = build_demo_model(tmp_path / "b", seed=3, pretrain_steps=2, log=lambda *_: None)
    other = build_demo_model(tmp_path / "c", seed=4, pretrain_steps=2, log=lambda *_: None)
    assert _digest(first) == _digest(second)
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    assert _digest(first) != _digest(other)
    info = json.loads((first / SPEC_FILE).read_text())
    assert info["seed"] == 3 and info["pretrain_steps"] == 2


def test_loads_in_nf4_on_cpu(demo_model_dir):
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, quantization_config=quantization, device_map="cpu")
    reference = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit"
    ids = torch.tensor([[5, 17, 99, 200, 3]])
    quantized, exact = model(ids).logits, reference(ids).logits
    assert torch.isfinite(quantized).all()
    # NF4 is lossy but close: the logits track the float32 model's.
    assert torch.nn.functional.cosine_similarity(quantized.flatten(), exact.flatten(), dim=0) > 0.95


def test_pretraining_lowers_the_loss(tmp_path):
    path = build_demo_model(tmp_path / "m", pretrain_steps=40, log=lambda *_: None)
    info = json.loads((path / SPEC_FILE).read_text())
    vocab = AutoTokenizer.from_pretrained(path).vocab_size
    import math

    assert info["pretrain_final_loss"] < math.log(vocab) - 1.0  # well below a uniform guess


def test_cli_refuses_an_existing_output_directory(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("precious")
    assert main(["demo-model", "--out", str(tmp_path), "--pretrain-steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and "--overwrite" in err and "Traceback" not in err
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_cli_rejects_negative_pretrain_steps(tmp_path, capsys):
    assert main(["demo-model", "--out", str(tmp_path / "x"), "--pretrain-steps", "-1"]) == 2
    assert "--pretrain-steps must be >= 0" in capsys.readouterr().err
