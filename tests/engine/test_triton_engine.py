"""The whole engine through the Triton LoRA and attention kernels (interpreted on CPU, float32): a mixed
batch of the base model and every adapter type gives peft's greedy tokens."""

from __future__ import annotations

import pytest

from loraplex.kernels.triton import expand, shrink
from tests.engine_support import (PROMPTS, TYPE_CONFIGS, load_peft, make_adapter, make_engine, oracle, run_until_done,
                                  submit)

MAX_NEW = 4
KINDS = ("lora-mixed-ranks", "dora", "adalora", "ia3", "prefix", "prompt", "p-tuning")


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


def test_every_adapter_type_through_triton_attention_and_lora_kernels_matches_peft(
        demo_model_dir, tmp_path, monkeypatch, triton_backend):
    """Both Triton backends, one mixed batch of every adapter type (a prefix adapter's blocks shared
    by two requests), prefills chunked by a small token budget so chunks attend to cached context,
    block_size 4 so contexts end mid-block."""
    import peft

    from loraplex.server.config import SchedulerConfig
    from loraplex.server.model import attention

    monkeypatch.setitem(TYPE_CONFIGS, "lora-mixed-ranks", lambda: peft.LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
        rank_pattern={"q_proj": 2, "down_proj": 16, "layers.1.mlp.up_proj": 5}))

    monkeypatch.setenv(attention.BACKEND_ENV, "triton")
    calls = []
    kernel = attention.triton_paged_attention
    monkeypatch.setattr(attention, "triton_paged_attention",
                        lambda *args, **kwargs: calls.append(args[7]) or kernel(*args, **kwargs))
    adapters = {kind: make_adapter(demo_model_dir, tmp_path / kind, kind, seed=70 + i)
                for i, kind in enumerate(KINDS)}
    scheduler = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=24, max_adapters=8, max_model_len=2048)
    engine = make_engine(demo_model_dir, max_device_adapters=len(adapters), block_size=4, scheduler=scheduler)
    assert engine.runner.attention_backend == "triton"
    requests = [(None, 0), *((kind, 0) for kind in KINDS), ("prefix", 1)]
    expected = {}
    for name in (None, *KINDS):
        model = load_peft(demo_model_dir, adapters[name] if name else None)
        for p in {p for n, p in requests if n == name}:
            expected[(name, p)] = oracle(model, engine.tokenizer.encode(PROMPTS[p]), MAX_NEW, None)
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    results = {(name, p): submit(engine, f"r-{name}-{p}", PROMPTS[p], adapter=name, max_new_tokens=MAX_NEW,
                                 ignore_eos=True) for name, p in requests}
    run_until_done(engine)
    assert all(expected[(name, 0)][0] != expected[(None, 0)][0] for name in KINDS)  # each adapter changes the tokens
    assert max(calls) > 1 and min(calls) == 1  # chunked prefill steps and pure decode steps
    assert triton_backend["shrink"] > 0 and triton_backend["expand"] > 0
    for key, collected in results.items():
        tokens, logprobs = expected[key]
        assert collected.token_ids == tokens, key
        assert max(abs(a - b) for a, b in zip(collected.logprobs, logprobs)) < 1e-4, key
