"""Fast torch path for shrink and expand (CPU serving; any device when forced).

Same semantics and argument checks as the Triton launchers (see ``ops``). Two strategies:

- ``segment``: one matmul per (segment, slice) over the segment's rows, sliced to the slot's own
  rank: reads r rows of A and B per adapter, never the padding. Uses ``meta.segments`` (host copy,
  on CPU); on other devices the segment list is read back once per call (a device sync).
- ``gather``: gathers every token's weights (``A[:, slot_t]``, ``B_t[slot_t]``), zeroes the gathered
  rank padding and runs one batched matmul per slice.

``STRATEGY`` picks one. Measured with benchmarks/lora_torch_cpu.py on the 2-core dev VM (table in
docs/benchmarks.md): the segment loop wins at every size tried, from 1.25x at 16 tokens over 16
adapters (1-token segments, its weak spot: ~20 µs per segment and slice) to ~200x at 2048-token
prefill, where gather copies every token's weights.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .checks import FLOAT_DTYPES, check_dim, check_pools, check_tensor, resolve_slices
from .meta import LoRAMeta

STRATEGY = "segment"


def _segments(meta: LoRAMeta) -> list[tuple[int, int, int]]:
    if meta.segments is not None:
        return meta.segments
    n = int((meta.seg_len > 0).sum())  # device sync: only when the torch path is forced on a GPU
    return list(zip(meta.seg_slot[:n].tolist(), meta.seg_start[:n].tolist(), meta.seg_len[:n].tolist()))


def _check_shrink(x, A, ranks, meta, out):
    check_tensor("x", x, 2, FLOAT_DTYPES)
    check_tensor("A", A, 4)
    if A.dtype != x.dtype:
        raise TypeError(f"A has dtype {A.dtype} but x has {x.dtype}; they must match")
    num_slices, S, R, _ = A.shape
    check_dim("A", A, 3, x.shape[1], "x's in_features")
    if x.shape[0] != meta.num_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens but meta was built for {meta.num_tokens}")
    if S < meta.max_slots:
        raise ValueError(f"A has {S} slots but meta addresses up to max_slots={meta.max_slots}")
    check_pools(ranks, None, num_slices, S)
    if out is not None:
        check_tensor("out", out, 3, (torch.float32,))
        if tuple(out.shape) != (num_slices, x.shape[0], R):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected (num_slices, T, max_rank) = "
                             f"({num_slices}, {x.shape[0]}, {R})")


def _check_expand(v, B_t, ranks, scalings, meta, y):
    check_tensor("y", y, 2, FLOAT_DTYPES)
    check_tensor("B_t", B_t, 3)
    if B_t.dtype != y.dtype:
        raise TypeError(f"B_t has dtype {B_t.dtype} but y has {y.dtype}; they must match")
    check_tensor("v", v, 3, (torch.float32, B_t.dtype))
    num_slices, T, R = v.shape
    check_dim("y", y, 0, T, "v's token count")
    check_dim("B_t", B_t, 1, R, "v's max_rank")
    check_dim("B_t", B_t, 2, y.shape[1], "y's out_total")
    if T != meta.num_tokens:
        raise ValueError(f"y has {T} tokens but meta was built for {meta.num_tokens}")
    if B_t.shape[0] < meta.max_slots:
        raise ValueError(f"B_t has {B_t.shape[0]} slots but meta addresses up to max_slots={meta.max_slots}")
    check_pools(ranks, scalings, num_slices, B_t.shape[0])


def torch_shrink(
    x: torch.Tensor,         # [T, in_features]
    A: torch.Tensor,         # [num_slices, S, max_rank, in_features]
    ranks: torch.Tensor,     # [num_slices, S] int32
    meta: LoRAMeta,
    out: torch.Tensor | None = None,  # [num_slices, T, max_rank] fp32
    strategy: str | None = None,
) -> torch.Tensor:
    _check_shrink(x, A, ranks, meta, out)
    num_slices, _, R, _ = A.shape
    T = x.shape[0]
    if out is None:
        out = torch.empty(num_slices, T, R, dtype=torch.float32, device=x.device)
    if T == 0 or R == 0:
        return out
    if (strategy or STRATEGY) == "gather":
        return _shrink_gather(x, A, ranks, meta, out)
    ranks_h = ranks.tolist()
    order = meta.order
    for slot, start, n in _segments(meta):
        rs = [ranks_h[i][slot] for i in range(num_slices)]
        if not any(rs):
            continue
        if meta.contiguous:
            rows, xs = None, x[start:start + n]
        else:
            rows = order[start:start + n].long()
            xs = x.index_select(0, rows)
        if min(rs) == max(rs):  # all slices share the rank: one batched matmul
            r = rs[0]
            res = torch.matmul(xs, A[:, slot, :r].transpose(1, 2)).float()  # [num_slices, n, r]
            if rows is None:
                out[:, start:start + n, :r] = res
            else:
                out[:, rows, :r] = res
            continue
        for i, r in enumerate(rs):
            if r:
                res = (xs @ A[i, slot, :r].T).float()
                if rows is None:
                    out[i, start:start + n, :r] = res
                else:
                    out[i, rows, :r] = res
    return out


def torch_expand(
    v: torch.Tensor,         # [num_slices, T, max_rank]
    B_t: torch.Tensor,       # [S, max_rank, out_total]
    ranks: torch.Tensor,     # [num_slices, S] int32
    scalings: torch.Tensor,  # [num_slices, S] fp32
    meta: LoRAMeta,
    y: torch.Tensor,         # [T, out_total], updated in place
    slice_offsets: Sequence[int] | None = None,
    slice_widths: Sequence[int] | None = None,
    strategy: str | None = None,
) -> torch.Tensor:
    _check_expand(v, B_t, ranks, scalings, meta, y)
    num_slices, T, R = v.shape
    offsets, widths = resolve_slices(num_slices, y.shape[1], slice_offsets, slice_widths)
    if T == 0 or R == 0:
        return y
    if (strategy or STRATEGY) == "gather":
        return _expand_gather(v, B_t, ranks, scalings, meta, y, offsets, widths)
    ranks_h, scalings_h = ranks.tolist(), scalings.tolist()
    order = meta.order
    for slot, start, n in _segments(meta):
        rows = None if meta.contiguous else order[start:start + n].long()
        for i, (off, w) in enumerate(zip(offsets, widths)):
            r = ranks_h[i][slot]
            if r == 0 or w == 0:
                continue
            s = scalings_h[i][slot]
            b = B_t[slot, :r, off:off + w]
            if rows is None:
                vs = v[i, start:start + n, :r].to(b.dtype)
                y[start:start + n, off:off + w].addmm_(vs, b, alpha=s)
            else:
                vs = v[i].index_select(0, rows)[:, :r].to(b.dtype)
                y[:, off:off + w].index_add_(0, rows, vs @ b, alpha=s)
    return y


def _shrink_gather(x, A, ranks, meta, out):
    num_slices, _, R, _ = A.shape
    slots = meta.slots.long()
    has = slots >= 0
    sc = slots.clamp(min=0)
    cols = torch.arange(R, device=x.device)
    for i in range(num_slices):
        keep = (cols < ranks[i].long()[sc].unsqueeze(1)) & has.unsqueeze(1)
        # Zero the gathered rank padding: a matmul may mix a NaN row into the others (CPU bf16 does).
        w = torch.where(keep.unsqueeze(2), A[i].index_select(0, sc), 0.0)   # [T, R, in]
        res = torch.bmm(w, x.unsqueeze(-1)).squeeze(-1)       # [T, R]
        out[i] = torch.where(keep, res.float(), 0.0)
    return out


def _expand_gather(v, B_t, ranks, scalings, meta, y, offsets, widths):
    slots = meta.slots.long()
    has = slots >= 0
    sc = slots.clamp(min=0)
    cols = torch.arange(v.shape[2], device=y.device)
    w_all = B_t.index_select(0, sc)                           # [T, R, out_total]
    for i, (off, w) in enumerate(zip(offsets, widths)):
        r_t = ranks[i].long()[sc]
        keep = (cols < r_t.unsqueeze(1)) & has.unsqueeze(1)
        vs = torch.where(keep, v[i].float(), 0.0).to(B_t.dtype)
        # Zero the gathered rank padding too: 0 · (whatever the pool holds there) must stay 0.
        b = torch.where(keep.unsqueeze(2), w_all[:, :, off:off + w], 0.0)
        delta = torch.bmm(vs.unsqueeze(1), b).squeeze(1)      # [T, w]
        s = torch.where(has & (r_t > 0), scalings[i][sc], 0.0).unsqueeze(1)
        ys = y[:, off:off + w]
        touched = (has & (r_t > 0)).unsqueeze(1)
        ys.copy_(torch.where(touched, (ys.float() + s * delta.float()).to(y.dtype), ys))
    return y
