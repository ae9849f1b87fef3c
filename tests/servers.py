"""A real `loraplex serve` process for tests: 127.0.0.1, ports 0, ready when its health service says so."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.clients import Client

LORAPLEX = str(Path(sys.executable).with_name("loraplex"))
"""The installed `loraplex` command: unlike `python -m loraplex.server.cli` started in the checkout, it never puts
the checkout root (and its folders, `kernels/` among them) on the server's sys.path."""
LISTENING = re.compile(r"listening on (\S+) metrics on (\S+)(?: http on (\S+))?")


@dataclass
class ServerProcess:
    process: subprocess.Popen
    address: str
    metrics_url: str
    http_url: str | None = None
    """The HTTP API's base URL (with --http-port)."""
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
    command = [LORAPLEX, "serve", "--model", str(model_dir),
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
        server = ServerProcess(process, match.group(1), match.group(2), match.group(3), lines)
        with server.client() as client:
            client.wait_until_serving(timeout=startup_timeout)
        return server
    except BaseException:
        process.kill()
        process.wait(timeout=10)
        raise
