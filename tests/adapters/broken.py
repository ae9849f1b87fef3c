"""Breaking a copy of a good adapter, and checking that registering it is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from loraplex.server.errors import FailedPrecondition, NotFound


def copy_adapter(adapter: Path, tmp_path: Path, name: str = "copy") -> Path:
    return shutil.copytree(adapter, tmp_path / name)


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def edit_tensors(path: Path, **changes) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    tensors.update(changes)
    save_file(tensors, path / "adapter_model.safetensors")


def assert_refused(engine, source: Path, match: str) -> None:
    """Registration fails with FAILED_PRECONDITION matching `match` and leaves the registry as it was."""
    before = engine.list_adapters()
    with pytest.raises(FailedPrecondition, match=match):
        engine.register_adapter("refused", str(source))
    assert engine.list_adapters() == before
    with pytest.raises(NotFound):
        engine.get_adapter("refused")
