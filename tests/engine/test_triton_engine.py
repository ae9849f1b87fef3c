"""The whole engine through the Triton LoRA kernels (interpreted on CPU, float32): a mixed batch of the
base model, LoRA with mixed ranks, DoRA, IA3 and prompt tuning gives peft's greedy tokens."""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels.triton import expand, shrink
from tests.engine.helpers import PROMPTS, load_peft, make_engine, oracle, run_until_done, submit
from tests.engine.test_adapter_types import TYPE_CONFIGS, make_adapter

MAX_NEW = 6
KINDS = ("lora-mixed-ranks", "dora", "ia3", "prompt")


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LORAPLEX_LORA_BACKEND", "triton")
    launches = {"shrink": 0, "expand": 0}
    for module, name in ((shrink, "triton_shrink"), (expand, "triton_expand")):
        launch = getattr(module, name)

        def counted(*args, _launch=launch, _kind=name.split("_")[1], **kwargs):
            launches[_kind] += 1
            return _launch(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return launches


def test_mixed_batch_through_the_triton_kernels_matches_peft(demo_model_dir, tmp_path, monkeypatch, triton_backend):
    import peft

    monkeypatch.setitem(TYPE_CONFIGS, "lora-mixed-ranks", lambda: peft.LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
        rank_pattern={"q_proj": 2, "down_proj": 16, "layers.1.mlp.up_proj": 5}))
    adapters = {kind: make_adapter(demo_model_dir, tmp_path / kind, kind, seed=50 + i) for i, kind in enumerate(KINDS)}
    engine = make_engine(demo_model_dir, max_device_adapters=len(adapters))
    prompt = engine.tokenizer.encode(PROMPTS[0])
    expected = {}
    for name in (None, *adapters):
        model = load_peft(demo_model_dir, adapters[name] if name else None)
        expected[name] = oracle(model, prompt, MAX_NEW, None)
    assert all(expected[name][0] != expected[None][0] for name in adapters)  # each adapter changes the tokens

    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    results = {name: submit(engine, f"r-{name}", PROMPTS[0], adapter=name, max_new_tokens=MAX_NEW, ignore_eos=True)
               for name in (None, *adapters)}
    run_until_done(engine)
    assert engine.num_steps <= MAX_NEW + 1  # one batch
    assert triton_backend["shrink"] > 0 and triton_backend["expand"] > 0
    for name, collected in results.items():
        tokens, logprobs = expected[name]
        assert collected.token_ids == tokens, name
        assert max(abs(a - b) for a, b in zip(collected.logprobs, logprobs)) < 1e-4, name
