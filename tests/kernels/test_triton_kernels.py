"""Triton shrink/expand (interpreted on CPU) against the fp32 reference.

Each case draws fresh inputs with NaN in every rank-padding row of A and B_t and in the scalings
of rank-0 slices, poisons shrink's output with a finite sentinel and expand's input v with NaN
outside [:rank], then checks:
  shrink  v[i, t, :r] matches the reference (so it was written and no padding was read) and the
          rest of v is untouched (or zeroed, with split-K);
  expand  y matches the reference where a token's adapter targets the slice, and is bit-for-bit
          unchanged elsewhere (slot −1 tokens, rank-0 slices).
The default grid covers every token count, adapter mix, slice count, dtype, layout and block-size
variant at least once; ``-m slow`` runs the full product.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from loraplex.kernels.triton.expand import triton_expand
from loraplex.kernels.meta import LoRAMeta
from loraplex.kernels.testing import expand_reference, shrink_reference
from loraplex.kernels.triton.shrink import triton_shrink
from tests.kernels.cases import MIXES, TOLERANCE, V_POISON, check_v, layout, make_problem

# Block-size variants besides the shape-class table: plain stores (split_k=1) with an even K loop
# on hidden=96 and several expand column blocks; and split_k=2 with several shrink rank blocks.
CONFIGS = {
    "table": None,
    "small": dict(block_m=16,
                  shrink=dict(block_n=16, block_k=32, split_k=1, num_warps=4, num_stages=2),
                  expand=dict(block_n=32, block_r=16, num_warps=4, num_stages=2)),
    "split2": dict(block_m=64,
                   shrink=dict(block_n=32, block_k=64, split_k=2, num_warps=4, num_stages=2),
                   expand=dict(block_n=64, block_r=32, num_warps=4, num_stages=2)),
}
TOKENS = (1, 7, 64, 133)
HIDDEN = (96, 200)
DTYPES = (torch.float32, torch.float16)
# Shrink sums exact fp16 products in fp32 just like the reference: fp32 tolerance for both dtypes.
SHRINK_TOL = TOLERANCE[torch.float32]


def run_case(T, hidden, num_slices, mix, dtype, contiguous, config, seed=0):
    problem, contiguous = layout(make_problem(T, hidden, num_slices, mix, dtype, seed), contiguous)
    p = problem
    cfg = CONFIGS[config]
    S, R = p.A.shape[1], p.A.shape[2]
    meta = LoRAMeta.allocate(256, S, "cpu").update(p.slots, contiguous=contiguous,
                                                   block_m=cfg and cfg["block_m"])

    v = torch.full((num_slices, T, R), V_POISON)
    triton_shrink(p.x, p.A, p.ranks, meta, out=v, config=cfg and cfg["shrink"])
    v_ref = shrink_reference(p.x, p.A, p.ranks, p.slots)
    mask = p.rank_mask()
    check_v(v, v_ref, mask, **SHRINK_TOL)

    v_in = v_ref.clone()
    v_in[~mask] = float("nan")
    y = p.y0.clone()
    triton_expand(v_in, p.B_t, p.ranks, p.scalings, meta, y, p.offsets, p.widths,
                  config=cfg and cfg["expand"])
    y_ref = expand_reference(v_ref, p.B_t, p.ranks, p.scalings, p.slots, p.y0.clone(), p.offsets, p.widths)
    touched = p.touched()
    assert torch.equal(y[~touched], p.y0[~touched]), "expand changed y outside its tokens/slices"
    torch.testing.assert_close(y[touched].float(), y_ref[touched].float(), **TOLERANCE[dtype])
    if touched.any():  # the reference moved y, so an expand that did nothing would fail above
        assert not torch.equal(y_ref[touched], p.y0[touched])


def default_grid():
    """Every (T, mix) pair once; dtype, hidden, slices, layout and config cycle across them."""
    cases = []
    for n, (T, mix) in enumerate(itertools.product(TOKENS, MIXES)):
        cases.append((T, HIDDEN[n % 2], 1 + n % 3, mix, DTYPES[(n // 2) % 2], n % 4 == 3,
                      list(CONFIGS)[n % 3]))
    # A large odd hidden size (Llama's 3424 = 11008 / 3.2...) in a reduced grid.
    cases.append((7, 3424, 3, "zipf", torch.float16, False, "split2"))
    cases.append((133, 3424, 2, "skewed", torch.float32, True, "table"))
    return cases


def case_id(case):
    T, hidden, ns, mix, dtype, contiguous, config = case
    return f"T{T}-h{hidden}-s{ns}-{mix}-{str(dtype)[6:]}-{'contig' if contiguous else 'perm'}-{config}"


@pytest.mark.parametrize("case", default_grid(), ids=case_id)
def test_triton_matches_reference(case):
    run_case(*case)


@pytest.mark.slow
@pytest.mark.parametrize("case", [
    # small blocks at h=3424 loop 107 times per program: up to 20 s each interpreted, so not there
    (T, h, ns, mix, dtype, contiguous, "table" if h == 3424 and config == "small" else config)
    for T, h, ns, mix, dtype in itertools.product(TOKENS, HIDDEN + (3424,), (1, 2, 3), MIXES, DTYPES)
    for contiguous, config in [(False, "table"), (True, "small"), (False, "split2")]
], ids=case_id)
def test_triton_matches_reference_full_grid(case):
    run_case(*case)


def test_split_k_zeroes_a_poisoned_output():
    """With split_k > 1 programs add into v atomically: the launcher must clear v first."""
    run_case(7, 96, 2, "zipf", torch.float32, False, "split2", seed=3)


def test_rank_zero_everywhere_and_no_adapter_tokens_leave_everything_untouched():
    p = make_problem(9, 96, 2, "no_adapter", torch.float32, seed=1)
    ranks = torch.zeros_like(p.ranks)
    meta = LoRAMeta.allocate(16, p.A.shape[1], "cpu").update(p.slots)
    v = torch.full((2, 9, p.A.shape[2]), 7.0)
    triton_shrink(p.x, p.A, ranks, meta, out=v, config=CONFIGS["small"]["shrink"])
    assert (v == 7.0).all()
    y = p.y0.clone()
    triton_expand(v, p.B_t, ranks, p.scalings, meta, y, p.offsets, p.widths)
    assert torch.equal(y, p.y0)
