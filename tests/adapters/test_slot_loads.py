"""The adapter store decides device residency and the runner copies: the copy runs outside the store's
lock, from a host tier already in the serving dtype; a copy that raises leaves the slot free."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.engine_support import PROMPTS, make_engine, make_lora_adapter, run_until_done, submit


@pytest.fixture
def engine_with_adapter(demo_model_dir, tmp_path):
    adapter = make_lora_adapter(demo_model_dir, tmp_path / "lora", seed=7, r=4, lora_alpha=8,
                                target_modules=["q_proj", "v_proj"])
    engine = make_engine(demo_model_dir, max_device_adapters=2)
    engine.register_adapter("a", str(adapter))
    return engine


def _lock_is_free(lock) -> bool:
    """Whether another thread could take `lock` now (an RLock is released by the thread that took it)."""
    free = []

    def probe():
        taken = lock.acquire(blocking=False)
        if taken:
            lock.release()
        free.append(taken)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return free[0]


def test_slot_copies_run_outside_the_store_lock(engine_with_adapter):
    engine = engine_with_adapter
    runner, store = engine.runner, engine.store
    copies = []
    load_slot = runner.load_slot

    def observed(slot, weights):
        copies.append((slot, _lock_is_free(store._lock), {w.a.dtype for w in weights.lora.values()}))
        return load_slot(slot, weights)

    runner.load_slot = observed
    request = submit(engine, "r", PROMPTS[0], adapter="a", max_new_tokens=3)
    run_until_done(engine)
    assert request.final.finish_reason == "length"
    assert copies == [(0, True, {runner.adapter_dtype})]
    assert store.get("a").state.value == "device" and store.loads["device"] == 1


def test_a_failed_copy_leaves_the_slot_free_and_the_next_step_loads_it(engine_with_adapter):
    engine = engine_with_adapter
    runner, store = engine.runner, engine.store
    load_slot = runner.load_slot
    calls = []

    def fails_once(slot, weights):
        calls.append(slot)
        if len(calls) == 1:
            raise RuntimeError("copy failed")
        return load_slot(slot, weights)

    runner.load_slot = fails_once
    first = submit(engine, "first", PROMPTS[0], adapter="a", max_new_tokens=4, ignore_eos=True)
    run_until_done(engine)  # alone in its step, the request the copy failed for ends (LLMEngine._isolate)
    assert first.final.finish_reason == "error" and store.get("a").state.value == "host"
    again = submit(engine, "again", PROMPTS[0], adapter="a", max_new_tokens=4, ignore_eos=True)
    run_until_done(engine)
    assert len(calls) == 2 and store.loads["device"] == 1 and store.get("a").state.value == "device"
    runner.load_slot = load_slot
    reference = submit(engine, "reference", PROMPTS[0], adapter="a", max_new_tokens=4, ignore_eos=True)
    run_until_done(engine)  # the slot is resident now: no copy
    assert again.final.finish_reason == "length" and again.token_ids == reference.token_ids


def test_the_host_tier_holds_the_serving_dtype(demo_model_dir, tmp_path):
    from loraplex.kernels.cpu import native

    if not native.available():
        pytest.skip(f"bfloat16 pools need the CPU LoRA kernel: {native.unavailable_reason()}")
    adapter = make_lora_adapter(demo_model_dir, tmp_path / "lora", seed=8, r=4, lora_alpha=8,
                                target_modules=["q_proj"])
    engine = make_engine(demo_model_dir, adapter_dtype="bfloat16")
    engine.register_adapter("a", str(adapter))
    weights = engine.store.host_weights(engine.store.acquire("a"))
    assert {t.dtype for w in weights.lora.values() for t in (w.a, w.b)} == {torch.bfloat16}
