"""The torch segment path's batching (one bmm per slice over consecutive slots, segments padded to the
longest; equal-length segments with gathered weights) against the fp32 reference: consecutive and
scattered slots, contiguous and permuted tokens, shared and per-adapter scalings, mixed ranks, long
segments beside short ones, NaN-poisoned rank padding."""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels import torch_ops
from loraplex.kernels.meta import LoRAMeta
from loraplex.kernels.testing import expand_reference, shrink_reference
from tests.kernels.cases import TOLERANCE

S, R = 16, 32


def problem(slots: list[int], ranks: list[int], widths: tuple[int, ...], hidden: int, dtype: torch.dtype,
            same_scale: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    num_slices = len(widths)
    ranks_t = torch.tensor([ranks] * num_slices, dtype=torch.int32)
    A = torch.randn(num_slices, S, R, hidden, generator=gen) / hidden ** 0.5
    B_t = torch.randn(S, R, sum(widths), generator=gen) / 4
    for s in range(S):
        A[:, s, ranks[s]:] = float("nan")
        B_t[s, ranks[s]:] = float("nan")
    scalings = torch.full((num_slices, S), 0.5) if same_scale else torch.rand(num_slices, S, generator=gen) + 0.5
    x = torch.randn(len(slots), hidden, generator=gen)
    y0 = torch.randn(len(slots), sum(widths), generator=gen)
    return (x.to(dtype), A.to(dtype), B_t.to(dtype), ranks_t, scalings, torch.tensor(slots, dtype=torch.int32),
            y0.to(dtype))


def contiguous_slots(counts: dict[int, int]) -> list[int]:
    return [slot for slot, n in counts.items() for _ in range(n)]


CASES = {
    # decode over 16 adapters in consecutive slots: one batch, the pools read as views
    "decode-consecutive": (contiguous_slots({s: 1 for s in range(16)}), [16] * S),
    # every adapter at the pool's full rank: shrink writes v in place
    "decode-full-rank": (contiguous_slots({s: 1 for s in range(4, 12)}), [R] * S),
    # prefill chunks of equal length, batched too
    "prefill-equal-chunks": (contiguous_slots({2: 24, 3: 24, 4: 24}), [16] * S),
    # scattered slots (gathered weights), no-adapter tokens last
    "decode-scattered": (contiguous_slots({1: 1, 4: 1, 5: 1, 9: 1, 15: 1}) + [-1, -1], [8] * S),
    # slots 1..3 (3, 1 and 2 tokens) padded to 3 in one batch; slots 6 and 9 gathered; slot 4 (rank 8)
    # on its own
    "padded-run": (contiguous_slots({1: 3, 2: 1, 3: 2, 4: 1, 6: 1, 9: 1}), [16, 16, 16, 16, 8] + [16] * 11),
    # zipf-like: lengths 1, 2 and a long segment, two ranks
    "zipf-mixed-ranks": (contiguous_slots({0: 12, 1: 2, 2: 2, 3: 1, 5: 1, 6: 1, 8: 1, 11: 1}),
                         [16, 16, 16, 16, 8, 8, 8, 8, 16, 16, 16, 8, 8, 8, 8, 8]),
}


@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "perm"])
@pytest.mark.parametrize("same_scale", [True, False], ids=["one-scale", "scales"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_batched_segments_match_reference(case, dtype, same_scale, contiguous):
    slots, ranks = CASES[case]
    widths = (64, 24, 24)
    x, A, B_t, ranks_t, scalings, token_slots, y0 = problem(slots, ranks, widths, 48, dtype, same_scale, seed=7)
    if not contiguous:
        perm = torch.randperm(len(slots), generator=torch.Generator().manual_seed(1))
        x, y0, token_slots = x[perm], y0[perm], token_slots[perm]
    meta = LoRAMeta.allocate(128, S, "cpu").update(token_slots, contiguous=contiguous)
    v = torch.full((3, len(slots), R), 12345.0)
    torch_ops.torch_shrink(x, A, ranks_t, meta, out=v)
    v_ref = shrink_reference(x, A, ranks_t, token_slots)
    used = (token_slots >= 0).view(1, -1, 1) & (torch.arange(R) < ranks_t.long()[:, token_slots.long().clamp(min=0)]
                                               .unsqueeze(-1))
    torch.testing.assert_close(v[used], v_ref[used], **TOLERANCE[dtype])

    y = y0.clone()
    torch_ops.torch_expand(v_ref, B_t, ranks_t, scalings, meta, y, (0, 64, 88), widths)
    y_ref = expand_reference(v_ref, B_t, ranks_t, scalings, token_slots, y0.clone(), (0, 64, 88), widths)
    torch.testing.assert_close(y.float(), y_ref.float(), **TOLERANCE[dtype])
    assert torch.equal(y[token_slots < 0], y0[token_slots < 0])

    plan = torch_ops._plan(meta, ranks_t)
    assert plan.batches, "no segments were batched: the test does not exercise the batched path"
