"""Layering the tests can check from the source: `server/config.py` and `server/errors.py` are the bottom floor
(every layer imports them, so they import only the standard library), and `kernels/testing.py` (the torch
references, the gathering LoRA op) serves tests and benchmarks, never the product."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"config.py": {"loraplex.server.errors"}, "errors.py": set()}


def _imports(path: Path) -> set[str]:
    """Modules `path` imports anywhere (function-level imports too); `from m import n` counts m and m.n."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names.add(module)
            names.update(f"{module.rstrip('.')}.{alias.name}" if node.module else module + alias.name
                         for alias in node.names)
    return names


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_the_bottom_floor_imports_only_the_standard_library(name):
    outside = {module for module in _imports(ROOT / "server" / name)
               if module.split(".")[0] not in sys.stdlib_module_names and module != "__future__"
               and not module.startswith("__future__.")}
    outside = {module for module in outside if module.rsplit(".", 1)[0] not in ALLOWED[name]}
    assert outside <= ALLOWED[name], f"server/{name} imports {sorted(outside - ALLOWED[name])}"


def test_no_product_module_imports_the_test_references():
    importers = []
    for path in sorted([*(ROOT / "server").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]):
        if path != ROOT / "kernels" / "testing.py" and any(
                module.endswith(".testing") and not module.startswith("torch") for module in _imports(path)):
            importers.append(str(path.relative_to(ROOT)))
    assert not importers, importers
