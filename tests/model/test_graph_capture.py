"""The decode CUDA graphs, captured on CPU as op recordings (tests/model/graph_record.py) on a fresh
engine with no adapter, then replayed for every adapter type loaded afterwards.

What a captured graph runs is fixed at capture: any Python branch on state that changes later (which
tables exist, which kinds are loaded, a buffer that grows) makes the replayed step differ from an eager
one. The model runs the plain torch backend with the per-token gathering LoRA op and the torch decode
attention, whose work is all aten ops (the Triton kernels' graph safety is checked on a GPU by
benchmarks/gpu_check.py)."""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels import backend as kernel_backend
from loraplex.kernels import testing
from loraplex.server.model import attention
from loraplex.server.model.decode_graphs import VARIANTS, DecodeGraphs
from tests.model.graph_record import recorder
from tests.engine_support import PROMPTS, TYPE_CONFIGS, make_adapter, make_engine, run_until_done, submit


@pytest.fixture
def graph_safe_cpu(monkeypatch):
    """Every op of the step an aten op: torch backend, gathering LoRA op, torch attention."""
    monkeypatch.setattr(kernel_backend, "select", testing.GatherBackend)
    monkeypatch.setenv(attention.BACKEND_ENV, "torch")


def _record_all(graphs: DecodeGraphs) -> dict:
    graphs.graphs.clear()
    graphs.capture(recorder())
    return dict(graphs.graphs)


def test_graphs_captured_before_any_adapter_replay_every_adapter_type(demo_model_dir, tmp_path, graph_safe_cpu,
                                                                       monkeypatch):
    import peft

    # IA3 input vectors on up_proj, which shares its input with gate_proj: the split path, eager only
    monkeypatch.setitem(TYPE_CONFIGS, "ia3-gate-up", lambda: peft.IA3Config(
        target_modules=["q_proj", "up_proj", "down_proj"], feedforward_modules=["up_proj", "down_proj"]))
    engine = make_engine(demo_model_dir, max_device_adapters=6)
    runner = engine.runner
    graphs = DecodeGraphs(runner, max_seqs=8)
    captured = _record_all(graphs)  # no adapter loaded yet: what start-up captures
    assert set(captured) == {(size, variant) for size in graphs.sizes for variant in VARIANTS}
    for graph, _ in captured.values():
        assert graph.host_reads() == [], "a captured step may not read the device"
    at_capture = {key: graph.signature() for key, (graph, _) in captured.items()}

    adapters = {"lora": 1, "dora": 2, "ia3": 3, "prefix": 4, "adalora": 5, "ia3-gate-up": 6}
    for kind, seed in adapters.items():
        engine.register_adapter(kind, str(make_adapter(demo_model_dir, tmp_path / kind, kind, seed)))
    ordinary = runner.execute
    replayed: list[tuple[int, str, frozenset]] = []
    eager_kinds: set[str] = set()

    def both(inputs, attach=None):
        if not graphs.takes(inputs, attach):
            eager_kinds.update(runner.slot_kinds[i.slot].value for i in inputs if i.slot >= 0)
            return ordinary(inputs, attach)
        variant = graphs.variant(inputs)
        static = graphs.run(inputs).clone()  # the recording replayed: writes this step's K/V first
        logits = ordinary(inputs, attach)
        torch.testing.assert_close(static, logits, rtol=1e-5, atol=1e-5)
        replayed.append((len(inputs), variant,
                         frozenset(runner.slot_kinds[i.slot].value for i in inputs if i.slot >= 0)))
        return logits

    runner.execute = both
    lengths = {"prefix": 2, "ia3-gate-up": 2, "dora": 4, "ia3": 4}  # eager-only first, then "vectors" ones
    for index, name in enumerate([None, *adapters]):
        submit(engine, f"r{index}", PROMPTS[index % len(PROMPTS)], adapter=name,
               max_new_tokens=lengths.get(name, 7), ignore_eos=True)
    run_until_done(engine)
    kinds_replayed = set().union(*(kinds for _, _, kinds in replayed))
    assert {"lora", "dora", "ia3"} <= kinds_replayed  # AdaLoRA is served as LoRA
    assert {variant for _, variant, _ in replayed} == set(VARIANTS)
    assert any(n > 2 for n, _, _ in replayed)  # padded buckets of mixed batches
    assert {"prefix"} <= eager_kinds  # prefix padding and split IA3 groups run eagerly
    assert runner.slot_splits.count(True) == 1

    # what a capture now would record is what start-up recorded: same ops on the same tensors
    runner.execute = ordinary
    again = _record_all(graphs)
    for key, (graph, _) in again.items():
        assert graph.signature() == at_capture[key], f"the {key} graph would capture other work after loading"


def test_the_vectors_variant_is_exact_for_slots_without_vectors(demo_model_dir, tmp_path, graph_safe_cpu):
    """Identity rows of out_scale/out_bias/ia3_in leave LoRA and base rows bit-for-bit unchanged."""
    engine = make_engine(demo_model_dir)
    engine.register_adapter("lora", str(make_adapter(demo_model_dir, tmp_path / "lora", "lora", 8)))
    graphs = DecodeGraphs(engine.runner, max_seqs=4)
    ordinary = engine.runner.execute
    seen = []

    def both(inputs, attach=None):
        if not graphs.takes(inputs, attach):
            return ordinary(inputs, attach)
        lora = graphs.run(inputs).clone()
        graphs.variant = lambda _: "vectors"
        vectors = graphs.run(inputs).clone()
        del graphs.variant
        assert torch.equal(lora, vectors)
        seen.append(len(inputs))
        return ordinary(inputs, attach)

    engine.runner.execute = both
    submit(engine, "a", PROMPTS[0], adapter="lora", max_new_tokens=3)
    submit(engine, "b", PROMPTS[1], max_new_tokens=3)
    run_until_done(engine)
    assert 2 in seen
