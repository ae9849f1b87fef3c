"""A real `loraplex serve` process on 127.0.0.1 (ports 0), and two adapters trained for it."""

from __future__ import annotations

from importlib import resources

import pytest

from tests.servers import start_server

ADMIN_TOKEN = "e2e-admin-token"


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
