"""Engine behaviour a user sees: continuous batching, eviction, preemption, hot register/unregister,
cancellation, sampling reproducibility, stop conditions and the errors for bad requests."""

from __future__ import annotations

import asyncio

import pytest

from loraplex.server.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied
from loraplex.server.engine.engine import AsyncEngine, GenerationRequest
from loraplex.server.config import AdapterConfig, CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from loraplex.server.model.sampling import SamplingParams
from tests.engine_support import PROMPTS, make_engine, make_lora_adapter, run_until_done, submit

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def four_adapters(demo_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        f"a{i}": make_lora_adapter(demo_model_dir, root / f"a{i}", seed=10 + i, r=4 + 2 * i, lora_alpha=8,
                                   target_modules=ALL_LINEAR if i % 2 else ["q_proj", "v_proj", "down_proj"])
        for i in range(4)
    }


def _workload(engine, adapters, max_new_tokens=8):
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    results = {}
    for i, prompt in enumerate(PROMPTS):
        for name in [None, *adapters]:
            results[(name, i)] = submit(engine, f"{name}-{i}", prompt, adapter=name, max_new_tokens=max_new_tokens,
                                        ignore_eos=True)
    run_until_done(engine)
    return {key: collected.token_ids for key, collected in results.items()}


@pytest.fixture(scope="module")
def unconstrained(demo_model_dir, four_adapters):
    return _workload(make_engine(demo_model_dir), four_adapters)


def test_more_adapters_than_device_slots_evicts_and_reloads(demo_model_dir, four_adapters, unconstrained):
    engine = make_engine(demo_model_dir, max_device_adapters=2, max_host_adapters=2)
    assert _workload(engine, four_adapters) == unconstrained
    assert engine.store.evictions["device"] > 0
    assert engine.store.evictions["host"] > 0  # host copies dropped and reloaded from disk by the worker
    assert engine.store.loads["host"] > len(four_adapters)


def test_kv_budget_below_the_load_preempts_and_keeps_outputs(demo_model_dir, four_adapters, unconstrained):
    engine = make_engine(demo_model_dir, kv_tokens=160, block_size=8)
    assert _workload(engine, four_adapters) == unconstrained
    assert engine.snapshot().num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.initial_free_blocks


def test_chunked_prefill_under_a_small_token_budget_keeps_outputs(demo_model_dir, four_adapters, unconstrained):
    scheduler = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=7, max_adapters=8, max_model_len=2048)
    engine = make_engine(demo_model_dir, scheduler=scheduler)
    assert _workload(engine, four_adapters) == unconstrained


def test_requests_arriving_while_others_decode_join_the_running_batch(demo_model_dir):
    engine = make_engine(demo_model_dir)
    first = submit(engine, "first", PROMPTS[0], max_new_tokens=20, ignore_eos=True)
    for _ in range(3):
        engine.step()
    assert len(first.outputs) == 3 and not first.outputs[-1].finished
    second = submit(engine, "second", PROMPTS[1], max_new_tokens=5, ignore_eos=True)
    stats = engine.step()
    assert stats.num_sequences == 2  # the newcomer's prefill rides along with the running decode
    assert len(first.outputs) == 4 and len(second.outputs) == 1
    run_until_done(engine)
    assert second.final.completion_tokens == 5 and first.final.completion_tokens == 20


def test_register_generate_unregister_while_another_adapter_runs(demo_model_dir, four_adapters, unconstrained):
    engine = make_engine(demo_model_dir)
    engine.register_adapter("a0", str(four_adapters["a0"]))
    engine.register_adapter("a1", str(four_adapters["a1"]))
    long_running = submit(engine, "a1-0", PROMPTS[0], adapter="a1", max_new_tokens=8, ignore_eos=True)
    leaving = submit(engine, "a0-0", PROMPTS[0], adapter="a0", max_new_tokens=8, ignore_eos=True)
    engine.step()
    engine.unregister_adapter("a0")  # its running request finishes, new ones are refused
    with pytest.raises(NotFound, match="'a0' is not registered"):
        submit(engine, "a0-late", PROMPTS[1], adapter="a0")
    assert [a.adapter_id for a in engine.list_adapters()] == ["a1"]
    engine.register_adapter("a2", str(four_adapters["a2"]))  # hot-load while a1 keeps decoding
    newcomer = submit(engine, "a2-0", PROMPTS[0], adapter="a2", max_new_tokens=8, ignore_eos=True)
    run_until_done(engine)
    assert leaving.token_ids == unconstrained[("a0", 0)]
    assert long_running.token_ids == unconstrained[("a1", 0)]
    assert newcomer.token_ids == unconstrained[("a2", 0)]
    engine.register_adapter("a0", str(four_adapters["a0"]))  # the id is free again
    with pytest.raises(AlreadyExists):
        engine.register_adapter("a0", str(four_adapters["a0"]))


def test_cancel_mid_generation_frees_blocks_and_adapter(demo_model_dir, four_adapters):
    engine = make_engine(demo_model_dir)
    engine.register_adapter("a0", str(four_adapters["a0"]))
    collected = submit(engine, "doomed", PROMPTS[2], adapter="a0", max_new_tokens=50, ignore_eos=True)
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.initial_free_blocks
    engine.abort("doomed")
    engine.step()
    assert collected.final.finish_reason == "cancelled"
    assert engine.block_manager.num_free_blocks == engine.initial_free_blocks
    engine.unregister_adapter("a0")  # no reference left: dropped at once
    assert engine.store.state_counts() == {}


def test_seeded_sampling_is_reproducible_whatever_else_is_in_the_batch(demo_model_dir):
    engine = make_engine(demo_model_dir)
    params = dict(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_new_tokens=12, ignore_eos=True)
    alone = submit(engine, "alone", PROMPTS[0], **params)
    run_until_done(engine)
    crowd = [submit(engine, f"other-{i}", p, temperature=0.7, max_new_tokens=6) for i, p in enumerate(PROMPTS)]
    again = submit(engine, "again", PROMPTS[0], **params)
    run_until_done(engine)
    assert again.token_ids == alone.token_ids
    other_seed = submit(engine, "other-seed", PROMPTS[0], **{**params, "seed": 99})
    run_until_done(engine)
    assert other_seed.token_ids != alone.token_ids
    assert all(c.final.finished for c in crowd)


def test_stop_strings_and_eos(demo_model_dir):
    engine = make_engine(demo_model_dir)
    probe = submit(engine, "probe", PROMPTS[3], max_new_tokens=12, ignore_eos=True)
    run_until_done(engine)
    text = probe.text
    assert text == engine.tokenizer.decode(probe.token_ids, skip_special_tokens=True)  # deltas add up
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"generated text too short to pick a stop string: {text!r}"
    stopped = submit(engine, "stopped", PROMPTS[3], max_new_tokens=12, stop=(stop,), ignore_eos=True)
    run_until_done(engine)
    assert stopped.final.finish_reason == "stop"
    assert stopped.text == text[: text.index(stop)]

    eos = engine.tokenizer.eos_token_id
    forced = submit(engine, "eos", [eos, eos, eos], max_new_tokens=30)  # EOS ends generation unless ignored
    run_until_done(engine)
    assert forced.final.finish_reason in ("eos", "length")
    if forced.final.finish_reason == "eos":
        assert forced.token_ids[-1] == eos and eos not in forced.token_ids[:-1]


def test_bad_requests_are_refused_with_their_cause(demo_model_dir):
    engine = make_engine(demo_model_dir, kv_tokens=64, block_size=16)
    with pytest.raises(InvalidArgument, match="prompt is empty"):
        submit(engine, "empty", "")
    with pytest.raises(InvalidArgument, match="outside the vocabulary"):
        submit(engine, "bad-ids", [1, 2, 10**6])
    with pytest.raises(InvalidArgument, match="context is 2048 tokens"):
        submit(engine, "long", [5] * 2048)
    with pytest.raises(InvalidArgument, match="whole KV cache has 4 blocks"):  # a retry can never fit
        submit(engine, "too-big-for-the-cache", [5] * 100, max_new_tokens=10)
    with pytest.raises(NotFound, match="'nope' is not registered"):
        submit(engine, "unknown", "hi", adapter="nope")
    with pytest.raises(InvalidArgument, match="temperature"):
        SamplingParams(temperature=-1)
    submit(engine, "dup", "hi", max_new_tokens=3)
    with pytest.raises(InvalidArgument, match="already in flight"):
        submit(engine, "dup", "hi")
    run_until_done(engine)
    assert engine.block_manager.num_free_blocks == engine.initial_free_blocks


def test_adapter_sources_must_stay_inside_the_adapter_root(demo_model_dir, four_adapters, tmp_path):
    root = four_adapters["a0"].parent
    engine = make_engine(demo_model_dir, adapter_root=root)
    engine.register_adapter("inside", "a0")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "link-out").symlink_to(outside)
    for source in ["../x", str(outside), "link-out", "a0/../../x"]:
        with pytest.raises(PermissionDenied, match="outside the adapter root"):
            engine.register_adapter("escape", source)
    with pytest.raises(InvalidArgument, match="adapter id"):
        engine.register_adapter("../bad id", "a1")


def test_async_engine_streams_and_cancels(demo_model_dir, four_adapters):
    config = EngineConfig(
        model=ModelConfig(path=demo_model_dir),
        cache=CacheConfig(num_tokens=4096),
        adapters=AdapterConfig(max_device_adapters=2, max_host_adapters=4),
    )
    engine = AsyncEngine(config).start()
    engine.engine.register_adapter("a1", str(four_adapters["a1"]))

    async def collect(request_id, adapter, n):
        request = GenerationRequest(request_id, prompt=PROMPTS[0], adapter_id=adapter,
                                    sampling=SamplingParams(max_new_tokens=n, ignore_eos=True))
        return [output async for output in engine.generate(request)]

    async def cancel_after_two():
        request = GenerationRequest("cancelled", prompt=PROMPTS[1], sampling=SamplingParams(max_new_tokens=500,
                                                                                           ignore_eos=True))
        seen = 0
        async for _ in engine.generate(request):
            seen += 1
            if seen == 2:
                break
        return seen

    async def main():
        return await asyncio.gather(collect("x", "a1", 6), collect("y", None, 4), cancel_after_two())

    try:
        with_adapter, base, seen = asyncio.run(main())
        assert [len(o.token_ids) for o in with_adapter] == [1] * 6 and with_adapter[-1].finish_reason == "length"
        assert len(base) == 4 and seen == 2
        for _ in range(200):  # the abort is applied by the engine thread's next step
            if engine.engine.block_manager.num_free_blocks == engine.engine.initial_free_blocks:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert engine.engine.block_manager.num_free_blocks == engine.engine.initial_free_blocks
    finally:
        engine.shutdown()


def test_close_waits_for_the_adapter_loader(demo_model_dir, four_adapters):
    """close() returns only after the loader thread has finished the adapter it was reading."""
    engine = make_engine(demo_model_dir, max_device_adapters=2, max_host_adapters=2)
    for name, path in four_adapters.items():
        engine.register_adapter(name, str(path))
    for i, name in enumerate(four_adapters):
        submit(engine, f"r{i}", PROMPTS[0], adapter=name, max_new_tokens=2)
    engine.step()  # the loader starts reading adapters in the background
    worker = engine.store._worker
    engine.close()
    assert not worker.is_alive()
