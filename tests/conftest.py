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


def _triton_language_state() -> dict:
    """What Triton's interpreter patches in `triton.language` when it first runs a kernel."""
    import triton.language as tl

    objects = [tl, tl.core, tl.math, tl.tensor, tl.core.dtype, getattr(tl.core, "tensor_descriptor_base", None)]
    return {id(obj): (obj, dict(vars(obj))) for obj in objects if obj is not None}


_PRISTINE_TRITON_LANGUAGE = _triton_language_state()
"""Taken at collection, before any test interprets a kernel."""


@pytest.fixture
def pristine_triton_language():
    """`triton.language` as it was before any kernel was interpreted. Triton 3.5's interpreter patches
    the language for good (later releases undo their patches after each launch), and a process in
    which it ran then fails to compile a kernel for a GPU (the compile tests, tests/kernels/test_compile.py)."""
    for obj, saved in _PRISTINE_TRITON_LANGUAGE.values():
        current = vars(obj)
        for name in [name for name in current if name not in saved]:
            delattr(obj, name)
        for name, value in saved.items():
            if current.get(name) is not value:
                setattr(obj, name, value)
    yield
