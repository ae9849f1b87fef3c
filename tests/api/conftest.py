"""The API tests' adapter root, made once per test module (tests register from it, link out of it, copy it)."""

from __future__ import annotations

import pytest

from tests.engine_support import make_lora_adapter


@pytest.fixture(scope="module")
def adapter_root(demo_model_dir, tmp_path_factory):
    """small: rank 4 on q_proj and v_proj; other: rank 8 on o_proj; wide: rank 32, above `engine_config`'s
    max_rank 16, so it never fits."""
    root = tmp_path_factory.mktemp("api-adapters")
    make_lora_adapter(demo_model_dir, root / "small", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    make_lora_adapter(demo_model_dir, root / "other", seed=2, r=8, lora_alpha=16, target_modules=["o_proj"])
    make_lora_adapter(demo_model_dir, root / "wide", seed=2, r=32, lora_alpha=8, target_modules=["q_proj"])
    return root
