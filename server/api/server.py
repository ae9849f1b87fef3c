"""Build and run the server: bind, load the engine, warm up, serve, drain on a signal.

gRPC, /metrics and (with --http-port) the OpenAI-compatible HTTP API all serve one engine; gRPC and
HTTP handlers run on the same event loop.

Lifecycle (the health service tells clients and load balancers where it stands):

    bind ports (health NOT_SERVING) → load the model → register --adapter ones → warm-up generation
    → SERVING ... SIGTERM/SIGINT → NOT_SERVING, new requests UNAVAILABLE → running requests finish
    (up to --drain-grace s; a second signal cuts it short) → stop → exit 0
    (the HTTP API follows the same states: GET /health answers 503 until SERVING and while draining)
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
import uuid
from typing import TYPE_CHECKING, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from loraplex.server.api.config import MAX_RECEIVE_BYTES, MAX_SEND_BYTES, ServerConfig
from loraplex.server.api.metrics import Metrics
from loraplex.server.api.admission import ServerState
from loraplex.server.api.servicer import AdaptersServicer, GeneratorServicer, preload_adapter
from loraplex.server.engine.client import EngineClient, GenerationRequest, SamplingParams, start_engine
from loraplex.server.errors import EngineError, UserError
from loraplex.v1 import loraplex_pb2 as pb
from loraplex.v1 import loraplex_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from loraplex.server.api.http import HttpServer

SERVICES = tuple(pb.DESCRIPTOR.services_by_name[name].full_name for name in ("Generator", "Adapters"))
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    ("grpc.max_send_message_length", MAX_SEND_BYTES),
    # without this a second server on the same port would bind too (Linux SO_REUSEPORT) and share traffic
    ("grpc.so_reuseport", 0),
]
WARMUP_PROMPT = "Hello"


class LoraplexServer:
    """One server: gRPC (both services, health, reflection), /metrics and the optional HTTP API, around
    one engine (`EngineClient`)."""

    def __init__(self, config: ServerConfig, log: Callable[[str], None] = print):
        self.config = config
        self.log = log
        self.metrics = Metrics()
        self.state = ServerState(config, self.metrics)
        self.health = health_aio.HealthServicer()
        self.grpc_server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0
        self.http: "HttpServer | None" = None
        self._stop_metrics: Callable[[], None] | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.host}:{self.metrics_port}/metrics"

    @property
    def http_url(self) -> str:
        """The HTTP API's base URL (an OpenAI client's base_url), or "" without --http-port."""
        if self.http is None:
            return ""
        return f"{'https' if self.http.tls else 'http'}://{self.config.host}:{self.http_port}/v1"

    # ------------------------------------------------------------------ start
    async def bind(self) -> None:
        """Listen on both ports; every service reports NOT_SERVING until `load` has finished."""
        config = self.config
        server = grpc.aio.server(options=GRPC_OPTIONS)
        pb_grpc.add_GeneratorServicer_to_server(GeneratorServicer(self.state), server)
        pb_grpc.add_AdaptersServicer_to_server(AdaptersServicer(self.state), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for service in ("", *SERVICES):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
        )
        target = f"{config.host}:{config.port}"
        try:
            if config.tls_cert is not None:
                credentials = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
                self.port = server.add_secure_port(target, credentials)
            else:
                self.port = server.add_insecure_port(target)
        except RuntimeError as error:
            raise UserError(f"cannot listen on {target} (is the port in use?): {error}") from None
        if not self.port:
            raise UserError(f"cannot listen on {target} (is the port in use?)")
        await server.start()
        self.grpc_server = server
        try:
            self._stop_metrics, self.metrics_port = self.metrics.serve_http(config.host, config.metrics_port)
        except OSError as error:
            await server.stop(None)
            raise UserError(f"cannot serve metrics on {config.host}:{config.metrics_port}: {error}") from None
        if config.http_port is not None:
            from loraplex.server.api.http import HttpServer

            http = HttpServer(self.state)
            try:
                self.http_port = await http.start(config.host, config.http_port)
            except BaseException:
                await self.stop()
                raise
            self.http = http

    async def load(self) -> None:
        """Load the model, register the --adapter adapters, warm up, then report SERVING."""
        started = time.perf_counter()
        engine = await asyncio.to_thread(start_engine, self.config.engine)
        self.state.engine = engine
        self.metrics.attach(engine)
        for adapter_id, path in self.config.adapters:
            try:
                await engine.register_adapter(adapter_id, path)
            except EngineError as error:
                raise UserError(f"--adapter {adapter_id}={path}: {error}") from None
        if self.config.warmup:
            await self._warm_up(engine)
        self.state.ready = True
        for service in ("", *SERVICES):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.log(f"loraplex serve: ready in {time.perf_counter() - started:.1f} s "
                 f"({len(self.config.adapters)} adapters registered)")

    async def _warm_up(self, engine: EngineClient) -> None:
        """A real generation through the base model and each --adapter adapter, all in one batch."""
        async def base() -> None:
            request = GenerationRequest(f"warmup-{uuid.uuid4().hex}", prompt=WARMUP_PROMPT,
                                        sampling=SamplingParams(max_new_tokens=2, ignore_eos=True))
            async with contextlib.aclosing(engine.generate(request)) as outputs:
                async for output in outputs:
                    if output.error is not None:
                        raise UserError(f"the warm-up generation failed: {output.error}")

        await asyncio.gather(base(), *(preload_adapter(engine, adapter_id) for adapter_id, _ in self.config.adapters))

    async def start(self) -> None:
        await self.bind()
        await self.load()

    # ------------------------------------------------------------------ stop
    async def drain(self, grace: float, cut_short: asyncio.Event | None = None) -> bool:
        """NOT_SERVING, refuse new requests, wait up to `grace` s for running ones; True if all ended."""
        self.state.draining = True
        await self.health.enter_graceful_shutdown()
        engine = self.state.engine
        if engine is None:
            return True
        drained = asyncio.ensure_future(engine.drain(grace))
        waiters = {drained}
        if cut_short is not None:
            waiters.add(asyncio.ensure_future(cut_short.wait()))
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        return drained.done() and not drained.cancelled() and drained.result()

    async def stop(self) -> None:
        """Stop serving at once (what `drain` left running is cancelled) and release everything."""
        stopping = []
        if self.grpc_server is not None:
            # a moment for handlers whose engine request already ended to send their last message
            stopping.append(self.grpc_server.stop(grace=1.0))
        if self.http is not None:
            stopping.append(self.http.stop())  # the same moment for HTTP responses
            self.http = None
        await asyncio.gather(*stopping)
        if self._stop_metrics is not None:
            self._stop_metrics()
            self._stop_metrics = None
        engine = self.state.engine
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)
            self.state.engine = None


async def run(config: ServerConfig) -> int:
    """`loraplex serve`: start, print the addresses, serve until SIGTERM/SIGINT, drain, exit 0."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    cut_short = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            cut_short.set()
        else:
            print(f"loraplex serve: {signal.Signals(signum).name}: draining (up to {config.drain_grace:g} s; "
                  "signal again to stop at once)", file=sys.stderr, flush=True)
            stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    server = LoraplexServer(config, log=lambda line: print(line, flush=True))
    try:
        await server.bind()
        http = f" http on {server.http_url}" if server.http_url else ""
        print(f"loraplex serve: listening on {server.address} metrics on {server.metrics_url}{http}", flush=True)
        loading = asyncio.ensure_future(server.load())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({loading, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            loading.result()  # a failed load raises here
            await stopped
        else:
            loading.cancel()  # stopped while loading: nothing is running yet
            stopped.cancel()
        drained = await server.drain(config.drain_grace, cut_short)
        if not drained:
            print(f"loraplex serve: {server.state.in_flight} requests still running after the grace period; "
                  "cancelling them", file=sys.stderr, flush=True)
    finally:
        await server.stop()
    print("loraplex serve: stopped", file=sys.stderr, flush=True)
    return 0
