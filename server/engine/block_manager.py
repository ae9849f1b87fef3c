"""Paged KV-cache bookkeeping: which fixed-size blocks are free, and who references each one.

The cache holds `num_blocks` blocks of `block_size` slots; slot `b * block_size + i` is position i of
block b (the model runner's flat KV tensors are indexed by slot). A sequence's `block_table` lists its
blocks in position order. Blocks are reference-counted so that several sequences can share
read-only blocks (a prefix-tuning adapter's virtual KV, later perhaps common prompt prefixes): a block
is free exactly when its count is 0. Pure Python, no tensors.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable

from loraplex.server.engine.sequence import Sequence


class BlockAllocationError(RuntimeError):
    """A bookkeeping bug in the caller: allocation past capacity, double free, unknown block."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts = [0] * num_blocks
        # FIFO reuse: deterministic, and a freed block is reused last.
        self._free: deque[int] = deque(range(num_blocks))

    # ---- counters --------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks

    def ref_count(self, block: int) -> int:
        self._check_id(block)
        return self._ref_counts[block]

    def blocks_for(self, num_positions: int) -> int:
        """Blocks that hold `num_positions` positions."""
        return -(-num_positions // self.block_size)

    # ---- raw blocks (shared prefixes; owned by whoever allocates them) --------------------------

    def allocate_blocks(self, n: int) -> list[int]:
        """Take n free blocks, each with ref count 1."""
        if n > len(self._free):
            raise BlockAllocationError(
                f"out of KV blocks: need {n}, {len(self._free)} free of {self.num_blocks} "
                "(check can_allocate first)"
            )
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def share(self, blocks: Iterable[int]) -> list[int]:
        """Add one reference to each (allocated) block; returns them, e.g. to start a block table."""
        blocks = list(blocks)
        for b in blocks:
            self._check_id(b)
            if self._ref_counts[b] == 0:
                raise BlockAllocationError(f"cannot share block {b}: it is free")
        for b in blocks:
            self._ref_counts[b] += 1
        return blocks

    def free_blocks(self, blocks: Iterable[int]) -> None:
        """Drop one reference from each block; a block whose count reaches 0 becomes free."""
        blocks = list(blocks)
        for b, n in Counter(blocks).items():  # check all first: an error leaves the counts unchanged
            self._check_id(b)
            if self._ref_counts[b] < n:
                raise BlockAllocationError(
                    f"double free of KV block {b} (ref count {self._ref_counts[b]}, freed {n} times)"
                )
        for b in blocks:
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free.append(b)

    # ---- sequences -------------------------------------------------------------------------------

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """New blocks that `allocate(seq, num_new_tokens)` would take."""
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow `seq.block_table` so positions [0, num_computed_tokens + num_new_tokens) have slots.

        Raises BlockAllocationError (and changes nothing) when too few blocks are free.
        """
        n = self.num_blocks_needed(seq, num_new_tokens)
        if n:
            seq.block_table.extend(self.allocate_blocks(n))

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's reference to each of its blocks and clear its table (no-op if empty)."""
        table, seq.block_table = seq.block_table, []
        self.free_blocks(table)

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat KV-cache slot of `position` (virtual positions included) in the sequence."""
        index, offset = divmod(position, self.block_size)
        if position < 0 or index >= len(seq.block_table):
            raise BlockAllocationError(
                f"position {position} of sequence {seq.seq_id} has no slot: its block table covers "
                f"{len(seq.block_table) * self.block_size} positions"
            )
        return seq.block_table[index] * self.block_size + offset

    def slots(self, seq: Sequence, start: int, stop: int) -> list[int]:
        """`slot` of each position in [start, stop): the slot mapping of one scheduled chunk."""
        return [self.slot(seq, p) for p in range(start, stop)]

    def _check_id(self, block: int) -> None:
        if not (isinstance(block, int) and 0 <= block < self.num_blocks):
            raise BlockAllocationError(f"{block!r} is not a KV block id (0..{self.num_blocks - 1})")
