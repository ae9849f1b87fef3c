"""The decoder layers' element-wise steps in C (kernels/cpu/native.py: add_rms_norm, rope_store)
against the torch formulas transformers' Llama-shaped models use."""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels.cpu import native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"C kernel unavailable: {native.unavailable_reason()}")
CLOSE = dict(rtol=2e-6, atol=1e-6)


def _hf_rms_norm(h, weight, eps):
    variance = h.pow(2).mean(-1, keepdim=True)
    return weight * (h * torch.rsqrt(variance + eps))


def _rotate(x, cos, sin):  # x [T, heads, D], cos/sin [T, D]
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin[:, None]


@pytest.mark.parametrize("rows", [1, 7, 16, 300])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_matches_transformers_rmsnorm(rows, with_delta):
    gen = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, 96, generator=gen) * 3
    delta = torch.randn(rows, 2 * 96, generator=gen)[:, 96:] if with_delta else None  # strided rows
    weight = torch.randn(96, generator=gen)
    expected_h = h + delta if with_delta else h.clone()
    out = torch.full((rows, 96), float("nan"))
    assert native.add_rms_norm(h, delta, weight, 1e-5, out) is out
    torch.testing.assert_close(h, expected_h, rtol=0, atol=0)  # the residual add is exact, in place
    torch.testing.assert_close(out, _hf_rms_norm(expected_h, weight, 1e-5), **CLOSE)


@pytest.mark.parametrize("T", [1, 5, 16, 200])
def test_rope_store_rotates_in_place_and_fills_the_cache(T):
    gen = torch.Generator().manual_seed(T)
    H, KVH, D = 6, 2, 32
    qkv = torch.randn(T, (H + 2 * KVH) * D, generator=gen)  # one fused projection output, as served
    q = qkv[:, : H * D].view(T, H, D)
    k = qkv[:, H * D : (H + KVH) * D].view(T, KVH, D)
    v = qkv[:, (H + KVH) * D :].view(T, KVH, D)
    positions = torch.arange(T, dtype=torch.float32)[:, None]
    freqs = positions / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    expected_q, expected_k, expected_v = _rotate(q, cos, sin), _rotate(k, cos, sin), v.clone()
    slots = torch.randperm(4 * T, generator=gen)[:T]
    slots[0] = -1  # not stored
    k_cache = torch.full((4 * T, KVH, D), float("nan"))
    v_cache = torch.full((4 * T, KVH, D), float("nan"))
    native.rope_store(q, k, v, cos, sin, k_cache, v_cache, slots)
    torch.testing.assert_close(q, expected_q, **CLOSE)
    torch.testing.assert_close(k, expected_k, **CLOSE)
    assert torch.equal(v, expected_v)
    stored = slots >= 0
    assert torch.equal(k_cache[slots[stored]], k[stored]) and torch.equal(v_cache[slots[stored]], v[stored])
    untouched = torch.ones(4 * T, dtype=torch.bool)
    untouched[slots[stored]] = False
    assert k_cache[untouched].isnan().all() and v_cache[untouched].isnan().all()


def test_refusals():
    h, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match="float32"):
        native.add_rms_norm(h.double(), None, w, 1e-5, torch.empty(4, 8))
    with pytest.raises(ValueError, match="rows"):
        native.add_rms_norm(h, torch.randn(3, 8), w, 1e-5, torch.empty(4, 8))
    with pytest.raises(ValueError, match="weight"):
        native.add_rms_norm(h, None, torch.randn(7), 1e-5, torch.empty(4, 8))
    q, k = torch.randn(2, 4, 8), torch.randn(2, 2, 8)
    cos = sin = torch.randn(2, 8)
    cache = torch.zeros(8, 2, 8)
    with pytest.raises(ValueError, match="do not fit"):
        native.rope_store(q, k, torch.randn(2, 1, 8), cos, sin, cache, cache, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        native.rope_store(q, k, k.clone(), cos, sin, cache, cache, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="cos"):
        native.rope_store(q, k, k.clone(), torch.randn(2, 6), sin, cache, cache, torch.zeros(2, dtype=torch.long))
