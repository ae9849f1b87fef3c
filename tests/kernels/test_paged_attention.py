"""The Triton paged attention kernel (interpreted on CPU) against the float32 SDPA reference over each
sequence's gathered context (`kernels/testing.py`)."""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels.testing import paged_attention_reference
from loraplex.kernels.triton.paged_attention import paged_attention

TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3}
BLOCK = 4


def make_case(query_lens, kv_lens, heads, kv_heads, dim, dtype, seed, shared_prefix_blocks=0, skips=None):
    """Random caches and queries; block tables drawn in random order from a pool, the first
    `shared_prefix_blocks` blocks of every table the same ones (a prefix-tuning prefix)."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-kv // BLOCK) for kv in kv_lens]
    num_blocks = sum(blocks_needed) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    shared, order = order[:shared_prefix_blocks], order[shared_prefix_blocks:]
    tables = []
    for need in blocks_needed:
        own = need - shared_prefix_blocks
        tables.append(shared + order[:own])
        order = order[own:]
    k_cache = torch.randn(num_blocks * BLOCK, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks * BLOCK, kv_heads, dim, generator=gen).to(dtype)
    q = torch.randn(sum(query_lens), heads, dim, generator=gen).to(dtype)
    skips = skips or [(0, 0)] * len(kv_lens)
    return q, k_cache, v_cache, tables, skips


def run_kernel(q, k_cache, v_cache, tables, query_lens, kv_lens, scale, window, skips, pad_seqs=0, config=None):
    max_blocks = max(len(t) for t in tables) + 2  # padded as a graph-captured step would be
    bt = torch.zeros(len(tables) + pad_seqs, max_blocks, dtype=torch.int32)
    for i, table in enumerate(tables):
        bt[i, : len(table)] = torch.tensor(table)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    starts += [starts[-1]] * pad_seqs
    query_start = torch.tensor(starts, dtype=torch.int32)
    lens = torch.tensor(list(kv_lens) + [0] * pad_seqs, dtype=torch.int32)
    skip = None
    if any(lo != hi for lo, hi in skips):
        skip = torch.tensor(list(skips) + [(0, 0)] * pad_seqs, dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    return paged_attention(q, k_cache, v_cache, out, bt, query_start, lens, max(query_lens), BLOCK, scale,
                           window, skip, config)


CASES = {
    # name: (query_lens, kv_lens, heads, kv_heads, dim, window)
    "decode-ragged-gqa": ([1, 1, 1, 1], [1, 7, 16, 23], 8, 2, 16, None),
    "decode-window-short": ([1, 1, 1], [5, 13, 22], 4, 4, 16, 6),
    "decode-window-longer-than-context": ([1, 1], [9, 14], 4, 1, 16, 40),
    "prefill-chunks-with-context": ([5, 3, 1, 7], [5, 11, 9, 30], 4, 2, 24, None),
    "prefill-chunks-window": ([6, 1, 9], [6, 17, 21], 6, 2, 16, 5),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_sdpa(name, dtype):
    query_lens, kv_lens, heads, kv_heads, dim, window = CASES[name]
    q, k_cache, v_cache, tables, skips = make_case(query_lens, kv_lens, heads, kv_heads, dim, dtype, seed=len(name))
    scale = dim ** -0.5
    got = run_kernel(q, k_cache, v_cache, tables, query_lens, kv_lens, scale, window, skips, pad_seqs=1)
    want = paged_attention_reference(q, k_cache, v_cache, tables, query_lens, kv_lens, BLOCK, scale, window, skips)
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("window", [None, 7])
def test_prefix_blocks_shared_by_two_sequences(window):
    """Two sequences whose first 2 blocks are the same prefix (6 entries, padded to 8 and hidden)."""
    query_lens, kv_lens, skips = [1, 4], [13, 17], [(6, 8), (6, 8)]
    q, k_cache, v_cache, tables, skips = make_case(query_lens, kv_lens, 4, 2, 16, torch.float32, seed=3,
                                                   shared_prefix_blocks=2, skips=skips)
    assert tables[0][:2] == tables[1][:2]
    got = run_kernel(q, k_cache, v_cache, tables, query_lens, kv_lens, 0.25, window, skips)
    want = paged_attention_reference(q, k_cache, v_cache, tables, query_lens, kv_lens, BLOCK, 0.25, window, skips)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_several_tiles_per_chunk_and_key_blocks_smaller_than_a_cache_block():
    """A 20-token chunk over 3 query tiles, keys read 16 at a time, MHA (one head per KV head)."""
    query_lens, kv_lens = [20, 1], [27, 5]
    q, k_cache, v_cache, tables, skips = make_case(query_lens, kv_lens, 2, 2, 16, torch.float32, seed=9)
    config = {"block_m": 8, "block_n": 16, "num_warps": 4, "num_stages": 1}
    got = run_kernel(q, k_cache, v_cache, tables, query_lens, kv_lens, 0.3, None, skips, config=config)
    want = paged_attention_reference(q, k_cache, v_cache, tables, query_lens, kv_lens, BLOCK, 0.3, None, skips)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_padding_sequences_leave_their_rows_and_bad_inputs_raise():
    q, k_cache, v_cache, tables, skips = make_case([1], [3], 2, 1, 16, torch.float32, seed=1)
    out = run_kernel(q, k_cache, v_cache, tables, [1], [3], 1.0, None, skips, pad_seqs=3)
    assert not out.isnan().any()
    bt = torch.zeros(1, 2, dtype=torch.int32)
    starts, lens = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([3], dtype=torch.int32)
    with pytest.raises(TypeError, match="block_tables has dtype int64"):
        paged_attention(q, k_cache, v_cache, out, bt.long(), starts, lens, 1, BLOCK, 1.0)
    with pytest.raises(ValueError, match="not a multiple"):
        paged_attention(q[:, :1].expand(1, 3, 16), k_cache[:, :1].expand(-1, 2, 16), v_cache[:, :1].expand(-1, 2, 16),
                        out[:, :1].expand(1, 3, 16), bt, starts, lens, 1, BLOCK, 1.0)
    with pytest.raises(TypeError, match="k_cache has dtype float16"):
        paged_attention(q, k_cache.half(), v_cache, out, bt, starts, lens, 1, BLOCK, 1.0)
    with pytest.raises(ValueError, match="window must be at least 1"):
        paged_attention(q, k_cache, v_cache, out, bt, starts, lens, 1, BLOCK, 1.0, window=0)


@pytest.mark.parametrize("splits", [2, 4, 5, 8, 16])
def test_decode_keys_split_over_programs_and_merged(splits):
    """Split-KV decode (what a small batch gets on a GPU: a power of two; 5 only as a config override):
    some splits get no keys at all (length 1, and 5 or more splits of a 3-tile context), a window, GQA,
    a padding sequence."""
    query_lens, kv_lens = [1, 1, 1, 1], [1, 9, 40, 33]
    q, k_cache, v_cache, tables, skips = make_case(query_lens, kv_lens, 6, 2, 16, torch.float32, seed=splits)
    config = {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1, "num_splits": splits}
    for window in (None, 20):
        got = run_kernel(q, k_cache, v_cache, tables, query_lens, kv_lens, 0.25, window, skips, pad_seqs=1,
                         config=config)
        want = paged_attention_reference(q, k_cache, v_cache, tables, query_lens, kv_lens, BLOCK, 0.25, window)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
