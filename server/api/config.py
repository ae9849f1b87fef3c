"""`ServerConfig`: the gRPC server's own settings, beside the `EngineConfig` it serves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraplex.server.config import EngineConfig
from loraplex.server.errors import UserError

# A 128k-token prompt is about 0.5 MB as text and at most 640 kB as uint32 varints: 4 MiB bounds the
# memory one call can make the server hold while leaving room for any real prompt.
MAX_RECEIVE_BYTES = 4 * 1024 * 1024
# A unary response with logprobs costs about 10 bytes per token plus its text: 16 MiB is over a
# million tokens, far beyond any context.
MAX_SEND_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    engine: EngineConfig
    host: str = "127.0.0.1"
    """Address to bind the gRPC and metrics servers to."""
    port: int = 50051
    """gRPC port; 0 picks a free one (printed at start)."""
    metrics_port: int = 9400
    """Prometheus /metrics port; 0 picks a free one."""
    http_port: int | None = None
    """OpenAI-compatible HTTP API port (0 picks a free one); None serves no HTTP API."""
    served_model_name: str | None = None
    """The base model's name in the HTTP API's `model` field; None: the model directory's name."""
    chat_template: Path | None = None
    """A Jinja chat template file for /v1/chat/completions, instead of the tokenizer's own."""
    adapters: tuple[tuple[str, str], ...] = ()
    """(id, path) pairs registered before the server reports SERVING."""
    allow_any_adapter_path: bool = False
    """Without an adapter root, let RegisterAdapter read any path on the server (trusted callers only)."""
    admin_token: str | None = None
    """If set, the Adapters service requires `authorization: Bearer <token>`."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    drain_grace: float = 30.0
    """Seconds running requests get to finish after SIGTERM/SIGINT."""
    max_queued_requests: int = 1024
    """Accepted, unfinished requests (queued or running) beyond which new ones get RESOURCE_EXHAUSTED."""
    warmup: bool = True
    """Run a real generation before reporting SERVING."""

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise UserError(f"--{name.replace('_', '-')} must be in 0..65535 (0 = any free port), got {value}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise UserError(f"--http-port must be in 0..65535 (0 = any free port), got {self.http_port}")
        named = [("--port", self.port), ("--metrics-port", self.metrics_port), ("--http-port", self.http_port)]
        named = [(flag, port) for flag, port in named if port]
        for i, (flag, port) in enumerate(named):
            for other, other_port in named[i + 1:]:
                if port == other_port:
                    raise UserError(f"{flag} and {other} are both {port}; give them different ports")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise UserError("--served-model-name is empty")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise UserError(f"--chat-template file not found: {self.chat_template}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UserError("--tls-cert and --tls-key go together: give both or neither")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise UserError(f"--{name.replace('_', '-')} file not found: {path}")
        if self.admin_token is not None and not self.admin_token.strip():
            raise UserError("--admin-token is empty")
        if self.drain_grace < 0:
            raise UserError(f"--drain-grace must be >= 0 seconds, got {self.drain_grace}")
        if self.max_queued_requests < 1:
            raise UserError(f"--max-queued-requests must be >= 1, got {self.max_queued_requests}")
        ids = [adapter_id for adapter_id, _ in self.adapters]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise UserError(f"--adapter gives the id {duplicates[0]!r} more than once")

    @property
    def model_name(self) -> str:
        """The base model's name in the HTTP API."""
        return self.served_model_name or Path(self.engine.model.path).resolve().name

    @property
    def api_registration_allowed(self) -> bool:
        return self.engine.adapters.adapter_root is not None or self.allow_any_adapter_path
