"""The C kernel's base-projection GEMM (`native.linear` on `native.pack_weight` panels) against
torch's float32 matmul: row counts around its 8/12-row blocks, output widths around its 16-column
panels and panel pairs, odd K, bias or none, strided rows, threads; and the fused groups using it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loraplex.kernels.cpu import native
from loraplex.kernels.backend import Projection, select
from loraplex.kernels.cpu.backend import OneDNNProjection, PanelProjection
from loraplex.server.adapters.lora import LoRAStepContext, wrap_model

pytestmark = pytest.mark.skipif(not native.available(), reason=f"C kernel unavailable: {native.unavailable_reason()}")


@pytest.mark.parametrize("M", [1, 3, 8, 9, 16, 17, 40, 100])
@pytest.mark.parametrize("N,K", [(1, 7), (16, 64), (17, 33), (48, 64), (100, 130)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_torch(M, N, K, with_bias):
    gen = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    weight = torch.randn(N, K, generator=gen)
    bias = torch.randn(N, generator=gen) if with_bias else None
    x = torch.randn(M, K, generator=gen)
    panels = native.pack_weight(weight)
    assert panels.shape[0] % 2 == 0 and panels.shape[0] * native.PANEL >= N
    y = native.linear(x, panels, bias, N)
    torch.testing.assert_close(y, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)
    assert torch.equal(native.unpack_weight(panels, N), weight)


def test_linear_strided_rows_and_out():
    """x rows of a wider tensor; the result written into a given output."""
    weight, x_wide = torch.randn(40, 24), torch.randn(10, 30)
    x = x_wide[:, 3:27]
    out = torch.full((10, 40), float("nan"))
    assert native.linear(x, native.pack_weight(weight), None, 40, out=out) is out
    torch.testing.assert_close(out, x @ weight.t(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
def test_linear_threads_give_the_same_result(threads):
    weight, x = torch.randn(200, 64), torch.randn(20, 64)
    panels = native.pack_weight(weight)
    torch.set_num_threads(threads)  # the kernel conftest restores it
    y = native.linear(x, panels, None, 200)
    torch.set_num_threads(1)
    assert torch.equal(y, native.linear(x, panels, None, 200))  # threads split columns, never a sum


def test_linear_refuses_what_does_not_fit():
    panels = native.pack_weight(torch.randn(32, 16))
    with pytest.raises(ValueError, match="does not fit"):
        native.linear(torch.randn(4, 15), panels, None, 32)
    with pytest.raises(ValueError, match="does not fit"):
        native.linear(torch.randn(4, 16), panels, None, 33)
    with pytest.raises(ValueError, match="float32"):
        native.linear(torch.randn(4, 16, dtype=torch.float64), panels, None, 32)
    with pytest.raises(ValueError, match="bias"):
        native.linear(torch.randn(4, 16), panels, torch.randn(31), 32)


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(24, 32), nn.Linear(24, 16), nn.Linear(24, 16, bias=False)
        self.o_proj = nn.Linear(32, 24, bias=False)


def test_fused_groups_keep_their_weights_in_panels():
    """A float32 CPU model's fused groups hold only the panels; outputs and unpacked weights are the
    original layers'."""
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList([_Layer()])
    layer = model.layers[0]
    originals = {name: (getattr(layer, name).weight.detach().clone(),
                        None if getattr(layer, name).bias is None else getattr(layer, name).bias.detach().clone())
                 for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    table = wrap_model(model, 2, 4, torch.float32, torch.device("cpu"), LoRAStepContext(select("cpu", torch.float32)))
    x = torch.randn(5, 24)
    for name, (weight, bias) in originals.items():
        wrapped = table[f"layers.0.{name}"]
        assert isinstance(wrapped.group.projection, PanelProjection)
        assert torch.equal(wrapped.base.weight, weight)
        inp = x if name != "o_proj" else torch.randn(5, 32)
        torch.testing.assert_close(wrapped(inp), F.linear(inp, weight, bias), rtol=1e-5, atol=1e-5)


def test_without_the_kernel_groups_use_onednn_or_plain_weights(monkeypatch):
    """No compiler: the fused groups fall back to oneDNN's packed layout (or the plain weight) with the
    same outputs."""
    monkeypatch.setattr(native, "available", lambda: False)
    torch.manual_seed(1)
    model = nn.Module()
    model.layers = nn.ModuleList([_Layer()])
    weight = model.layers[0].o_proj.weight.detach().clone()
    table = wrap_model(model, 2, 4, torch.float32, torch.device("cpu"), LoRAStepContext(select("cpu", torch.float32)))
    group = table["layers.0.o_proj"].group
    assert isinstance(group.projection, (OneDNNProjection, Projection))
    assert not isinstance(group.projection, PanelProjection)
    x = torch.randn(3, 32)
    torch.testing.assert_close(table["layers.0.o_proj"](x), x @ weight.t(), rtol=1e-5, atol=1e-5)
