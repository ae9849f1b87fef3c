"""A step that raises ends only the requests that cause it: faults injected into one adapter's layer
and into one request, in mixed batches, leave every other request with the tokens it gets without them."""

from __future__ import annotations

import logging
import re

import pytest

from loraplex.server.adapters.store import AdapterState
from loraplex.server.errors import FailedPrecondition
from tests.engine_support import PROMPTS, make_engine, make_lora_adapter, run_until_done, submit

POISON = 2047
"""A token id whose embedding lookup the request-fault test makes fail."""


@pytest.fixture(scope="module")
def adapters(demo_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return {name: make_lora_adapter(demo_model_dir, root / name, seed=40 + i, r=4, lora_alpha=8,
                                    target_modules=["q_proj", "v_proj", "down_proj"])
            for i, name in enumerate(("good0", "good1", "bad"))}


@pytest.fixture
def engine(demo_model_dir, adapters):
    engine = make_engine(demo_model_dir, max_device_adapters=3)
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    yield engine
    engine.close()


def _survivors(engine, tag):
    """Requests of both good adapters and the base model, one of them sampled with a seed."""
    requests = {(name, p): submit(engine, f"{tag}-{name}-{p}", PROMPTS[p], adapter=name, max_new_tokens=6,
                                  ignore_eos=True)
                for p in (0, 1) for name in (None, "good0", "good1")}
    requests["sampled"] = submit(engine, f"{tag}-sampled", PROMPTS[3], adapter="good0", max_new_tokens=6,
                                 ignore_eos=True, temperature=0.9, seed=7)
    return requests


def _tokens(requests):
    return {key: collected.token_ids for key, collected in requests.items()}


def _clean_run(engine):
    requests = _survivors(engine, "clean")
    run_until_done(engine)
    return _tokens(requests)


def _fault_in_layer(engine, adapter_id, after_steps):
    """Make layer 2's down_proj raise in every step holding the adapter after its first `after_steps`:
    by then layers 0-2 have written this step's KV entries of every sequence."""
    store = engine.store
    module = engine.runner.model.model.layers[2].mlp.down_proj
    forward = module.forward
    steps = [0]

    def faulty(x):
        meta = module.group.context.meta
        key = store._current.get(adapter_id)
        slot = key is not None and store._entries[key].slot
        if meta is not None and slot in meta.token_slots[:meta.num_tokens].tolist():
            steps[0] += 1
            if steps[0] > after_steps:
                raise RuntimeError(f"injected fault in {adapter_id}'s layer")
        return forward(x)

    module.forward = faulty
    return lambda: setattr(module, "forward", forward)


ERROR_ID = re.compile(r"error id ([0-9a-f]{16})")


def _logged_cause(caplog, message: str) -> str:
    """The exception logged under the error id that `message` quotes (the client sees only the id)."""
    error_id = ERROR_ID.search(message).group(1)
    records = [r for r in caplog.records if error_id in r.getMessage() and r.exc_info]
    assert records, message
    return repr(records[0].exc_info[1])


def test_a_failing_adapter_ends_only_its_requests_and_is_quarantined(engine, adapters, caplog):
    caplog.set_level(logging.ERROR)
    restore = _fault_in_layer(engine, "bad", after_steps=3)
    clean = _clean_run(engine)  # without the failing adapter: the reference
    assert engine.num_step_failures == 0

    survivors = _survivors(engine, "mixed")
    bad = [submit(engine, f"bad-{p}", PROMPTS[p], adapter="bad", max_new_tokens=6, ignore_eos=True) for p in (0, 2)]
    run_until_done(engine)
    assert _tokens(survivors) == clean  # the failed runs left no trace in the KV cache or the sampler
    for collected in bad:
        final = collected.final
        assert final.finish_reason == "error" and final.error.code == "INTERNAL"
        assert "adapter 'bad' failed in the engine step" in str(final.error)
        assert "injected fault" not in str(final.error) and "quarantined" not in str(final.error)
        assert "injected fault" in _logged_cause(caplog, str(final.error))
        assert collected.token_ids  # it failed mid-generation, after producing tokens
    assert engine.num_step_failures >= 1
    assert engine.get_adapter("bad").state is not AdapterState.QUARANTINED  # one failure may be a bad request

    again = submit(engine, "bad-again", PROMPTS[1], adapter="bad", max_new_tokens=6, ignore_eos=True)
    run_until_done(engine)
    assert "it is now quarantined" in str(again.final.error)
    info = engine.get_adapter("bad")
    assert info.state is AdapterState.QUARANTINED and ERROR_ID.search(info.quarantine_reason)
    assert "injected fault" in _logged_cause(caplog, info.quarantine_reason)
    assert [a.state for a in engine.list_adapters() if a.adapter_id == "bad"] == [AdapterState.QUARANTINED]
    assert engine.snapshot().adapters_by_state["quarantined"] == 1
    with pytest.raises(FailedPrecondition, match="adapter 'bad' is quarantined.*register it again"):
        submit(engine, "refused", PROMPTS[0], adapter="bad")
    assert engine.block_manager.num_free_blocks == engine.initial_free_blocks

    restore()  # the operator fixes the adapter and registers it again
    engine.unregister_adapter("bad")
    engine.register_adapter("bad", str(adapters["bad"]))
    assert engine.get_adapter("bad").state is AdapterState.HOST
    served = submit(engine, "served", PROMPTS[0], adapter="bad", max_new_tokens=4)
    run_until_done(engine)
    assert served.final.error is None and len(served.token_ids) == 4


def test_a_failing_request_ends_alone_and_its_adapter_is_not_blamed(engine, caplog):
    caplog.set_level(logging.ERROR)
    embed = engine.runner.model.model.embed_tokens
    forward = embed.forward

    def faulty(ids):
        if (ids == POISON).any():
            raise ValueError("injected fault in one request's input")
        return forward(ids)

    embed.forward = faulty
    clean = _clean_run(engine)
    survivors = _survivors(engine, "mixed")
    poisoned = submit(engine, "poisoned", [5, POISON, 9], adapter="good1", max_new_tokens=6)
    run_until_done(engine)
    assert _tokens(survivors) == clean
    error = poisoned.final.error
    assert poisoned.final.finish_reason == "error" and poisoned.token_ids == []
    assert "this request (adapter 'good1') failed in the engine step" in str(error)
    assert "injected" in _logged_cause(caplog, str(error))
    key = engine.store._current["good1"]
    assert engine.store._entries[key].failures == 0  # other good1 requests ran: the request was the cause
    assert engine.block_manager.num_free_blocks == engine.initial_free_blocks


def test_a_step_of_one_failing_request_ends_it(engine):
    runner = engine.runner
    execute = runner.execute
    runner.execute = lambda inputs, attach=None: (_ for _ in ()).throw(RuntimeError("injected"))
    failing = submit(engine, "alone", PROMPTS[0])
    run_until_done(engine)
    assert "this request (the base model) failed" in str(failing.final.error)
    runner.execute = execute
    after = submit(engine, "after", PROMPTS[0], max_new_tokens=3)
    run_until_done(engine)
    assert len(after.token_ids) == 3
