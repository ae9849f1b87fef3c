"""Segmented-gather LoRA expand (Triton): add each token's scaled lora_B product into y, in place.

Semantics, for every token t with slot a = token_slots[t] != −1 and every slice i with r = ranks[i, a] > 0:

    y[t, off_i : off_i + w_i] += scalings[i, a] · v[i, t, :r] @ B_t[a, :r, off_i : off_i + w_i]

B_t is lora_B transposed (rank-major), slices side by side in its columns, so rank row k of an
adapter is one contiguous run of out_total values. Grid: (meta.num_tiles, num_slices,
cdiv(max slice width, BLOCK_N)). A program takes one tile of tokens, one slice and BLOCK_N of that
slice's columns, loops over the slot's own rank in BLOCK_R steps (no reads of rank padding), and
exits at once for empty tiles, rank-0 slices and columns beyond the slice's width. Each y element
is written by exactly one program: no atomics, deterministic.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from . import configs
from ..checks import FLOAT_DTYPES, check_dim, check_pools, check_tensor, resolve_slices
from ..devices import same_device
from ..meta import LoRAMeta
from .utils import check_launch_device, for_current_mode, next_pow2

MAX_SLICES = 4


# The step layout's tables sit at offsets that change when the runner regrows it: no specializing on
# their alignment (each is read per tile or gathered from a data-dependent start).
# stride_v_i is T·max_rank: its divisibility by 16 would follow the step's token count
@triton.jit(do_not_specialize=["stride_v_i"],
            do_not_specialize_on_alignment=["tile_slot_ptr", "tile_start_ptr", "tile_len_ptr", "token_order_ptr"])
def _expand_kernel(
    # pointers
    v_ptr,            # [num_slices, T, R] fp32 or B_t's dtype
    b_ptr,            # [S, R, out_total]
    y_ptr,            # [T, out_total]
    ranks_ptr,        # [num_slices, S] int32
    scalings_ptr,     # [num_slices, S] fp32
    tile_slot_ptr,    # [num_tiles] int32
    tile_start_ptr,   # [num_tiles] int32
    tile_len_ptr,     # [num_tiles] int32
    token_order_ptr,  # [T] int32
    # sizes: column offset and width of each slice in y / B_t (unused ones are 0)
    off0, off1, off2, off3,
    w0, w1, w2, w3,
    num_slots,
    # strides (in elements; every last dimension has unit stride)
    stride_v_i,
    stride_v_t,
    stride_b_s,
    stride_b_r,
    stride_y_t,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    tile = tl.program_id(0)
    slice_id = tl.program_id(1)
    pid_n = tl.program_id(2)

    slot = tl.load(tile_slot_ptr + tile)
    if slot < 0:  # past the last tile of this step
        return
    rank = tl.load(ranks_ptr + slice_id * num_slots + slot)
    if rank == 0:  # this adapter does not target this slice
        return
    width = tl.where(slice_id == 0, w0, tl.where(slice_id == 1, w1, tl.where(slice_id == 2, w2, w3)))
    n0 = pid_n * BLOCK_N
    if n0 >= width:  # narrower slice (k/v under GQA) than the grid's widest
        return
    off = tl.where(slice_id == 0, off0, tl.where(slice_id == 1, off1, tl.where(slice_id == 2, off2, off3)))
    scale = tl.load(scalings_ptr + slice_id * num_slots + slot)

    start = tl.load(tile_start_ptr + tile)
    m_len = tl.load(tile_len_ptr + tile)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < m_len
    rows = tl.load(token_order_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < width
    cols = off + offs_n

    v_ptrs = v_ptr + slice_id.to(tl.int64) * stride_v_i + rows[:, None] * stride_v_t
    b_ptrs = b_ptr + slot.to(tl.int64) * stride_b_s + cols[None, :]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        vt = tl.load(v_ptrs + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        bt = tl.load(b_ptrs + offs_r[:, None] * stride_b_r, mask=r_mask[:, None] & n_mask[None, :],
                     other=0.0)
        if FP32_DOT:
            acc += tl.dot(vt.to(tl.float32), bt, input_precision="ieee")
        else:
            acc += tl.dot(vt.to(bt.dtype), bt)  # tensor cores; v rounds to B's dtype as in PEFT

    y_ptrs = y_ptr + rows[:, None] * stride_y_t + cols[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    y_old = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y_old.to(tl.float32) + acc * scale).to(y_ptr.dtype.element_ty), mask=mask)


def triton_expand(
    v: torch.Tensor,         # [num_slices, T, max_rank], fp32 or B_t's dtype, unit stride in the last dim
    B_t: torch.Tensor,       # [S, max_rank, out_total], y's dtype, contiguous
    ranks: torch.Tensor,     # [num_slices, S] int32
    scalings: torch.Tensor,  # [num_slices, S] fp32
    meta: LoRAMeta,          # built for these T tokens
    y: torch.Tensor,         # [T, out_total], fp16/bf16/fp32, unit stride in the last dim; updated in place
    slice_offsets: Sequence[int] | None = None,  # column where slice i starts in y and B_t
    slice_widths: Sequence[int] | None = None,   # None: out_total split equally
    config: dict | None = None,
) -> torch.Tensor:
    """Launch the expand kernel; returns y (updated in place)."""
    check_tensor("y", y, 2, FLOAT_DTYPES, last_dim_contiguous=True)
    check_launch_device("y", y)
    check_tensor("B_t", B_t, 3, contiguous=True)
    if B_t.dtype != y.dtype:
        raise TypeError(f"B_t has dtype {B_t.dtype} but y has {y.dtype}; they must match")
    check_tensor("v", v, 3, (torch.float32, B_t.dtype), last_dim_contiguous=True)
    num_slices, T, R = v.shape
    S, _, out_total = B_t.shape
    check_dim("y", y, 0, T, "v's token count")
    check_dim("B_t", B_t, 1, R, "v's max_rank")
    check_dim("B_t", B_t, 2, y.shape[1], "y's out_total")
    if T != meta.num_tokens:
        raise ValueError(f"y has {T} tokens but meta was built for {meta.num_tokens}")
    if S < meta.max_slots:
        raise ValueError(f"B_t has {S} slots but meta addresses up to max_slots={meta.max_slots}")
    if num_slices > MAX_SLICES:
        raise ValueError(f"v has {num_slices} slices; the expand kernel takes at most {MAX_SLICES}")
    check_pools(ranks, scalings, num_slices, S)
    for name, t in (("v", v), ("B_t", B_t), ("ranks", ranks), ("scalings", scalings)):
        if not same_device(t.device, y.device):
            raise ValueError(f"{name} is on {t.device}, expected {y.device} (y's device)")
    if not same_device(meta.device, y.device):
        raise ValueError(f"meta buffers are on {meta.device}, expected {y.device} (y's device)")
    offsets, widths = resolve_slices(num_slices, out_total, slice_offsets, slice_widths)
    if T == 0 or R == 0 or max(widths) == 0:
        return y

    cfg = config or configs.kernel_config("expand", meta.shape_class)
    block_r = max(16, min(cfg["block_r"], next_pow2(R)))
    block_n = cfg["block_n"]
    pad = (0,) * (MAX_SLICES - num_slices)
    grid = (meta.num_tiles, num_slices, triton.cdiv(max(widths), block_n))
    for_current_mode(_expand_kernel)[grid](
        v, B_t, y, ranks, scalings,
        meta.tile_slot, meta.tile_start, meta.tile_len, meta.token_order,
        *(offsets + pad), *(widths + pad),
        S,
        v.stride(0), v.stride(1), B_t.stride(0), B_t.stride(1), y.stride(0),
        BLOCK_M=meta.block_m, BLOCK_N=block_n, BLOCK_R=block_r, FP32_DOT=y.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y
