"""`EngineClient`: the one interface the network fronts (server/api) use to reach the engine, after
vLLM's `EngineClient` (vllm/engine/protocol.py). `AsyncEngine` implements it.

The fronts import the engine's plain data types from here too, and nothing else from engine/ or model/.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, AsyncIterator, Callable, Protocol, runtime_checkable

from loraplex.server.adapters.store import AdapterInfo, AdapterState
from loraplex.server.engine.engine import (
    AsyncEngine,
    EngineSnapshot,
    GenerationRequest,
    RequestOutput,
    ServerInfo,
    StepStats,
)
from loraplex.server.model.sampling import SamplingParams

if TYPE_CHECKING:
    from loraplex.server.config import EngineConfig

__all__ = [
    "AdapterInfo", "AdapterState", "EngineClient", "EngineSnapshot", "GenerationRequest", "RequestOutput",
    "SamplingParams", "ServerInfo", "StepStats", "start_engine",
]


@runtime_checkable
class EngineClient(Protocol):
    # ---------------------------------------------------------------- requests
    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Outputs of `request` as they are produced (an async generator); closing it early aborts the
        request. Raises an EngineError at the first `__anext__` if the engine refuses the request."""
        ...

    def abort(self, request_id: str) -> None:
        """End a request; a no-op for one that already ended."""
        ...

    # ---------------------------------------------------------------- adapters
    async def register_adapter(self, adapter_id: str, source: str, pin: bool = False) -> AdapterInfo: ...

    async def unregister_adapter(self, adapter_id: str) -> None: ...

    def list_adapters(self) -> list[AdapterInfo]: ...

    def get_adapter(self, adapter_id: str) -> AdapterInfo: ...

    # ---------------------------------------------------------------- model, state, statistics
    def server_info(self) -> ServerInfo: ...

    def get_tokenizer(self):
        """The model's Hugging Face tokenizer (chat templates, decoding single tokens)."""
        ...

    def snapshot(self) -> EngineSnapshot: ...

    def num_live_requests(self) -> int: ...

    def add_step_listener(self, listener: Callable[[StepStats], None]) -> None: ...

    def add_adapter_load_listener(self, listener: Callable[[str, float], None]) -> None: ...

    # ---------------------------------------------------------------- lifecycle
    async def drain(self, timeout: float) -> bool:
        """Refuse new requests and wait up to `timeout` s for the live ones; True if all finished."""
        ...

    def shutdown(self) -> None: ...


def start_engine(config: "EngineConfig") -> EngineClient:
    """Load the model and start the step loop; blocks (minutes for a large model): call it off the loop."""
    return AsyncEngine(config).start()
