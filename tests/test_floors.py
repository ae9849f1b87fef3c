"""`server/config.py` and `server/errors.py` are the bottom floor: every layer imports them, so they import
only the standard library (config may use errors), never torch or another loraplex module."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[1] / "server"
ALLOWED = {"config.py": {"loraplex.server.errors"}, "errors.py": set()}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):  # function-level imports count too
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_the_bottom_floor_imports_only_the_standard_library(name):
    outside = {module for module in _imports(SERVER / name)
               if module.split(".")[0] not in sys.stdlib_module_names and module != "__future__"}
    assert outside <= ALLOWED[name], f"server/{name} imports {sorted(outside - ALLOWED[name])}"
