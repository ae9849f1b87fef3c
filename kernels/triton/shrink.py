"""Segmented-gather LoRA shrink (Triton): each token times its own adapter's lora_A, several slices at once.

Semantics, for every token t with slot a = token_slots[t] != −1 and every slice i with r = ranks[i, a] > 0:

    v[i, t, :r] = x[t] @ A[i, a, :r]ᵀ          (fp32 accumulation, fp32 output)

Grid: (meta.num_tiles, num_slices, cdiv(max_rank, BLOCK_N) * SPLIT_K). A program takes one tile
(≤ BLOCK_M tokens of one slot, rows gathered through meta.token_order), one slice, one block of
rank columns and one K-split; it exits at once when the tile is empty (slot −1) or its rank columns
start at or beyond the slot's rank, so each adapter streams only its own r rows of A.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from ..checks import FLOAT_DTYPES, check_dim, check_pools, check_tensor
from ..devices import same_device
from ..meta import LoRAMeta
from .utils import check_launch_device, for_current_mode, next_pow2


# The step layout's tables sit at offsets that change when the runner regrows it: no specializing on
# their alignment (each is read per tile or gathered from a data-dependent start).
# stride_v_i is T·max_rank: its divisibility by 16 would follow the step's token count
@triton.jit(do_not_specialize=["stride_v_i"],
            do_not_specialize_on_alignment=["tile_slot_ptr", "tile_start_ptr", "tile_len_ptr", "token_order_ptr"])
def _shrink_kernel(
    # pointers
    x_ptr,            # [T, K]
    a_ptr,            # [num_slices, S, R, K]
    v_ptr,            # [num_slices, T, R] fp32
    ranks_ptr,        # [num_slices, S] int32
    tile_slot_ptr,    # [num_tiles] int32
    tile_start_ptr,   # [num_tiles] int32
    tile_len_ptr,     # [num_tiles] int32
    token_order_ptr,  # [T] int32
    # sizes
    K,
    num_slots,
    # strides (in elements; every last dimension has unit stride)
    stride_x_t,
    stride_a_i,
    stride_a_s,
    stride_a_r,
    stride_v_i,
    stride_v_t,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    tile = tl.program_id(0)
    slice_id = tl.program_id(1)
    pid_n = tl.program_id(2) // SPLIT_K
    pid_k = tl.program_id(2) % SPLIT_K

    slot = tl.load(tile_slot_ptr + tile)
    if slot < 0:  # past the last tile of this step
        return
    rank = tl.load(ranks_ptr + slice_id * num_slots + slot)
    n0 = pid_n * BLOCK_N
    if n0 >= rank:  # rank 0 (slice not targeted) or columns beyond this adapter's rank
        return

    start = tl.load(tile_start_ptr + tile)
    m_len = tl.load(tile_len_ptr + tile)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < m_len
    rows = tl.load(token_order_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < rank
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + rows[:, None] * stride_x_t + offs_k[None, :]
    a_ptrs = (a_ptr + slice_id.to(tl.int64) * stride_a_i + slot.to(tl.int64) * stride_a_s
              + offs_n[None, :] * stride_a_r + offs_k[:, None])  # [BLOCK_K, BLOCK_N] tile of Aᵀ
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k in range(0, (K + BLOCK_K * SPLIT_K - 1) // (BLOCK_K * SPLIT_K)):
        if EVEN_K:
            xk = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
            ak = tl.load(a_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_ok = offs_k < K - k * (BLOCK_K * SPLIT_K)
            xk = tl.load(x_ptrs, mask=m_mask[:, None] & k_ok[None, :], other=0.0)
            ak = tl.load(a_ptrs, mask=n_mask[None, :] & k_ok[:, None], other=0.0)
        if FP32_DOT:
            acc += tl.dot(xk, ak, input_precision="ieee")
        else:
            acc += tl.dot(xk, ak)
        x_ptrs += BLOCK_K * SPLIT_K
        a_ptrs += BLOCK_K * SPLIT_K

    v_ptrs = v_ptr + slice_id.to(tl.int64) * stride_v_i + rows[:, None] * stride_v_t + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(v_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(v_ptrs, acc, mask=mask)


def triton_shrink(
    x: torch.Tensor,         # [T, in_features], fp16/bf16/fp32, unit stride in the last dim
    A: torch.Tensor,         # [num_slices, S, max_rank, in_features], x's dtype, contiguous
    ranks: torch.Tensor,     # [num_slices, S] int32, 0 <= ranks <= max_rank
    meta: LoRAMeta,          # built for these T tokens
    out: torch.Tensor | None = None,  # [num_slices, T, max_rank] fp32, unit stride in the last dim
    config: dict | None = None,       # overrides the table entry (keys as in configs.TABLE)
) -> torch.Tensor:
    """Launch the shrink kernel; returns v (``out`` if given).

    Only ``v[i, t, :ranks[i, slot_t]]`` of tokens with a slot is written; the rest of v is left as
    it was (with split_k > 1 the launcher zeroes v first, as the programs accumulate atomically).
    """
    check_tensor("x", x, 2, FLOAT_DTYPES, last_dim_contiguous=True)
    check_launch_device("x", x)
    check_tensor("A", A, 4, contiguous=True)
    if A.dtype != x.dtype:
        raise TypeError(f"A has dtype {A.dtype} but x has {x.dtype}; they must match")
    num_slices, S, R, K = A.shape
    T = x.shape[0]
    check_dim("A", A, 3, x.shape[1], "x's in_features")
    if T != meta.num_tokens:
        raise ValueError(f"x has {T} tokens but meta was built for {meta.num_tokens}")
    if S < meta.max_slots:
        raise ValueError(f"A has {S} slots but meta addresses up to max_slots={meta.max_slots}")
    check_pools(ranks, None, num_slices, S)
    for name, t in (("A", A), ("ranks", ranks)):
        if not same_device(t.device, x.device):
            raise ValueError(f"{name} is on {t.device}, expected {x.device} (x's device)")
    if not same_device(meta.device, x.device):
        raise ValueError(f"meta buffers are on {meta.device}, expected {x.device} (x's device)")
    if out is None:
        out = torch.empty(num_slices, T, R, dtype=torch.float32, device=x.device)
    check_tensor("out", out, 3, (torch.float32,), last_dim_contiguous=True)
    if tuple(out.shape) != (num_slices, T, R):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected (num_slices, T, max_rank) = "
                         f"({num_slices}, {T}, {R})")
    if not same_device(out.device, x.device):
        raise ValueError(f"out is on {out.device}, expected {x.device} (x's device)")
    if T == 0 or R == 0:
        return out

    cfg = config or configs.kernel_config("shrink", meta.shape_class)
    block_n = max(16, min(cfg["block_n"], next_pow2(R)))
    block_k, split_k = cfg["block_k"], cfg["split_k"]
    if split_k > 1:
        out.zero_()
    grid = (meta.num_tiles, num_slices, triton.cdiv(R, block_n) * split_k)
    for_current_mode(_shrink_kernel)[grid](
        x, A, out, ranks,
        meta.tile_slot, meta.tile_start, meta.tile_len, meta.token_order,
        K, S,
        x.stride(0), A.stride(0), A.stride(1), A.stride(2), out.stride(0), out.stride(1),
        BLOCK_M=meta.block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        EVEN_K=K % (block_k * split_k) == 0, FP32_DOT=x.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
