"""The runner's lean forward (server/decoder.py) against the transformers forward it replaces: the
same greedy tokens and logprobs for every supported architecture, with and without the C kernels,
in batches that mix adapters, prefills and decodes; anything else keeps the transformers forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraplex.kernels import native
from loraplex.server.decoder import DecoderForward
from tests.engine.helpers import PROMPTS, make_engine, make_lora_adapter, run_until_done, submit

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
        monkeypatch.setattr(native, "takes_float32", lambda *tensors: False)
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
    assert DecoderForward.create(model) is not None

    class OtherMLP(nn.Module):
        def forward(self, x):
            return x

    model.model.layers[1].mlp = OtherMLP()
    assert DecoderForward.create(model) is None
