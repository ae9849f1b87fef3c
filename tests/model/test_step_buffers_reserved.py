"""The runner's per-step buffers are sized at start-up from the scheduler's budgets: a step at the
largest budget allocates nothing (no pinned allocation, no blocking copy mid-serving)."""

from __future__ import annotations

import logging

from loraplex.server.config import SchedulerConfig
from tests.engine_support import PROMPTS, make_engine, make_lora_adapter, run_until_done, submit


def test_steps_at_the_budget_keep_the_start_up_buffers(demo_model_dir, tmp_path, caplog):
    budgets = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=96, max_adapters=4, max_model_len=512)
    engine = make_engine(demo_model_dir, scheduler=budgets)
    engine.register_adapter("a", str(make_lora_adapter(demo_model_dir, tmp_path / "a", seed=1, r=4,
                                                       target_modules="all-linear")))
    runner = engine.runner
    assert runner.lora_meta is not None and runner.lora_meta.max_tokens >= 96
    at_start = (runner.lora_meta, runner.buffers.host.data_ptr(), runner.buffers.table.data_ptr())
    long_prompt = " ".join(PROMPTS) * 4  # longer than the token budget: chunked to full 96-token steps
    with caplog.at_level(logging.WARNING):
        for i in range(6):
            submit(engine, f"r{i}", long_prompt if i < 2 else PROMPTS[i % len(PROMPTS)],
                   adapter="a" if i % 2 else None, max_new_tokens=3)
        sizes = []
        engine.step_listeners.append(lambda stats: sizes.append(stats.num_tokens))
        run_until_done(engine)
    assert max(sizes) == 96
    assert (runner.lora_meta, runner.buffers.host.data_ptr(), runner.buffers.table.data_ptr()) == at_start
    assert not [r for r in caplog.records if "reserved" in r.getMessage()]
