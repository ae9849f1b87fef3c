"""The engine: one step loop over the scheduler, the adapter store, the model runner and the sampler.

`LLMEngine` is the synchronous core; exactly one thread calls `step`. Other threads only call
`add_request`, `abort` and the adapter methods, which validate at once (raising an `EngineError` the
API maps to a status code) and hand work to the step thread through an inbox. One step reads:

    drain inbox → schedule (a plan) → allocate its blocks, write prefix-tuning KV → assign adapter
    slots → run the model → sample → name computed blocks in the prefix cache → detokenize/stop → emit

A step that raises ends only the requests that cause it (`_isolate`): the step's sequences are run
again split by adapter, failing groups halved down to single sequences; everyone else's results of
the step are kept. An adapter whose every request fails is named in their error and, after repeated
failures, quarantined by the adapter store.

`AsyncEngine` runs the step loop in its own thread and exposes `generate(request)` as an async
iterator of `RequestOutput`s for asyncio code; it implements `EngineClient` (engine/client.py), the
one interface the network fronts use.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from loraplex.server.adapters.kind import AdapterKind
from loraplex.server.adapters.store import AdapterInfo, AdapterStore
from loraplex.server.engine.block_manager import BlockManager
from loraplex.server.config import EngineConfig, SchedulerConfig
from loraplex.server.engine.detokenizer import IncrementalDetokenizer, StopChecker
from loraplex.server.errors import EngineError, InvalidArgument, Unavailable
from loraplex.server.failures import internal_error_message, report_internal_error
from loraplex.server.model.runner import ModelRunner, StepInput
from loraplex.server.model.sampling import Sampler, SamplingParams
from loraplex.server.engine.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from loraplex.server.engine.sequence import Sequence

log = logging.getLogger(__name__)

FINISH_LENGTH, FINISH_STOP, FINISH_EOS = "length", "stop", "eos"
FINISH_CANCELLED, FINISH_ERROR = "cancelled", "error"


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: str | None = None
    """Text to tokenize; or give prompt_token_ids."""
    prompt_token_ids: tuple[int, ...] | None = None
    adapter_id: str | None = None
    """None (or "") is the base model."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    cache_prompt: bool = True
    """Take the prompt's leading blocks from the prefix cache and leave its blocks there (when the
    server's prefix caching is on)."""


@dataclass
class RequestOutput:
    """New output of one request since its previous RequestOutput (a delta), or its end."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    """"length", "stop", "eos", "cancelled" or "error" on the last output."""
    error: EngineError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class StepStats:
    num_tokens: int
    num_sequences: int
    num_adapters: int
    """Distinct adapters (base model excluded) in the step."""
    seconds: float


@dataclass
class EngineSnapshot:
    """Gauges and counters for the metrics layer, read at scrape time from any thread."""

    num_waiting: int
    num_running: int
    kv_cache_usage: float
    adapters_by_state: dict[str, int]
    adapter_loads: dict[str, int]
    adapter_evictions: dict[str, int]
    num_steps: int
    num_preemptions: int
    num_step_failures: int
    """Steps that raised and were rerun to isolate the failing requests."""
    num_quarantines: int
    """Adapters quarantined since start."""
    prefix_cache_queries: dict[str | None, int] = field(default_factory=dict)
    """Prompt tokens looked up in the prefix cache, by adapter id (None: the base model)."""
    prefix_cache_hits: dict[str | None, int] = field(default_factory=dict)
    """Prompt tokens whose KV came from the prefix cache, by adapter id."""
    prefix_cache_blocks: int = 0
    """KV blocks the prefix cache names (referenced by running requests or reclaimable)."""
    prefix_cache_evictions: int = 0
    """Cached blocks handed out for other positions since start."""
    running_adapters: frozenset[str] = frozenset()
    """Adapter ids of running requests (the base model not counted)."""
    waiting_adapters: frozenset[str] = frozenset()
    """Adapter ids of accepted requests waiting to start."""


@dataclass(frozen=True)
class ServerInfo:
    """The model and the engine's limits, as the network fronts report them; fixed once the engine is up."""

    model_path: str
    architectures: tuple[str, ...]
    quantization: str
    dtype: str
    device: str
    int8_threshold: float
    batch_invariant: bool
    max_model_len: int
    """Tokens of context: the prompt (with an adapter's virtual tokens) and the generated ones."""
    kv_cache_tokens: int
    block_size: int
    """Tokens per KV block."""
    prefix_caching: bool
    max_rank: int
    max_device_adapters: int
    max_host_adapters: int


@dataclass
class _RequestState:
    request: GenerationRequest
    sink: Callable[[RequestOutput], None]
    detokenizer: IncrementalDetokenizer
    stop_checker: StopChecker
    seed: int | None
    """Keys the request's noise (its own seed, or one the engine drew); None for greedy requests."""
    max_new_tokens: int
    adapter_key: str | None
    kind: AdapterKind | None
    """None for the base model."""
    adapter_virtual_tokens: int
    """The adapter's virtual tokens (prompt or prefix tuning), before padding to
    `Sequence.num_virtual_positions`."""


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.runner = ModelRunner(config)
        self.tokenizer = self.runner.tokenizer
        self.eos_token_ids = self._eos_ids()
        self.block_manager = BlockManager(self.runner.num_blocks, self.runner.block_size)
        self.initial_free_blocks = self.block_manager.num_free_blocks
        self.scheduler = Scheduler(config.scheduler or self._default_scheduler_config(), self.block_manager)
        budgets = self.scheduler.config
        self.runner.reserve(budgets.max_num_batched_tokens, budgets.max_num_seqs)
        self.runner.prepare_decode_graphs(budgets.max_num_seqs)
        self._wake = threading.Event()
        self.store = AdapterStore(config.adapters, self.runner.base_spec, self.runner.host_tier,
                                  on_ready=self._wake.set)
        head = self.runner.model.get_output_embeddings()
        self.sampler = Sampler(getattr(head, "out_features", None) or head.weight.shape[0], self.runner.device,
                               max_rows=self.scheduler.config.max_num_seqs)
        self._seeds = random.Random(config.seed)
        self._inbox: deque[Sequence] = deque()
        self._aborts: deque[str] = deque()
        self._sequences: dict[str, Sequence[_RequestState]] = {}  # request id -> live sequence
        self._lock = threading.Lock()  # guards _sequences for add/abort from other threads
        self._prefix_queries: dict[str | None, int] = defaultdict(int)
        self._prefix_hits: dict[str | None, int] = defaultdict(int)
        self.step_listeners: list[Callable[[StepStats], None]] = []
        self.num_steps = 0
        self.num_step_failures = 0

    def _eos_ids(self) -> set[int]:
        ids = self.runner.hf_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return set(ids)

    def _default_scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            max_num_seqs=256,
            max_num_batched_tokens=max(2048, self.runner.block_size),
            max_adapters=self.config.adapters.max_device_adapters,
            max_model_len=self.runner.max_model_len,
        )

    # ------------------------------------------------------------------ any thread
    def add_request(self, request: GenerationRequest, sink: Callable[[RequestOutput], None]) -> None:
        """Validate and queue a request; raises an EngineError (nothing queued) if it cannot run."""
        params = request.sampling
        if not request.request_id:
            raise InvalidArgument("request_id is empty")
        prompt_ids = self._prompt_ids(request)
        adapter_key = self.store.acquire(request.adapter_id) if request.adapter_id else None
        try:
            kind, num_virtual = self.store.kind(adapter_key) if adapter_key else (None, 0)
            max_len = self.scheduler.config.max_model_len
            if len(prompt_ids) + num_virtual >= max_len:
                virtual = f" (+ {num_virtual} virtual tokens of the adapter)" if num_virtual else ""
                raise InvalidArgument(
                    f"the prompt has {len(prompt_ids)} tokens{virtual}; the model's context is {max_len} tokens, "
                    "including at least one generated token"
                )
            max_new_tokens = min(params.max_new_tokens, max_len - len(prompt_ids) - num_virtual)
            # prefix-tuning entries fill whole blocks, shared by every sequence of the adapter
            kv_virtual = self.block_manager.blocks_for(num_virtual) * self.block_manager.block_size \
                if kind is AdapterKind.PREFIX else num_virtual
            problem = self.scheduler.check_admissible(len(prompt_ids), max_new_tokens, kv_virtual)
            if problem is not None:
                raise problem
            seed = None if params.greedy else params.seed if params.seed is not None else self._seeds.getrandbits(64)
            state = _RequestState(request, sink, IncrementalDetokenizer(self.tokenizer, prompt_ids),
                                  StopChecker(params.stop), seed, max_new_tokens, adapter_key, kind, num_virtual)
            seq = Sequence(request.request_id, prompt_ids, max_new_tokens=max_new_tokens, adapter_key=adapter_key,
                           num_virtual_positions=kv_virtual,
                           num_shared_positions=kv_virtual if kind is AdapterKind.PREFIX else 0,
                           cache_prompt=self.config.cache.prefix_caching and request.cache_prompt, extra=state)
            with self._lock:
                if request.request_id in self._sequences:
                    raise InvalidArgument(f"request_id {request.request_id!r} is already in flight")
                self._sequences[request.request_id] = seq
        except BaseException:
            if adapter_key is not None:
                self.store.release(adapter_key)
            raise
        self._inbox.append(seq)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Stop a request: its blocks and adapter reference are freed by the next step."""
        self._aborts.append(request_id)
        self._wake.set()

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
            bad = [i for i in ids if not 0 <= i < self.runner.vocab_size]
            if bad:
                raise InvalidArgument(
                    f"prompt_token_ids holds {bad[0]}, outside the vocabulary [0, {self.runner.vocab_size})"
                )
        else:
            ids = self.tokenizer.encode(request.prompt or "", add_special_tokens=True)
        if not ids:
            raise InvalidArgument("the prompt is empty")
        return ids

    # ------------------------------------------------------------------ adapters (any thread)
    def register_adapter(self, adapter_id: str, source: str, pin: bool = False) -> AdapterInfo:
        return self.store.register(adapter_id, source, pin=pin)

    def unregister_adapter(self, adapter_id: str) -> None:
        self.store.unregister(adapter_id)

    def list_adapters(self) -> list[AdapterInfo]:
        return self.store.list()

    def get_adapter(self, adapter_id: str) -> AdapterInfo:
        return self.store.get(adapter_id)

    def num_live_requests(self) -> int:
        return len(self._sequences)

    def snapshot(self) -> EngineSnapshot:
        scheduler = self.scheduler
        # list() copies each queue in one C call, so the step thread cannot mutate it mid-iteration
        running = list(scheduler.running)
        waiting = list(scheduler.waiting) + list(self._inbox)
        return EngineSnapshot(
            num_waiting=scheduler.num_waiting + len(self._inbox),
            num_running=scheduler.num_running,
            kv_cache_usage=self.block_manager.usage(),
            prefix_cache_queries=dict(self._prefix_queries),
            prefix_cache_hits=dict(self._prefix_hits),
            prefix_cache_blocks=self.block_manager.num_cached_blocks,
            prefix_cache_evictions=self.block_manager.num_evictions,
            adapters_by_state=dict(self.store.state_counts()),
            adapter_loads=dict(self.store.loads),
            adapter_evictions=dict(self.store.evictions),
            num_steps=self.num_steps,
            num_preemptions=self.scheduler.num_preemptions,
            running_adapters=_adapter_ids(running),
            waiting_adapters=_adapter_ids(waiting),
            num_step_failures=self.num_step_failures,
            num_quarantines=self.store.quarantines,
        )

    # ------------------------------------------------------------------ the step thread
    def has_work(self) -> bool:
        return bool(self._inbox or self._aborts or self.scheduler.has_unfinished())

    def wait_for_work(self, timeout: float) -> None:
        self._wake.wait(timeout)
        self._wake.clear()

    def step(self) -> StepStats | None:
        """Run one step; returns its stats, or None when nothing could run."""
        started = time.perf_counter()
        self._drain_inbox()
        self._fail_broken_adapters()
        out = self.scheduler.schedule(self._adapter_ready)
        if not out.scheduled:
            return None
        self.block_manager.allocate_step(out.scheduled)
        for item in out.scheduled:
            if item.admitted:
                self._start(item)
        live = [item for item in out.scheduled if not item.seq.is_finished]
        if not live:
            return None
        out = SchedulerOutput(live, out.preempted, sum(s.num_new_tokens for s in live))
        running_keys = {s.adapter_key for s in self.scheduler.running if s.adapter_key is not None}
        running_keys |= {s.seq.adapter_key for s in out.scheduled if s.seq.adapter_key is not None}
        try:
            sampled, logprobs = self._run(out.scheduled, running_keys)
        except Exception as error:
            sampled, logprobs = self._isolate(out.scheduled, error)
        self.scheduler.update(out, sampled)
        for item in out.scheduled:
            if not item.seq.is_finished:
                self.block_manager.cache_computed(item.seq)
        for item in out.scheduled:
            seq = item.seq
            if seq.seq_id not in sampled:
                continue
            try:
                self._postprocess(seq, sampled[seq.seq_id], logprobs[seq.seq_id])
            except Exception as error:  # detokenizing or stop-checking this request's text: end it alone
                log.exception("postprocessing request %s failed", seq.request_id)
                self._fail(seq, EngineError(f"the engine failed on this request's output: {error!r}"))
        stats = StepStats(
            num_tokens=sum(s.num_new_tokens for s in out.scheduled),
            num_sequences=len(out.scheduled),
            num_adapters=len({s.seq.adapter_key for s in out.scheduled if s.seq.adapter_key is not None}),
            seconds=time.perf_counter() - started,
        )
        self.num_steps += 1
        for listener in self.step_listeners:
            listener(stats)
        return stats

    def _run(self, items: list[ScheduledSequence], keys: set[str]) -> tuple[dict[int, int], dict[int, float]]:
        """Run `items` in one forward pass and sample them: ({seq_id: token}, {seq_id: logprob}).

        keys: adapters that get (or keep) a device slot, at least those of `items`.
        """
        slots, loads = self.store.assign_slots(keys)
        for load in loads:  # the store decided; the runner copies, outside the store's lock
            started = time.perf_counter()
            try:
                self.runner.load_slot(load.slot, load.weights)
            except BaseException:
                self.store.load_failed(load)
                raise
            self.store.loaded(time.perf_counter() - started)
        inputs = [self._step_input(s.seq, s.num_new_tokens, slots.get(s.seq.adapter_key, -1), s.samples)
                  for s in items]
        sampling = [s.seq for s in items if s.samples]
        if not sampling:
            self.runner.execute(inputs)
            return {}, {}
        ids = [seq.seq_id for seq in sampling]
        # per-row parameters ride in the step's one copy; the draw number is the tokens sampled so far
        batch = self.sampler.prepare([seq.extra.request.sampling for seq in sampling],
                                     [seq.extra.seed for seq in sampling],
                                     [seq.num_output_tokens for seq in sampling],
                                     [seq.token_ids for seq in sampling], ids)
        logits = self.runner.execute(inputs, batch.attach)
        tokens, logprobs = self.sampler.sample(logits, batch)
        return dict(zip(ids, tokens)), dict(zip(ids, logprobs))

    def _isolate(self, items: list[ScheduledSequence],
                 error: Exception) -> tuple[dict[int, int], dict[int, float]]:
        """The step raised `error`: find the sequences that make it fail, end only those, and return
        the sampled tokens of all the others.

        The sequences run again split by adapter; a group that still fails is halved down to single
        sequences. Nothing a failed run did survives it: the scheduler has not advanced, the KV
        positions it wrote are written again by each sequence's successful run (before anything reads
        them), and a sampled row's noise depends on its seed and output length only, which a failed
        run does not advance (nor the penalty mask's marked counts). Only this path
        pays for the search; a step that does not raise costs nothing more.
        """
        self.num_step_failures += 1
        log.warning("an engine step of %d sequences failed (%r); rerunning them to isolate the cause",
                    len(items), error)
        groups: dict[str | None, list[ScheduledSequence]] = defaultdict(list)
        for item in items:
            groups[item.seq.adapter_key].append(item)
        failed: dict[int, Exception] = {}
        if len(items) == 1:
            failed[items[0].seq.seq_id] = error
            pending = []
        else:
            pending = list(groups.values()) if len(groups) > 1 else _halves(items)
        sampled: dict[int, int] = {}
        logprobs: dict[int, float] = {}
        while pending:
            part = pending.pop()
            try:
                part_sampled, part_logprobs = self._run(part, {s.seq.adapter_key for s in part} - {None})
            except Exception as part_error:
                if len(part) == 1:
                    failed[part[0].seq.seq_id] = part_error
                else:
                    pending.extend(_halves(part))
                continue
            sampled.update(part_sampled)
            logprobs.update(part_logprobs)
        for key, group in groups.items():
            bad = [item.seq for item in group if item.seq.seq_id in failed]
            if not bad:
                continue
            adapter_id = bad[0].extra.request.adapter_id
            whole_adapter = key is not None and len(bad) == len(group)
            # The client learns which adapter failed and an error id; the traceback goes to the log only.
            error_ids = {seq.seq_id: report_internal_error(f"the engine step of request {seq.request_id}",
                                                           failed[seq.seq_id]) for seq in bad}
            quarantined = whole_adapter and self.store.record_failure(key, f"error id {error_ids[bad[0].seq_id]}")
            for seq in bad:
                if whole_adapter:
                    then = "; it is now quarantined" if quarantined else ""
                    message = f"adapter {adapter_id!r} failed in the engine step{then}"
                else:
                    what = f"adapter {adapter_id!r}" if adapter_id else "the base model"
                    message = f"this request ({what}) failed in the engine step"
                message += f"; other requests were not affected; {internal_error_message(error_ids[seq.seq_id])}"
                log.error("ending request %s: %s", seq.request_id, message)
                self._fail(seq, EngineError(message))
        return sampled, logprobs

    def _fail(self, seq: Sequence, error: EngineError) -> None:
        self.scheduler.abort(seq.seq_id)
        self._close(seq, RequestOutput(seq.request_id, finished=True, finish_reason=FINISH_ERROR, error=error))

    def _start(self, item: ScheduledSequence) -> None:
        """A sequence admitted this step: count its prefix-cache lookup, write the prefix-tuning KV
        its cached blocks do not hold."""
        seq = item.seq
        state = seq.extra
        num_cached = len(item.cached_blocks) * self.block_manager.block_size
        if seq.num_preemptions == 0 and seq.cache_prompt:
            adapter_id = state.request.adapter_id or None
            self._prefix_queries[adapter_id] += seq.num_prompt_tokens
            self._prefix_hits[adapter_id] += max(0, num_cached - seq.num_virtual_positions)
        if seq.num_shared_positions <= num_cached:
            return
        weights = self.store.host_weights(seq.adapter_key)
        if weights is None:  # dropped from host memory since the scheduler asked: wait for the reload
            self._fail(seq, Unavailable(f"adapter {state.request.adapter_id!r} was evicted while its request "
                                        "started; retry"))
            return
        self.runner.write_prefix(seq.block_table[: self.block_manager.blocks_for(seq.num_shared_positions)],
                                 weights.prefix_kv)

    def _step_input(self, seq: Sequence[_RequestState], n: int, slot: int, samples: bool) -> StepInput:
        state = seq.extra
        start = seq.num_computed_tokens
        virtual = skip = None
        if state.kind is AdapterKind.PROMPT and start < state.adapter_virtual_tokens:
            virtual = self.runner.slot_prompts[slot][start : min(start + n, state.adapter_virtual_tokens)]
        elif state.kind is AdapterKind.PREFIX and seq.num_virtual_positions > state.adapter_virtual_tokens:
            skip = (state.adapter_virtual_tokens, seq.num_virtual_positions)
        return StepInput(token_ids=seq.token_ids_at(start, start + n), start=start, block_table=seq.block_table,
                         slot=slot, samples=samples, virtual_embeddings=virtual, skip=skip)

    def _adapter_ready(self, key: str) -> bool:
        """Whether sequences of this adapter can be admitted now: a prefix-tuning adapter also needs
        its weights in host memory, for the KV the engine writes when the sequence starts."""
        if not self.store.is_ready(key):
            return False
        return self.store.kind(key)[0] is not AdapterKind.PREFIX or self.store.host_weights(key) is not None

    def _drain_inbox(self) -> None:
        while self._inbox:
            self.scheduler.add(self._inbox.popleft())
        while self._aborts:
            request_id = self._aborts.popleft()
            seq = self._sequences.get(request_id)
            if seq is not None:
                self.scheduler.abort(seq.seq_id)
                self._close(seq, RequestOutput(request_id, finished=True, finish_reason=FINISH_CANCELLED))

    def _fail_broken_adapters(self) -> None:
        for seq in list(self._sequences.values()):
            key = seq.adapter_key
            error = self.store.failure(key) if key is not None and not seq.is_finished else None
            if error is not None:
                self._fail(seq, error)

    def _postprocess(self, seq: Sequence[_RequestState], token: int, logprob: float) -> None:
        state = seq.extra
        params = state.request.sampling
        finish = None
        text = ""
        if token in self.eos_token_ids and not params.ignore_eos:
            finish = FINISH_EOS
        else:
            text, stopped = state.stop_checker.feed(state.detokenizer.push(token))
            if stopped:
                finish = FINISH_STOP
        if finish is None and (
            seq.num_output_tokens >= state.max_new_tokens
            or seq.num_tokens + state.adapter_virtual_tokens >= self.scheduler.config.max_model_len
        ):
            finish = FINISH_LENGTH
        if finish in (FINISH_EOS, FINISH_LENGTH):  # release held-back text; it may still complete a stop string
            tail, stopped = state.stop_checker.feed(state.detokenizer.flush())
            text += tail if stopped else tail + state.stop_checker.flush()
            finish = FINISH_STOP if stopped else finish
        output = RequestOutput(
            seq.request_id,
            text=text,
            token_ids=[token],
            logprobs=[logprob] if params.return_logprobs else [],
            finished=finish is not None,
            finish_reason=finish,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_output_tokens,
        )
        if finish is None:
            state.sink(output)
        else:
            self.scheduler.finish(seq)
            self._close(seq, output)

    def _close(self, seq: Sequence[_RequestState], output: RequestOutput) -> None:
        state = seq.extra
        with self._lock:
            if self._sequences.pop(seq.request_id, None) is None:
                return
        if state.adapter_key is not None:
            self.store.release(state.adapter_key)
        self.sampler.release(seq.seq_id)
        output.prompt_tokens = seq.num_prompt_tokens
        output.completion_tokens = seq.num_output_tokens
        state.sink(output)

    def fail_all(self, error: EngineError) -> None:
        """End every live request with `error`: the engine's own bookkeeping (scheduling, not the
        model step, whose failures `_isolate` confines) hit a bug, so no state can be trusted."""
        for seq in list(self._sequences.values()):
            self._fail(seq, error)
        self._inbox.clear()

    def close(self) -> None:
        self.store.close()


def _adapter_ids(sequences: list[Sequence[_RequestState]]) -> frozenset[str]:
    return frozenset(seq.extra.request.adapter_id for seq in sequences if seq.extra.request.adapter_id)


def _halves(items: list[ScheduledSequence]) -> list[list[ScheduledSequence]]:
    middle = len(items) // 2
    return [items[:middle], items[middle:]]


class AsyncEngine:
    """The engine's step loop in a thread of its own, with an asyncio front."""

    def __init__(self, config: EngineConfig):
        self.engine = LLMEngine(config)
        runner, model, adapters = self.engine.runner, config.model, config.adapters
        self._info = ServerInfo(
            model_path=str(model.path), architectures=tuple(runner.hf_config.architectures or ()),
            quantization=model.quantization, dtype=model.dtype, device=str(runner.device),
            int8_threshold=model.int8_threshold, batch_invariant=model.batch_invariant,
            max_model_len=self.engine.scheduler.config.max_model_len,
            kv_cache_tokens=runner.num_blocks * runner.block_size, block_size=runner.block_size,
            prefix_caching=config.cache.prefix_caching, max_rank=adapters.max_rank,
            max_device_adapters=adapters.max_device_adapters, max_host_adapters=adapters.max_host_adapters,
        )
        self._stop = threading.Event()
        self._draining = False
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)

    def start(self) -> "AsyncEngine":
        self._thread.start()
        return self

    def _loop(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            if not engine.has_work():
                engine.wait_for_work(timeout=0.5)
                continue
            try:
                stats = engine.step()
            except Exception:
                error_id = report_internal_error("the engine step")
                engine.fail_all(EngineError(internal_error_message(error_id)))
                continue
            if stats is None:  # work exists but none can run yet (an adapter is loading)
                engine.wait_for_work(timeout=0.01)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Outputs of `request` as they are produced; closing the iterator early aborts it."""
        if self._draining:
            raise Unavailable("the server is shutting down and accepts no new requests")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        sink = lambda output: loop.call_soon_threadsafe(queue.put_nowait, output)  # noqa: E731
        if request.adapter_id and self.engine.store.would_load_from_repo(request.adapter_id):
            # first use of a repository adapter: add_request reads and validates its files, no work for the loop
            await asyncio.to_thread(self.engine.add_request, request, sink)
        else:
            self.engine.add_request(request, sink)
        finished = False
        try:
            while not finished:
                output = await queue.get()
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.engine.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    # Adapter calls read files (registration validates every tensor): run them off the event loop.
    async def register_adapter(self, adapter_id: str, source: str, pin: bool = False) -> AdapterInfo:
        return await asyncio.to_thread(self.engine.register_adapter, adapter_id, source, pin)

    async def unregister_adapter(self, adapter_id: str) -> None:
        await asyncio.to_thread(self.engine.unregister_adapter, adapter_id)

    def list_adapters(self) -> list[AdapterInfo]:
        return self.engine.list_adapters()

    def get_adapter(self, adapter_id: str) -> AdapterInfo:
        return self.engine.get_adapter(adapter_id)

    def server_info(self) -> ServerInfo:
        return self._info

    def get_tokenizer(self):
        return self.engine.tokenizer

    def snapshot(self) -> EngineSnapshot:
        return self.engine.snapshot()

    def add_step_listener(self, listener: Callable[[StepStats], None]) -> None:
        """Call `listener` on the engine thread after every step that ran."""
        self.engine.step_listeners.append(listener)

    def add_adapter_load_listener(self, listener: Callable[[str, float], None]) -> None:
        """Call `listener(tier, seconds)` (any thread) after each adapter load into "host" or "device"."""
        self.engine.store.load_listeners.append(listener)

    def num_live_requests(self) -> int:
        return self.engine.num_live_requests()

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests and wait up to `timeout` s for the live ones; True if all finished."""
        self._draining = True
        deadline = time.monotonic() + timeout
        while self.num_live_requests() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.num_live_requests()

    def shutdown(self) -> None:
        self._stop.set()
        self.engine._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.engine.close()
