"""A real `loraplex serve` process on 127.0.0.1 (ports 0), and two adapters trained for it."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pytest

from loraplex.clients import Client

ADMIN_TOKEN = "e2e-admin-token"
LISTENING = re.compile(r"listening on (\S+) metrics on (\S+)")


@dataclass
class ServerProcess:
    process: subprocess.Popen
    address: str
    metrics_url: str
    lines: list[str] = field(default_factory=list)
    """Everything the process printed so far (filled by a reader thread)."""

    def client(self, **kwargs) -> Client:
        return Client(self.address, **kwargs)

    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_server(model_dir: Path, *args: str, startup_timeout: float = 120.0) -> ServerProcess:
    """`loraplex serve --port 0 --metrics-port 0 ...`; returns once its health service reports SERVING."""
    command = [sys.executable, "-m", "loraplex.server.cli", "serve", "--model", str(model_dir),
               "--port", "0", "--metrics-port", "0", "--device", "cpu", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    first: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if LISTENING.search(line):
                first.put(line)
        first.put("")  # the process ended

    threading.Thread(target=read, daemon=True).start()
    try:
        line = first.get(timeout=startup_timeout)
        match = LISTENING.search(line)
        assert match, f"the server exited before listening:\n{''.join(lines)}"
        server = ServerProcess(process, match.group(1), match.group(2), lines)
        with server.client() as client:
            client.wait_until_serving(timeout=startup_timeout)
        return server
    except BaseException:
        process.kill()
        process.wait(timeout=10)
        raise


@pytest.fixture(scope="session")
def trained_adapters(demo_model_dir, tmp_path_factory):
    """pirate and shout LoRA adapters, trained briefly with the in-process train API, in one root."""
    from loraplex.server.train import TrainConfig, train

    root = tmp_path_factory.mktemp("e2e-adapters")
    for name, rank in (("pirate", 8), ("shout", 4)):
        with resources.as_file(resources.files("loraplex.server.data").joinpath(f"{name}.jsonl")) as data:
            train(TrainConfig(model=demo_model_dir, method="lora", data=data, out=root / name, rank=rank,
                              max_steps=4, lr=1e-2, quiet=True))
    return root


@pytest.fixture(scope="module")
def server(demo_model_dir, trained_adapters):
    """Adapter root, admin token, a KV cache of 1024 tokens (the context is 2048)."""
    server = start_server(demo_model_dir, "--adapter-root", str(trained_adapters), "--admin-token", ADMIN_TOKEN,
                          "--kv-cache-tokens", "1024", "--max-rank", "16")
    yield server
    server.stop()
