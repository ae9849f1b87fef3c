"""Backend selection (device default, LORAPLEX_LORA_BACKEND) and lora_apply end to end."""

from __future__ import annotations

import pytest
import torch

import loraplex.kernels as K
from loraplex.kernels import ops, testing, torch_ops
from loraplex.kernels.cpu import native
from loraplex.kernels.triton import expand, shrink
from tests.kernels.cases import TOLERANCE, layout, make_problem


def test_default_backend_follows_the_device():
    assert ops.select_backend(torch.device("cpu")) == "torch"
    assert ops.select_backend(torch.device("cuda")) == "triton"


@pytest.mark.parametrize("value, expected", [("triton", "triton"), ("torch", "torch"), (" Native ", "native")])
def test_environment_forces_a_backend(monkeypatch, value, expected):
    monkeypatch.setenv(K.BACKEND_ENV, value)
    assert ops.select_backend(torch.device("cpu")) == expected
    assert ops.select_backend(torch.device("cuda")) == expected


@pytest.mark.parametrize("value", ["cuda", "reference", "gather"])
def test_unknown_backend_is_refused(monkeypatch, value):
    """The test references (kernels/testing.py) are no LoRA op a deployment can pick."""
    monkeypatch.setenv(K.BACKEND_ENV, value)
    with pytest.raises(ValueError, match=f"LORAPLEX_LORA_BACKEND='{value}': expected one of triton, native, torch$"):
        ops.select_backend(torch.device("cpu"))


def _spy(monkeypatch, module, name, calls):
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize("backend", [None, "native", "torch", "triton"])
def test_lora_apply_routes_and_matches_reference(monkeypatch, backend):
    if backend in (None, "native") and not native.available():
        pytest.skip(f"C kernel unavailable: {native.unavailable_reason()}")
    if backend:
        monkeypatch.setenv(K.BACKEND_ENV, backend)
    calls: list[str] = []
    _spy(monkeypatch, torch_ops, "torch_shrink", calls)
    _spy(monkeypatch, torch_ops, "torch_expand", calls)
    _spy(monkeypatch, shrink, "triton_shrink", calls)
    _spy(monkeypatch, expand, "triton_expand", calls)
    _spy(monkeypatch, native, "lora_apply", calls)

    p, _ = layout(make_problem(20, 96, 3, "no_adapter", torch.float32, seed=5), contiguous=True)
    meta = K.LoRAMeta.allocate(64, p.A.shape[1], "cpu", max_slices=3, max_rank=p.A.shape[2])
    meta.update(p.slots, contiguous=True)
    y = p.y0.clone()
    out = ops.lora_apply(p.x, y, p.A, p.B_t, p.ranks, p.scalings, meta, p.offsets, p.widths)
    assert out is y

    expected = {None: ["lora_apply"], "native": ["lora_apply"], "torch": ["torch_shrink", "torch_expand"],
                "triton": ["triton_shrink", "triton_expand"]}[backend]
    assert calls == expected
    v_ref = testing.shrink_reference(p.x, p.A, p.ranks, p.slots)
    y_ref = testing.expand_reference(v_ref, p.B_t, p.ranks, p.scalings, p.slots, p.y0.clone(),
                                       p.offsets, p.widths)
    torch.testing.assert_close(y, y_ref, **TOLERANCE[torch.float32])
    assert not torch.equal(y, p.y0)


def test_lora_apply_uses_the_reserved_workspace(monkeypatch):
    monkeypatch.setenv(K.BACKEND_ENV, "torch")  # the C kernel keeps v in its own buffer
    p = make_problem(5, 96, 1, "identical", torch.float32, seed=1)
    meta = K.LoRAMeta.allocate(8, p.A.shape[1], "cpu", max_slices=1, max_rank=p.A.shape[2]).update(p.slots)
    seen = []
    real = torch_ops.torch_shrink
    monkeypatch.setattr(torch_ops, "torch_shrink", lambda *a, out=None, **k: seen.append(out) or real(*a, out=out, **k))
    ops.lora_apply(p.x, p.y0.clone(), p.A, p.B_t, p.ranks, p.scalings, meta)
    assert seen[0].data_ptr() == meta.workspace(1, p.A.shape[2]).data_ptr()


def test_shrink_and_expand_entry_points_default_slices():
    """lora_shrink / lora_expand with equal slice widths (slice_offsets/widths left out)."""
    p = make_problem(9, 64, 2, "zipf", torch.float32, seed=4)
    # equal widths instead of the problem's unequal ones
    B_t = torch.randn(p.A.shape[1], p.A.shape[2], 2 * 40)
    meta = K.LoRAMeta.allocate(16, p.A.shape[1], "cpu").update(p.slots)
    v = ops.lora_shrink(p.x, p.A, p.ranks, meta)
    assert v.shape == (2, 9, p.A.shape[2]) and v.dtype == torch.float32
    y0 = torch.randn(9, 80)
    y = ops.lora_expand(v, B_t, p.ranks, torch.ones_like(p.scalings), meta, y0.clone())
    y_ref = testing.expand_reference(v, B_t, p.ranks, torch.ones_like(p.scalings), p.slots, y0.clone(),
                                       (0, 40), (40, 40))
    torch.testing.assert_close(y, y_ref, **TOLERANCE[torch.float32])
