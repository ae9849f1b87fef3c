"""Decoding sequences attended as one batch (gathered blocks, padding masked) give what attending each
sequence on its own gives: different context lengths, contexts that fill their blocks exactly (no
mask), a sliding window, grouped-query heads, and decode rows split by a prefill chunk."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from loraplex.server.model import attention
from loraplex.server.model.runner import ModelRunner, StepInput
from loraplex.server.model.step_buffers import StepBuffers

BLOCK = 4
HEADS, KV_HEADS, DIM = 4, 2, 8


def make_cache(num_blocks: int = 32) -> attention.PagedKVCache:
    cache = attention.PagedKVCache(1, num_blocks, BLOCK, KV_HEADS, DIM, torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=gen))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=gen))
    return cache


def context_slots(table: list[int], length: int) -> torch.Tensor:
    return torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(length)])


def fake_runner(**fields) -> SimpleNamespace:
    """What ModelRunner's layout helpers read; they put their index arrays into its step buffer."""
    buffers = StepBuffers(torch.device("cpu"))
    buffers.begin(1 << 16)
    return SimpleNamespace(block_size=BLOCK, buffers=buffers, **fields)


def run(meta: attention.AttentionMeta, query, key, value, window):
    module = SimpleNamespace(layer_idx=0, sliding_window=window)
    return attention.paged_attention(module, query, key, value, None, scaling=DIM ** -0.5,
                                     **{attention.META_KWARG: meta})[0]


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("lengths", [[7, 3, 12, 1], [8, 8, 8, 8], [5, 5, 5, 5]], ids=["ragged", "full-blocks", "equal"])
@pytest.mark.parametrize("prefill_between", [False, True])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_batched_decode_matches_one_call_per_sequence(lengths, window, prefill_between, backend):
    if backend == "native" and not attention.native.available():
        pytest.skip(f"C kernel unavailable: {attention.native.unavailable_reason()}")
    gen = torch.Generator().manual_seed(1)
    tables = [[3 + 4 * i, 20 + i, 9 + i, 30 - i][: -(-length // BLOCK)] for i, length in enumerate(lengths)]
    decoding = []  # (row, StepInput) as the model runner collects them
    spans = []     # the same sequences, one span each (the per-sequence path)
    slot_mapping = []
    row = 0
    prefill = None
    for i, (table, length) in enumerate(zip(tables, lengths)):
        if prefill_between and i == 2:  # a 3-token prefill chunk between the decode rows
            prefill = attention.SequenceSpan(row, 3, context_slots([1, 2], 3))
            slot_mapping += context_slots([1, 2], 3).tolist()
            row += 3
        decoding.append((row, StepInput(token_ids=[0], start=length - 1, block_table=table, slot=-1, samples=True)))
        spans.append(attention.SequenceSpan(row, 1, context_slots(table, length)))
        slot_mapping.append(int(context_slots(table, length)[-1]))
        row += 1
    T = row
    query = torch.randn(1, HEADS, T, DIM, generator=gen)
    key = torch.randn(1, KV_HEADS, T, DIM, generator=gen)
    value = torch.randn(1, KV_HEADS, T, DIM, generator=gen)
    runner = fake_runner(max_gather_tokens=1 << 20)
    batch = ModelRunner._decode_batch(runner, decoding)
    runner.buffers.send()
    assert (batch.row_range is None) == prefill_between

    extra = [prefill] if prefill is not None else []
    mapping = torch.tensor(slot_mapping)
    one_by_one = run(attention.AttentionMeta(make_cache(), mapping, spans + extra), query, key, value, window)
    batched = run(attention.AttentionMeta(make_cache(), mapping, extra, decode=batch, backend=backend),
                  query, key, value, window)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)
    if lengths == [8, 8, 8, 8] and window is None:
        assert batch.mask(None, 8) is None  # contexts fill their blocks: attended without a mask


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("consecutive", [True, False])
def test_batched_fresh_prefills_match_one_call_per_sequence(window, consecutive):
    """Prompts of equal length (positions [0, n)) attend to their own keys in one causal call."""
    gen = torch.Generator().manual_seed(2)
    n, tables = 5, [[1, 2], [6, 7], [10, 3]]
    fresh, spans, slot_mapping, row = [], [], [], 0
    for i, table in enumerate(tables):
        if not consecutive and i == 1:  # a decoding sequence's row between the prompts
            spans.append(attention.SequenceSpan(row, 1, context_slots([20], 3)))
            slot_mapping.append(int(context_slots([20], 3)[-1]))
            row += 1
        fresh.append((row, n))
        spans.append(attention.SequenceSpan(row, n, context_slots(table, n)))
        slot_mapping += context_slots(table, n).tolist()
        row += n
    query = torch.randn(1, HEADS, row, DIM, generator=gen)
    key = torch.randn(1, KV_HEADS, row, DIM, generator=gen)
    value = torch.randn(1, KV_HEADS, row, DIM, generator=gen)
    runner = fake_runner()
    batches = ModelRunner._prefill_batches(runner, fresh)
    runner.buffers.send()
    assert len(batches) == 1 and (batches[0].rows is None) == consecutive

    mapping = torch.tensor(slot_mapping)
    one_by_one = run(attention.AttentionMeta(make_cache(), mapping, spans), query, key, value, window)
    others = [span for span in spans if span.query_len == 1]
    batched = run(attention.AttentionMeta(make_cache(), mapping, others, prefills=batches), query, key, value, window)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_gather_tokens", [16, 1 << 20])
def test_gathered_decode_memory_is_proportional_to_the_tokens_attended(monkeypatch, max_gather_tokens):
    """One long context among short ones: the gathering path (GPU, or CPU without the C kernel) must
    not pad every sequence to the longest; each call gathers at most max_gather_tokens positions
    (or one sequence), and all calls together at most twice the attended blocks."""
    gen = torch.Generator().manual_seed(3)
    lengths = [60, 3, 5, 6, 2, 7]
    tables, next_block = [], 1
    for length in lengths:
        count = -(-length // BLOCK)
        tables.append(list(range(next_block, next_block + count)))
        next_block += count
    decoding, spans, slot_mapping = [], [], []
    for row, (table, length) in enumerate(zip(tables, lengths)):
        decoding.append((row, StepInput(token_ids=[0], start=length - 1, block_table=table, slot=-1, samples=True)))
        spans.append(attention.SequenceSpan(row, 1, context_slots(table, length)))
        slot_mapping.append(int(context_slots(table, length)[-1]))
    T = len(lengths)
    query = torch.randn(1, HEADS, T, DIM, generator=gen)
    key = torch.randn(1, KV_HEADS, T, DIM, generator=gen)
    value = torch.randn(1, KV_HEADS, T, DIM, generator=gen)
    runner = fake_runner(max_gather_tokens=max_gather_tokens)
    batch = ModelRunner._decode_batch(runner, decoding)
    runner.buffers.send()
    mapping = torch.tensor(slot_mapping)
    one_by_one = run(attention.AttentionMeta(make_cache(next_block), mapping, spans), query, key, value, None)

    gathered = []
    sdpa = attention.F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        gathered.append(k.shape[0] * k.shape[2])  # sequences x positions held by this call
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording)
    batched = run(attention.AttentionMeta(make_cache(next_block), mapping, [], decode=batch), query, key, value, None)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)
    attended_blocks = sum(-(-length // BLOCK) for length in lengths)
    assert sum(gathered) <= 2 * attended_blocks * BLOCK, gathered
    assert max(gathered) <= max(max_gather_tokens, max(lengths) + BLOCK), gathered
