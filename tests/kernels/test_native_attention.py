"""The C kernel's decode attention (`native.decode_attention`) against the gathered-context SDPA path
of server/model/attention.py: GQA and plain heads, uneven lengths, padded block tables, sliding windows,
strided queries, threads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraplex.kernels.cpu import native
from loraplex.server.model.attention import DecodeBatch

pytestmark = pytest.mark.skipif(not native.available(), reason=f"C kernel unavailable: {native.unavailable_reason()}")


def _problem(lengths, heads, kv_heads, dim=16, block_size=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    per_seq = -(-max(lengths) // block_size)
    num_blocks = sum(-(-n // block_size) for n in lengths) + 2
    order = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0 pads the tables
    blocks, used = [], 0
    for n in lengths:
        own = -(-n // block_size)
        blocks += order[used : used + own].tolist() + [0] * (per_seq - own)
        used += own
    k = torch.randn(num_blocks * block_size, kv_heads, dim, generator=gen)
    v = torch.randn(num_blocks * block_size, kv_heads, dim, generator=gen)
    k[:block_size] = float("nan")  # padding blocks are never read
    v[:block_size] = float("nan")
    batch = DecodeBatch(rows=torch.arange(len(lengths)) * 2 + 1, row_range=None,
                        blocks=torch.tensor(blocks), blocks_per_seq=per_seq,
                        lengths=torch.tensor(lengths), uniform=False)
    query = torch.randn(2 * len(lengths) + 1, heads, dim, generator=gen)
    return batch, k, v, query


def _expected(batch, k, v, query, window, scale, block_size=4):
    q = query.index_select(0, batch.rows).unsqueeze(2)  # [B, H, 1, D]
    keys = batch.gather(k, block_size).nan_to_num(0.0)
    values = batch.gather(v, block_size).nan_to_num(0.0)
    mask = batch.mask(window, keys.shape[2])
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)[:, :, 0]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("window", [None, 3, 7, 100])
@pytest.mark.parametrize("lengths", [[1], [5, 1, 12], [8, 8, 8, 3, 16]])
def test_decode_attention_matches_sdpa(heads, kv_heads, window, lengths):
    batch, k, v, query = _problem(lengths, heads, kv_heads, seed=len(lengths) + heads)
    out = torch.full_like(query, 7.0)
    native.decode_attention(query, batch.rows, k, v, batch.blocks, batch.blocks_per_seq, 4, batch.lengths,
                            window, 0.3, out)
    torch.testing.assert_close(out[batch.rows], _expected(batch, k, v, query, window, 0.3), rtol=1e-5, atol=1e-5)
    others = torch.ones(out.shape[0], dtype=torch.bool)
    others[batch.rows] = False
    assert torch.equal(out[others], torch.full_like(out[others], 7.0))  # only the queries' rows are written


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_attention_strided_query_and_threads(threads):
    """The query as the model hands it ([H, T, D] memory viewed as [T, H, D]); 1 or 2 threads agree."""
    batch, k, v, query = _problem([9, 2, 13, 4], 4, 2, seed=5)
    strided = query.transpose(0, 1).contiguous().transpose(0, 1)
    torch.set_num_threads(threads)  # the kernel conftest restores it
    out = torch.zeros_like(query)
    native.decode_attention(strided, batch.rows, k, v, batch.blocks, batch.blocks_per_seq, 4, batch.lengths,
                            None, 0.25, out)
    torch.testing.assert_close(out[batch.rows], _expected(batch, k, v, query, None, 0.25), rtol=1e-5, atol=1e-5)


def test_decode_attention_refuses_what_does_not_fit():
    batch, k, v, query = _problem([3, 5], 4, 2)
    out = torch.zeros_like(query)
    with pytest.raises(ValueError, match="do not fit"):
        native.decode_attention(query, batch.rows, k, v, batch.blocks[:-1], batch.blocks_per_seq, 4,
                                batch.lengths, None, 1.0, out)
    with pytest.raises(ValueError, match="float32"):
        native.decode_attention(query.double(), batch.rows, k, v, batch.blocks, batch.blocks_per_seq, 4,
                                batch.lengths, None, 1.0, out)
    with pytest.raises(ValueError, match="int64"):
        native.decode_attention(query, batch.rows.int(), k, v, batch.blocks, batch.blocks_per_seq, 4,
                                batch.lengths, None, 1.0, out)


def test_paged_attention_same_output_with_and_without_the_kernel(monkeypatch):
    """server/model/attention.py's decode branch: the C kernel and the gathered-SDPA fallback agree."""
    from types import SimpleNamespace

    from loraplex.server.model import attention

    lengths, block_size = [5, 9, 2], 4
    batch, k, v, _ = _problem(lengths, 4, 2, block_size=block_size, seed=9)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    cache = attention.PagedKVCache(1, k.shape[0] // block_size, block_size, 2, 16, torch.float32, torch.device("cpu"))
    cache.k[0].copy_(k)
    cache.v[0].copy_(v)
    tokens = 2 * len(lengths) + 1
    gen = torch.Generator().manual_seed(2)
    query = torch.randn(1, 4, tokens, 16, generator=gen)
    key, value = torch.randn(1, 2, tokens, 16, generator=gen), torch.randn(1, 2, tokens, 16, generator=gen)
    free = torch.arange(tokens) + (k.shape[0] - tokens)  # write the step's keys where no context reads
    module = SimpleNamespace(layer_idx=0)

    def run():
        cache.k[0].copy_(k)
        cache.v[0].copy_(v)
        meta = attention.AttentionMeta(cache=cache, slot_mapping=free, spans=[], decode=batch)
        return attention.paged_attention(module, query, key, value, None, scaling=0.25,
                                         **{attention.META_KWARG: meta})[0][0, batch.rows]

    with_kernel = run()
    monkeypatch.setattr(native, "available", lambda: False)
    torch.testing.assert_close(with_kernel, run(), rtol=1e-5, atol=1e-5)
