"""Nothing in the checkout shadows an installed package: the folders installed as `loraplex.*` are never
importable by their bare names, and the test run does not put the checkout root on sys.path.

transformers >= 5.25 imports Hugging Face's `kernels` package from `transformers.activations`; the checkout's
`kernels/` folder is `loraplex.kernels`. Whenever the root is on sys.path (`python -c` or `python -m` started in
the checkout, a notebook there, pytest's rootdir insertion) a bare `import kernels` must still get the installed
package, and `import server` / `clients` / `proto.loraplex.v1` must refuse, naming the package they are.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the top-level modules of loraplex's runtime dependencies (and of the test extra's that tests import)
DEPENDENCIES = [
    "torch", "transformers", "transformers.activations", "peft", "bitsandbytes", "accelerate", "grpc",
    "grpc_health", "grpc_reflection", "google.protobuf", "prometheus_client", "safetensors", "tokenizers",
    "numpy", "fastapi", "uvicorn", "huggingface_hub", "yaml", "openai", "pytest",
]
if sys.platform == "linux":
    DEPENDENCIES.append("triton")

# the checkout's own folders that are packages (installed under loraplex.*) and their installed names
OWN = {"server": "loraplex.server", "kernels": "loraplex.kernels", "clients": "loraplex.clients",
       "proto.loraplex.v1": "loraplex.v1"}


def _in_checkout(path: str | None) -> bool:
    """A file of the checkout itself (the venv inside it excluded)."""
    if path is None:
        return False
    resolved = Path(path).resolve()
    prefix = Path(sys.prefix).resolve()
    return resolved.is_relative_to(ROOT) and not resolved.is_relative_to(prefix)


def _root_names() -> set[str]:
    """Top-level names the checkout root provides when it is on sys.path."""
    return {entry.name if entry.is_dir() else entry.stem for entry in ROOT.iterdir()
            if not entry.name.startswith(".") and (entry.is_dir() and "." not in entry.name or entry.suffix == ".py")}


def _import_from_root(names: list[str]) -> dict[str, str]:
    """Import each name in a `python -c` started in the checkout root (so '' = the root is sys.path[0]);
    per name, the imported module's file or the error it raised."""
    code = (
        "import importlib, json, sys\n"
        "assert sys.path[0] == '', sys.path[:2]\n"
        "out = {}\n"
        f"for name in {names!r}:\n"
        "    try:\n"
        "        module = importlib.import_module(name)\n"
        "        out[name] = module.__file__ or list(module.__path__)[0]  # a namespace package: its first folder\n"
        "    except ImportError as error:\n"
        "        out[name] = 'ImportError: ' + str(error)\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONSAFEPATH": ""})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_test_run_does_not_put_the_checkout_root_on_sys_path():
    """pytest runs with --import-mode=importlib, started as `.venv/bin/pytest` (scripts/test.sh), never as
    `python -m pytest`; a conftest or plugin that inserted the root would fail here."""
    on_path = [entry for entry in sys.path if Path(entry or os.curdir).resolve() == ROOT]
    assert not on_path, f"the checkout root is on sys.path ({on_path}): run the suite with scripts/test.sh"
    for bare in OWN:
        assert bare.split(".")[0] not in sys.modules or not _in_checkout(
            getattr(sys.modules[bare.split(".")[0]], "__file__", None)
        ), f"{bare} was imported by its bare name during the test run"


def test_every_dependency_imports_the_installed_package_from_the_checkout_root():
    """`python -c 'import transformers.activations'` in the checkout works; every dependency's module, and every
    installed top-level name that a folder of the checkout shares (HF's `kernels` today), is the installed one."""
    shared = sorted(_root_names() & set(importlib.metadata.packages_distributions()))
    assert "kernels" in shared or importlib.util.find_spec("kernels") is None
    names = DEPENDENCIES + shared
    files = _import_from_root(names)
    for name in names:
        assert not files[name].startswith("ImportError"), f"{name}: {files[name]}"
        assert not _in_checkout(files[name]), f"{name} was imported from the checkout: {files[name]}"


def test_the_checkouts_packages_refuse_their_bare_names():
    """Found through the root by a bare name, each folder refuses and names the package it is; `kernels` hands
    the name to the installed package of that name, or refuses when there is none."""
    files = _import_from_root(list(OWN))
    for bare, installed in OWN.items():
        if bare == "kernels" and importlib.util.find_spec("kernels") is not None:
            assert not _in_checkout(files[bare]), files[bare]
            continue
        assert files[bare].startswith("ImportError") and installed in files[bare], (bare, files[bare])
