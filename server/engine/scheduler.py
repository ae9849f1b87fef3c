"""Which sequences run in the next step: continuous batching under token, KV-block and adapter budgets.

One engine step reads:

    out = scheduler.schedule(adapter_ready)      # the plan: who computes which positions, with which blocks
    block_manager.allocate_step(out.scheduled)    # the engine carries it out (and writes prefix-tuning KV)
    ... run the model on out.scheduled, sample a token for each item with `samples` ...
    scheduler.update(out, {seq_id: token_id})     # advance KV progress, append sampled tokens
    block_manager.cache_computed(seq)             # for each scheduled sequence: name its full blocks
    ... for each sequence that must stop (EOS, stop string, max_new_tokens): scheduler.finish(seq)

The scheduler never allocates: it counts the free blocks its plan speaks for, and frees the blocks
of the sequences it preempts, finishes or aborts.

`schedule` works in two phases, first come first served:

1. Running sequences, in admission order, each get their remaining positions (1 while decoding; a
   prefill chunk otherwise) within the step's token budget, with KV blocks for them, the block
   of the position being computed included. When blocks run out, the most recently admitted running
   sequence is preempted by recomputation (blocks freed, `num_computed_tokens = 0`, output so far
   kept and re-prefilled with the prompt) and put back at the front of the waiting queue; the
   oldest sequences always progress. A step that preempts admits nothing.
2. Waiting sequences, in queue order, are admitted while `max_num_seqs`, the token budget, the KV
   blocks and the adapter budget allow. An admitted sequence starts with the leading full blocks
   the prefix cache holds for it (`BlockManager.cached_prefix`: those positions count as computed)
   and gets blocks for its whole remaining prefill, so a chunked prefill never stalls midway; the
   first step computes `min(uncomputed, tokens left)` positions. A sequence that does not fit is skipped, not waited for:
   - its adapter would make more than `max_adapters` distinct adapters among running sequences;
   - its adapter is not `adapter_ready` yet (the engine loads adapters in the background);
   - its remaining prefill does not fit in the free blocks.
   Anti-starvation: a sequence skipped for adapter slots or blocks counts the steps in which a later
   sequence competing for that resource was admitted ahead of it (any admission competes for
   blocks; admissions with an adapter compete for adapter slots). Once it has been bypassed
   `max_bypass_steps` times (over its life, preemptions included), the sequences behind it that
   compete for what it waits for are held back until it is admitted: with blocks, nothing behind
   it is admitted; with adapter slots, only base-model sequences are (and this also holds while its
   adapter is still loading, so the slot that frees up stays free for it).

Invariants the engine can rely on: every running sequence is scheduled in every step (the token
budget is at least `max_num_seqs`, and only the last admitted sequence can be mid-prefill), so the
adapters of a step are exactly those of `running`, at most `max_adapters` of them; `scheduled` is
in running order then admission order, deterministic for the same inputs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from loraplex.server.config import SchedulerConfig
from loraplex.server.engine.block_manager import BlockManager
from loraplex.server.errors import EngineError, InvalidArgument
from loraplex.server.engine.sequence import Sequence, SequenceStatus

_BLOCKS = "blocks"
_ADAPTERS = "adapter slots"


@dataclass(frozen=True)
class ScheduledSequence:
    """Positions [start, start + num_new_tokens) of `seq` are computed this step."""

    seq: Sequence
    start: int
    """`seq.num_computed_tokens` when scheduled."""
    num_new_tokens: int
    samples: bool
    """After this step every position is computed: the engine samples the next token from the
    logits of the last position."""
    num_new_blocks: int = 0
    """Blocks the engine appends to the block table before the step (`BlockManager.allocate_step`)."""
    cached_blocks: tuple[int, ...] | None = None
    """Set when the sequence is admitted this step: the leading blocks it takes from the prefix
    cache (its block table starts with them)."""

    @property
    def admitted(self) -> bool:
        return self.cached_blocks is not None

    @property
    def stop(self) -> int:
        return self.start + self.num_new_tokens

    @property
    def positions(self) -> range:
        return range(self.start, self.stop)

    @property
    def token_ids(self) -> list[int]:
        """Input ids of the chunk (`seq.token_ids[start:stop]` when the sequence has no virtual
        positions; virtual positions, which take adapter embeddings instead, are left out)."""
        return self.seq.token_ids_at(self.start, self.stop)


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence]
    """Running sequences in admission order, then the ones admitted this step."""
    preempted: list[Sequence]
    """Sequences preempted this step (now waiting, blocks freed, to be recomputed)."""
    num_batched_tokens: int
    """Sum of num_new_tokens: the positions the model computes this step."""

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Owns the waiting queue and the running list; the block manager is shared with the engine.

    Not thread-safe: only the engine's step thread calls it (add and abort included).
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        """Not running, in queue order: arrival order, preempted sequences moved to the front."""
        self.running: list[Sequence] = []
        """In admission order; the last one is the next preemption victim."""
        self.num_preemptions = 0
        """Preemptions since start (a counter for the metrics layer)."""
        self._seqs: dict[int, Sequence] = {}
        self._adapter_refs: dict[str, int] = {}  # adapter id -> running sequences using it
        # seq_id -> steps in which a competing later arrival went first; kept across preemptions
        self._bypassed: dict[int, int] = {}

    # ---- queries ---------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    def check_admissible(
        self, num_prompt_tokens: int, max_new_tokens: int, num_virtual_positions: int = 0
    ) -> EngineError | None:
        """The error to refuse a request with, or None if it can run (alone, at worst).

        InvalidArgument for an empty prompt, max_new_tokens < 1, a sequence longer than
        max_model_len, or one whose KV would not fit in the whole cache (a retry can never succeed,
        so not ResourceExhausted). The last sampled token is never computed, so a sequence needs
        virtual + prompt + max_new_tokens - 1 slots. `str(error)` is the message. The engine checks
        this once, before `add`.
        """
        if num_prompt_tokens < 1:
            return InvalidArgument("the prompt is empty: at least one token is needed")
        if max_new_tokens < 1:
            return InvalidArgument(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        total = num_virtual_positions + num_prompt_tokens + max_new_tokens
        if total > self.config.max_model_len:
            virtual = f" + {num_virtual_positions} virtual" if num_virtual_positions else ""
            return InvalidArgument(
                f"{num_prompt_tokens} prompt tokens{virtual} + max_new_tokens {max_new_tokens} = "
                f"{total} exceeds the maximum sequence length {self.config.max_model_len}"
            )
        bm = self.block_manager
        blocks = bm.blocks_for(total - 1)
        if blocks > bm.num_blocks:
            return InvalidArgument(
                f"the request needs {total - 1} KV slots ({blocks} blocks of {bm.block_size}) but the "
                f"whole KV cache has {bm.num_blocks} blocks; lower max_new_tokens or shorten the prompt"
            )
        return None

    # ---- lifecycle -------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence that passed `check_admissible`."""
        if seq.seq_id in self._seqs or seq.status is not SequenceStatus.WAITING:
            raise ValueError(f"sequence {seq.seq_id} was already added")
        self._seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def abort(self, seq_id: int) -> Sequence | None:
        """Remove a waiting or running sequence and free its blocks now; None if unknown/finished."""
        seq = self._seqs.get(seq_id)
        if seq is not None:
            self._remove(seq)
        return seq

    def finish(self, seq: Sequence) -> None:
        """Mark a sequence FINISHED, free its blocks, forget it. No-op if it already finished."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if self._seqs.get(seq.seq_id) is not seq:
            raise ValueError(f"sequence {seq.seq_id} was never added to this scheduler")
        self._remove(seq)

    # ---- the step ------------------------------------------------------------------------------

    def schedule(self, adapter_ready: Callable[[str | None], bool]) -> SchedulerOutput:
        """Choose this step's work (see the module docstring); the engine carries the plan out.

        `adapter_ready(adapter_key)` says whether a waiting sequence's adapter can be used in a step
        now; it is called at most once per adapter per step, never for None (the base model), and
        may start a background load when it answers False. It must eventually answer True for the
        adapter of every waiting sequence, or the engine must abort that sequence: a starving
        sequence waiting for its adapter holds back other adapters' admissions. An empty output
        with sequences waiting means they all wait for adapters: the engine should wait for a load
        rather than spin.
        """
        plan = _BlockPlan(self.block_manager)
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted: list[Sequence] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            if n <= 0:
                raise RuntimeError(
                    f"running sequence {seq.seq_id} has no position to compute: call update() after "
                    "every step and finish() for sequences that stop"
                )
            needed = self.block_manager.num_blocks_needed(seq, n)
            while needed > plan.available:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                plan.reserve(needed)
                scheduled.append(_scheduled(seq, n, needed))
                budget -= n
                i += 1

        if not preempted:
            budget = self._admit(adapter_ready, budget, scheduled, plan)
        num_batched = self.config.max_num_batched_tokens - budget
        return SchedulerOutput(scheduled, preempted, num_batched)

    def update(self, output: SchedulerOutput, sampled: dict[int, int]) -> None:
        """Record a computed step: advance `num_computed_tokens`, append sampled tokens.

        `sampled` maps seq_id to the token sampled for it: exactly the sequences whose item
        `samples` (sequences finished or aborted since `schedule` are skipped). Checked before
        anything changes.
        """
        live = [s for s in output.scheduled if s.seq.status is SequenceStatus.RUNNING]
        expected = {s.seq.seq_id for s in live if s.samples}
        gone = {s.seq.seq_id for s in output.scheduled if s.seq.status is not SequenceStatus.RUNNING}
        missing = expected - sampled.keys()
        unexpected = sampled.keys() - expected - gone
        if missing or unexpected:
            raise ValueError(
                f"sampled tokens do not match the step: missing for sequences {sorted(missing)}, "
                f"unexpected for {sorted(unexpected)} (only items with samples=True sample)"
            )
        for item in live:
            if item.seq.num_computed_tokens != item.start:
                raise RuntimeError(f"update() for sequence {item.seq.seq_id} applied twice or out of order")
        for item in live:
            item.seq.num_computed_tokens += item.num_new_tokens
            if item.samples:
                item.seq.append_token(sampled[item.seq.seq_id])

    # ---- internals -------------------------------------------------------------------------------

    def _admit(
        self,
        adapter_ready: Callable[[str | None], bool],
        budget: int,
        scheduled: list[ScheduledSequence],
        plan: _BlockPlan,
    ) -> int:
        """Phase 2 of `schedule`: admit waiting sequences; returns the token budget left."""
        cfg = self.config
        ready_memo: dict[str, bool] = {}
        held: set[str] = set()  # resources reserved for a sequence bypassed max_bypass_steps times
        blocked: list[tuple[Sequence, str]] = []  # skipped this step, and for which resource
        bypassed: set[int] = set()
        kept: deque[Sequence] = deque()

        while self.waiting:
            if len(self.running) >= cfg.max_num_seqs or budget == 0 or _BLOCKS in held:
                break
            seq = self.waiting.popleft()
            adapter = seq.adapter_key
            starving = self._bypassed.get(seq.seq_id, 0) >= cfg.max_bypass_steps
            new_adapter = adapter is not None and adapter not in self._adapter_refs

            reason = None
            if adapter is not None and _ADAPTERS in held:
                kept.append(seq)
                continue
            if new_adapter and len(self._adapter_refs) >= cfg.max_adapters:
                reason = _ADAPTERS
            elif adapter is not None and not self._ready(adapter, adapter_ready, ready_memo):
                if starving and new_adapter:
                    held.add(_ADAPTERS)  # keep the slot that is free now for it while it loads
                kept.append(seq)
                continue
            else:
                admission = plan.admission(seq)
                if admission is None:
                    reason = _BLOCKS
            if reason is not None:
                blocked.append((seq, reason))
                if starving:
                    held.add(reason)
                kept.append(seq)
                continue

            cached, num_computed, num_new_blocks = admission
            seq.num_computed_tokens = num_computed
            n = min(seq.num_uncomputed_tokens, budget)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if adapter is not None:
                self._adapter_refs[adapter] = self._adapter_refs.get(adapter, 0) + 1
            scheduled.append(_scheduled(seq, n, num_new_blocks, cached))
            budget -= n
            for other, why in blocked:
                if why == _BLOCKS or adapter is not None:
                    bypassed.add(other.seq_id)

        kept.extend(self.waiting)
        self.waiting = kept
        for seq_id in bypassed:
            self._bypassed[seq_id] = self._bypassed.get(seq_id, 0) + 1
        return budget

    @staticmethod
    def _ready(adapter: str, adapter_ready: Callable[[str | None], bool], memo: dict[str, bool]) -> bool:
        if adapter not in memo:
            memo[adapter] = bool(adapter_ready(adapter))
        return memo[adapter]

    def _preempt(self, seq: Sequence) -> None:
        """Its blocks are freed at once (cached ones stay cached), so the plan can count them."""
        self.running.remove(seq)
        self._release_adapter(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)  # victims go youngest first, so the oldest ends up in front

    def _remove(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release_adapter(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        del self._seqs[seq.seq_id]
        self._bypassed.pop(seq.seq_id, None)

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.adapter_key is not None:
            left = self._adapter_refs[seq.adapter_key] - 1
            if left:
                self._adapter_refs[seq.adapter_key] = left
            else:
                del self._adapter_refs[seq.adapter_key]


def _scheduled(seq: Sequence, n: int, num_new_blocks: int, cached: tuple[int, ...] | None = None) -> ScheduledSequence:
    start = seq.num_computed_tokens
    return ScheduledSequence(seq, start, n, samples=start + n == seq.num_positions, num_new_blocks=num_new_blocks,
                             cached_blocks=cached)


class _BlockPlan:
    """The free blocks a plan has not spoken for yet; blocks change hands only when the engine
    carries the plan out (`BlockManager.allocate_step`)."""

    def __init__(self, block_manager: BlockManager) -> None:
        self.block_manager = block_manager
        self._reserved = 0
        self._reclaimed: set[int] = set()  # free cached blocks the plan takes back

    @property
    def available(self) -> int:
        return self.block_manager.num_free_blocks - self._reserved

    def reserve(self, n: int) -> None:
        self._reserved += n

    def admission(self, seq: Sequence) -> tuple[tuple[int, ...], int, int] | None:
        """(cached blocks, positions computed, new blocks) to admit `seq` with its whole remaining
        prefill, or None if the blocks are not there.

        The leading blocks found in the prefix cache count as computed; prefix tuning's shared
        positions are computed either way (the engine writes the ones that missed).
        """
        bm = self.block_manager
        cached = tuple(bm.cached_prefix(seq))
        reclaimed = {b for b in cached if bm.ref_count(b) == 0} - self._reclaimed
        num_new_blocks = bm.blocks_for(seq.num_positions) - len(cached)
        if num_new_blocks + len(reclaimed) > self.available:
            return None
        self._reserved += num_new_blocks + len(reclaimed)
        self._reclaimed |= reclaimed
        return cached, max(len(cached) * bm.block_size, seq.num_shared_positions), num_new_blocks
