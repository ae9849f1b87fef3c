"""The scheduler, driven by a fake model loop over a slot-addressed fake KV cache.

The fake model writes each computed position into its KV slot and, for every scheduled chunk, reads
the sequence's positions back through its block table, checking each slot still holds what that
sequence wrote there. A sampled token is a deterministic function of the sequence's tokens and
adapter, so any run, however it was batched, chunked or preempted, must give the same tokens as an
unconstrained run; overlapping, stale or missing blocks fail loudly.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from loraplex.server.engine.block_manager import BlockAllocationError, BlockManager
from loraplex.server.errors import InvalidArgument
from loraplex.server.config import SchedulerConfig
from loraplex.server.engine.scheduler import Scheduler
from loraplex.server.engine.sequence import Sequence, SequenceStatus
from tests.block_invariants import assert_block_invariants

VOCAB = 997


def running_adapters(sched: Scheduler) -> set[str]:
    return {seq.adapter_key for seq in sched.running} - {None}


def next_token(tokens: list[int], adapter: str | None) -> int:
    salt = sum(map(ord, adapter)) if adapter else 0
    return (sum((i + 1) * t for i, t in enumerate(tokens)) * 31 + salt) % VOCAB


class Loop:
    """A fake engine: schedule → fake model → update → stop at max_new_tokens, checking invariants."""

    def __init__(self, num_blocks: int = 256, block_size: int = 4, ready=None, cache_prompt: bool = True,
                 **config) -> None:
        self.cache_prompt = cache_prompt
        self.config = SchedulerConfig(**config)
        self.bm = BlockManager(num_blocks, block_size)
        self.sched = Scheduler(self.config, self.bm)
        self.cache: list[tuple | None] = [None] * (num_blocks * block_size)
        self.ready = ready or (lambda adapter: True)
        self.ready_calls: list[str | None] = []
        self.step_no = 0
        self.outputs = []
        self.running_before: list[list[Sequence]] = []

    def submit(self, name: str, prompt_len: int, max_new: int, adapter: str | None = None, virtual: int = 0,
               prompt: list[int] | None = None):
        if prompt is None:
            prompt = [(7 * len(name) + 13 * i + sum(map(ord, name))) % VOCAB for i in range(prompt_len)]
        seq = Sequence(name, prompt, max_new_tokens=max_new, adapter_key=adapter, num_virtual_positions=virtual,
                       cache_prompt=self.cache_prompt)
        error = self.sched.check_admissible(seq.num_prompt_tokens, seq.max_new_tokens, virtual)
        if error is not None:
            raise error
        self.sched.add(seq)
        return seq

    def _ready(self, adapter):
        self.ready_calls.append(adapter)
        return self.ready(adapter)

    def step(self):
        before = list(self.sched.running)
        self.running_before.append(before)
        self.ready_calls = []
        out = self.sched.schedule(self._ready)
        self.bm.allocate_step(out.scheduled)
        self._check(out, before)
        sampled = self._run_model(out)
        self.sched.update(out, sampled)
        for item in out.scheduled:
            self.bm.cache_computed(item.seq)
        for item in out.scheduled:
            if item.samples and item.seq.num_output_tokens >= item.seq.max_new_tokens:
                self.sched.finish(item.seq)
        self.outputs.append(out)
        self.step_no += 1
        return out

    def run(self, max_steps: int = 2000) -> None:
        while self.sched.has_unfinished():
            assert self.step_no < max_steps, "did not finish"
            self.step()

    def _run_model(self, out) -> dict[int, int]:
        for item in out.scheduled:  # a real step writes every new key/value before attending
            seq = item.seq
            for pos in item.positions:
                assert self.bm.ref_count(seq.block_table[pos // self.bm.block_size]) == 1, "writes a shared block"
                self.cache[slot(self.bm, seq, pos)] = self._content(seq, pos)
        sampled = {}
        for item in out.scheduled:
            seq = item.seq
            for pos in range(item.stop):  # attention reads the whole context through the block table
                assert self.cache[slot(self.bm, seq, pos)] == self._content(seq, pos), (
                    f"KV of sequence {seq.request_id} position {pos} was overwritten or never written"
                )
            if item.samples:
                sampled[seq.seq_id] = next_token(seq.token_ids, seq.adapter_key)
        return sampled

    @staticmethod
    def _content(seq: Sequence, pos: int):
        """A position's KV is a function of the adapter and every position up to it."""
        return seq.adapter_key, tuple(seq.position_keys(0, pos + 1))

    def _check(self, out, before: list[Sequence]) -> None:
        cfg, sched, bm = self.config, self.sched, self.bm
        ns = [item.num_new_tokens for item in out.scheduled]
        assert all(n >= 1 for n in ns)
        assert out.num_batched_tokens == sum(ns) <= cfg.max_num_batched_tokens
        assert sched.num_running <= cfg.max_num_seqs
        assert len(running_adapters(sched)) <= cfg.max_adapters
        step_adapters = {item.seq.adapter_key for item in out.scheduled} - {None}
        assert step_adapters == running_adapters(sched)
        # every running sequence computes something every step, in running order
        assert [item.seq for item in out.scheduled] == sched.running
        admitted = [s for s in sched.running if s not in before]
        assert all(a is None or self.ready(a) for a in (s.adapter_key for s in admitted))
        assert len(self.ready_calls) == len(set(self.ready_calls)), "adapter_ready asked twice in a step"
        for item in out.scheduled:  # blocks cover exactly what is computed by the end of the step
            assert len(item.seq.block_table) >= bm.blocks_for(item.stop)
        assert all(not s.block_table for s in sched.waiting)
        assert_block_invariants(bm, sched.running)

    def tokens(self) -> dict[str, list[int]]:
        return {s.request_id: list(s.output_token_ids) for s in self.seqs}

    @property
    def seqs(self) -> list[Sequence]:
        seen = {}
        for out in self.outputs:
            for item in out.scheduled:
                seen[item.seq.seq_id] = item.seq
        return list(seen.values())


def slot(bm: BlockManager, seq: Sequence, position: int) -> int:
    return seq.block_table[position // bm.block_size] * bm.block_size + position % bm.block_size


def reference(workload) -> dict[str, list[int]]:
    """Each request alone on an unconstrained scheduler."""
    result = {}
    for name, prompt_len, max_new, adapter in workload:
        loop = Loop(num_blocks=512, max_num_seqs=8, max_num_batched_tokens=4096)
        loop.submit(name, prompt_len, max_new, adapter)
        loop.run()
        result.update(loop.tokens())
    return result


def items_by_name(out) -> dict[str, tuple[int, bool]]:
    return {item.seq.request_id: (item.num_new_tokens, item.samples) for item in out.scheduled}


# ---- Sequence and config --------------------------------------------------------------------------


def test_sequence_tracks_tokens_and_positions():
    a = Sequence("a", [5, 6, 7], max_new_tokens=4, adapter_key="x")
    b = Sequence("b", [1], max_new_tokens=1)
    assert b.seq_id > a.seq_id
    assert a.status is SequenceStatus.WAITING and a.block_table == [] and a.num_preemptions == 0
    assert (a.num_tokens, a.num_positions, a.num_uncomputed_tokens, a.is_prefill) == (3, 3, 3, True)
    a.num_computed_tokens = 3
    a.append_token(9)
    assert a.token_ids == [5, 6, 7, 9] and a.output_token_ids == [9] and a.prompt_token_ids == [5, 6, 7]
    assert (a.num_uncomputed_tokens, a.is_prefill, a.last_token_id) == (1, False, 9)
    v = Sequence("v", [5, 6], max_new_tokens=1, num_virtual_positions=3)
    assert v.num_positions == 5
    assert v.token_ids_at(0, 5) == [5, 6] and v.token_ids_at(0, 3) == [] and v.token_ids_at(2, 4) == [5]


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_num_seqs", 0),
        ("max_num_batched_tokens", 0),
        ("max_adapters", 0),
        ("max_model_len", -1),
        ("max_bypass_steps", -1),
        ("max_num_seqs", 2.0),
        ("max_adapters", True),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be an integer"):
        SchedulerConfig(**{field: value})


def test_config_token_budget_must_cover_one_token_per_running_sequence():
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(8\) must be >= max_num_seqs \(16\)"):
        SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=8)
    SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=16, max_bypass_steps=0)


# ---- batching -------------------------------------------------------------------------------------


def test_arrival_joins_the_running_batch_on_the_next_step():
    loop = Loop()
    loop.submit("a", 5, 10)
    loop.submit("b", 3, 10)
    assert items_by_name(loop.step()) == {"a": (5, True), "b": (3, True)}
    assert items_by_name(loop.step()) == {"a": (1, True), "b": (1, True)}
    loop.submit("c", 6, 3)
    out = loop.step()
    assert items_by_name(out) == {"a": (1, True), "b": (1, True), "c": (6, True)}
    assert [item.seq.request_id for item in out.scheduled] == ["a", "b", "c"]
    c = out.scheduled[2].seq
    assert c.num_output_tokens == 1 and out.scheduled[0].seq.num_output_tokens == 3
    loop.run()
    assert loop.tokens() == reference([("a", 5, 10, None), ("b", 3, 10, None), ("c", 6, 3, None)])
    assert loop.bm.num_free_blocks == loop.bm.num_blocks


def test_chunked_prefill_respects_the_token_budget():
    loop = Loop(max_num_seqs=2, max_num_batched_tokens=4)
    loop.submit("a", 3, 8)
    loop.step()
    b = loop.submit("b", 10, 2)
    steps = [items_by_name(loop.step()) for _ in range(4)]
    assert steps == [
        {"a": (1, True), "b": (3, False)},
        {"a": (1, True), "b": (3, False)},
        {"a": (1, True), "b": (3, False)},
        {"a": (1, True), "b": (1, True)},
    ]
    assert b.num_output_tokens == 1
    loop.run()
    assert loop.tokens() == reference([("a", 3, 8, None), ("b", 10, 2, None)])


def test_long_prompt_is_chunked_and_later_arrivals_wait_for_the_budget():
    loop = Loop(max_num_seqs=4, max_num_batched_tokens=8)
    loop.submit("long", 20, 2)
    loop.submit("short", 2, 2)
    assert items_by_name(loop.step()) == {"long": (8, False)}  # budget spent: "short" waits
    assert items_by_name(loop.step()) == {"long": (8, False)}
    assert items_by_name(loop.step()) == {"long": (4, True), "short": (2, True)}
    loop.run()
    assert loop.tokens() == reference([("long", 20, 2, None), ("short", 2, 2, None)])


def test_admission_reserves_the_blocks_of_the_whole_prefill():
    loop = Loop(num_blocks=6, block_size=4, max_num_seqs=2, max_num_batched_tokens=4)
    loop.submit("a", 4, 6)
    loop.step()  # a holds 1 block, 2 once it decodes
    big = loop.submit("big", 18, 2)  # 5 blocks: its first chunk of 3 would fit, its prompt does not
    out = loop.step()
    assert big not in [i.seq for i in out.scheduled] and big.block_table == []
    loop.run()
    loop2 = Loop(num_blocks=8, block_size=4, max_num_seqs=2, max_num_batched_tokens=4)
    loop2.submit("a", 4, 6)
    loop2.step()
    big = loop2.submit("big", 18, 2)
    out = loop2.step()
    assert items_by_name(out)["big"] == (3, False)
    assert len(big.block_table) == 5  # all of the prompt, though only 3 positions are computed


def test_max_num_seqs_limits_running_and_admission_is_first_come_first_served():
    loop = Loop(max_num_seqs=2, max_num_batched_tokens=64)
    workload = [(f"s{i}", 3 + i, 2 + (i % 3), None) for i in range(6)]
    for w in workload:
        loop.submit(*w)
    admitted = []
    while loop.sched.has_unfinished():
        out = loop.step()
        assert len(out.scheduled) <= 2
        admitted += [item.seq.request_id for item in out.scheduled if item.start == 0]
    assert admitted == [w[0] for w in workload]
    assert loop.tokens() == reference(workload)


def test_schedule_is_deterministic():
    def trace():
        loop = Loop(num_blocks=12, max_num_seqs=4, max_num_batched_tokens=8, max_adapters=2)
        for i in range(10):
            loop.submit(f"s{i}", 2 + 3 * (i % 4), 3 + i % 5, ["x", "y", "z", None][i % 4])
        loop.run()
        return [[(i.seq.request_id, i.start, i.num_new_tokens) for i in o.scheduled] for o in loop.outputs]

    assert trace() == trace()


# ---- adapters -------------------------------------------------------------------------------------


def test_adapter_budget_caps_distinct_running_adapters_and_the_base_model_is_free():
    loop = Loop(max_num_seqs=8, max_num_batched_tokens=64, max_adapters=2)
    workload = [(f"s{i}", 4 + i % 3, 3 + i % 4, ["a", "b", "c", None, "d"][i % 5]) for i in range(15)]
    for w in workload:
        loop.submit(*w)
    loop.run()  # Loop._check asserts <= 2 distinct adapters in every step
    assert loop.tokens() == reference(workload)
    per_step = [{i.seq.adapter_key for i in out.scheduled} for out in loop.outputs]
    assert max(len(s - {None}) for s in per_step) == 2
    assert any(len(s) == 3 and None in s for s in per_step)  # base sequences ran beside two adapters


def test_adapter_not_ready_is_skipped_without_blocking_others():
    loop = Loop(max_num_batched_tokens=64)
    loop.ready = lambda adapter: adapter != "slow" or loop.step_no >= 5
    slow = loop.submit("slow", 4, 2, "slow")
    loop.submit("fast", 4, 3, "fast")
    loop.submit("base", 4, 3, None)
    for _ in range(5):
        out = loop.step()
        assert slow not in [i.seq for i in out.scheduled]
        assert loop.ready_calls.count("slow") == 1
    assert slow.status is SequenceStatus.WAITING
    assert loop.sched.num_running == 0  # "fast" and "base" are done already
    assert items_by_name(loop.step()) == {"slow": (4, True)}
    loop.run()
    assert loop.tokens() == reference([("slow", 4, 2, "slow"), ("fast", 4, 3, "fast"), ("base", 4, 3, None)])


def test_nothing_ready_gives_an_empty_step():
    loop = Loop(ready=lambda adapter: False)
    loop.submit("a", 3, 2, "x")
    out = loop.sched.schedule(loop.ready)
    assert out.is_empty and out.num_batched_tokens == 0 and loop.sched.num_waiting == 1
    assert loop.sched.has_unfinished()


# ---- preemption -----------------------------------------------------------------------------------


def _preemption_workload():
    return [(f"s{i}", 5 + (3 * i) % 7, 12 + (5 * i) % 9, [None, "a", "b"][i % 3]) for i in range(8)]


def test_preemption_when_blocks_run_out_gives_the_unconstrained_tokens():
    workload = _preemption_workload()
    loop = Loop(num_blocks=14, block_size=4, max_num_seqs=8, max_num_batched_tokens=32, max_adapters=3)
    for w in workload:
        loop.submit(*w)
    loop.run()
    assert loop.sched.num_preemptions > 0
    assert sum(s.num_preemptions for s in loop.seqs) == loop.sched.num_preemptions
    assert sum(len(out.preempted) for out in loop.outputs) == loop.sched.num_preemptions
    assert loop.tokens() == reference(workload)
    assert loop.bm.num_free_blocks == loop.bm.num_blocks


def test_preemption_takes_the_most_recently_admitted_and_requeues_it_in_front():
    loop = Loop(num_blocks=5, block_size=4, max_num_seqs=4, max_num_batched_tokens=32, max_bypass_steps=0)
    loop.submit("old", 7, 12)
    loop.submit("new", 8, 12)
    loop.submit("later", 8, 2)  # 2 blocks: does not fit beside the 4 above
    loop.step()
    assert [s.request_id for s in loop.sched.running] == ["old", "new"]
    while not loop.outputs[-1].preempted:
        loop.step()
    out = loop.outputs[-1]
    [victim] = out.preempted
    assert victim.request_id == "new" and victim.num_preemptions == 1
    assert victim.status is SequenceStatus.WAITING and victim.num_computed_tokens == 0
    assert victim.block_table == [] and victim.num_output_tokens > 0
    assert [s.request_id for s in loop.sched.waiting] == ["new", "later"]
    assert [i.seq.request_id for i in out.scheduled] == ["old"]  # nothing admitted in that step
    # readmitted before "later", re-prefilling prompt and output so far in one go, then sampling
    outputs_so_far = victim.num_output_tokens
    while victim.status is SequenceStatus.WAITING:
        loop.step()
    item = next(i for i in loop.outputs[-1].scheduled if i.seq is victim)
    assert (item.start, item.num_new_tokens, item.samples) == (0, 8 + outputs_so_far, True)
    loop.run()
    assert loop.tokens() == reference([("old", 7, 12, None), ("new", 8, 12, None), ("later", 8, 2, None)])


def test_a_step_that_preempts_admits_nothing():
    loop = Loop(num_blocks=5, block_size=4, max_num_seqs=4, max_num_batched_tokens=32)
    loop.submit("old", 7, 12)
    loop.submit("new", 8, 12)
    loop.step()
    later = loop.submit("later", 2, 2)  # 1 block: fits once "new" is preempted
    while not loop.outputs[-1].preempted:
        assert later.status is SequenceStatus.WAITING
        loop.step()
    assert [i.seq.request_id for i in loop.outputs[-1].scheduled] == ["old"]
    assert loop.bm.num_free_blocks >= 1 and later.status is SequenceStatus.WAITING
    assert "later" in items_by_name(loop.step())  # "new" does not fit yet; "later" goes first


def test_a_lone_sequence_that_outgrows_the_cache_preempts_itself_rather_than_crash():
    # check_admissible is the real guard; this is the engine forgetting to stop at max_new_tokens.
    loop = Loop(num_blocks=2, block_size=2, max_num_seqs=1, max_num_batched_tokens=4)
    seq = loop.submit("a", 3, 2)
    loop.step()
    seq.max_new_tokens = 99  # the loop keeps going past what was admitted
    loop.step()
    out = loop.step()  # position 4 needs a third block
    assert out.preempted == [seq] and out.is_empty
    assert seq.status is SequenceStatus.WAITING and loop.bm.num_free_blocks == 2


def test_decode_step_allocates_the_block_of_the_position_it_computes():
    loop = Loop(block_size=4)
    seq = loop.submit("a", 4, 3)
    loop.step()
    assert len(seq.block_table) == 1 and seq.num_computed_tokens == 4 and seq.num_tokens == 5
    out = loop.sched.schedule(loop.ready)
    assert (out.scheduled[0].start, out.scheduled[0].num_new_tokens, out.scheduled[0].num_new_blocks) == (4, 1, 1)
    loop.bm.allocate_step(out.scheduled)
    assert len(seq.block_table) == 2


# ---- starvation -----------------------------------------------------------------------------------


def _admitted_at(loop: Loop, seq: Sequence) -> int:
    return next(n for n, out in enumerate(loop.outputs) if seq in [i.seq for i in out.scheduled])


def _bypasses(loop: Loop, head: Sequence, competes=lambda seq: True) -> int:
    """Steps in which a sequence queued behind `head` (submitted later, never admitted before) and
    competing with it was admitted while `head` was still waiting for its first admission."""
    seen: set[int] = set()
    count = 0
    for n, out in enumerate(loop.outputs[: _admitted_at(loop, head)]):
        new = [i.seq for i in out.scheduled if i.seq.seq_id not in seen]
        seen.update(s.seq_id for s in new)
        if any(s.seq_id > head.seq_id and competes(s) for s in new):
            count += 1
    return count


def _block_starvation(max_bypass_steps: int):
    # some arrivals' prompts are equal ("x1a", "x0b"): without the prefix cache they take blocks of their own
    loop = Loop(num_blocks=12, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                max_bypass_steps=max_bypass_steps, cache_prompt=False)
    for i in range(3):
        loop.submit(f"warm{i}", 4, 6)
    loop.step()
    head = loop.submit("head", 36, 2)  # 9 blocks: needs the cache almost empty
    for i in range(40):  # two small arrivals per step keep some blocks busy
        loop.submit(f"x{i}a", 4, 6)
        loop.submit(f"x{i}b", 4, 6)
        loop.step()
    loop.run()
    return loop, head


def test_blocked_sequence_is_bypassed_at_most_max_bypass_steps_times():
    loop, head = _block_starvation(max_bypass_steps=3)
    assert _bypasses(loop, head) == 3
    assert _admitted_at(loop, head) < 20  # long before the stream of arrivals ends (step 41)


def test_without_the_bypass_bound_the_same_stream_starves_the_blocked_sequence():
    loop, head = _block_starvation(max_bypass_steps=10_000)
    assert _bypasses(loop, head) >= 30
    assert _admitted_at(loop, head) > 41  # only once the stream dried up


def _adapter_starvation(max_bypass_steps: int):
    loop = Loop(max_num_seqs=8, max_num_batched_tokens=64, max_adapters=2, max_bypass_steps=max_bypass_steps)
    loop.submit("a0", 3, 5, "a")
    loop.submit("b0", 3, 5, "b")
    loop.step()
    head = loop.submit("head", 3, 2, "c")
    for i in range(30):  # "a" and "b" always have a sequence running; base requests don't compete
        loop.submit(f"a{i + 1}", 3, 5, "a")
        loop.submit(f"b{i + 1}", 3, 5, "b")
        loop.submit(f"n{i + 1}", 3, 5, None)
        loop.step()
    loop.run()
    return loop, head


def test_sequence_waiting_for_an_adapter_slot_is_bypassed_at_most_max_bypass_steps_times():
    loop, head = _adapter_starvation(max_bypass_steps=2)
    assert _bypasses(loop, head, competes=lambda s: s.adapter_key is not None) == 2
    admitted_at = _admitted_at(loop, head)
    assert admitted_at < 15
    # base-model arrivals kept being admitted while the adapters drained for "head"
    held_back = loop.outputs[4:admitted_at]
    admitted = [i.seq for out in held_back for i in out.scheduled if i.start == 0]
    assert admitted and all(s.adapter_key is None for s in admitted)


def test_without_the_bypass_bound_adapter_traffic_starves_a_new_adapter():
    loop, head = _adapter_starvation(max_bypass_steps=10_000)
    assert _bypasses(loop, head, competes=lambda s: s.adapter_key is not None) >= 30
    assert _admitted_at(loop, head) > 31  # only once the stream dried up


def test_base_model_arrivals_do_not_use_up_the_bypasses_of_a_sequence_waiting_for_a_slot():
    loop = Loop(max_num_seqs=16, max_num_batched_tokens=64, max_adapters=1, max_bypass_steps=2)
    loop.submit("a0", 3, 12, "a")
    loop.step()
    head = loop.submit("head", 3, 2, "c")
    for i in range(5):  # five steps of base-model arrivals only
        loop.submit(f"n{i}", 3, 2)
        loop.step()
    a1 = loop.submit("a1", 3, 2, "a")  # still may go ahead of "head": no bypass used so far
    loop.step()
    assert a1.status is not SequenceStatus.WAITING and head.status is SequenceStatus.WAITING
    loop.run()
    assert _bypasses(loop, head, competes=lambda s: s.adapter_key is not None) == 1


def test_freed_adapter_slot_stays_reserved_while_the_starving_sequences_adapter_loads():
    loop = Loop(max_num_seqs=8, max_num_batched_tokens=64, max_adapters=1, max_bypass_steps=1)
    asked = {}

    def ready(adapter):  # "c" takes 3 steps to load after it is first asked for
        asked.setdefault(adapter, loop.step_no)
        return adapter != "c" or loop.step_no >= asked["c"] + 3

    loop.ready = ready
    loop.submit("a0", 3, 3, "a")
    loop.step()
    head = loop.submit("head", 3, 2, "c")
    loop.submit("a1", 3, 3, "a")  # bypasses "head" once: the bound
    loop.step()
    loop.submit("d", 3, 2, "d")  # ready at once: would take the slot "a" frees
    loop.run()
    assert _bypasses(loop, head) == 1
    order = [i.seq.request_id for out in loop.outputs for i in out.scheduled if i.start == 0]
    assert order.index("head") < order.index("d")
    assert loop.ready_calls.count("c") <= 1


# ---- abort, finish, update ------------------------------------------------------------------------


def test_abort_frees_blocks_at_once_from_waiting_and_running():
    loop = Loop(num_blocks=16, max_num_seqs=2)
    a = loop.submit("a", 9, 20)
    b = loop.submit("b", 5, 20, "x")
    c = loop.submit("c", 5, 20)
    loop.step()
    loop.step()
    assert loop.bm.num_free_blocks < 16 and c.status is SequenceStatus.WAITING
    assert loop.sched.abort(a.seq_id) is a
    assert a.status is SequenceStatus.FINISHED and a.block_table == []
    assert loop.sched.abort(c.seq_id) is c
    assert loop.sched.abort(c.seq_id) is None and loop.sched.abort(10**9) is None
    assert loop.sched.running == [b] and loop.sched.num_waiting == 0
    assert loop.sched.abort(b.seq_id) is b
    assert loop.bm.num_free_blocks == 16 and not loop.sched.has_unfinished()
    assert running_adapters(loop.sched) == set()


def test_abort_between_schedule_and_update_drops_that_sequence_only():
    loop = Loop()
    a = loop.submit("a", 3, 5)
    b = loop.submit("b", 3, 5)
    out = loop.sched.schedule(loop.ready)
    loop.sched.abort(a.seq_id)
    loop.sched.update(out, {a.seq_id: 1, b.seq_id: 2})  # a's token is dropped, not an error
    assert a.output_token_ids == [] and b.output_token_ids == [2]
    assert loop.bm.num_used_blocks == len(b.block_table)


def test_finish_is_idempotent_and_refuses_strangers():
    loop = Loop()
    a = loop.submit("a", 3, 5)
    loop.step()
    loop.sched.finish(a)
    loop.sched.finish(a)
    assert a.status is SequenceStatus.FINISHED and loop.bm.num_free_blocks == loop.bm.num_blocks
    with pytest.raises(ValueError, match="never added"):
        loop.sched.finish(Sequence("z", [1], max_new_tokens=1))
    with pytest.raises(ValueError, match="already added"):
        loop.sched.add(a)


def test_update_checks_the_sampled_tokens_against_the_step():
    loop = Loop(max_num_seqs=2, max_num_batched_tokens=4)
    a = loop.submit("a", 2, 5)
    b = loop.submit("b", 6, 5)
    out = loop.sched.schedule(loop.ready)  # a: 2 tokens, samples; b: 2 of 6, does not
    with pytest.raises(ValueError, match=rf"missing for sequences \[{a.seq_id}\]"):
        loop.sched.update(out, {})
    with pytest.raises(ValueError, match=rf"unexpected for \[{b.seq_id}\]"):
        loop.sched.update(out, {a.seq_id: 1, b.seq_id: 2})
    assert a.num_computed_tokens == 0 and b.num_computed_tokens == 0  # nothing applied
    loop.sched.update(out, {a.seq_id: 1})
    assert (a.num_computed_tokens, a.output_token_ids, b.num_computed_tokens) == (2, [1], 2)
    with pytest.raises(RuntimeError, match="applied twice"):
        loop.sched.update(out, {a.seq_id: 1})


def test_schedule_without_update_is_caught():
    loop = Loop()
    loop.submit("a", 3, 5)
    out = loop.sched.schedule(loop.ready)
    out.scheduled[0].seq.num_computed_tokens += 3  # computed, but the sampled token was never appended
    with pytest.raises(RuntimeError, match="no position to compute"):
        loop.sched.schedule(loop.ready)


# ---- admission checks -----------------------------------------------------------------------------


def test_check_admissible_limits_and_messages():
    sched = Scheduler(SchedulerConfig(max_model_len=40), BlockManager(num_blocks=5, block_size=4))
    assert sched.check_admissible(10, 11) is None  # 20 positions, the last token never computed: 20 slots
    err = sched.check_admissible(10, 12)
    assert isinstance(err, InvalidArgument)  # retrying can never help: not RESOURCE_EXHAUSTED
    assert str(err).startswith("the request needs 21 KV slots (6 blocks of 4) but the whole KV cache has 5")
    err = sched.check_admissible(30, 11)
    assert isinstance(err, InvalidArgument)
    assert str(err) == "30 prompt tokens + max_new_tokens 11 = 41 exceeds the maximum sequence length 40"
    assert isinstance(sched.check_admissible(0, 5), InvalidArgument)
    assert "max_new_tokens must be >= 1" in str(sched.check_admissible(5, 0))
    assert "+ 8 virtual" in str(sched.check_admissible(20, 20, num_virtual_positions=8))
    assert isinstance(sched.check_admissible(4, 10, num_virtual_positions=8), InvalidArgument)


def test_a_sequence_that_exactly_fills_the_cache_runs_alone():
    loop = Loop(num_blocks=5, block_size=4, max_num_seqs=2, max_num_batched_tokens=8)
    big = loop.submit("big", 10, 11)
    with pytest.raises(InvalidArgument, match="whole KV cache"):
        loop.submit("too-big", 10, 12)
    other = loop.submit("other", 6, 6)
    loop.run()
    assert big.num_output_tokens == 11 and other.num_output_tokens == 6
    assert loop.tokens() == reference([("big", 10, 11, None), ("other", 6, 6, None)])


def test_add_refuses_what_could_never_run():
    loop = Loop(max_model_len=16)
    with pytest.raises(InvalidArgument, match="exceeds the maximum sequence length 16"):
        loop.submit("a", 10, 7)
    assert not loop.sched.has_unfinished()
    loop.submit("b", 10, 6)  # exactly max_model_len
    loop.run()


def test_virtual_positions_are_computed_and_take_slots():
    loop = Loop(block_size=4)
    seq = loop.submit("v", 5, 2, virtual=3)
    out = loop.step()
    [item] = out.scheduled
    assert (item.start, item.num_new_tokens, item.samples) == (0, 8, True)
    assert item.token_ids == seq.prompt_token_ids
    assert len(seq.block_table) == 2
    out = loop.step()
    assert (out.scheduled[0].start, out.scheduled[0].token_ids) == (8, [seq.output_token_ids[0]])


def test_chunked_prefill_with_virtual_positions_samples_only_at_the_end():
    loop = Loop(block_size=4, max_num_seqs=3, max_num_batched_tokens=3)
    seq = loop.submit("v", 5, 2, virtual=3)
    chunks = []
    for _ in range(3):
        [item] = loop.step().scheduled
        chunks.append((item.start, item.num_new_tokens, item.samples, item.token_ids))
    p = seq.prompt_token_ids
    assert chunks == [(0, 3, False, []), (3, 3, False, p[:3]), (6, 2, True, p[3:])]
    assert seq.num_output_tokens == 1


def test_block_manager_errors_surface_through_the_scheduler_bookkeeping():
    loop = Loop(num_blocks=4)
    a = loop.submit("a", 3, 5)
    loop.step()
    stolen = list(a.block_table)
    loop.bm.free_blocks(stolen)  # someone else freed a's block: finishing a is now a double free
    with pytest.raises(BlockAllocationError, match="double free"):
        loop.sched.finish(a)


# ---- prefix cache -----------------------------------------------------------------------------------

SYSTEM = [(31 * i + 5) % VOCAB for i in range(10)]


def alone(prompt: list[int], max_new: int, adapter: str | None = None) -> list[int]:
    loop = Loop(num_blocks=512, cache_prompt=False)
    seq = loop.submit("alone", 0, max_new, adapter, prompt=prompt)
    loop.run()
    return seq.output_token_ids


def test_a_later_request_takes_the_cached_leading_blocks_and_computes_the_rest():
    loop = Loop(block_size=4)
    first = loop.submit("first", 0, 3, prompt=SYSTEM + [1, 2])
    loop.run()
    second = loop.submit("second", 0, 3, prompt=SYSTEM + [3, 4, 5])  # 12 positions: blocks 0-3, 4-7 hit
    [item] = loop.step().scheduled
    assert (item.start, item.num_new_tokens, len(item.cached_blocks)) == (8, 5, 2)
    assert first.status is SequenceStatus.FINISHED
    third = loop.submit("third", 0, 3, prompt=SYSTEM + [1, 2], adapter="other#1")  # another adapter: no hit
    assert loop.step().scheduled[-1].start == 0
    loop.run()
    assert second.output_token_ids == alone(SYSTEM + [3, 4, 5], 3)
    assert third.output_token_ids == alone(SYSTEM + [1, 2], 3, "other#1")


def test_a_fully_cached_prompt_computes_its_last_position():
    loop = Loop(block_size=4)
    loop.submit("warm", 0, 2, prompt=SYSTEM[:9] + [7, 7, 7])
    loop.run()
    seq = loop.submit("again", 0, 2, prompt=SYSTEM[:9])  # positions 0-7 hit, 8 is computed for the logits
    [item] = loop.step().scheduled
    assert (item.start, item.num_new_tokens, item.samples) == (8, 1, True)
    loop.run()
    assert seq.output_token_ids == alone(SYSTEM[:9], 2)


def test_preempting_and_cancelling_sequences_that_share_blocks_frees_only_their_own():
    # 10 blocks of 2: a and b share SYSTEM's 5 blocks; decoding grows them until b must be preempted
    loop = Loop(num_blocks=10, block_size=2, max_num_seqs=4, max_num_batched_tokens=32)
    a = loop.submit("a", 0, 8, prompt=SYSTEM + [1])
    loop.step()
    b = loop.submit("b", 0, 8, prompt=SYSTEM + [2])
    c = loop.submit("c", 0, 8, prompt=SYSTEM + [3])
    loop.step()
    assert b.block_table[:5] == a.block_table[:5] == c.block_table[:5]
    while not any(out.preempted for out in loop.outputs):
        loop.step()
    assert loop.outputs[-1].preempted == [c] and not c.block_table
    assert a.status is b.status is SequenceStatus.RUNNING and a.block_table[:5] == b.block_table[:5]
    loop.sched.abort(a.seq_id)  # a cancel while the others may still hold its prefix
    assert_block_invariants(loop.bm, [*loop.sched.running, *loop.sched.waiting])
    loop.run()
    assert b.output_token_ids == alone(SYSTEM + [2], 8) and c.output_token_ids == alone(SYSTEM + [3], 8)
    assert loop.bm.num_free_blocks == loop.bm.num_blocks and loop.bm.num_used_blocks == 0


def test_cached_blocks_are_evicted_for_new_work_and_the_outputs_stay_exact():
    loop = Loop(num_blocks=8, block_size=2, max_num_seqs=2)
    prompts = [[(17 * k + i) % VOCAB for i in range(9)] for k in range(6)]
    for k, prompt in enumerate(prompts):  # each fills most of the cache, then leaves its blocks cached
        loop.submit(f"p{k}", 0, 4, prompt=prompt)
        loop.run()
    assert loop.bm.num_evictions > 0 and loop.bm.num_cached_blocks <= 8
    again = loop.submit("again", 0, 4, prompt=prompts[-1])
    [item] = loop.step().scheduled
    assert item.start == 8  # the most recent prompt survived
    loop.run()
    assert again.output_token_ids == alone(prompts[-1], 4)
    assert [s.output_token_ids for s in loop.seqs[:6]] == [alone(p, 4) for p in prompts]


def test_scheduling_modules_do_not_import_torch(tmp_path):
    code = (
        "import sys; import loraplex.server.engine.scheduler, loraplex.server.engine.block_manager, loraplex.server.engine.sequence; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path).returncode == 0  # not the checkout root
