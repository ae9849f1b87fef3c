"""An in-process server on 127.0.0.1:0 (its own event loop in a thread) for the API tests."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from pathlib import Path

from loraplex.server.api.config import ServerConfig
from loraplex.server.api.server import LoraplexServer
from loraplex.server.config import AdapterConfig, CacheConfig, EngineConfig, ModelConfig

PROMPT = "Q: Where do fish live?\nA:"


def engine_config(model_dir: Path, *, adapter_root: Path | None = None, kv_tokens: int = 1024,
                  max_rank: int = 16, max_device_adapters: int = 4) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(path=model_dir, quantization="none", dtype="float32", device="cpu"),
        cache=CacheConfig(num_tokens=kv_tokens),
        adapters=AdapterConfig(max_rank=max_rank, max_device_adapters=max_device_adapters,
                               max_host_adapters=8, adapter_root=adapter_root),
    )


class ServerThread:
    """`LoraplexServer` running in a thread; `start(load=False)` binds without loading the model."""

    def __init__(self, config: ServerConfig):
        self.server = LoraplexServer(config, log=lambda line: None)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self, load: bool = True) -> "ServerThread":
        self.thread.start()
        self.call(self.server.start() if load else self.server.bind())
        return self

    def call(self, coroutine, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return self.server.address

    def stop(self) -> None:
        try:
            self.call(self.server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)


def scrape(url: str) -> dict[str, float]:
    """Prometheus samples by `name{label=value,...}` (labels sorted), as the demo reads them."""
    from loraplex.server.demo.cli import scrape as demo_scrape

    return demo_scrape(url)


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def wait_idle(client, timeout: float = 60.0) -> None:
    """Until the server reports no running or queued requests (aborts are applied by the next engine step)."""
    import time

    deadline = time.monotonic() + timeout
    while (info := client.server_info()).running_requests or info.queued_requests:
        assert time.monotonic() < deadline, f"requests stayed in the engine: {info}"
        time.sleep(0.02)
