"""For tests and benchmarks only: the plain torch references every backend is checked against, and a
backend whose LoRA op is device work only. No production module imports this one.

``shrink_reference``, ``expand_reference`` (a loop over slots) and ``paged_attention_reference`` (a
loop over sequences) compute in fp32: the test oracles. ``GatherBackend`` runs the torch backend with
``lora_gather_reference``, which a CUDA graph (or tests/model/test_graph_capture.py's op recording)
may capture.

They read the per-token slot vector directly (not ``LoRAMeta``), so tests of the kernels also test
the metadata. Shapes and semantics are those of ``ops.lora_shrink`` / ``ops.lora_expand``:

    shrink:  v[i, t, :r] = x[t] @ A[i, slot_t, :r]ᵀ                     r = ranks[i, slot_t]
    expand:  y[t, off_i : off_i + w_i] += s[i, slot_t] · v[i, t, :r] @ B_t[slot_t, :r, off_i : off_i + w_i]

Tokens with slot −1 and (slice, slot) pairs with rank 0 are skipped. ``shrink_reference`` zeroes the
rest of v (the fast paths leave it as it was, or zero it).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .backend import Backend, LoRAPoolTensors
from .checks import resolve_slices


def shrink_reference(
    x: torch.Tensor,            # [T, in_features]
    A: torch.Tensor,            # [num_slices, S, max_rank, in_features]
    ranks: torch.Tensor,        # [num_slices, S] int
    token_slots: torch.Tensor,  # [T] int, −1 = no adapter
    out: torch.Tensor | None = None,  # [num_slices, T, max_rank], any float dtype
) -> torch.Tensor:
    num_slices, _, max_rank, _ = A.shape
    T = x.shape[0]
    v = torch.zeros(num_slices, T, max_rank, dtype=torch.float32, device=x.device)
    slots = token_slots.long().cpu()
    ranks = ranks.cpu()
    for slot in sorted(set(slots.tolist()) - {-1}):
        idx = (slots == slot).nonzero().flatten().to(x.device)
        xs = x[idx].float()
        for i in range(num_slices):
            r = int(ranks[i, slot])
            if r:
                v[i, idx, :r] = xs @ A[i, slot, :r].float().T
    if out is None:
        return v
    out.copy_(v)
    return out


def expand_reference(
    v: torch.Tensor,            # [num_slices, T, max_rank]
    B_t: torch.Tensor,          # [S, max_rank, out_total]
    ranks: torch.Tensor,        # [num_slices, S] int
    scalings: torch.Tensor,     # [num_slices, S] float
    token_slots: torch.Tensor,  # [T] int, −1 = no adapter
    y: torch.Tensor,            # [T, out_total], updated in place
    slice_offsets: Sequence[int],
    slice_widths: Sequence[int],
) -> torch.Tensor:
    slots = token_slots.long().cpu()
    ranks, scalings = ranks.cpu(), scalings.cpu()
    for slot in sorted(set(slots.tolist()) - {-1}):
        idx = (slots == slot).nonzero().flatten().to(y.device)
        for i, (off, w) in enumerate(zip(slice_offsets, slice_widths)):
            r = int(ranks[i, slot])
            if r == 0:
                continue
            delta = v[i, idx, :r].float() @ B_t[slot, :r, off:off + w].float()
            cols = y[idx, off:off + w].float() + float(scalings[i, slot]) * delta
            y[idx, off:off + w] = cols.to(y.dtype)
    return y


def lora_gather_reference(
    x: torch.Tensor,            # [T, in_features]
    A: torch.Tensor,            # [num_slices, S, max_rank, in_features]
    B_t: torch.Tensor,          # [S, max_rank, out_total]
    ranks: torch.Tensor,        # [num_slices, S] int
    scalings: torch.Tensor,     # [num_slices, S] float
    token_slots: torch.Tensor,  # [T] int, −1 = no adapter
    y: torch.Tensor,            # [T, out_total], updated in place
    slice_offsets: Sequence[int],
    slice_widths: Sequence[int],
) -> torch.Tensor:
    """shrink then expand with every token gathering its own slot's weights: device work only, no host
    read and no data-dependent shape, so a CUDA graph (or tests/model/test_graph_capture.py's op
    recording) may capture it. Rank padding and slot −1 are masked, not skipped."""
    slots = token_slots.long()
    used = slots >= 0
    index = slots.clamp(min=0)
    rank_index = torch.arange(A.shape[2], device=x.device)
    xf = x.float()
    for i, (off, w) in enumerate(zip(slice_offsets, slice_widths)):
        live = (rank_index[None, :] < ranks[i].index_select(0, index)[:, None]) & used[:, None]  # [T, r]
        a = torch.where(live[:, :, None], A[i].index_select(0, index).float(), 0.0)  # [T, r, in]
        b = torch.where(live[:, :, None], B_t.index_select(0, index)[:, :, off : off + w].float(), 0.0)
        v = torch.bmm(a, xf[:, :, None])  # [T, r, 1]
        delta = torch.bmm(v.transpose(1, 2), b)[:, 0] * scalings[i].index_select(0, index)[:, None]
        y[:, off : off + w] = (y[:, off : off + w].float() + delta).to(y.dtype)
    return y


def paged_attention_reference(
    q: torch.Tensor,                # [T, H, D]
    k_cache: torch.Tensor,          # [slots, KVH, D]
    v_cache: torch.Tensor,          # [slots, KVH, D]
    tables: Sequence[Sequence[int]],  # each sequence's block table
    query_lens: Sequence[int],      # each sequence's rows, in row order
    kv_lens: Sequence[int],         # each sequence's cache entries, this step's included
    block_size: int,
    scale: float,
    window: int | None = None,
    skips: Sequence[tuple[int, int] | None] | None = None,  # hidden KV index ranges (prefix padding)
) -> torch.Tensor:
    """fp32 [T, H, D]: SDPA per sequence over its gathered context, causal (and windowed) by position;
    the semantics of ``kernels/triton/paged_attention.py``."""
    import torch.nn.functional as F

    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    row = 0
    for i, (table, n, kv_len) in enumerate(zip(tables, query_lens, kv_lens)):
        idx = torch.arange(kv_len, device=q.device)
        slots = torch.tensor(list(table), device=q.device)[idx // block_size] * block_size + idx % block_size
        skip = skips[i] if skips is not None else None
        if skip is not None:
            slots = slots[(idx < skip[0]) | (idx >= skip[1])]
        k = k_cache[slots].float().transpose(0, 1)[None]  # [1, KVH, ctx, D]
        v = v_cache[slots].float().transpose(0, 1)[None]
        ctx = k.shape[2]
        q_pos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        qs = q[row : row + n].float().transpose(0, 1)[None]  # [1, H, n, D]
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[row : row + n] = o[0].transpose(0, 1)
        row += n
    return out


class GatherBackend(Backend):
    """The torch backend whose LoRA op is ``lora_gather_reference``: every op of a step an aten op, with no
    host read, so graph-capture tests can record a step on CPU."""

    name = "gather"

    def lora_apply(self, x: torch.Tensor, y: torch.Tensor, pool: LoRAPoolTensors, prepared: object | None,
                   step: object, v: torch.Tensor | None = None) -> torch.Tensor:
        offsets, widths = resolve_slices(pool.a.shape[0], y.shape[1], pool.slice_offsets, pool.slice_widths)
        return lora_gather_reference(x, pool.a, pool.b_t, pool.ranks, pool.scale, step.slots, y, offsets, widths)
