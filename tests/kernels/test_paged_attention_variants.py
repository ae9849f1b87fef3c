"""The paged attention kernel's variants: decode split counts are few (each is a compiled variant)."""

from __future__ import annotations

import torch

from loraplex.kernels.triton import paged_attention as pa

H100_SMS = 132


def test_decode_split_counts_are_powers_of_two(monkeypatch):
    monkeypatch.setattr(pa, "_num_sms", lambda *args: H100_SMS)
    cuda = torch.device("cuda", 0)
    for kv_heads in (1, 2, 8):
        counts = {pa.decode_splits(n * kv_heads, cuda) for n in range(1, 257)}
        assert counts <= {1, 2, 4, 8, 16}, f"kv_heads={kv_heads}: split counts {sorted(counts)}"
        assert 16 in counts  # one sequence on an H100
