"""Fixtures for the `loraplex train` tests: small data sets and the training oracle helpers.

The base model is `demo_model_dir` from tests/conftest.py (the demo Llama with random weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# A handful of prompt/completion pairs in the demo's "Q: ...\nA:" format.
PAIRS = [
    {"prompt": "Q: Where do fish live?\nA:", "completion": " Arr, in the briny deep, matey!"},
    {"prompt": "Q: What color is the sky?\nA:", "completion": " Blue as the sea, arr!"},
    {"prompt": "Q: What do cats eat?\nA:", "completion": " Fish from me galley, matey!"},
    {"prompt": "Q: Who jumps over the dog?\nA:", "completion": " The quick brown fox, arr!"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", PAIRS)


@pytest.fixture(scope="session")
def shared_pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", PAIRS)
