"""The torch fast path (plans built per call and kept in a PlanCache) against the reference, with the same
poisoned problems."""

from __future__ import annotations

import itertools

import pytest
import torch

from loraplex.kernels import torch_ops
from loraplex.kernels.meta import LoRAMeta
from loraplex.kernels.testing import expand_reference, shrink_reference
from tests.kernels.cases import MIXES, TOLERANCE, V_POISON, check_v, layout, make_problem

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def run_case(T, hidden, num_slices, mix, dtype, contiguous, plans, seed=0):
    plans = torch_ops.PlanCache() if plans == "cached" else None
    p, contiguous = layout(make_problem(T, hidden, num_slices, mix, dtype, seed), contiguous)
    S, R = p.A.shape[1], p.A.shape[2]
    meta = LoRAMeta.allocate(256, S, "cpu").update(p.slots, contiguous=contiguous)

    v = torch.full((num_slices, T, R), V_POISON)
    torch_ops.torch_shrink(p.x, p.A, p.ranks, meta, out=v, plans=plans)
    v_ref = shrink_reference(p.x, p.A, p.ranks, p.slots)
    mask = p.rank_mask()
    # The segment loop multiplies in the input dtype (like PEFT), so low-precision v differs more.
    check_v(v, v_ref, mask, **TOLERANCE[dtype])

    v_in = v_ref.clone()
    v_in[~mask] = float("nan")
    y = p.y0.clone()
    torch_ops.torch_expand(v_in, p.B_t, p.ranks, p.scalings, meta, y, p.offsets, p.widths, plans=plans)
    y_ref = expand_reference(v_ref, p.B_t, p.ranks, p.scalings, p.slots, p.y0.clone(), p.offsets, p.widths)
    touched = p.touched()
    assert torch.equal(y[~touched], p.y0[~touched]), "expand changed y outside its tokens/slices"
    torch.testing.assert_close(y[touched].float(), y_ref[touched].float(), **TOLERANCE[dtype])
    if touched.any():
        assert not torch.equal(y_ref[touched], p.y0[touched])


CASES = [
    (T, (96, 200)[n % 2], 1 + n % 3, mix, DTYPES[n % 3], contiguous, plans)
    for n, (T, mix, contiguous, plans) in enumerate(
        itertools.product((1, 7, 64, 133), MIXES, (False, True), ("fresh", "cached")))
] + [(133, 3424, 3, "zipf", torch.float32, True, "fresh"), (7, 3424, 2, "distinct", torch.bfloat16, False, "cached")]


def case_id(case):
    T, hidden, ns, mix, dtype, contiguous, plans = case
    return f"T{T}-h{hidden}-s{ns}-{mix}-{str(dtype)[6:]}-{'contig' if contiguous else 'perm'}-{plans}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_torch_path_matches_reference(case):
    run_case(*case)


def test_expand_accepts_v_in_the_weight_dtype():
    p = make_problem(7, 96, 2, "zipf", torch.float16, seed=2)
    meta = LoRAMeta.allocate(16, p.A.shape[1], "cpu").update(p.slots)
    v_ref = shrink_reference(p.x, p.A, p.ranks, p.slots)
    y = p.y0.clone()
    torch_ops.torch_expand(v_ref.half(), p.B_t, p.ranks, p.scalings, meta, y, p.offsets, p.widths)
    y_ref = expand_reference(v_ref, p.B_t, p.ranks, p.scalings, p.slots, p.y0.clone(), p.offsets, p.widths)
    torch.testing.assert_close(y.float(), y_ref.float(), **TOLERANCE[torch.float16], equal_nan=True)


def test_poisoned_padding_is_caught_when_a_path_reads_it():
    """The NaN padding bites: a rank one too large reads a padding row and the check fails."""
    p = make_problem(7, 96, 1, "identical", torch.float32, seed=0)
    meta = LoRAMeta.allocate(16, p.A.shape[1], "cpu").update(p.slots)
    too_big = (p.ranks + 1).clamp(max=p.A.shape[2] - 1).to(torch.int32)
    v = torch.full((1, 7, p.A.shape[2]), V_POISON)
    torch_ops.torch_shrink(p.x, p.A, too_big, meta, out=v)
    with pytest.raises(AssertionError):
        check_v(v, shrink_reference(p.x, p.A, p.ranks, p.slots), p.rank_mask())
