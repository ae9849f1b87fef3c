"""The static-buffer decode step that CUDA graphs capture, run eagerly on CPU: the same logits and
tokens as the ordinary step, for a batch mixing the base model, LoRA and DoRA, padded to its bucket."""

from __future__ import annotations

import numpy as np
import torch

from loraplex.server.model.decode_graphs import DecodeGraphs, batch_sizes
from tests.engine_support import PROMPTS, make_engine, make_lora_adapter, run_until_done, submit


def test_batch_sizes_double_to_64_then_step_by_32():
    assert batch_sizes(1) == [1]
    assert batch_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_sizes(65) == [1, 2, 4, 8, 16, 32, 64, 96]
    assert batch_sizes(200) == [1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 224]


def test_static_decode_step_equals_the_ordinary_step(demo_model_dir, tmp_path):
    lora = make_lora_adapter(demo_model_dir, tmp_path / "lora", seed=5, r=8, lora_alpha=16, target_modules="all-linear")
    dora = make_lora_adapter(demo_model_dir, tmp_path / "dora", seed=6, r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    engine = make_engine(demo_model_dir)
    engine.register_adapter("lora", str(lora))
    engine.register_adapter("dora", str(dora))
    runner = engine.runner
    assert runner.decode_graphs is None  # CPU: no capture, every step eager
    graphs = DecodeGraphs(runner, max_seqs=8)
    ordinary = runner.execute
    batches = []

    def both(inputs, attach=None):
        if not graphs.takes(inputs, attach):
            return ordinary(inputs, attach)
        static = graphs.run(inputs, attach).clone()  # writes the same K/V into the same slots first
        logits = ordinary(inputs, attach)
        assert static.shape == logits.shape
        torch.testing.assert_close(static, logits, rtol=1e-4, atol=1e-4)
        assert static.argmax(-1).tolist() == logits.argmax(-1).tolist()
        batches.append(len(inputs))
        return logits

    runner.execute = both
    requests = [submit(engine, "base", PROMPTS[0], max_new_tokens=4),
                submit(engine, "lora", PROMPTS[1], adapter="lora", max_new_tokens=6),
                submit(engine, "dora", PROMPTS[2], adapter="dora", max_new_tokens=8)]
    run_until_done(engine)
    assert all(r.final.finish_reason == "length" for r in requests)
    assert 3 in batches and 1 in batches  # padded to 4, and a batch of its own size


def test_static_decode_step_through_the_triton_kernels_equals_the_ordinary_step(demo_model_dir, tmp_path,
                                                                                   monkeypatch):
    """The layout CUDA captures by default: Triton paged attention over the padded int32 tables and
    Triton LoRA kernels (interpreted), block_size 4 so contexts end mid-block."""
    from loraplex.server.model import attention

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LORAPLEX_LORA_BACKEND", "triton")
    monkeypatch.setenv(attention.BACKEND_ENV, "triton")
    assert attention.graph_safe("triton") and not attention.graph_safe("torch")
    lora = make_lora_adapter(demo_model_dir, tmp_path / "lora", seed=7, r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj"])
    engine = make_engine(demo_model_dir, block_size=4)
    engine.register_adapter("lora", str(lora))
    graphs = DecodeGraphs(engine.runner, max_seqs=4)
    assert graphs.paged
    ordinary = engine.runner.execute
    compared = []

    def both(inputs, attach=None):
        if not graphs.takes(inputs, attach):
            return ordinary(inputs, attach)
        static = graphs.run(inputs, attach).clone()
        logits = ordinary(inputs, attach)
        torch.testing.assert_close(static, logits, rtol=1e-4, atol=1e-4)
        compared.append(len(inputs))
        return logits

    engine.runner.execute = both
    submit(engine, "base", PROMPTS[0], max_new_tokens=3)
    submit(engine, "lora", PROMPTS[1], adapter="lora", max_new_tokens=3)
    run_until_done(engine)
    assert 2 in compared  # padded to its bucket of 2


def test_enforce_eager_flag_reaches_the_engine_config(demo_model_dir):
    from loraplex.server.api.cli import config_from_args
    from loraplex.server.cli import build_parser

    base = ["serve", "--model", str(demo_model_dir), "--device", "cpu"]
    assert config_from_args(build_parser().parse_args(base + ["--enforce-eager"])).engine.enforce_eager
    assert not config_from_args(build_parser().parse_args(base)).engine.enforce_eager


def test_the_static_layout_fits_the_largest_bucket(demo_model_dir):
    engine = make_engine(demo_model_dir)
    graphs = DecodeGraphs(engine.runner, max_seqs=200)
    graphs._stage([], graphs.max_batch)  # every array at its full size
    assert tuple(graphs.tables.shape) == (225, graphs.max_blocks) and graphs.lora_meta.max_tokens == 224


class _Writes(np.ndarray):
    """The host tables, counting the entries each assignment writes."""

    def __setitem__(self, index, value):
        self.log.append(np.asarray(super().__getitem__(index)).size)
        super().__setitem__(index, value)


def test_a_step_writes_only_the_block_table_entries_appended_since_the_last(demo_model_dir):
    """Block tables stay on the host per sequence: a steady step writes no table entry, a new block one
    entry, a new sequence its table; the copy covers the table rows in use, not the model's context."""
    from loraplex.server.model.runner import StepInput

    engine = make_engine(demo_model_dir)
    graphs = DecodeGraphs(engine.runner, max_seqs=8)
    writes = graphs._tables.view(_Writes)
    writes.log = []
    graphs._tables = writes
    sent = []
    graphs.buffers.send = lambda nbytes=None: sent.append(nbytes)
    tables = [list(range(10 * i, 10 * i + 6)) for i in range(4)]
    inputs = [StepInput([3], 16 * 6 - 5 + i, tables[i], slot=-1, samples=True) for i in range(4)]
    graphs._stage(inputs, 4)
    assert sum(writes.log) == 4 * 6  # first sight: every table whole
    writes.log.clear()
    graphs._stage(inputs, 4)
    assert sum(writes.log) == 0
    tables[2].append(99)
    graphs._stage(inputs, 4)
    assert sum(writes.log) == 1
    writes.log.clear()
    inputs[1] = StepInput([3], 20, [7, 8], slot=-1, samples=True)  # a new sequence in place of the second
    graphs._stage(inputs, 4)
    assert sum(writes.log) == 2
    rows_in_use = 1 + max(graphs._table_of[id(item.block_table)][0] for item in inputs)
    assert sent[-1] == graphs._tables_at + rows_in_use * graphs._row_bytes < graphs.buffers.table.numel()
