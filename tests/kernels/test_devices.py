"""Device spellings: a device is normalised once, to what its tensors report, and compared in one place."""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels import devices
from loraplex.kernels.triton.expand import triton_expand
from loraplex.kernels.meta import LoRAMeta
from loraplex.kernels.testing import expand_reference, shrink_reference
from loraplex.kernels.triton.shrink import triton_shrink
from loraplex.server.config import ModelConfig


def test_normalize_gives_what_tensors_report():
    assert devices.normalize(torch.device("cpu", 0)) == torch.empty(1, device=torch.device("cpu", 0)).device
    assert devices.normalize("cpu") == torch.device("cpu")
    assert devices.normalize("cuda:1") == torch.device("cuda", 1)
    # without CUDA, "cuda" means the device torch would pick first: index 0
    expected = torch.cuda.current_device() if torch.cuda.is_available() else 0
    assert devices.normalize("cuda") == torch.device("cuda", expected)
    assert devices.same_device("cuda", torch.device("cuda", expected))
    assert devices.same_device(torch.device("cpu", 0), "cpu")
    assert not devices.same_device("cuda:1", "cuda:0")


@pytest.mark.parametrize("given, stored", [("cpu", "cpu"), ("cpu:0", "cpu"), ("cuda", "cuda"), ("cuda:2", "cuda:2")])
def test_model_config_stores_the_device_spelling_without_torch(given, stored):
    """The config (no torch) drops a CPU index; a bare "cuda" becomes the current device where torch is:
    the CLI (`loraplex serve`, `demo`) and the model runner normalise it."""
    assert ModelConfig(path=".", device=given).device == stored


@pytest.mark.parametrize("bad", ["cudax", "gpu", "cuda:a", "mps", ""])
def test_model_config_refuses_other_devices(bad):
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda"):
        ModelConfig(path=".", device=bad)


def test_kernels_accept_meta_built_for_an_equivalent_device_spelling():
    """The class of bug that made every LoRA step fail on CUDA ("cuda" vs "cuda:0"), shown on CPU."""
    gen = torch.Generator().manual_seed(0)
    T, H, S, R, out = 5, 32, 3, 16, 24
    x = torch.randn(T, H, generator=gen)
    A = torch.randn(1, S, R, H, generator=gen)
    B_t = torch.randn(S, R, out, generator=gen)
    ranks = torch.tensor([[16, 8, 4]], dtype=torch.int32)
    scalings = torch.tensor([[0.5, 1.0, 2.0]])
    slots = torch.tensor([0, 0, 1, 2, -1], dtype=torch.int32)
    meta = LoRAMeta.allocate(8, S, torch.device("cpu", 0)).update(slots, contiguous=True)
    v = triton_shrink(x, A, ranks, meta)
    y = triton_expand(v, B_t, ranks, scalings, meta, torch.zeros(T, out))
    v_ref = shrink_reference(x, A, ranks, slots)
    y_ref = expand_reference(v_ref, B_t, ranks, scalings, slots, torch.zeros(T, out), (0,), (out,))
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    assert meta.device == torch.device("cpu")


def test_make_current_sets_the_cuda_device_only_for_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    devices.make_current("cpu")
    assert calls == []
    devices.make_current("cuda:3")
    assert calls == [torch.device("cuda", 3)]


def test_serve_stores_a_bare_cuda_as_the_current_device(monkeypatch, tmp_path):
    """`loraplex serve --device cuda` configures the device its tensors report (GetServerInfo says it)."""
    from loraplex.server.api.cli import config_from_args
    from loraplex.server.cli import build_parser

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    args = build_parser().parse_args(["serve", "--model", str(tmp_path), "--device", "cuda"])
    assert config_from_args(args).engine.model.device == "cuda:3"
