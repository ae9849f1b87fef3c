"""Admission, for the gRPC and the HTTP front alike: whether the server takes a request now (warm-up,
drain, --max-queued-requests), the admin token and adapter-path checks, and the accounting of each
accepted generation request (`Call`).

Refusals are `EngineError`s; each front maps them onto its own status codes.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from loraplex.server.api.config import ServerConfig
from loraplex.server.api.metrics import Metrics, RequestTracker
from loraplex.server.engine.client import EngineClient
from loraplex.server.errors import PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable


@dataclass
class ServerState:
    """What both fronts share: the engine once it is up, the lifecycle flags, the metrics."""

    config: ServerConfig
    metrics: Metrics
    engine: EngineClient | None = None
    ready: bool = False
    """The warm-up generation has run: requests are accepted."""
    draining: bool = False
    """A shutdown signal arrived: new requests get UNAVAILABLE."""
    in_flight: int = 0
    """Generation requests accepted and not finished."""


def accepting_engine(state: ServerState) -> EngineClient:
    """The engine if the server takes new requests now; Unavailable while warming up or draining."""
    if state.draining:
        raise Unavailable("the server is shutting down and accepts no new requests; retry on another replica")
    if not state.ready or state.engine is None:
        raise Unavailable("the server is still loading the model and warming up; wait until its health "
                          "service reports SERVING (HTTP: GET /health answers 200)")
    return state.engine


def admit(state: ServerState) -> EngineClient:
    """The engine for a new generation request, within --max-queued-requests (else ResourceExhausted)."""
    engine = accepting_engine(state)
    if state.in_flight >= state.config.max_queued_requests:
        raise ResourceExhausted(f"the server has {state.in_flight} requests in flight, its limit "
                                f"(--max-queued-requests {state.config.max_queued_requests}); retry later")
    return engine


def admin_engine(state: ServerState, while_draining: bool) -> EngineClient:
    """The engine for an adapter call; with `while_draining` (listing, unregistering) also while draining."""
    if while_draining and state.draining and state.engine is not None:
        return state.engine
    return accepting_engine(state)


def check_admin_token(config: ServerConfig, authorization: str | None, missing: str, wrong: str) -> None:
    """With --admin-token, Unauthenticated unless `authorization` is 'Bearer <token>'; `missing` and
    `wrong` are the messages, in the words of the caller's transport."""
    token = config.admin_token
    if token is None:
        return
    if authorization is None:
        raise Unauthenticated(missing)
    if not hmac.compare_digest(authorization.encode(), f"Bearer {token}".encode()):
        raise Unauthenticated(wrong)


def check_registration_allowed(config: ServerConfig, source_resolves: str) -> None:
    """PermissionDenied unless the server reads adapter paths sent over the API; `source_resolves` names
    the request's source field in the transport's words ("sources then resolve")."""
    if not config.api_registration_allowed:
        raise PermissionDenied(f"this server reads no adapter paths over the API: start it with --adapter-root DIR "
                               f"({source_resolves} inside DIR) or, for trusted callers only, "
                               "--allow-any-adapter-path")


def default_max_new_tokens(engine: EngineClient, num_prompt_tokens: int) -> int:
    """Up to the context, and within the KV cache: OpenAI's chat default when the client sets no limit."""
    info = engine.server_info()
    room = min(info.max_model_len, info.kv_cache_tokens)
    return max(1, room - num_prompt_tokens)


class Call:
    """One accepted generation request (a gRPC call, or a prompt of an HTTP request); `close`
    (idempotent) releases everything it holds."""

    def __init__(self, state: ServerState, engine: EngineClient, engine_id: str, tracker: RequestTracker):
        self.state = state
        self.engine = engine
        self.engine_id = engine_id
        self.tracker = tracker
        self.finish = "cancelled"
        self.accepted = True
        self.closed = False
        state.in_flight += 1

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.state.in_flight -= 1
        if self.finish == "cancelled":
            self.engine.abort(self.engine_id)  # a no-op if the engine already closed it
        if self.accepted:
            self.tracker.end(self.finish)
