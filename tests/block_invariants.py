"""The block manager's invariants, checked by the scheduler and engine tests after every step (no torch)."""

from __future__ import annotations

from collections import Counter


def assert_block_invariants(bm, seqs) -> None:
    """Reference counts are exactly the sequences' block-table entries; free blocks are the unreferenced
    ones; the prefix cache names each block at most once; no sequence can write a shared or cached block."""
    counts = Counter(b for seq in seqs for b in seq.block_table)
    assert [bm.ref_count(b) for b in range(bm.num_blocks)] == [counts.get(b, 0) for b in range(bm.num_blocks)]
    assert sorted(bm._free) == [b for b in range(bm.num_blocks) if not counts.get(b)]
    assert all(bm._hash_of[block] == h for h, block in bm._cached.items())
    assert sum(h is not None for h in bm._hash_of) == len(bm._cached)
    for seq in seqs:
        for block in seq.block_table[seq.num_computed_tokens // bm.block_size:]:  # written by later steps
            assert counts[block] == 1 and bm._hash_of[block] is None, f"sequence {seq.request_id} shares block {block}"
