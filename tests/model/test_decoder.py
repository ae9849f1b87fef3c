"""The runner's lean forward (server/model/decoder.py) against the transformers forward it replaces: the
same greedy tokens and logprobs for every supported architecture, with and without the C kernels,
in batches that mix adapters, prefills and decodes; anything else keeps the transformers forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraplex.kernels.backend import Backend
from loraplex.kernels.cpu import native
from loraplex.server.model.decoder import DecoderForward
from tests.engine_support import PROMPTS, make_engine, make_lora_adapter, run_until_done, submit

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _generate(engine, adapter_dir, lean: bool):
    if not lean:
        engine.runner.decoder = None
    engine.register_adapter("a", str(adapter_dir))
    # staggered lengths: later steps mix decodes with prefills; every other request on the adapter
    results = [submit(engine, f"r{i}", PROMPTS[i], adapter="a" if i % 2 else None, max_new_tokens=6 + i,
                      ignore_eos=True) for i in range(len(PROMPTS))]
    run_until_done(engine)
    return [(r.token_ids, r.logprobs) for r in results]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("kernels", [True, False], ids=["c", "torch"])
def test_lean_forward_matches_the_transformers_forward(demo_model_factory, tmp_path, monkeypatch, arch, kernels):
    if not kernels:
        monkeypatch.setattr(native, "available", lambda: False)  # the runner picks the torch backend
    base_dir = demo_model_factory(arch)
    adapter = make_lora_adapter(base_dir, tmp_path / "a", seed=11, r=8, lora_alpha=16, target_modules=ALL_LINEAR)
    lean_engine = make_engine(base_dir)
    assert lean_engine.runner.decoder is not None
    lean = _generate(lean_engine, adapter, lean=True)
    reference = _generate(make_engine(base_dir), adapter, lean=False)
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(lean, reference):
        assert tokens == ref_tokens
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref_logprobs), rtol=1e-4, atol=1e-4)


def test_unknown_layers_keep_the_transformers_forward(demo_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    assert DecoderForward.create(model, Backend("cpu", torch.float32)) is not None

    class OtherMLP(nn.Module):
        def forward(self, x):
            return x

    model.model.layers[1].mlp = OtherMLP()
    assert DecoderForward.create(model, Backend("cpu", torch.float32)) is None


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_sliding_window_models_match_the_transformers_oracle(demo_model_factory, tmp_path, arch):
    """A window shorter than the prompts: Mistral names it in its config only, Qwen2 on each attention
    module (and only for the layers past max_window_layers)."""
    import json
    import shutil

    from tests.engine_support import load_peft, oracle

    base_dir = tmp_path / arch
    shutil.copytree(demo_model_factory(arch), base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    config["sliding_window"] = 6
    if arch == "qwen2":
        config["use_sliding_window"], config["max_window_layers"] = True, 1
        config.pop("layer_types", None)
    (base_dir / "config.json").write_text(json.dumps(config))
    engine = make_engine(base_dir)
    model = load_peft(base_dir, None)
    if arch == "qwen2":
        assert [layer.self_attn.sliding_window for layer in model.model.layers][:2] == [None, 6]
    for lean in (True, False):
        if not lean:
            engine.runner.decoder = None
        results = {p: submit(engine, f"{lean}-{p}", PROMPTS[p], max_new_tokens=8, ignore_eos=True) for p in (0, 2)}
        run_until_done(engine)
        for p, collected in results.items():
            tokens, logprobs = oracle(model, engine.tokenizer.encode(PROMPTS[p]), 8, None)
            assert collected.token_ids == tokens, (lean, p)
            assert max(abs(a - b) for a, b in zip(collected.logprobs, logprobs)) < 1e-4
