"""Fast torch path for shrink and expand (CPU serving; any device when forced).

Same semantics and argument checks as the Triton launchers (see ``ops``): one matmul per (segment,
slice) over the segment's rows, sliced to the slot's own rank, so it reads r rows of A and B per
adapter, never the padding. Uses ``meta.segments`` (host copy, on CPU); on other devices the segment
list is read back once per call (a device sync). It beats gathering every token's weights for one
batched matmul at every size benchmarks/lora_torch_cpu.py tries (docs/benchmarks.md); its weak spot,
many 1-token segments (one matmul call each), is covered by batching, always at each adapter's own
rank:

- decode-like segments (at most ``PAD_MAX_LEN`` tokens) with equal ranks in consecutive slots run as
  one ``bmm`` per slice over a view of the pools, each segment padded to the run's longest (padding
  rows are computed and dropped);
- the other segments of equal length and ranks (prefill chunks; short segments whose slots are not
  next to another's) run as one ``bmm`` per slice per length, their weights gathered
  (``index_select``) when their slots are not consecutive.

Runs stop at the first gap: running a range of slots through their gaps would read unused slots'
weights and drop the rows, which grows with the number of slots and gains nothing
(``loraplex bench``, docs/benchmarks.md).

A decode step over 16 adapters then costs one shrink and one expand ``bmm`` per slice instead of
16 matmuls each. The grouping is computed once per (step layout, ranks, scalings) and kept in the
caller's ``PlanCache`` (the backend's), when one is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .checks import FLOAT_DTYPES, check_dim, check_pools, check_tensor, resolve_slices
from .meta import LoRAMeta

# Segments up to this long are padded to their run's longest and batched (decode steps: 1 token per
# sequence, a few per popular adapter).
PAD_MAX_LEN = 8
# Longer segments up to this long are batched with others of the same length and ranks (prefill
# chunks); a longer one runs alone, its matmul's fixed call cost amortized.
BATCH_MAX_LEN = 512


@dataclass
class _Batch:
    """Segments of equal length n and equal per-slice ranks, run as one bmm per slice.

    Worked examples, contiguous layout, rank 16 everywhere:
    - segments (slot, start, len) (3, 0, 1), (4, 1, 1), (5, 2, 1): slots 3..5 (a view of the pools),
      rows [0, 3) (a view of x);
    - (3, 0, 2), (4, 2, 1): padded to n = 2, rows [0, 1, 2, 2] (the last row repeated), of which
      positions [0, 1, 2] are real, at rows [0, 1, 2];
    - prefill chunks (3, 0, 32), (7, 32, 32): weights gathered, ``A[i, :, :16].index_select(0, [3, 7])``.
    """

    n: int
    k: int                           # segments
    ranks: tuple[int, ...]           # per slice, 0: skipped
    slot0: int                       # slots are slot0 + 0..k-1 when slot_index is None
    slot_index: torch.Tensor | None  # [k] long, for slots that are not consecutive
    row0: int                        # rows are [row0, row0 + k·n) when row_index is None
    row_index: torch.Tensor | None   # [k·n] long token rows, segment by segment (padding repeats a row)
    scales: tuple                    # per slice: one float, or a [k, 1, 1] fp32 tensor (expand only)
    real: torch.Tensor | None = None       # [m] long positions in the k·n block that are not padding
    real_rows: torch.Tensor | None = None  # [m] long their token rows


@dataclass
class _Loop:
    """One segment run with its own matmuls (long, or alone with its length and ranks)."""

    slot: int
    start: int
    n: int
    rows: torch.Tensor | None        # [n] long token rows; None: [start, start + n) (contiguous layout)
    ranks: tuple[int, ...]
    scales: tuple[float, ...]        # expand only


@dataclass
class _Plan:
    batches: list[_Batch]
    looped: list[_Loop]


class PlanCache:
    """Plans reused while the step layout and the pool's ranks/scalings are unchanged (decode steps
    repeat the same layout); at most ``size`` are kept."""

    def __init__(self, size: int = 512):
        self.size = size
        self.entries: dict[tuple, tuple] = {}


def _plan(meta: LoRAMeta, ranks: torch.Tensor, scalings: torch.Tensor | None = None,
          plans: PlanCache | None = None) -> _Plan:
    """The batches and looped segments of this step for one pool's ranks (and scalings).

    Kept in ``plans`` when given. Keys use the tensors' identity and version counter (bumped by every in-place
    write, e.g. loading an adapter into a slot), so a hit costs no device read; the entry holds the
    tensors, so their ids cannot be reused while it lives. A contiguous layout is keyed by its
    segments' content, a permuted one by the segment list of this very update (its order differs).
    """
    segments = _segments(meta)
    layout = (tuple(segments), True) if meta.contiguous else (id(segments), False)
    key = (layout, id(ranks), ranks._version,
           None if scalings is None else (id(scalings), scalings._version))
    if plans is None:
        return _build_plan(meta, segments, ranks.tolist(), None if scalings is None else scalings.tolist())
    key = (id(meta),) + key
    entry = plans.entries.get(key)
    if entry is None:
        if len(plans.entries) >= plans.size:
            plans.entries.clear()
        plan = _build_plan(meta, segments, ranks.tolist(), None if scalings is None else scalings.tolist())
        entry = plans.entries[key] = (meta, segments, ranks, scalings, plan)
    return entry[4]


def _build_plan(meta, segments, ranks_h, scalings_h) -> _Plan:
    num_slices = len(ranks_h)
    device = meta.device
    order = None if meta.contiguous else meta.order.long()

    def scales_of(slots, rs):
        if scalings_h is None:
            return ()
        out = []
        for i, r in enumerate(rs):
            values = [scalings_h[i][slot] for slot in slots]
            if not r or len(set(values)) == 1:
                out.append(values[0])
            else:
                out.append(torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1))
        return tuple(out)

    def rows_of(start: int, n: int) -> list[int]:
        return list(range(start, start + n)) if order is None else order[start:start + n].tolist()

    short: dict[tuple, list[tuple[int, int, int]]] = {}
    groups: dict[tuple, list[tuple[int, int, int]]] = {}
    singles = []
    for seg in segments:
        slot, _, n = seg
        rs = tuple(ranks_h[i][slot] for i in range(num_slices))
        if not any(rs):
            continue
        if n <= PAD_MAX_LEN:
            short.setdefault(rs, []).append(seg)
        elif n <= BATCH_MAX_LEN:
            groups.setdefault((n, rs), []).append(seg)
        else:
            singles.append((seg, rs))
    batches = []
    for rs, segs in short.items():  # segments come in slot order
        runs = [[segs[0]]]
        for seg in segs[1:]:
            if seg[0] == runs[-1][-1][0] + 1:
                runs[-1].append(seg)
            else:
                runs.append([seg])
        for run in runs:
            if len(run) == 1:  # batched with the segments of its length, weights gathered
                groups.setdefault((run[0][2], rs), []).append(run[0])
                continue
            batches.append(_range_batch(run, rs, rows_of, scales_of, order is None, device))
    for (n, rs), segs in groups.items():
        if len(segs) == 1:
            singles.append((segs[0], rs))
            continue
        slots = [slot for slot, _, _ in segs]
        consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
        slot_index = None if consecutive else torch.tensor(slots, dtype=torch.long, device=device)
        starts = [start for _, start, _ in segs]
        row_index = None
        if not (meta.contiguous and starts == list(range(starts[0], starts[0] + n * len(segs), n))):
            positions = torch.cat([torch.arange(start, start + n) for start in starts]).to(device)
            row_index = positions if order is None else order[positions]
        batches.append(_Batch(n, len(segs), rs, slots[0], slot_index, starts[0], row_index, scales_of(slots, rs)))
    looped = []
    for (slot, start, n), rs in sorted(singles, key=lambda item: item[0][1]):
        rows = None if order is None else order[start:start + n]
        looped.append(_Loop(slot, start, n, rows, rs, scales_of([slot], rs)))
    return _Plan(batches, looped)


def _range_batch(run, rs, rows_of, scales_of, contiguous: bool, device) -> _Batch:
    """Short segments in consecutive slots as one batch over a view of the pools, every segment
    padded to the longest (padding rows repeat the segment's last row; their results are dropped)."""
    n = max(length for _, _, length in run)
    k = len(run)
    slots = [slot for slot, _, _ in run]
    starts = [start for _, start, _ in run]
    if contiguous and all(length == n for _, _, length in run) \
            and starts == list(range(starts[0], starts[0] + n * k, n)):
        return _Batch(n, k, rs, slots[0], None, starts[0], None, scales_of(slots, rs))
    rows, real, real_rows = [], [], []
    for j, (_, start, length) in enumerate(run):
        seg_rows = rows_of(start, length)
        rows += seg_rows + [seg_rows[-1]] * (n - length)
        real += range(j * n, j * n + length)
        real_rows += seg_rows
    as_index = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    padded = len(real) < len(rows)
    return _Batch(n, k, rs, slots[0], None, starts[0], as_index(rows), scales_of(slots, rs),
                  as_index(real) if padded else None, as_index(real_rows) if padded else None)


def _segments(meta: LoRAMeta) -> list[tuple[int, int, int]]:
    if meta.segments is not None:
        return meta.segments
    n = int((meta.seg_len > 0).sum())  # device sync: only when the torch path is forced on a GPU
    return list(zip(meta.seg_slot[:n].tolist(), meta.seg_start[:n].tolist(), meta.seg_len[:n].tolist()))


def check_shrink(x, A, ranks, meta, out):
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


def check_expand(v, B_t, ranks, scalings, meta, y):
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
    plans: PlanCache | None = None,
) -> torch.Tensor:
    check_shrink(x, A, ranks, meta, out)
    num_slices, _, R, _ = A.shape
    T = x.shape[0]
    if out is None:
        out = torch.empty(num_slices, T, R, dtype=torch.float32, device=x.device)
    if T == 0 or R == 0:
        return out
    plan = _plan(meta, ranks, plans=plans)
    for batch in plan.batches:
        k, n, kn = batch.k, batch.n, batch.k * batch.n
        if batch.row_index is None:
            xs = x[batch.row0:batch.row0 + kn].view(k, n, -1)
        else:
            xs = x.index_select(0, batch.row_index).view(k, n, -1)
        for i, r in enumerate(batch.ranks):
            if not r:
                continue
            if batch.slot_index is None:
                a = A[i, batch.slot0:batch.slot0 + k, :r]                  # [k, r, in]
            else:
                a = A[i, :, :r].index_select(0, batch.slot_index)
            if batch.row_index is None and r == R and x.dtype == torch.float32 and out.stride(1) == R:
                # full-rank fp32: the rows of out are one contiguous block, written in place
                torch.bmm(xs, a.transpose(1, 2), out=out[i, batch.row0:batch.row0 + kn].view(k, n, R))
                continue
            res = torch.bmm(xs, a.transpose(1, 2)).view(kn, r)              # [k·n, r]
            if batch.row_index is None:
                out[i, batch.row0:batch.row0 + kn, :r] = res
            elif batch.real is None:
                out[i, batch.row_index, :r] = res.float()
            else:  # padded: only the real positions
                out[i, batch.real_rows, :r] = res.index_select(0, batch.real).float()
    for seg in plan.looped:
        start, n, rows, rs = seg.start, seg.n, seg.rows, seg.ranks
        xs = x[start:start + n] if rows is None else x.index_select(0, rows)
        if min(rs) == max(rs):  # all slices share the rank: one batched matmul
            r = rs[0]
            res = torch.matmul(xs, A[:, seg.slot, :r].transpose(1, 2)).float()  # [num_slices, n, r]
            if rows is None:
                out[:, start:start + n, :r] = res
            else:
                out[:, rows, :r] = res
            continue
        for i, r in enumerate(rs):
            if r:
                res = (xs @ A[i, seg.slot, :r].T).float()
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
    plans: PlanCache | None = None,
) -> torch.Tensor:
    check_expand(v, B_t, ranks, scalings, meta, y)
    num_slices, T, R = v.shape
    offsets, widths = resolve_slices(num_slices, y.shape[1], slice_offsets, slice_widths)
    if T == 0 or R == 0:
        return y
    plan = _plan(meta, ranks, scalings, plans)
    same_dtype = v.dtype == B_t.dtype
    for batch in plan.batches:
        k, n, kn = batch.k, batch.n, batch.k * batch.n
        for i, (off, w) in enumerate(zip(offsets, widths)):
            r = batch.ranks[i]
            if r == 0 or w == 0:
                continue
            if batch.slot_index is None:
                b = B_t[batch.slot0:batch.slot0 + k, :r, off:off + w]        # [k, r, w]
            else:
                b = B_t[:, :r, off:off + w].index_select(0, batch.slot_index)
            if batch.row_index is None:
                vs = v[i, batch.row0:batch.row0 + kn, :r]
            else:
                vs = v[i].index_select(0, batch.row_index)[:, :r]
            vs = (vs if same_dtype else vs.to(B_t.dtype)).view(k, n, r)
            s = batch.scales[i]
            if batch.row_index is None:
                # bmm then add: baddbmm_ into a row-strided view of y falls back to k addmm_ calls
                ys = y[batch.row0:batch.row0 + kn, off:off + w].view(k, n, w)
                if isinstance(s, float):
                    ys.add_(torch.bmm(vs, b), alpha=s)
                else:
                    ys.addcmul_(torch.bmm(vs, b), s.to(y.dtype))
            else:
                delta = torch.bmm(vs, b)
                alpha = s if isinstance(s, float) else 1.0
                if not isinstance(s, float):
                    delta = delta * s.to(y.dtype)
                delta = delta.view(kn, w)
                if batch.real is None:
                    y[:, off:off + w].index_add_(0, batch.row_index, delta, alpha=alpha)
                else:  # padded: only the real positions
                    y[:, off:off + w].index_add_(0, batch.real_rows, delta.index_select(0, batch.real), alpha=alpha)
    for seg in plan.looped:
        start, n, rows = seg.start, seg.n, seg.rows
        for i, (off, w) in enumerate(zip(offsets, widths)):
            r = seg.ranks[i]
            if r == 0 or w == 0:
                continue
            s = seg.scales[i]
            b = B_t[seg.slot, :r, off:off + w]
            if rows is None:
                vs = v[i, start:start + n, :r].to(b.dtype)
                y[start:start + n, off:off + w].addmm_(vs, b, alpha=s)
            else:
                vs = v[i].index_select(0, rows)[:, :r].to(b.dtype)
                y[:, off:off + w].index_add_(0, rows, vs @ b, alpha=s)
    return y
