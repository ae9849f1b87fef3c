"""The LoRA kernels compile no new variant when the runner regrows its step layout (`LoRAMeta`) for a
larger step: its token_order and tile tables then sit at other offsets of the table block, so their
16-byte alignment changes. Launches are recorded, not run (`compile_keys`)."""

from __future__ import annotations

import torch

from loraplex.kernels.meta import LoRAMeta
from loraplex.kernels.triton import expand, shrink
from loraplex.kernels.triton.expand import triton_expand
from loraplex.kernels.triton.shrink import triton_shrink

from .compile_keys import Recorder


def test_one_variant_whatever_the_layout_size(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(shrink, "for_current_mode", recorder)
    monkeypatch.setattr(expand, "for_current_mode", recorder)
    T, H, S, R, out = 5, 64, 3, 16, 48
    x, A = torch.zeros(T, H, dtype=torch.float16), torch.zeros(2, S, R, H, dtype=torch.float16)
    B_t = torch.zeros(S, R, 2 * out, dtype=torch.float16)
    ranks, scalings = torch.full((2, S), R, dtype=torch.int32), torch.ones(2, S)
    variants = set()
    for max_tokens in (256, 301, 333):  # token_order at 1024, 1204 and 1332 bytes into the block
        recorder.keys.clear()
        meta = LoRAMeta.allocate(max_tokens, S, "cpu").update([0, 0, 1, 2, -1], contiguous=True)
        v = triton_shrink(x, A, ranks, meta)
        triton_expand(v, B_t, ranks, scalings, meta, torch.zeros(T, 2 * out, dtype=torch.float16))
        assert len(recorder.keys) == 2
        variants.add(frozenset(recorder.keys))
    assert len(variants) == 1
