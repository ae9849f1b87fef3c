"""Batch invariance: where the server promises it (float32 on CPU; int8 with outlier threshold 0), a
request gives the same tokens alone and in a mixed concurrent burst, for every quantization mode and
adapter type; DoRA on an int8 base (registered after the base has run) matches peft.

The base model's MLP is rescaled (up_proj x20, down_proj /20: the same function) so that down_proj's
inputs have columns above LLM.int8's usual outlier threshold in some rows and not others, as large
models do; with the threshold at 6.0, bursts of these requests change each other's logprobs by ~1e-2
(and tokens, given longer outputs).
"""

from __future__ import annotations

import pytest
import torch

from loraplex.server.model import quantization
from tests.engine_support import (PROMPTS, TYPE_CONFIGS, load_peft, make_adapter, make_engine, oracle, run_until_done,
                                  submit)

MAX_NEW = 4


@pytest.fixture(scope="module")
def outlier_model_dir(demo_model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("outliers")
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.mul_(20.0)
            layer.mlp.down_proj.weight.div_(20.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(demo_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(outlier_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("invariance")
    return {kind: make_adapter(outlier_model_dir, root / kind, kind, seed=50 + i)
            for i, kind in enumerate(TYPE_CONFIGS)}


def _requests(engine, tag):
    """Every adapter type and the base model (prompts of two lengths), plus one seeded sampled request."""
    requests = {(name, p): submit(engine, f"{tag}-{name}-{p}", PROMPTS[p], adapter=name, max_new_tokens=MAX_NEW,
                                  ignore_eos=True)
                for i, name in enumerate((None, *TYPE_CONFIGS)) for p in [(0, 3)[i % 2]]}
    requests["sampled"] = submit(engine, f"{tag}-sampled", PROMPTS[1], adapter="lora", max_new_tokens=MAX_NEW,
                                 ignore_eos=True, temperature=1.0, seed=3)
    return requests


@pytest.mark.parametrize("quantization", ["none", "nf4", "int8"])
def test_alone_and_in_a_mixed_burst_give_the_same_tokens(outlier_model_dir, adapters, quantization):
    engine = make_engine(outlier_model_dir, quantization=quantization, max_device_adapters=len(adapters))
    assert engine.config.model.batch_invariant
    warm_up = submit(engine, "warm-up", PROMPTS[2], max_new_tokens=2)
    run_until_done(engine)  # adapters registered after the base ran (DoRA reads the int8 weights then)
    assert warm_up.final.error is None
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    alone = {}
    burst = _requests(engine, "burst")
    steps = run_until_done(engine)
    assert steps <= MAX_NEW + 1  # one batch: every request ran in the same steps
    for key in burst:
        name, p = key if key != "sampled" else ("lora", 1)
        sampling = {"temperature": 1.0, "seed": 3} if key == "sampled" else {}
        single = submit(engine, f"alone-{key}", PROMPTS[p], adapter=name, max_new_tokens=MAX_NEW, ignore_eos=True,
                        **sampling)
        run_until_done(engine)
        alone[key] = single
    for key, collected in burst.items():
        assert collected.final.error is None, key
        assert collected.token_ids == alone[key].token_ids, f"{quantization}: {key} differs alone and in the burst"
        # float32 sums may round differently with the batch (~1e-6); LLM.int8's outliers move them ~1e-2
        drift = max(abs(a - b) for a, b in zip(collected.logprobs, alone[key].logprobs))
        assert drift < 1e-4, f"{quantization}: {key}'s logprobs move by {drift} with the batch"
    assert len({tuple(c.token_ids) for c in burst.values()}) > 2  # the adapters change the outputs


def test_dora_on_an_int8_base_matches_peft(outlier_model_dir, adapters, monkeypatch):
    """Registered after the int8 base has run; peft's own int8 dequantization breaks such a layer, so
    the oracle is peft's DoRA with the server's dequantization."""
    import peft.tuners.lora.dora as peft_dora

    engine = make_engine(outlier_model_dir, quantization="int8")
    submit(engine, "warm-up", PROMPTS[0], max_new_tokens=2)
    run_until_done(engine)
    engine.register_adapter("dora", str(adapters["dora"]))
    served = submit(engine, "dora", PROMPTS[0], adapter="dora", max_new_tokens=MAX_NEW, ignore_eos=True)
    run_until_done(engine)
    monkeypatch.setattr(peft_dora, "dequantize_module_weight", quantization.dequantized_weight)
    model = load_peft(outlier_model_dir, adapters["dora"], "int8")
    tokens, logprobs = oracle(model, engine.tokenizer.encode(PROMPTS[0]), MAX_NEW, None)
    assert served.token_ids == tokens
    assert max(abs(a - b) for a, b in zip(served.logprobs, logprobs)) < 1e-3
