"""The registration tests' engine and their known-good adapter, which each test copies and breaks."""

from __future__ import annotations

import pytest

from tests.adapters.broken import copy_adapter
from tests.engine_support import make_engine, make_lora_adapter


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    """max_rank 16: a rank-32 adapter does not fit."""
    return make_engine(demo_model_dir, max_rank=16)


@pytest.fixture(scope="module")
def good(demo_model_dir, tmp_path_factory):
    """A rank-4 LoRA on q_proj and v_proj that registers; never edited (tests edit a copy)."""
    return make_lora_adapter(demo_model_dir, tmp_path_factory.mktemp("good") / "a", seed=1, r=4,
                             target_modules=["q_proj", "v_proj"])


@pytest.fixture
def copy(good, tmp_path):
    return copy_adapter(good, tmp_path)
