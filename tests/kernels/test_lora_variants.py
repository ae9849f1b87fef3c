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


def test_warm_up_compiles_every_variant_serving_launches(monkeypatch):
    """`TritonBackend.warm_up` at start-up launches every (pool shape, shape class) variant; steps of any
    token count then launch nothing new. max_rank 8: the scratch's stride T·8 is a multiple of 16 for
    even T only, which must not select a variant."""
    from loraplex.kernels.backend import TritonBackend
    from loraplex.server.adapters.lora import LoRAPool

    recorder = Recorder()
    monkeypatch.setattr(shrink, "for_current_mode", recorder)
    monkeypatch.setattr(expand, "for_current_mode", recorder)
    backend = TritonBackend("cpu", torch.float16)
    pools = [LoRAPool(64, [48, 16, 16], 4, 8, torch.float16, torch.device("cpu")),
             LoRAPool(128, [64], 4, 8, torch.float16, torch.device("cpu")),
             LoRAPool(64, [48, 16, 16], 4, 8, torch.float16, torch.device("cpu"))]  # same shapes as the first
    assert backend.warm_up(pools) == 8
    warmed = set(recorder.keys)
    recorder.keys.clear()
    generator = torch.Generator().manual_seed(0)
    for tokens in (1, 3, 16, 17, 128, 129, 200, 513):
        slots = torch.randint(-1, 4, (tokens,), generator=generator).sort().values.tolist()
        slots = [s for s in slots if s >= 0] + [s for s in slots if s < 0]
        meta = LoRAMeta.allocate(1024, 4, "cpu", max_slices=3, max_rank=8).update(slots, contiguous=True)
        for pool in pools:
            x = torch.zeros(tokens, pool.in_features, dtype=torch.float16)
            backend.lora_apply(x, torch.zeros(tokens, pool.out_total, dtype=torch.float16), pool, None,
                               backend.begin_step(meta))
    assert recorder.keys <= warmed, f"{len(recorder.keys - warmed)} variants serving launches are not warmed up"
