"""The adapter store: registry → host memory (LRU) → device slots (LRU, pinned while in use).

- Registration validates the adapter completely (config, every tensor's shape against the base) in
  the caller's thread, so a bad adapter is refused with its cause before anything is accepted, and
  leaves the converted weights in the host tier.
- Host-tier misses (the weights were evicted from host memory) are reloaded by one background worker
  thread; the scheduler only runs sequences whose adapter `is_ready`, so a slow load never stalls the
  step loop or other requests.
- Device slots are assigned by the engine thread each step (`assign_slots`) for the adapters of the
  running sequences; a slot used by the current step is never evicted. The store only decides: it
  returns the slots to fill, and the engine has the model runner copy them, outside the store's lock.
- The host tier holds weights as `prepare` made them (the runner's serving dtype, pinned on CUDA),
  so a device load is one plain copy.
- Every accepted request holds a reference (`acquire`/`release`): unregistering an adapter refuses
  new requests at once, while the accepted ones finish on the weights they started with.
- An adapter whose requests keep failing inside engine steps (`record_failure`) is quarantined: new
  requests get FAILED_PRECONDITION until it is unregistered and registered again.
- With an adapter repository (`AdapterConfig.adapter_repo`), `acquire` of an unregistered id first
  registers `<repo>/<id>/` (`load_from_repo`), so replicas sharing a volume serve all of its adapters
  without a register call each. Async callers run `load_from_repo` off their event loop beforehand.
"""

from __future__ import annotations

import enum
import logging
import queue
import re
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loraplex.server.adapters.kind import AdapterKind
from loraplex.server.adapters.loader import AdapterWeights, BaseModelSpec, load_adapter
from loraplex.server.config import AdapterConfig
from loraplex.server.errors import (AlreadyExists, EngineError, FailedPrecondition, InvalidArgument, NotFound,
                                    PermissionDenied, Unavailable)

log = logging.getLogger(__name__)

ADAPTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
QUARANTINE_AFTER = 2
"""Engine steps in which every request of an adapter failed, after which it is quarantined: one
failure may be a bad request; a second means the adapter itself cannot run."""


class AdapterState(enum.Enum):
    REGISTERED = "registered"  # on disk only
    HOST = "host"  # converted, in host memory
    DEVICE = "device"  # in a device slot
    QUARANTINED = "quarantined"  # failed in engine steps repeatedly; refused until registered again


@dataclass
class AdapterInfo:
    """What the API reports about an adapter."""

    adapter_id: str
    source: str
    peft_type: str
    max_rank: int
    target_modules: list[str]
    num_virtual_tokens: int
    state: AdapterState
    size_bytes: int
    pinned: bool
    quarantine_reason: str | None = None
    """Why the adapter is quarantined (state QUARANTINED)."""


@dataclass
class _Entry:
    key: str  # unique per registration: "<id>#<n>"; sequences hold this, not the id
    adapter_id: str
    source: Path
    peft_type: str
    kind: AdapterKind
    num_virtual_tokens: int
    max_rank: int
    target_modules: list[str]
    size_bytes: int
    pinned: bool
    weights: AdapterWeights | None = None
    slot: int | None = None
    references: int = 0  # accepted requests not yet finished
    unregistered: bool = False
    loading: bool = False
    error: str | None = None  # the last background load failed
    failures: int = 0  # engine steps in which all of its requests failed
    quarantined: str | None = None  # why it is refused until registered again


@dataclass
class SlotLoad:
    """A device slot to fill with an adapter's host weights before the step that uses it."""

    slot: int
    key: str
    weights: AdapterWeights


def validate_adapter_id(adapter_id: str) -> None:
    if not ADAPTER_ID.fullmatch(adapter_id or ""):
        raise InvalidArgument(
            f"adapter id {adapter_id!r} is invalid: use 1-128 characters from letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )


def resolve_source(source: str | Path, root: Path | None) -> Path:
    """The adapter directory for `source`; inside `root` when one is configured."""
    if not str(source):
        raise InvalidArgument("adapter source is empty: give the adapter's directory")
    path = Path(source)
    try:
        resolved = (path if root is None else root / path).resolve()  # an absolute `path` replaces root
    except (OSError, ValueError) as error:  # a NUL byte, a name too long for the file system
        raise InvalidArgument(f"adapter source {str(source)[:200]!r} is not a usable path: {error}") from None
    if root is None:
        return resolved
    if not resolved.is_relative_to(root):
        raise PermissionDenied(f"adapter source {str(source)!r} resolves outside the adapter root {root}")
    return resolved


class AdapterStore:
    def __init__(self, config: AdapterConfig, base: BaseModelSpec,
                 prepare: Callable[[AdapterWeights], AdapterWeights] = lambda weights: weights,
                 on_ready: Callable[[], None] = lambda: None):
        self.config = config
        self.base = base
        self._prepare = prepare
        self._on_ready = on_ready
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}  # key -> entry, unregistered ones still in use included
        self._current: dict[str, str] = {}  # registered adapter id -> key
        self._generation = 0
        self._host_lru: OrderedDict[str, None] = OrderedDict()  # keys with host weights, oldest first
        self._slots: list[str | None] = [None] * config.max_device_adapters
        self._slot_lru: OrderedDict[int, None] = OrderedDict((i, None) for i in range(config.max_device_adapters))
        self.loads: Counter[str] = Counter()  # tier -> loads into it
        self.evictions: Counter[str] = Counter()  # tier -> evictions from it
        self.quarantines = 0  # adapters quarantined since start
        self.load_listeners: list[Callable[[str, float], None]] = []  # (tier, seconds) after each load
        self._repo_loads: dict[str, threading.Lock] = {}  # adapter id -> held while reading it from the repo
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="loraplex-adapter-loader", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ registry (any thread)
    def register(self, adapter_id: str, source: str | Path, pin: bool = False) -> AdapterInfo:
        validate_adapter_id(adapter_id)
        return self._register(adapter_id, resolve_source(source, self.config.adapter_root), pin)

    def _register(self, adapter_id: str, path: Path, pin: bool) -> AdapterInfo:
        self._refuse_duplicate(adapter_id)
        started = time.perf_counter()
        weights = self._read(path)
        seconds = time.perf_counter() - started
        with self._lock:
            self._refuse_duplicate(adapter_id)
            self._generation += 1
            entry = _Entry(f"{adapter_id}#{self._generation}", adapter_id, path, weights.peft_type, weights.kind,
                           weights.num_virtual_tokens, weights.max_rank, weights.target_modules,
                           weights.size_bytes, pin)
            self._entries[entry.key] = entry
            self._current[adapter_id] = entry.key
            self._store_host(entry, weights, seconds)
            return self._info(entry)

    def unregister(self, adapter_id: str) -> None:
        """New requests get NOT_FOUND at once; accepted ones finish, then the weights are dropped."""
        validate_adapter_id(adapter_id)
        with self._lock:
            entry = self._get(adapter_id)
            entry.unregistered = True
            del self._current[adapter_id]
            self._drop_if_unused(entry)

    def get(self, adapter_id: str) -> AdapterInfo:
        validate_adapter_id(adapter_id)
        with self._lock:
            return self._info(self._get(adapter_id))

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            return [self._info(self._entries[key]) for _, key in sorted(self._current.items())]

    def would_load_from_repo(self, adapter_id: str) -> bool:
        """Whether `acquire(adapter_id)` would first read the adapter from the repository."""
        with self._lock:
            return self.config.adapter_repo is not None and adapter_id not in self._current

    def load_from_repo(self, adapter_id: str) -> None:
        """Register `adapter_id` from `<adapter_repo>/<id>/` unless it is registered (or there is no repo).

        Ids follow the registration rules (so no '..' or '/'); a directory that resolves outside the
        repository (a symlink) is PERMISSION_DENIED, a missing one NOT_FOUND, an adapter that does not
        fit the base FAILED_PRECONDITION. Concurrent first requests for one id read it once.
        """
        repo = self.config.adapter_repo
        if repo is None or not self.would_load_from_repo(adapter_id):
            return
        validate_adapter_id(adapter_id)
        path = (repo / adapter_id).resolve()
        if not path.is_relative_to(repo):
            raise PermissionDenied(f"adapter {adapter_id!r} of the adapter repository {repo} resolves outside it")
        if not path.is_dir():
            raise NotFound(f"adapter {adapter_id!r} is not registered and the adapter repository {repo} has no "
                           f"directory {adapter_id!r}")
        with self._lock:
            loading = self._repo_loads.setdefault(adapter_id, threading.Lock())
        with loading:
            try:
                if self.would_load_from_repo(adapter_id):  # else a request we waited for registered it
                    self._register(adapter_id, path, pin=False)
            except AlreadyExists:  # an explicit registration came first: serve that one
                pass
            finally:
                with self._lock:
                    if self._repo_loads.get(adapter_id) is loading:
                        del self._repo_loads[adapter_id]

    def acquire(self, adapter_id: str) -> str:
        """Count an accepted request and return the registration key its sequence carries.

        INVALID_ARGUMENT for a malformed id (the registration rules); NOT_FOUND if the adapter is not
        (or no longer) registered and no repository has it.
        """
        validate_adapter_id(adapter_id)
        self.load_from_repo(adapter_id)
        with self._lock:
            entry = self._get(adapter_id)
            if entry.quarantined is not None:
                raise FailedPrecondition(
                    f"adapter {adapter_id!r} is quarantined: {entry.quarantined}; unregister it and register it "
                    "again to serve it"
                )
            entry.references += 1
            if entry.weights is None and entry.slot is None:
                self._request_load(entry)
            return entry.key

    def release(self, key: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            entry.references -= 1
            self._drop_if_unused(entry)

    def state_counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self._state(self._entries[key]).value for key in self._current.values())

    # ------------------------------------------------------------------ engine thread
    def is_ready(self, key: str | None) -> bool:
        """Whether a sequence of this adapter can run now (weights in host memory or a slot)."""
        if key is None:
            return True
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.error is not None:
                return False
            if entry.weights is None and entry.slot is None:
                self._request_load(entry)
                return False
            return True

    def kind(self, key: str) -> tuple[AdapterKind, int]:
        """(AdapterWeights.kind, num_virtual_tokens) of a registration key."""
        with self._lock:
            entry = self._entries[key]
            return entry.kind, entry.num_virtual_tokens

    def host_weights(self, key: str) -> AdapterWeights | None:
        """The converted weights if they are in host memory (else a background load is requested)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.weights is None:
                self._request_load(entry)
            return entry.weights

    def failure(self, key: str) -> EngineError | None:
        """Why the adapter's requests cannot run, if they cannot: its last background reload failed
        (its files changed on disk: UNAVAILABLE), or it is quarantined (FAILED_PRECONDITION)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.quarantined is not None:
                return FailedPrecondition(f"adapter {entry.adapter_id!r} is quarantined: {entry.quarantined}")
            return None if entry.error is None else Unavailable(entry.error)

    def record_failure(self, key: str, reason: str) -> bool:
        """Count an engine step in which every request of the adapter failed with `reason`; returns
        whether the adapter is now quarantined (after QUARANTINE_AFTER of them)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            entry.failures += 1
            if entry.quarantined is None and entry.failures >= QUARANTINE_AFTER:
                entry.quarantined = f"its requests failed in {entry.failures} engine steps, last with {reason}"
                self.quarantines += 1
                log.error("adapter %r quarantined: %s", entry.adapter_id, entry.quarantined)
            return entry.quarantined is not None

    def assign_slots(self, keys: set[str]) -> tuple[dict[str, int], list[SlotLoad]]:
        """Device slots for this step's adapters (at most max_device_adapters of them), and the slots
        whose weights the caller must copy before the step runs (then `loaded`, or `load_failed`)."""
        if len(keys) > len(self._slots):
            raise RuntimeError(f"{len(keys)} adapters in one step, only {len(self._slots)} device slots")
        with self._lock:
            result, loads = {}, []
            for key in keys:
                entry = self._entries[key]
                if entry.slot is None:
                    slot = self._free_slot(keep=keys)
                    self._slots[slot] = key
                    entry.slot = slot
                    loads.append(SlotLoad(slot, key, entry.weights))
                self._slot_lru.move_to_end(entry.slot)
                if key in self._host_lru:
                    self._host_lru.move_to_end(key)
                result[key] = entry.slot
            return result, loads

    def loaded(self, seconds: float) -> None:
        """A device slot was filled (`assign_slots`' loads) in `seconds`."""
        with self._lock:
            self.loads["device"] += 1
        for listener in self.load_listeners:
            listener("device", seconds)

    def load_failed(self, load: SlotLoad) -> None:
        """Filling `load`'s slot raised: the slot holds nothing usable."""
        with self._lock:
            entry = self._entries.get(load.key)
            if entry is not None and entry.slot == load.slot:
                entry.slot = None
            if self._slots[load.slot] == load.key:
                self._slots[load.slot] = None

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop the loader thread and wait for it (up to `timeout` s): a read it is in the middle of
        finishes first. An interpreter exiting while the thread still reads an adapter aborts."""
        self._queue.put(None)
        if self._worker is not threading.current_thread():
            self._worker.join(timeout)

    # ------------------------------------------------------------------ internals (lock held)
    def _read(self, path: Path) -> AdapterWeights:
        try:
            return self._prepare(load_adapter(path, self.base, self.config.max_rank, self.config.allow_pickle))
        except OSError as error:  # unreadable files or directories (permissions, I/O errors)
            raise FailedPrecondition(f"adapter {path} cannot be read: {error}") from None

    def _refuse_duplicate(self, adapter_id: str) -> None:
        with self._lock:
            key = self._current.get(adapter_id)
            if key is not None:
                raise AlreadyExists(
                    f"adapter {adapter_id!r} is already registered (from {self._entries[key].source}); "
                    "unregister it first"
                )

    def _get(self, adapter_id: str) -> _Entry:
        key = self._current.get(adapter_id)
        if key is None:
            raise NotFound(f"adapter {adapter_id!r} is not registered")
        return self._entries[key]

    def _state(self, entry: _Entry) -> AdapterState:
        if entry.quarantined is not None:
            return AdapterState.QUARANTINED
        if entry.slot is not None:
            return AdapterState.DEVICE
        if entry.weights is not None:
            return AdapterState.HOST
        return AdapterState.REGISTERED

    def _info(self, entry: _Entry) -> AdapterInfo:
        return AdapterInfo(entry.adapter_id, str(entry.source), entry.peft_type, entry.max_rank,
                           list(entry.target_modules), entry.num_virtual_tokens, self._state(entry),
                           entry.size_bytes, entry.pinned, entry.quarantined)

    def _store_host(self, entry: _Entry, weights: AdapterWeights, seconds: float) -> None:
        entry.weights = weights
        entry.error = None
        self._host_lru[entry.key] = None
        self.loads["host"] += 1
        self._evict_host()
        for listener in self.load_listeners:
            listener("host", seconds)

    def _evict_host(self) -> None:
        """Drop host copies beyond max_host_adapters: least recently used first, pinned ones last."""
        while len(self._host_lru) > self.config.max_host_adapters:
            candidates = [k for k in self._host_lru if not self._entries[k].pinned] or list(self._host_lru)
            victim = candidates[0]
            self._host_lru.pop(victim)
            self._entries[victim].weights = None
            self.evictions["host"] += 1

    def _free_slot(self, keep: set[str]) -> int:
        """An empty slot, else the least recently used one whose adapter is not in this step."""
        for slot in self._slot_lru:
            if self._slots[slot] is None:
                return slot
        for slot in self._slot_lru:
            owner = self._entries[self._slots[slot]]
            if owner.key not in keep:
                owner.slot = None
                self._slots[slot] = None
                self.evictions["device"] += 1
                if owner.weights is None and owner.references:  # only the disk has it now
                    self._request_load(owner)
                return slot
        raise RuntimeError("no device slot is free for this step")

    def _drop_if_unused(self, entry: _Entry) -> None:
        if not entry.unregistered or entry.references > 0:
            return
        if entry.slot is not None:  # the next adapter loaded there overwrites every table of the slot
            self._slots[entry.slot] = None
        self._host_lru.pop(entry.key, None)
        del self._entries[entry.key]

    def _request_load(self, entry: _Entry) -> None:
        if not entry.loading:
            entry.loading = True
            self._queue.put(entry.key)

    # ------------------------------------------------------------------ background loader
    def _work(self) -> None:
        while (key := self._queue.get()) is not None:
            with self._lock:
                entry = self._entries.get(key)
            if entry is None:
                continue
            started = time.perf_counter()
            try:
                weights, error = self._read(entry.source), None
            except Exception as exc:  # the files changed on disk since registration
                weights, error = None, f"reloading adapter {entry.adapter_id!r} from {entry.source} failed: {exc}"
                log.error(error)
            with self._lock:
                entry.loading = False
                if self._entries.get(key) is entry:
                    if weights is not None:
                        self._store_host(entry, weights, time.perf_counter() - started)
                    else:
                        entry.error = error
            self._on_ready()
