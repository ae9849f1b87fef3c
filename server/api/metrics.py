"""Prometheus metrics of one server, on a registry of its own (several servers can share a process).

Three sources, each read where it is cheapest:
- per request, by the gRPC servicer and the HTTP API alike (`RequestTracker`): requests, tokens,
  latencies, error codes;
- per engine step, by a step listener on the engine thread: batch size and distinct adapters;
- at scrape time, from `engine.snapshot()` (`_SnapshotCollector`): queue, running requests, KV usage,
  the prefix cache (lookups and hits by adapter, cached blocks, evictions),
  adapters by state, the adapters of running and waiting requests (the inference gateway's
  `lora_requests_info` format), and the adapter store's load/eviction counters (kept by the store,
  so exposed as counters built at scrape time rather than mirrored).

Every metric is listed with its meaning in README.md ("Metrics").
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from loraplex.server.engine.client import EngineClient, RequestOutput, StepStats

BASE_MODEL_LABEL = "_base"
"""The `adapter` label of base-model requests; no adapter id can start with '_'."""
ADAPTER_STATES = ("registered", "host", "device", "quarantined")
TIERS = ("host", "device")

# Latencies from a 4 M-parameter model on a CPU (milliseconds) to a 70 B model behind a long queue.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
ADAPTER_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("loraplex_requests", "Generation requests ended, by adapter and finish reason "
                                "(length, stop, eos; cancelled: the client cancelled or its deadline passed; "
                                "error: the request failed after it was accepted)",
                                ["adapter", "finish_reason"], registry=r)
        self.errors = Counter("loraplex_request_errors", "RPCs (both services) that ended with a status other "
                              "than OK, by gRPC status code name", ["code"], registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens of requests that reached the "
                                     "engine's first output, by adapter", ["adapter"], registry=r)
        self.generated_tokens = Counter("loraplex_generated_tokens", "Tokens generated, by adapter (counted as "
                                        "they are produced, so cancelled requests count what they got)",
                                        ["adapter"], registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "From a request's arrival to its first "
                              "generated token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loraplex_inter_token_latency_seconds", "Between consecutive generated tokens of "
                             "one request", buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("loraplex_request_duration_seconds", "From a request's arrival to its end "
                                  "(requests the engine accepted)", buckets=DURATION_BUCKETS, registry=r)
        self.batch_tokens = Histogram("loraplex_batch_size_tokens", "Tokens run in one engine step (prefill "
                                      "chunks plus one per decoding sequence)", buckets=TOKEN_BUCKETS, registry=r)
        self.batch_sequences = Histogram("loraplex_batch_size_sequences", "Sequences in one engine step",
                                         buckets=TOKEN_BUCKETS, registry=r)
        self.batch_adapters = Histogram("loraplex_batch_distinct_adapters", "Distinct adapters in one engine "
                                        "step (the base model not counted)", buckets=ADAPTER_BUCKETS, registry=r)
        self.step_seconds = Histogram("loraplex_step_duration_seconds", "Wall time of one engine step",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_load = Histogram("loraplex_adapter_load_seconds", "Loading one adapter into a tier: "
                                      "host (read and convert from disk), device (copy into a slot)",
                                      ["tier"], buckets=LATENCY_BUCKETS, registry=r)
        self._snapshot = _SnapshotCollector()
        r.register(self._snapshot)

    def attach(self, engine: "EngineClient") -> None:
        """Start observing `engine`: step and adapter-load listeners, and the scrape-time snapshot."""
        engine.add_step_listener(self._on_step)
        engine.add_adapter_load_listener(self._on_adapter_load)
        self._snapshot.engine = engine

    def _on_step(self, stats: "StepStats") -> None:  # engine thread
        self.batch_tokens.observe(stats.num_tokens)
        self.batch_sequences.observe(stats.num_sequences)
        self.batch_adapters.observe(stats.num_adapters)
        self.step_seconds.observe(stats.seconds)

    def _on_adapter_load(self, tier: str, seconds: float) -> None:  # any thread
        self.adapter_load.labels(tier).observe(seconds)

    def count_error(self, code_name: str) -> None:
        self.errors.labels(code_name).inc()

    def track(self, adapter_id: str | None) -> "RequestTracker":
        return RequestTracker(self, adapter_id or BASE_MODEL_LABEL)

    def serve_http(self, host: str, port: int) -> tuple[Callable[[], None], int]:
        """Serve /metrics on host:port (0: a free port); returns (stop, bound port)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return stop, server.server_port


class RequestTracker:
    """Latency and token accounting of one accepted request."""

    def __init__(self, metrics: Metrics, adapter: str):
        self.metrics = metrics
        self.adapter = adapter
        self.started = time.perf_counter()
        self.last_token: float | None = None
        self.prompt_counted = False
        self.ended = False

    def output(self, output: "RequestOutput") -> None:
        m = self.metrics
        if not self.prompt_counted and output.prompt_tokens:
            m.prompt_tokens.labels(self.adapter).inc(output.prompt_tokens)
            self.prompt_counted = True
        n = len(output.token_ids)
        if not n:
            return
        now = time.perf_counter()
        if self.last_token is None:
            m.ttft.observe(now - self.started)
        else:
            for _ in range(n):  # a delta of several tokens shares its gap evenly
                m.itl.observe((now - self.last_token) / n)
        self.last_token = now
        m.generated_tokens.labels(self.adapter).inc(n)

    def end(self, finish_reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.metrics.requests.labels(self.adapter, finish_reason).inc()
        self.metrics.duration.observe(time.perf_counter() - self.started)


class _SnapshotCollector(Collector):
    """Gauges and store counters read from the engine when Prometheus scrapes."""

    def __init__(self) -> None:
        self.engine: "EngineClient | None" = None

    def describe(self):
        return []  # the families depend on the engine being up; nothing to check at registration

    def collect(self):
        engine = self.engine
        if engine is None:  # still loading the model
            return
        snap = engine.snapshot()
        yield GaugeMetricFamily("loraplex_queue_depth", "Requests accepted and waiting to start",
                                value=snap.num_waiting)
        yield GaugeMetricFamily("loraplex_running_requests", "Requests running in the engine (holding KV blocks)",
                                value=snap.num_running)
        yield GaugeMetricFamily("loraplex_kv_cache_usage_ratio", "Fraction of KV cache blocks held by running "
                                "requests (blocks only the prefix cache keeps are reclaimable and not counted)",
                                value=snap.kv_cache_usage)
        adapters = GaugeMetricFamily("loraplex_adapters", "Registered adapters by where their weights are "
                                     "(registered: disk only, host: host memory, device: a device slot; "
                                     "quarantined: refused after repeated failures)",
                                     labels=["state"])
        for state in ADAPTER_STATES:
            adapters.add_metric([state], snap.adapters_by_state.get(state, 0))
        yield adapters
        loads = CounterMetricFamily("loraplex_adapter_loads", "Adapter loads into a tier (host: from disk, "
                                    "device: into a slot)", labels=["tier"])
        evictions = CounterMetricFamily("loraplex_adapter_evictions", "Adapters evicted from a tier to make "
                                        "room (least recently used first)", labels=["tier"])
        for tier in TIERS:
            loads.add_metric([tier], snap.adapter_loads.get(tier, 0))
            evictions.add_metric([tier], snap.adapter_evictions.get(tier, 0))
        yield loads
        yield evictions
        # vLLM's vllm:lora_requests_info, which the inference gateway's endpoint picker reads for adapter affinity
        lora_info = GaugeMetricFamily("loraplex_lora_requests_info", "Adapters of running and waiting requests "
                                      "(comma-separated labels) and device adapter slots (max_lora); the value is "
                                      "the Unix time of this state", labels=["running_lora_adapters",
                                                                            "waiting_lora_adapters", "max_lora"])
        lora_info.add_metric([",".join(sorted(snap.running_adapters)), ",".join(sorted(snap.waiting_adapters)),
                              str(engine.server_info().max_device_adapters)], time.time())
        yield lora_info
        queries = CounterMetricFamily("loraplex_prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                      "cache, by adapter (requests with cache_prompt false are not counted)",
                                      labels=["adapter"])
        hits = CounterMetricFamily("loraplex_prefix_cache_hits", "Prompt tokens whose KV came from the prefix "
                                   "cache instead of being computed, by adapter", labels=["adapter"])
        for adapter_id, n in snap.prefix_cache_queries.items():
            label = adapter_id or BASE_MODEL_LABEL
            queries.add_metric([label], n)
            hits.add_metric([label], snap.prefix_cache_hits.get(adapter_id, 0))
        yield queries
        yield hits
        yield GaugeMetricFamily("loraplex_prefix_cache_blocks", "KV blocks the prefix cache holds (shared by "
                                "running requests, or reclaimable)", value=snap.prefix_cache_blocks)
        yield CounterMetricFamily("loraplex_prefix_cache_evictions", "Cached KV blocks reused for other tokens "
                                  "(least recently freed first)", value=snap.prefix_cache_evictions)
        yield CounterMetricFamily("loraplex_preemptions", "Sequences preempted (KV blocks ran out; they are "
                                  "recomputed later)", value=snap.num_preemptions)
        yield CounterMetricFamily("loraplex_step_failures", "Engine steps that raised and were rerun in parts "
                                  "to end only the failing requests", value=snap.num_step_failures)
        yield CounterMetricFamily("loraplex_adapter_quarantines", "Adapters quarantined after their requests "
                                  "failed in engine steps repeatedly", value=snap.num_quarantines)
