"""Bad arguments are refused with a message that names the offending argument (Triton and torch)."""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels.triton.expand import triton_expand
from loraplex.kernels.meta import LoRAMeta
from loraplex.kernels.triton.shrink import triton_shrink
from loraplex.kernels.torch_ops import torch_expand, torch_shrink

T, H, S, R, NS = 4, 16, 4, 8, 2
SHRINKS = {"triton": triton_shrink, "torch": torch_shrink}
EXPANDS = {"triton": triton_expand, "torch": torch_expand}


def shrink_args(**overrides):
    args = dict(x=torch.randn(T, H), A=torch.randn(NS, S, R, H), ranks=torch.full((NS, S), R, dtype=torch.int32),
                meta=LoRAMeta.allocate(8, S, "cpu").update([0, 1, -1, 3]), out=torch.empty(NS, T, R))
    args.update(overrides)
    return args


def expand_args(**overrides):
    args = dict(v=torch.randn(NS, T, R), B_t=torch.randn(S, R, 24), ranks=torch.full((NS, S), R, dtype=torch.int32),
                scalings=torch.ones(NS, S), meta=LoRAMeta.allocate(8, S, "cpu").update([0, 1, -1, 3]),
                y=torch.zeros(T, 24), slice_offsets=(0, 16), slice_widths=(16, 8))
    args.update(overrides)
    return args


SHRINK_CASES = [
    ("x 3-D", dict(x=torch.randn(1, T, H)), r"x must be 2-D, got shape \(1, 4, 16\)"),
    ("x int", dict(x=torch.ones(T, H, dtype=torch.int64)), "x has dtype int64, expected one of float16, bfloat16, float32"),
    ("A dtype", dict(A=torch.randn(NS, S, R, H).half()), "A has dtype torch.float16 but x has torch.float32"),
    ("A 3-D", dict(A=torch.randn(S, R, H)), "A must be 4-D"),
    ("A in_features", dict(A=torch.randn(NS, S, R, 32)), r"A.shape\[3\] is 32 but x's in_features is 16"),
    ("A slots", dict(A=torch.randn(NS, 2, R, H), ranks=torch.ones(NS, 2, dtype=torch.int32)),
     "A has 2 slots but meta addresses up to max_slots=4"),
    ("ranks dtype", dict(ranks=torch.full((NS, S), R)), "ranks has dtype int64, expected one of int32"),
    ("ranks shape", dict(ranks=torch.full((S,), R, dtype=torch.int32)), r"ranks must be 2-D"),
    ("ranks slices", dict(ranks=torch.full((3, S), R, dtype=torch.int32)),
     r"ranks has shape \(3, 4\), expected \(num_slices, S\) = \(2, 4\)"),
    ("out dtype", dict(out=torch.empty(NS, T, R, dtype=torch.float16)), "out has dtype float16, expected one of float32"),
    ("out shape", dict(out=torch.empty(NS, T, 2 * R)), r"out has shape \(2, 4, 16\), expected \(num_slices, T, max_rank\)"),
    ("meta tokens", dict(meta=LoRAMeta.allocate(8, S, "cpu").update([0, 1, 2])), "x has 4 tokens but meta was built for 3"),
]


@pytest.mark.parametrize("backend", SHRINKS)
@pytest.mark.parametrize("name, overrides, message", SHRINK_CASES, ids=[c[0] for c in SHRINK_CASES])
def test_shrink_argument_errors(backend, name, overrides, message):
    with pytest.raises((ValueError, TypeError), match=message):
        SHRINKS[backend](**shrink_args(**overrides))


EXPAND_CASES = [
    ("y dtype", dict(y=torch.zeros(T, 24, dtype=torch.int32)), "y has dtype int32"),
    ("B_t dtype", dict(B_t=torch.randn(S, R, 24).half()), "B_t has dtype torch.float16 but y has torch.float32"),
    ("v dtype", dict(v=torch.randn(NS, T, R).double()), "v has dtype float64, expected one of float32"),
    ("y tokens", dict(y=torch.zeros(T + 1, 24)), r"y.shape\[0\] is 5 but v's token count is 4"),
    ("B_t rank", dict(B_t=torch.randn(S, 2 * R, 24)), r"B_t.shape\[1\] is 16 but v's max_rank is 8"),
    ("B_t out", dict(B_t=torch.randn(S, R, 30)), r"B_t.shape\[2\] is 30 but y's out_total is 24"),
    ("B_t slots", dict(B_t=torch.randn(2, R, 24)), "B_t has 2 slots but meta addresses up to max_slots=4"),
    ("scalings dtype", dict(scalings=torch.ones(NS, S, dtype=torch.float64)), "scalings has dtype float64"),
    ("scalings shape", dict(scalings=torch.ones(NS, 3)), r"scalings has shape \(2, 3\), expected \(num_slices, S\)"),
    ("slice range", dict(slice_offsets=(0, 20)), r"slice 1: columns \[20, 28\) are outside y's 24 columns"),
    ("slice count", dict(slice_offsets=(0,), slice_widths=(16,)), "must have one entry per slice"),
    ("equal split", dict(y=torch.zeros(T, 25), B_t=torch.randn(S, R, 25), slice_offsets=None, slice_widths=None),
     "out_total=25 does not split into 2 equal slices"),
    ("meta tokens", dict(meta=LoRAMeta.allocate(8, S, "cpu").update([0])), "y has 4 tokens but meta was built for 1"),
]


@pytest.mark.parametrize("backend", EXPANDS)
@pytest.mark.parametrize("name, overrides, message", EXPAND_CASES, ids=[c[0] for c in EXPAND_CASES])
def test_expand_argument_errors(backend, name, overrides, message):
    with pytest.raises((ValueError, TypeError), match=message):
        EXPANDS[backend](**expand_args(**overrides))


def test_triton_layout_requirements():
    with pytest.raises(ValueError, match="A must be contiguous"):
        triton_shrink(**shrink_args(A=torch.randn(NS, S, H, R).transpose(2, 3)))
    with pytest.raises(ValueError, match="x must have unit stride in its last dimension"):
        triton_shrink(**shrink_args(x=torch.randn(H, T).T))
    with pytest.raises(ValueError, match="B_t must be contiguous"):
        triton_expand(**expand_args(B_t=torch.randn(S, 24, R).transpose(1, 2)))
    with pytest.raises(ValueError, match="y must have unit stride"):
        triton_expand(**expand_args(y=torch.zeros(24, T).T))
    with pytest.raises(ValueError, match="at most 4"):
        triton_expand(**expand_args(v=torch.randn(5, T, R), ranks=torch.ones(5, S, dtype=torch.int32),
                                    scalings=torch.ones(5, S), slice_offsets=None, slice_widths=None,
                                    y=torch.zeros(T, 25), B_t=torch.randn(S, R, 25)))


def test_triton_wants_cuda_unless_interpreting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="x is on cpu: the Triton kernels need CUDA tensors"):
        triton_shrink(**shrink_args())
    with pytest.raises(ValueError, match="y is on cpu: the Triton kernels need CUDA tensors"):
        triton_expand(**expand_args())


def test_strided_views_are_accepted_where_documented():
    """v may be a [:, :T] view of a bigger buffer and x/y row-strided: the launchers pass strides."""
    from loraplex.kernels.testing import expand_reference, shrink_reference

    args = shrink_args()
    big_x = torch.randn(T, 2 * H)
    x = big_x[:, :H]
    buf = torch.full((NS, 2 * T, R), 5.0)
    v = buf[:, :T]
    triton_shrink(x, args["A"], args["ranks"], args["meta"], out=v)
    ref = shrink_reference(x, args["A"], args["ranks"], args["meta"].slots)
    used = args["meta"].slots >= 0
    torch.testing.assert_close(v[:, used], ref[:, used])
    assert (buf[:, T:] == 5.0).all()

    e = expand_args()
    big_y = torch.zeros(T, 40)
    y = big_y[:, :24]
    triton_expand(e["v"], e["B_t"], e["ranks"], e["scalings"], e["meta"], y, (0, 16), (16, 8))
    y_ref = expand_reference(e["v"], e["B_t"], e["ranks"], e["scalings"], e["meta"].slots, torch.zeros(T, 24),
                             (0, 16), (16, 8))
    torch.testing.assert_close(y, y_ref)
    assert (big_y[:, 24:] == 0).all()
