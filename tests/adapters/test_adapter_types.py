"""Every PEFT adapter type, alone and side by side in one mixed batch, against peft's forward pass.

The oracle is greedy decoding through `PeftModel`'s forward with the whole sequence recomputed each
step (peft 0.21's `generate` drops prefix-tuning prefixes and drifts for prompt/P-tuning, so it is
not the reference for those types). Float32; tokens must be equal, logprobs within 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.server.train.config import TrainConfig
from loraplex.server.train.trainer import train
from tests.engine_support import (PROMPTS, TYPE_CONFIGS, load_peft, make_adapter, make_engine, oracle, run_until_done,
                                  submit)

MAX_NEW = 8


def _expected(base_dir, adapters, tokenizer, prompts, quantization="none"):
    expected = {}
    for name in [None, *adapters]:
        model = load_peft(base_dir, adapters[name] if name else None, quantization)
        for p in prompts:
            expected[(name, p)] = oracle(model, tokenizer.encode(PROMPTS[p]), MAX_NEW, None)
    return expected


def _serve(engine, adapters, prompts, register=True):
    if register:
        for name, path in adapters.items():
            engine.register_adapter(name, str(path))
    results = {(name, p): submit(engine, f"{name}-{p}", PROMPTS[p], adapter=name, max_new_tokens=MAX_NEW,
                                 ignore_eos=True)
               for p in prompts for name in [None, *adapters]}
    run_until_done(engine)
    return results


def _assert_match(results, expected):
    for key, collected in results.items():
        tokens, logprobs = expected[key]
        assert collected.token_ids == tokens, f"tokens differ for {key}"
        error = max(abs(a - b) for a, b in zip(collected.logprobs, logprobs))
        assert error < 1e-4, f"logprobs differ by {error} for {key}"


@pytest.fixture(scope="module")
def peft_adapters(demo_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("types")
    return {kind: make_adapter(demo_model_dir, root / kind, kind, seed=i) for i, kind in enumerate(TYPE_CONFIGS)}


@pytest.fixture(scope="module")
def expected_llama(demo_model_dir, peft_adapters):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    return _expected(demo_model_dir, peft_adapters, tokenizer, prompts=(0, 2))


@pytest.mark.parametrize("kind", list(TYPE_CONFIGS))
def test_each_type_alone_matches_peft(demo_model_dir, peft_adapters, expected_llama, kind):
    # the adapter changes the output, so agreement is not trivial
    assert any(expected_llama[(kind, p)][0] != expected_llama[(None, p)][0] for p in (0, 2)), kind
    engine = make_engine(demo_model_dir)
    engine.register_adapter(kind, str(peft_adapters[kind]))
    results = {(kind, p): submit(engine, f"{kind}-{p}", PROMPTS[p], adapter=kind, max_new_tokens=MAX_NEW,
                                 ignore_eos=True) for p in (0, 2)}
    run_until_done(engine)
    _assert_match(results, expected_llama)
    info = engine.get_adapter(kind)
    assert info.size_bytes > 0
    if kind.startswith(("prefix", "prompt", "p-tuning")):
        assert info.num_virtual_tokens == TYPE_CONFIGS[kind]().num_virtual_tokens
    engine.unregister_adapter(kind)
    engine.step()  # the step thread owns the blocks: it frees an unused adapter's prefix blocks
    assert engine.block_manager.num_free_blocks == engine.initial_free_blocks


def test_every_type_in_one_mixed_batch_matches_peft(demo_model_dir, peft_adapters, expected_llama):
    engine = make_engine(demo_model_dir, max_device_adapters=len(peft_adapters))
    _assert_match(_serve(engine, peft_adapters, prompts=(0, 2)), expected_llama)
    assert engine.num_steps <= MAX_NEW + 1  # one batch: every request ran in the same steps


def test_mixed_batch_on_qwen2_with_biases(demo_model_factory, tmp_path):
    base_dir = demo_model_factory("qwen2")  # q/k/v carry a bias: DoRA must keep it out of its row scaling
    adapters = {kind: make_adapter(base_dir, tmp_path / kind, kind, seed=30 + i) for i, kind in enumerate(TYPE_CONFIGS)}
    engine = make_engine(base_dir, max_device_adapters=len(adapters))
    expected = _expected(base_dir, adapters, engine.tokenizer, prompts=(1,))
    _assert_match(_serve(engine, adapters, prompts=(1,)), expected)


def test_mixed_batch_on_an_nf4_base_matches_peft_on_the_same_4bit_base(demo_model_dir, peft_adapters):
    engine = make_engine(demo_model_dir, quantization="nf4", max_device_adapters=len(peft_adapters))
    expected = _expected(demo_model_dir, peft_adapters, engine.tokenizer, prompts=(0,), quantization="nf4")
    _assert_match(_serve(engine, peft_adapters, prompts=(0,)), expected)


def test_requests_of_one_prefix_adapter_share_its_blocks(demo_model_dir, peft_adapters):
    engine = make_engine(demo_model_dir, block_size=8, prefix_caching=False)  # shared even without caching
    engine.register_adapter("prefix", str(peft_adapters["prefix-projection"]))  # 20 virtual tokens: 3 blocks
    first = submit(engine, "first", PROMPTS[0], adapter="prefix", max_new_tokens=MAX_NEW, ignore_eos=True)
    engine.step()  # writes the prefix KV; the blocks are then in the cache
    second = submit(engine, "second", PROMPTS[0], adapter="prefix", max_new_tokens=MAX_NEW, ignore_eos=True)
    engine.step()
    bm = engine.block_manager
    seqs = [engine._sequences["first"], engine._sequences["second"]]
    shared = seqs[0].block_table[:3]
    assert seqs[1].block_table[:3] == shared
    assert all(bm.ref_count(block) == 2 for block in shared)
    own = {block for seq in seqs for block in seq.block_table[3:]}
    assert bm.num_used_blocks == len(shared) + len(own)  # the prefix is stored once
    assert bm.num_cached_blocks == 3  # caching is off: the prompt's blocks are not kept
    run_until_done(engine)
    assert first.token_ids == second.token_ids
    engine.unregister_adapter("prefix")
    engine.step()
    assert bm.num_free_blocks == engine.initial_free_blocks


@pytest.fixture(scope="module")
def trained_adapters(demo_model_dir, tmp_path_factory):
    """Adapters of every method made by `loraplex train` (a few steps on the pirate examples)."""
    from importlib import resources

    data = Path(str(resources.files("loraplex.server.data").joinpath("pirate.jsonl")))
    root = tmp_path_factory.mktemp("trained")
    methods = {"lora": {}, "qlora": {}, "dora": {}, "adalora": {}, "ia3": {}, "prefix": {}, "prompt": {},
               "p-tuning": {}}
    adapters = {}
    for method, extra in methods.items():
        out = root / method
        train(TrainConfig(model=demo_model_dir, method=method, data=data, out=out, max_steps=6, batch_size=4,
                          lr=5e-2, quiet=True, **extra))
        adapters[method] = out
    return adapters


def test_adapters_made_by_loraplex_train_match_peft_alone_and_mixed(demo_model_dir, trained_adapters):
    engine = make_engine(demo_model_dir, max_device_adapters=len(trained_adapters))
    expected = _expected(demo_model_dir, trained_adapters, engine.tokenizer, prompts=(0,))
    _assert_match(_serve(engine, trained_adapters, prompts=(0,)), expected)
    for name in trained_adapters:
        alone = submit(engine, f"alone-{name}", PROMPTS[0], adapter=name, max_new_tokens=MAX_NEW, ignore_eos=True)
        run_until_done(engine)
        assert alone.token_ids == expected[(name, 0)][0], name


def test_idle_prefix_blocks_stay_cached_until_requests_need_the_kv_cache(demo_model_dir, peft_adapters):
    """An idle prefix adapter's KV stays in the prefix cache, counted as free (an idle server reads 0),
    and is evicted as soon as requests need its blocks."""
    engine = make_engine(demo_model_dir, block_size=8, kv_tokens=64)  # 8 blocks
    engine.register_adapter("prefix", str(peft_adapters["prefix-projection"]))  # 20 virtual tokens: 3 blocks
    first = submit(engine, "prefix-request", [5, 6, 7], adapter="prefix", max_new_tokens=4, ignore_eos=True)
    run_until_done(engine)
    bm = engine.block_manager
    assert bm.num_cached_blocks == 3 and bm.num_free_blocks == engine.initial_free_blocks
    assert engine.snapshot().kv_cache_usage == 0
    # 48 prompt tokens + 8 new: 7 blocks, more than the 5 beside the cached prefix
    base = submit(engine, "base", list(range(10, 58)), max_new_tokens=8, ignore_eos=True)
    assert run_until_done(engine, max_steps=200) < 200
    assert base.final.finish_reason == "length" and len(base.token_ids) == 8
    assert bm.num_free_blocks == engine.initial_free_blocks and bm.num_evictions >= 2
    # the adapter still works: its prefix is written again on its next request
    again = submit(engine, "prefix-again", [5, 6, 7], adapter="prefix", max_new_tokens=4, ignore_eos=True)
    run_until_done(engine)
    assert again.final.finish_reason == "length" and again.token_ids == first.token_ids


@pytest.mark.parametrize("block_size", [1, 4])
def test_prefix_cache_hits_give_the_cold_and_peft_outputs_for_every_type(demo_model_dir, peft_adapters,
                                                                          expected_llama, block_size):
    """The base model, then every type in one batch, run one prompt three times: a shorter warm-up (which
    must not hit the blocks other adapters computed for the same tokens), the prompt with a hit ending
    mid-prompt, and the prompt with every block cached (with block size 1: all but its last token).
    Tokens and logprobs stay those of peft, as for the cold runs."""
    engine = make_engine(demo_model_dir, block_size=block_size, kv_tokens=4096,
                         max_device_adapters=len(peft_adapters))
    for name, path in peft_adapters.items():
        engine.register_adapter(name, str(path))
    prompt = engine.tokenizer.encode(PROMPTS[2])

    def run(case, names, max_new_tokens=MAX_NEW, ids=prompt):
        before = engine.snapshot().prefix_cache_hits
        results = {name: submit(engine, f"{case}-{name}", list(ids), adapter=name, max_new_tokens=max_new_tokens,
                                ignore_eos=True) for name in names}
        run_until_done(engine)
        after = engine.snapshot().prefix_cache_hits
        return results, {name: after.get(name, 0) - before.get(name, 0) for name in names}

    for names in ([None], list(peft_adapters)):
        _, hits = run("warm", names, max_new_tokens=2, ids=prompt[:-6])
        assert not any(hits.values()), hits  # the base model's blocks of the same tokens are not theirs
        mid, hits = run("mid", names)
        assert all(0 < n <= len(prompt) - 5 for n in hits.values()), hits
        full, hits = run("full", names)
        if block_size == 1:
            assert all(n == len(prompt) - 1 for n in hits.values()), hits
        for results in (mid, full):
            _assert_match({(name, 2): collected for name, collected in results.items()}, expected_llama)
    assert engine.snapshot().kv_cache_usage == 0 and engine.block_manager.num_cached_blocks > 0


def test_a_re_registered_adapter_never_hits_its_predecessors_blocks(demo_model_dir, peft_adapters, expected_llama):
    engine = make_engine(demo_model_dir, block_size=4)
    engine.register_adapter("x", str(peft_adapters["lora"]))
    submit(engine, "old", PROMPTS[2], adapter="x", max_new_tokens=MAX_NEW, ignore_eos=True)
    run_until_done(engine)
    engine.unregister_adapter("x")
    engine.register_adapter("x", str(peft_adapters["dora"]))  # same id, other weights
    new = submit(engine, "new", PROMPTS[2], adapter="x", max_new_tokens=MAX_NEW, ignore_eos=True)
    run_until_done(engine)
    snapshot = engine.snapshot()
    assert snapshot.prefix_cache_hits["x"] == 0 and snapshot.prefix_cache_queries["x"] > 0
    _assert_match({("dora", 2): new}, expected_llama)
