"""The fused projection groups of a float32 CPU model: their weight lives in the backend's layout
(oneDNN's prepacked one where torch has it), with the original layers' outputs and weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loraplex.kernels.backend import select
from loraplex.kernels.cpu import native
from loraplex.kernels.cpu.backend import OneDNNProjection
from loraplex.server.adapters.lora import LoRAStepContext, wrap_model


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(24, 32), nn.Linear(24, 16), nn.Linear(24, 16, bias=False)
        self.o_proj = nn.Linear(32, 24, bias=False)


@pytest.mark.parametrize("kernels", [True, False], ids=["c", "torch"])
def test_fused_groups_keep_their_weights_in_the_backend_layout(monkeypatch, kernels):
    """With or without the C kernels, the fused groups hold their weight only in oneDNN's layout; outputs,
    one projection's columns and unpacked weights are the original layers'."""
    if not kernels:
        monkeypatch.setattr(native, "available", lambda: False)
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        pytest.skip("this torch has no oneDNN packed linear")
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList([_Layer()])
    layer = model.layers[0]
    originals = {name: (getattr(layer, name).weight.detach().clone(),
                        None if getattr(layer, name).bias is None else getattr(layer, name).bias.detach().clone())
                 for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    backend = select("cpu", torch.float32)
    assert backend.name == ("cpu" if kernels else "torch-cpu")
    table = wrap_model(model, 2, 4, torch.float32, torch.device("cpu"), LoRAStepContext(backend))
    x = torch.randn(5, 24)
    for name, (weight, bias) in originals.items():
        wrapped = table[f"layers.0.{name}"]
        assert isinstance(wrapped.group.projection, OneDNNProjection)
        assert torch.equal(wrapped.base.weight, weight)
        inp = x if name != "o_proj" else torch.randn(5, 32)
        torch.testing.assert_close(wrapped(inp), F.linear(inp, weight, bias), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(wrapped.base(inp), F.linear(inp, weight, bias), rtol=1e-5, atol=1e-5)
