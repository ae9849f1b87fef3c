"""KV block bookkeeping: growth by position, ref-counted sharing, the prefix cache, and loud bookkeeping errors."""

from __future__ import annotations

import pytest

from loraplex.server.engine.block_manager import BlockAllocationError, BlockManager
from loraplex.server.engine.sequence import Sequence


def _seq(num_prompt: int, num_virtual: int = 0, adapter: str | None = None, first: int = 0) -> Sequence:
    return Sequence("r", list(range(first, first + num_prompt)), max_new_tokens=4, adapter_key=adapter,
                    num_virtual_positions=num_virtual)


def _grow(bm: BlockManager, seq: Sequence, n: int) -> None:
    """What the engine does for a planned step: append the blocks `n` more positions need."""
    seq.block_table.extend(bm.allocate_blocks(bm.num_blocks_needed(seq, n)))


def test_allocate_covers_computed_plus_new_positions_and_no_more():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = _seq(6)
    assert bm.num_blocks_needed(seq, 6) == 2
    _grow(bm, seq, 6)  # positions 0..5: blocks for 0-3 and 4-7
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 6
    seq.num_computed_tokens = 6
    _grow(bm, seq, 2)  # positions 6, 7 fit in the second block
    assert len(seq.block_table) == 2
    _grow(bm, seq, 3)  # position 8..10 need a third
    assert len(seq.block_table) == 3 and bm.num_used_blocks == 3
    assert bm.usage() == pytest.approx(3 / 8)
    assert len(set(seq.block_table)) == 3


def test_virtual_positions_take_slots():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = _seq(5, num_virtual=3)
    assert seq.num_positions == 8
    _grow(bm, seq, seq.num_uncomputed_tokens)
    assert len(seq.block_table) == 2


def test_allocation_beyond_capacity_raises_and_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    a, b = _seq(8), _seq(8)
    _grow(bm, a, 8)
    assert bm.num_blocks_needed(b, 4) == 1 and bm.num_blocks_needed(b, 5) == 2
    with pytest.raises(BlockAllocationError, match="out of KV blocks: need 2, 1 free of 3"):
        _grow(bm, b, 8)
    assert b.block_table == [] and bm.num_free_blocks == 1


def test_free_returns_blocks_and_double_free_is_an_error():
    bm = BlockManager(num_blocks=4, block_size=2)
    seq = _seq(5)
    _grow(bm, seq, 5)
    blocks = list(seq.block_table)
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 4
    assert all(bm.ref_count(b) == 0 for b in blocks)
    bm.free(seq)  # an empty table frees nothing: not a double free
    assert bm.num_free_blocks == 4
    with pytest.raises(BlockAllocationError, match=f"double free of KV block {blocks[0]}"):
        bm.free_blocks([blocks[0]])
    assert bm.num_free_blocks == 4


def test_double_free_within_one_call_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=2)
    blocks = bm.allocate_blocks(2)
    with pytest.raises(BlockAllocationError, match="double free"):
        bm.free_blocks([blocks[0], blocks[1], blocks[0]])
    assert [bm.ref_count(b) for b in blocks] == [1, 1] and bm.num_free_blocks == 2


def test_unknown_block_ids_are_refused():
    bm = BlockManager(num_blocks=4, block_size=2)
    for bad in (-1, 4, "0"):
        with pytest.raises(BlockAllocationError, match="is not a KV block id"):
            bm.free_blocks([bad])


def test_shared_prefix_blocks_are_ref_counted():
    bm = BlockManager(num_blocks=8, block_size=4)
    prefix = bm.allocate_blocks(2)  # e.g. an adapter's virtual KV, owned by the adapter store
    seqs = [_seq(3, num_virtual=8) for _ in range(3)]
    for seq in seqs:
        seq.block_table = bm.share(prefix)
        seq.num_computed_tokens = 8
    assert [bm.ref_count(b) for b in prefix] == [4, 4]
    assert bm.num_used_blocks == 2

    # Own blocks come after the shared ones: 8 virtual + 3 prompt positions need one more block each.
    for seq in seqs:
        assert bm.num_blocks_needed(seq, 3) == 1
        _grow(bm, seq, 3)
        assert seq.block_table[:2] == prefix and len(seq.block_table) == 3
    assert bm.num_used_blocks == 5

    bm.free(seqs[0])
    bm.free(seqs[1])
    assert [bm.ref_count(b) for b in prefix] == [2, 2]
    assert bm.num_used_blocks == 3  # prefix + seqs[2]'s own block
    bm.free_blocks(prefix)  # the owner lets go; seqs[2] still holds it
    assert bm.num_used_blocks == 3
    bm.free(seqs[2])
    assert bm.num_free_blocks == 8 and all(bm.ref_count(b) == 0 for b in range(8))


def test_sharing_a_free_block_is_an_error():
    bm = BlockManager(num_blocks=4, block_size=2)
    [block] = bm.allocate_blocks(1)
    bm.free_blocks([block])
    with pytest.raises(BlockAllocationError, match=f"cannot share block {block}: it is free and caches nothing"):
        bm.share([block])


def test_freed_blocks_are_reused():
    bm = BlockManager(num_blocks=2, block_size=2)
    a = _seq(4)
    _grow(bm, a, 4)
    assert bm.num_free_blocks == 0
    bm.free(a)
    b = _seq(4)
    _grow(bm, b, 4)
    assert sorted(b.block_table) == [0, 1]


@pytest.mark.parametrize("kwargs", [{"num_blocks": 0, "block_size": 4}, {"num_blocks": 4, "block_size": 0}])
def test_constructor_validates(kwargs):
    bad = next(k for k, v in kwargs.items() if v == 0)
    with pytest.raises(ValueError, match=bad):
        BlockManager(**kwargs)


def _computed(bm: BlockManager, seq: Sequence) -> Sequence:
    _grow(bm, seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_positions
    bm.cache_computed(seq)
    return seq


def test_full_computed_blocks_are_cached_and_outlive_their_sequence():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _computed(bm, _seq(10))  # blocks 0-3, 4-7 full; 8-9 partial
    assert bm.num_cached_blocks == 2
    blocks = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 8 and bm.usage() == 0  # cached blocks are reclaimable, not in use
    b = _seq(12)  # same first 8 tokens
    assert bm.cached_prefix(b) == blocks[:2]
    assert bm.cached_prefix(_seq(8)) == blocks[:1]  # the last position is always computed
    assert bm.cached_prefix(_seq(12, first=1)) == []
    assert bm.cached_prefix(_seq(12, adapter="x#1")) == []  # another adapter registration never hits
    b.block_table = bm.share(blocks[:2])
    assert bm.num_free_blocks == 6 and [bm.ref_count(x) for x in blocks[:2]] == [1, 1]


def test_virtual_positions_are_part_of_the_chain():
    bm = BlockManager(num_blocks=8, block_size=4)
    _computed(bm, _seq(8, num_virtual=4, adapter="p#1"))
    assert len(bm.cached_prefix(_seq(8, num_virtual=4, adapter="p#1"))) == 2
    assert bm.cached_prefix(_seq(8, num_virtual=4, adapter="p#2")) == []
    assert bm.cached_prefix(_seq(12, adapter="p#1")) == []  # token ids never equal a virtual position


def test_cache_prompt_off_neither_looks_up_nor_caches_beyond_shared_positions():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = _seq(8, num_virtual=4, adapter="p#1")
    seq.cache_prompt, seq.num_shared_positions = False, 4
    _computed(bm, seq)
    assert bm.num_cached_blocks == 1  # the adapter's prefix-tuning block only
    other = _seq(8, num_virtual=4, adapter="p#1")
    assert len(bm.cached_prefix(other)) == 1


def test_blocks_that_cache_nothing_are_reused_before_cached_ones_least_recently_freed_first():
    bm = BlockManager(num_blocks=6, block_size=2)
    old = _computed(bm, _seq(5))  # 3 blocks, the first 2 full and cached
    old_blocks = list(old.block_table)
    bm.free(old)
    new = _computed(bm, _seq(5, first=50))
    new_blocks = list(new.block_table)
    bm.free(new)
    assert bm.num_cached_blocks == 4 and bm.num_free_blocks == 6
    cached = old_blocks[:2] + new_blocks[:2]
    taken = bm.allocate_blocks(3)  # the two blocks caching nothing, then old's tail: freed last-block-first
    assert not set(taken[:2]) & set(cached) and taken[2] == old_blocks[1]
    assert bm.num_evictions == 1 and bm.num_cached_blocks == 3
    assert bm.cached_prefix(_seq(5)) == old_blocks[:1]
    assert len(bm.cached_prefix(_seq(5, first=50))) == 2


def test_a_block_computed_twice_is_cached_once():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = _seq(5), _seq(5)
    for seq in (a, b):
        _grow(bm, seq, 5)
    for seq in (a, b):
        seq.num_computed_tokens = 5
        bm.cache_computed(seq)
    assert bm.num_cached_blocks == 1 and bm.cached_prefix(_seq(6)) == a.block_table[:1]
    bm.free(b)
    assert bm.num_free_blocks == 6  # b's copy is simply free
