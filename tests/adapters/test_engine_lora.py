"""peft is the oracle: a mixed batch of the base model and LoRA adapters gives each request exactly the
greedy tokens of peft's PeftModel for that adapter alone (float32), with logprobs within 1e-4."""

from __future__ import annotations

import pytest

from tests.engine_support import PROMPTS, load_peft, make_engine, make_lora_adapter, oracle, run_until_done, submit

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    # name: LoraConfig kwargs — different ranks, alphas, rsLoRA, patterns and target sets
    "r8-all": dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR),
    "r4-attn": dict(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
    "r16-rslora-mlp": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "r2-patterns": dict(
        r=2, lora_alpha=4, target_modules=["k_proj", "o_proj", "down_proj"],
        rank_pattern={"layers.1.self_attn.o_proj": 6}, alpha_pattern={"down_proj": 3},
    ),
}
MAX_NEW = 10


@pytest.fixture(scope="module")
def adapters(demo_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-adapters")
    return {name: make_lora_adapter(demo_model_dir, root / name, seed=i, **kw)
            for i, (name, kw) in enumerate(ADAPTERS.items())}


def _expected(base_dir, adapters, tokenizer, quantization="none"):
    """peft's greedy tokens/logprobs for every (adapter, prompt) of the mixed batch, each alone."""
    expected = {}
    for name in [None, *adapters]:
        model = load_peft(base_dir, adapters[name] if name else None, quantization)
        for p, prompt in enumerate(PROMPTS):
            ids = tokenizer.encode(prompt)
            expected[(name, p)] = oracle(model, ids, MAX_NEW, None)
    return expected


def _run_mixed(engine, adapters):
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    results = {}
    for name in [None, *adapters]:
        for p, prompt in enumerate(PROMPTS):
            results[(name, p)] = submit(engine, f"{name}-{p}", prompt, adapter=name, max_new_tokens=MAX_NEW,
                                        ignore_eos=True)
    run_until_done(engine)
    return results


def _assert_match(results, expected):
    for key, collected in results.items():
        tokens, logprobs = expected[key]
        assert collected.final.finish_reason == "length"
        assert collected.token_ids == tokens, f"tokens differ for {key}"
        assert max(abs(a - b) for a, b in zip(collected.logprobs, logprobs)) < 1e-4, f"logprobs differ for {key}"


def test_mixed_batch_matches_peft_per_adapter(demo_model_dir, adapters):
    engine = make_engine(demo_model_dir)
    expected = _expected(demo_model_dir, adapters, engine.tokenizer)
    # the adapters really change the output, so matching is not trivial
    for name in adapters:
        assert any(expected[(name, p)][0] != expected[(None, p)][0] for p in range(len(PROMPTS))), name
    results = _run_mixed(engine, adapters)
    _assert_match(results, expected)
    assert engine.block_manager.num_free_blocks == engine.initial_free_blocks


def test_mixed_batch_on_nf4_base_matches_peft_on_the_same_4bit_base(demo_model_dir, adapters):
    engine = make_engine(demo_model_dir, quantization="nf4")
    expected = _expected(demo_model_dir, adapters, engine.tokenizer, quantization="nf4")
    results = _run_mixed(engine, adapters)
    _assert_match(results, expected)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
def test_other_architectures_match_peft(demo_model_factory, tmp_path, arch):
    base_dir = demo_model_factory(arch)
    chosen = {name: ADAPTERS[name] for name in ("r8-all", "r4-attn")}
    adapters = {name: make_lora_adapter(base_dir, tmp_path / name, seed=7, **kw) for name, kw in chosen.items()}
    engine = make_engine(base_dir)
    expected = {}
    for name in [None, *adapters]:
        model = load_peft(base_dir, adapters[name] if name else None)
        for p in (0, 2):
            expected[(name, p)] = oracle(model, engine.tokenizer.encode(PROMPTS[p]), MAX_NEW, None)
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    results = {key: submit(engine, f"{key[0]}-{key[1]}", PROMPTS[key[1]], adapter=key[0], max_new_tokens=MAX_NEW,
                           ignore_eos=True) for key in expected}
    run_until_done(engine)
    _assert_match(results, expected)


def test_bfloat16_adapter_storage_matches_peft_on_the_rounded_weights(demo_model_dir, adapters):
    """--adapter-dtype bfloat16 rounds each LoRA weight to bfloat16 once and computes in float32: the
    mixed batch equals peft running the same adapters with their weights rounded the same way."""
    import torch

    from loraplex.kernels.cpu import native

    if not native.available():
        pytest.skip(f"C kernel unavailable: {native.unavailable_reason()}")
    engine = make_engine(demo_model_dir, adapter_dtype="bfloat16")
    pool = next(iter(engine.runner.lora_table.values())).group.pool
    assert pool.a.dtype == torch.bfloat16 and pool.b_t.dtype == torch.bfloat16
    expected = {}
    for name in [None, *adapters]:
        model = load_peft(demo_model_dir, adapters[name] if name else None)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_" in param_name:
                    param.copy_(param.bfloat16().float())
        for p, prompt in enumerate(PROMPTS):
            expected[(name, p)] = oracle(model, engine.tokenizer.encode(prompt), MAX_NEW, None)
    _assert_match(_run_mixed(engine, adapters), expected)


def test_bfloat16_adapter_storage_is_refused_off_float32_cpu(demo_model_dir):
    from loraplex.server.config import AdapterConfig, CacheConfig, EngineConfig, ModelConfig
    from loraplex.server.engine.engine import LLMEngine

    config = EngineConfig(model=ModelConfig(path=demo_model_dir, dtype="bfloat16", device="cpu"),
                          cache=CacheConfig(num_tokens=256), adapters=AdapterConfig(dtype="bfloat16"))
    with pytest.raises(ValueError, match="is for a float32 model on CPU, got --dtype bfloat16 on cpu"):
        LLMEngine(config)
    with pytest.raises(ValueError, match="adapter dtype must be one of"):
        AdapterConfig(dtype="float16")
