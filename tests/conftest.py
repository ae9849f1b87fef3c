"""Shared fixtures: demo models built once per test session with the real save/load path."""

from __future__ import annotations

import pytest

from loraplex.server.demo.model import build_demo_model


def _quiet(*_args, **_kwargs) -> None:
    pass


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    """A Llama-shaped demo model (GQA, random weights), saved with save_pretrained."""
    out = tmp_path_factory.mktemp("demo-llama")
    return build_demo_model(out, arch="llama", seed=0, pretrain_steps=0, overwrite=True, log=_quiet)


@pytest.fixture(scope="session")
def demo_model_factory(tmp_path_factory):
    """Build (and cache per session) a demo model of another architecture or seed."""
    cache = {}

    def build(arch: str = "llama", seed: int = 0, pretrain_steps: int = 0):
        key = (arch, seed, pretrain_steps)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"demo-{arch}-{seed}-{pretrain_steps}")
            cache[key] = build_demo_model(
                out, arch=arch, seed=seed, pretrain_steps=pretrain_steps, overwrite=True, log=_quiet
            )
        return cache[key]

    return build
