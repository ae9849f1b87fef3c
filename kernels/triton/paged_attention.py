"""Paged attention (Triton): each sequence's queries over its keys/values, read straight from the paged
cache through its block table (no gathered copy); decode and chunked prefill in one kernel.

Semantics, for sequence s with query rows [qs[s], qs[s+1]) (n = qs[s+1] - qs[s] tokens), kv_len[s]
cache entries (this step's included) and block table bt[s]: KV index j lives in cache slot
``bt[s, j // block_size] * block_size + j % block_size``; query token i sits at KV index
c = kv_len[s] - n + i. With skip[s] = (lo, hi), KV indices [lo, hi) are invisible (prefix-tuning
padding) and an index j >= hi has position j - (hi - lo) (else j). For every query head h of KV head
h // group:

    out[qs[s] + i, h] = softmax_j(scale · q[qs[s] + i, h] · k[slot(j), h // group]) @ v[slot(j), h // group]
        over the visible j <= c whose position is > position(c) - window (no window: all)

(float32 accumulation, online softmax). Blocks shared by several sequences (a prefix-tuning prefix)
are just entries of their block tables.

Grid: (num_seqs, kv_heads, cdiv(max_query_len, tokens per tile) · splits). A program takes one tile
of one sequence's query tokens and all the query heads of one KV head (rows: token-major,
head-minor), so those heads share every K/V load; it exits at once past its sequence's tokens, so the
tables may be padded with empty sequences (qs[s] == qs[s+1]) to a fixed shape. At decode, when the
batch gives fewer programs than the GPU has SMs to fill, each sequence's keys are split over several
programs (`decode_splits`, chosen from shapes only: a power of two up to MAX_SPLITS) whose partial
results a second kernel merges. The launcher reads nothing from the device and allocates nothing whose
size depends on the data (the split partials are sized by the shapes): a launch can be captured in a
CUDA graph.

Every launch compiles (once per process) the variant its meta-parameters and specialization select. A
model fixes all of them but the shape class (decode or prefill), the split count, HAS_SKIP and
HAS_WINDOW, which `server/model/attention.py`'s `warm_up` enumerates and compiles at start-up; the
values that change from step to step but feed only scalar arithmetic or int32 table loads (the
window, the block-table stride, the step buffer's 8-byte-aligned tables) are not specialized on.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..checks import FLOAT_DTYPES, check_tensor
from ..devices import same_device
from .utils import check_launch_device, for_current_mode, next_pow2
from . import attention_configs

LOG2E = 1.4426950408889634
# Most programs one decoding sequence's keys are split over: each split writes a partial [rows, head_dim]
# float32 result that the merge kernel reads back.
MAX_SPLITS = 16
SPLIT_COUNTS = (1, 2, 4, 8, 16)
"""What `decode_splits` returns: each is a kernel variant, so there are few."""


@triton.jit(do_not_specialize=["window", "stride_bt"],
            do_not_specialize_on_alignment=["block_table_ptr", "query_start_ptr", "kv_len_ptr", "skip_ptr"])
def _paged_attention_kernel(
    # pointers
    q_ptr,            # [T, H, D]
    k_ptr,            # [num_slots, KVH, D]
    v_ptr,            # [num_slots, KVH, D]
    o_ptr,            # [T, H, D]
    block_table_ptr,  # [num_seqs, max_blocks] int32
    query_start_ptr,  # [num_seqs + 1] int32
    kv_len_ptr,       # [num_seqs] int32
    skip_ptr,         # [num_seqs, 2] int32 (read when HAS_SKIP)
    part_acc_ptr,     # [num_seqs, KVH, NUM_SPLITS, BLOCK_M, HEAD_PAD] fp32 (written when NUM_SPLITS > 1)
    part_ml_ptr,      # [num_seqs, KVH, NUM_SPLITS, 2, BLOCK_M] fp32: running max and sum of each split
    # sizes
    qk_scale,         # scale · log2(e): the softmax runs in base 2
    window,           # positions each query sees (read when HAS_WINDOW)
    # strides (in elements; every last dimension has unit stride)
    stride_q_t,
    stride_q_h,
    stride_k_s,
    stride_k_h,
    stride_v_s,
    stride_v_h,
    stride_o_t,
    stride_o_h,
    stride_bt,
    # meta-parameters
    GROUP: tl.constexpr,       # query heads per KV head
    GROUP_PAD: tl.constexpr,   # next power of two
    BLOCK_Q: tl.constexpr,     # query tokens per tile
    BLOCK_M: tl.constexpr,     # rows per tile, >= BLOCK_Q * GROUP_PAD
    BLOCK_N: tl.constexpr,     # keys per iteration
    BLOCK_SIZE: tl.constexpr,  # cache block size: a power of two divides by a shift
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,    # next power of two
    HAS_SKIP: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    FP32_DOT: tl.constexpr,
    NUM_SPLITS: tl.constexpr,  # > 1 (decode only): programs share one sequence's keys, then `_combine_kernel`
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_block = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS

    q_first = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_first
    if q_block * BLOCK_Q >= q_len:  # past this sequence's tokens (or a padding sequence)
        return
    kv_len = tl.load(kv_len_ptr + seq)
    skip_lo = kv_len * 0
    shift = kv_len * 0
    if HAS_SKIP:
        skip_lo = tl.load(skip_ptr + seq * 2)
        shift = tl.load(skip_ptr + seq * 2 + 1) - skip_lo

    # rows of the tile: token r // GROUP_PAD of the tile, query head kv_head * GROUP + r % GROUP_PAD
    offs_m = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + offs_m // GROUP_PAD
    g = offs_m % GROUP_PAD
    row_ok = (offs_m // GROUP_PAD < BLOCK_Q) & (tok < q_len) & (g < GROUP)
    head = kv_head * GROUP + g
    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = offs_d < HEAD_DIM
    q_rows = (q_first + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    q_idx = kv_len - q_len + tok                                  # KV index of each row's token
    last_tok = tl.minimum(q_len, (q_block + 1) * BLOCK_Q) - 1
    kv_end = kv_len - q_len + last_tok + 1                          # the tile's last token sees [0, kv_end)
    kv_begin = kv_end * 0
    if HAS_WINDOW:  # the first token sees positions > its position - window: skip whole blocks before
        q_pos = tl.where(q_idx >= skip_lo + shift, q_idx - shift, q_idx)
        first_pos = kv_len - q_len + q_block * BLOCK_Q - shift - window + 1
        first_idx = tl.where(first_pos >= skip_lo, first_pos + shift, first_pos)
        kv_begin = tl.maximum(first_idx, 0) // BLOCK_N * BLOCK_N
    if NUM_SPLITS > 1:  # this program's share of the key tiles
        per_split = ((kv_end - kv_begin + BLOCK_N - 1) // BLOCK_N + NUM_SPLITS - 1) // NUM_SPLITS * BLOCK_N
        kv_begin = kv_begin + split * per_split
        kv_end = tl.minimum(kv_end, kv_begin + per_split)
    k_base = k_ptr + kv_head.to(tl.int64) * stride_k_h
    v_base = v_ptr + kv_head.to(tl.int64) * stride_v_h
    table = block_table_ptr + seq.to(tl.int64) * stride_bt

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, HEAD_PAD), 0.0, tl.float32)
    for start in range(kv_begin, kv_end, BLOCK_N):
        idx = start + tl.arange(0, BLOCK_N)
        idx_ok = idx < kv_end
        block = tl.load(table + idx // BLOCK_SIZE, mask=idx_ok, other=0)
        slots = block.to(tl.int64) * BLOCK_SIZE + idx % BLOCK_SIZE
        kv_mask = idx_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + slots[:, None] * stride_k_s + offs_d[None, :], mask=kv_mask, other=0.0)
        if FP32_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale

        visible = idx_ok[None, :] & (idx[None, :] <= q_idx[:, None])
        if HAS_SKIP:
            visible &= ((idx < skip_lo) | (idx >= skip_lo + shift))[None, :]
        if HAS_WINDOW:
            k_pos = tl.where(idx >= skip_lo + shift, idx - shift, idx)
            visible &= k_pos[None, :] > q_pos[:, None] - window
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet stays at 0
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        v = tl.load(v_base + slots[:, None] * stride_v_s + offs_d[None, :], mask=kv_mask, other=0.0)
        if FP32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(o_ptr + q_rows[:, None] * stride_o_t + head[:, None] * stride_o_h + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        part = (seq.to(tl.int64) * tl.num_programs(1) + kv_head) * NUM_SPLITS + split
        tl.store(part_acc_ptr + part * (BLOCK_M * HEAD_PAD) + offs_m[:, None] * HEAD_PAD + offs_d[None, :], acc)
        tl.store(part_ml_ptr + part * (2 * BLOCK_M) + offs_m, m_i)
        tl.store(part_ml_ptr + part * (2 * BLOCK_M) + BLOCK_M + offs_m, l_i)


@triton.jit(do_not_specialize_on_alignment=["query_start_ptr"])
def _combine_kernel(
    o_ptr,            # [T, H, D]
    query_start_ptr,  # [num_seqs + 1] int32
    part_acc_ptr,     # [num_seqs, KVH, NUM_SPLITS, BLOCK_M, HEAD_PAD] fp32
    part_ml_ptr,      # [num_seqs, KVH, NUM_SPLITS, 2, BLOCK_M] fp32
    stride_o_t,
    stride_o_h,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """out[row of seq, heads of kv_head] = the splits' partial softmax-weighted sums, merged (decode)."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_first = tl.load(query_start_ptr + seq)
    if tl.load(query_start_ptr + seq + 1) == q_first:  # a padding sequence
        return
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, HEAD_PAD), 0.0, tl.float32)
    first = (seq.to(tl.int64) * tl.num_programs(1) + kv_head) * NUM_SPLITS
    for split in range(NUM_SPLITS):
        part = first + split
        m_s = tl.load(part_ml_ptr + part * (2 * BLOCK_M) + offs_m)
        l_s = tl.load(part_ml_ptr + part * (2 * BLOCK_M) + BLOCK_M + offs_m)
        acc_s = tl.load(part_acc_ptr + part * (BLOCK_M * HEAD_PAD) + offs_m[:, None] * HEAD_PAD + offs_d[None, :])
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no split has seen a key yet
        alpha = tl.math.exp2(m_i - m_safe)
        beta = tl.math.exp2(m_s - m_safe)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m_i = m_new
    g = offs_m % GROUP_PAD
    row_ok = (offs_m < GROUP_PAD) & (g < GROUP)
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(o_ptr + q_first.to(tl.int64) * stride_o_t + (kv_head * GROUP + g)[:, None] * stride_o_h
             + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


@functools.cache
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 0 elsewhere."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device.index or 0).multi_processor_count


def decode_splits(programs: int, device: torch.device) -> int:
    """Key ranges per (sequence, KV head) at decode for `programs` = sequences x KV heads: about two
    waves of the GPU's SMs, ceil(2 · SMs / programs), rounded down to a power of two in SPLIT_COUNTS;
    1 off CUDA (interpreted)."""
    sms = _num_sms(device)
    if not sms:
        return 1
    want = max(1, min(MAX_SPLITS, -(-2 * sms // programs)))
    return 1 << (want.bit_length() - 1)


def tile_shape(group: int, max_query_len: int, cfg: dict) -> dict:
    """The kernel's tile meta-parameters for `group` query heads per KV head and a table entry."""
    group_pad = next_pow2(group)
    block_q = 1 if max_query_len == 1 else max(1, cfg["block_m"] // group_pad)
    return dict(GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_M=max(16, block_q * group_pad),
                BLOCK_N=cfg["block_n"])


def paged_attention(
    q: torch.Tensor,            # [T, H, D], unit stride along D (a transposed view is fine)
    k_cache: torch.Tensor,      # [num_slots, KVH, D], q's dtype, unit stride along D
    v_cache: torch.Tensor,      # [num_slots, KVH, D], q's dtype, unit stride along D
    out: torch.Tensor,          # [T, H, D], q's dtype, unit stride along D; rows of padding sequences untouched
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32, contiguous
    query_start: torch.Tensor,  # [num_seqs + 1] int32: sequence s has rows [query_start[s], query_start[s + 1])
    kv_lens: torch.Tensor,      # [num_seqs] int32: cache entries of each sequence, this step's included
    max_query_len: int,         # an upper bound of the sequences' token counts (host-known)
    block_size: int,
    scale: float,
    window: int | None = None,  # each query sees the last `window` positions only (None: all)
    skip: torch.Tensor | None = None,  # [num_seqs, 2] int32: KV indices [lo, hi) hidden (lo == hi: none)
    config: dict | None = None,  # overrides the table entry (keys as in attention_configs.TABLE)
) -> torch.Tensor:
    """Launch the paged attention kernel; returns ``out``."""
    check_tensor("q", q, 3, FLOAT_DTYPES, last_dim_contiguous=True)
    check_launch_device("q", q)
    num_heads, head_dim = q.shape[1], q.shape[2]
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        check_tensor(name, t, 3, (q.dtype,), last_dim_contiguous=True)
        if t.shape[2] != head_dim:
            raise ValueError(f"{name} has head_dim {t.shape[2]}, q has {head_dim}")
    if tuple(out.shape[:2]) != tuple(q.shape[:2]):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(q.shape)} (q's)")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    kv_heads = k_cache.shape[1]
    if num_heads % kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {kv_heads} KV heads")
    check_tensor("block_tables", block_tables, 2, (torch.int32,), contiguous=True)
    num_seqs = block_tables.shape[0]
    check_tensor("query_start", query_start, 1, (torch.int32,), contiguous=True)
    check_tensor("kv_lens", kv_lens, 1, (torch.int32,), contiguous=True)
    if query_start.shape[0] != num_seqs + 1 or kv_lens.shape[0] != num_seqs:
        raise ValueError(f"query_start has {query_start.shape[0]} entries and kv_lens {kv_lens.shape[0]}; "
                         f"expected {num_seqs + 1} and {num_seqs} (block_tables has {num_seqs} rows)")
    if skip is not None:
        check_tensor("skip", skip, 2, (torch.int32,), contiguous=True)
        if tuple(skip.shape) != (num_seqs, 2):
            raise ValueError(f"skip has shape {tuple(skip.shape)}, expected ({num_seqs}, 2)")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("out", out), ("block_tables", block_tables),
                    ("query_start", query_start), ("kv_lens", kv_lens), ("skip", skip)):
        if t is not None and not same_device(t.device, q.device):
            raise ValueError(f"{name} is on {t.device}, expected {q.device} (q's device)")
    if window is not None and window < 1:
        raise ValueError(f"window must be at least 1 (None: no window), got {window}")
    if num_seqs == 0 or max_query_len < 1:
        return out

    cfg = config or attention_configs.kernel_config(attention_configs.shape_class(max_query_len))
    tile = tile_shape(num_heads // kv_heads, max_query_len, cfg)
    head_pad = max(16, next_pow2(head_dim))
    splits = 1 if max_query_len > 1 else cfg.get("num_splits") or decode_splits(num_seqs * kv_heads, q.device)
    part_acc = part_ml = out  # not read with one split
    if splits > 1:
        part_acc = torch.empty(num_seqs, kv_heads, splits, tile["BLOCK_M"], head_pad, dtype=torch.float32,
                               device=q.device)
        part_ml = torch.empty(num_seqs, kv_heads, splits, 2, tile["BLOCK_M"], dtype=torch.float32, device=q.device)
    grid = (num_seqs, kv_heads, triton.cdiv(max_query_len, tile["BLOCK_Q"]) * splits)
    for_current_mode(_paged_attention_kernel)[grid](
        q, k_cache, v_cache, out, block_tables, query_start, kv_lens, kv_lens if skip is None else skip,
        part_acc, part_ml,
        scale * LOG2E, window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0),
        **tile, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, HEAD_PAD=head_pad, HAS_SKIP=skip is not None,
        HAS_WINDOW=window is not None,
        FP32_DOT=q.dtype == torch.float32, NUM_SPLITS=splits, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    if splits > 1:
        for_current_mode(_combine_kernel)[(num_seqs, kv_heads)](
            out, query_start, part_acc, part_ml, out.stride(0), out.stride(1),
            GROUP=tile["GROUP"], GROUP_PAD=tile["GROUP_PAD"], BLOCK_M=tile["BLOCK_M"], HEAD_DIM=head_dim,
            HEAD_PAD=head_pad, NUM_SPLITS=splits, num_warps=4,
        )
    return out
