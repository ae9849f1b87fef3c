"""The network fronts reach the engine only through `EngineClient`, and neither front imports the other."""

from __future__ import annotations

import ast
from pathlib import Path

from loraplex.server.engine.client import EngineClient
from loraplex.server.engine.engine import AsyncEngine

API = Path(__file__).resolve().parents[2] / "server" / "api"


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def test_the_api_imports_the_engine_only_through_the_client_module():
    for path in sorted(API.glob("*.py")):
        for module in imported_modules(path):
            for inner in ("engine", "model", "adapters"):
                if module.startswith(f"loraplex.server.{inner}"):
                    assert module == "loraplex.server.engine.client", f"{path.name} imports {module}"


def test_the_http_api_does_not_import_the_grpc_servicer():
    assert not any("servicer" in module for module in imported_modules(API / "http.py"))


def test_async_engine_implements_every_method_of_the_client_protocol():
    methods = {name for name in vars(EngineClient) if not name.startswith("_")}
    assert methods >= {"generate", "abort", "register_adapter", "server_info", "snapshot", "drain"}
    assert all(callable(getattr(AsyncEngine, name, None)) for name in methods), methods - set(dir(AsyncEngine))
