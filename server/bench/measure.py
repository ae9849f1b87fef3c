"""Measurements of `loraplex bench`: one timed run of a batch, and how repeated runs are summarized.

A run records, per request, the time each generated token reached the caller. From those:
throughput = generated tokens / wall time of the run; time to first token (TTFT) = first token time
minus the run's start (every request is submitted at the start); inter-token latency (ITL) = gaps
between a request's consecutive tokens. Memory = the bytes the system keeps resident (weights,
adapters, KV cache) plus the peak growth during the run (CUDA: `max_memory_allocated`; CPU: the
process RSS sampled every 5 ms).

The machine is shared and noisy, so systems are measured in rounds that alternate their order, and
each ratio is the median over rounds of the ratio within a round (both sides measured seconds apart).
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field

import torch


@dataclass
class RunResult:
    seconds: float
    token_times: list[list[float]]
    """Per request: seconds since the run's start at which each token arrived."""
    transient_bytes: int = 0
    step_seconds: list[float] = field(default_factory=list)
    """Decode steps only (every scheduled sequence computed one token); loraplex runs only."""

    @property
    def tokens(self) -> int:
        return sum(len(times) for times in self.token_times)

    @property
    def throughput(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def ttfts(self) -> list[float]:
        return [times[0] for times in self.token_times if times]

    @property
    def itls(self) -> list[float]:
        return [b - a for times in self.token_times for a, b in zip(times, times[1:])]


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class SystemSummary:
    name: str
    throughput: float
    """Median over rounds, generated tokens per second."""
    throughputs: list[float]
    ttft_p50: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p99: float | None
    memory_bytes: int | None
    """Resident bytes plus the largest transient peak of its runs; None when unknown (gRPC)."""
    decode_step_p50: float | None = None

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "throughput_tok_s": self.throughput,
            "throughputs_tok_s": self.throughputs,
            "ttft_p50_s": self.ttft_p50,
            "ttft_p99_s": self.ttft_p99,
            "itl_p50_s": self.itl_p50,
            "itl_p99_s": self.itl_p99,
            "peak_memory_bytes": self.memory_bytes,
            "decode_step_p50_s": self.decode_step_p50,
        }


def summarize(name: str, runs: list[RunResult], resident_bytes: int | None) -> SystemSummary:
    """Latency percentiles pool every request of every measured run."""
    ttfts = [t for run in runs for t in run.ttfts]
    itls = [t for run in runs for t in run.itls]
    steps = [t for run in runs for t in run.step_seconds]
    memory = None if resident_bytes is None else resident_bytes + max((r.transient_bytes for r in runs), default=0)
    throughputs = [run.throughput for run in runs]
    return SystemSummary(
        name=name,
        throughput=statistics.median(throughputs),
        throughputs=throughputs,
        ttft_p50=percentile(ttfts, 50),
        ttft_p99=percentile(ttfts, 99),
        itl_p50=percentile(itls, 50),
        itl_p99=percentile(itls, 99),
        memory_bytes=memory,
        decode_step_p50=percentile(steps, 50),
    )


def median_ratio(numerator: list[RunResult], denominator: list[RunResult]) -> float:
    """Median over rounds of throughput(numerator) / throughput(denominator) within the round."""
    return statistics.median(a.throughput / b.throughput for a, b in zip(numerator, denominator))


def round_orders(names: list[str], rounds: int) -> list[list[str]]:
    """Rotate and reverse the order of the systems from round to round, so that no system always
    runs first (caches warm) or right after the same neighbour."""
    orders = []
    for i in range(rounds):
        shift = i % len(names)
        order = names[shift:] + names[:shift]
        orders.append(order[::-1] if (i // len(names)) % 2 else order)
    return orders


class MemoryWatch:
    """Peak memory growth over a block: CUDA's allocator peak, or the process RSS sampled on CPU."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device = device
        self.interval = interval
        self.peak_growth = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "MemoryWatch":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = rss_bytes()
            self._peak = self._start
            self._thread = threading.Thread(target=self._sample, name="bench-rss", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_growth = max(0, torch.cuda.max_memory_allocated(self.device) - self._start)
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, rss_bytes())
            self.peak_growth = max(0, self._peak - self._start)


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return 0
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors` (views of one storage count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now() -> float:
    return time.perf_counter()
