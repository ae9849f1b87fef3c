"""Paged KV-cache bookkeeping: free blocks, reference counts, and the prefix cache of full blocks.

The cache holds `num_blocks` blocks of `block_size` slots; slot `b * block_size + i` is position i of
block b (the model runner's flat KV tensors are indexed by slot). A sequence's `block_table` lists its
blocks in position order. Blocks are reference-counted so that several sequences can share
read-only blocks.

Prefix caching: a full, computed block is named by a hash chained over the sequence's cache root
(its adapter registration, so a re-registered adapter never hits an old entry), the previous
block's hash and the block's position keys (token ids; virtual positions of prompt/prefix tuning
have keys of their own). A block whose count drops to 0 stays in the cache, reclaimable: it is
handed out again (and its hash forgotten, an eviction) only after every free block that caches
nothing, least recently freed first, unless a new sequence whose leading blocks hash the same takes
it back first. Pure Python, no tensors.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from loraplex.server.engine.sequence import Sequence

if TYPE_CHECKING:
    from loraplex.server.engine.scheduler import ScheduledSequence


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
        # Blocks with count 0, handed out from the front: blocks that cache nothing first, then cached
        # blocks least recently freed first.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # block hash -> block holding those positions' KV
        self.num_evictions = 0
        """Cached blocks handed out for other positions since start."""

    # ---- counters --------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence references: never used, or cached and reclaimable."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks the prefix cache names, referenced or not."""
        return len(self._cached)

    def usage(self) -> float:
        """Fraction of blocks referenced by sequences, in [0, 1]; cached free blocks do not count."""
        return self.num_used_blocks / self.num_blocks

    def ref_count(self, block: int) -> int:
        self._check_id(block)
        return self._ref_counts[block]

    def blocks_for(self, num_positions: int) -> int:
        """Blocks that hold `num_positions` positions."""
        return -(-num_positions // self.block_size)

    # ---- raw blocks ------------------------------------------------------------------------------

    def allocate_blocks(self, n: int) -> list[int]:
        """Take n free blocks, each with ref count 1, evicting the cached ones among them."""
        if n > len(self._free):
            raise BlockAllocationError(
                f"out of KV blocks: need {n}, {len(self._free)} free of {self.num_blocks} "
                "(the scheduler's plan counts them first)"
            )
        blocks = [self._free.popitem(last=False)[0] for _ in range(n)]
        for b in blocks:
            self._ref_counts[b] = 1
            block_hash = self._hash_of[b]
            if block_hash is not None:
                self._hash_of[b] = None
                del self._cached[block_hash]
                self.num_evictions += 1
        return blocks

    def share(self, blocks: Iterable[int]) -> list[int]:
        """Add one reference to each block: an allocated one, or a cached one taken back from the free
        list. Returns them, e.g. to start a block table."""
        blocks = list(blocks)
        for b in blocks:
            self._check_id(b)
            if self._ref_counts[b] == 0 and self._hash_of[b] is None:
                raise BlockAllocationError(f"cannot share block {b}: it is free and caches nothing")
        for b in blocks:
            if self._ref_counts[b] == 0:
                del self._free[b]
            self._ref_counts[b] += 1
        return blocks

    def free_blocks(self, blocks: Iterable[int]) -> None:
        """Drop one reference from each block; a block whose count reaches 0 becomes free (and stays
        cached if it has a hash)."""
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
                self._free[b] = None
                if self._hash_of[b] is None:  # holds nothing worth keeping: reuse it before any cached block
                    self._free.move_to_end(b, last=False)

    # ---- prefix cache ----------------------------------------------------------------------------

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks holding `seq`'s leading full blocks, as far as they hit.

        The last position is left out: its logits give the next token, so it is always computed.
        Read only: `share` takes the blocks.
        """
        limit = (seq.num_positions - 1) // self.block_size
        if not seq.cache_prompt:
            limit = min(limit, seq.num_shared_positions // self.block_size)
        hits = []
        for block_hash in self._block_hashes(seq, limit):
            block = self._cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def cache_computed(self, seq: Sequence) -> None:
        """Name the sequence's full, computed blocks in the cache (the first block computed for a
        hash keeps it)."""
        full = seq.num_computed_tokens // self.block_size
        if not seq.cache_prompt:
            full = min(full, seq.num_shared_positions // self.block_size)
        if full <= seq.num_cached_blocks:
            return
        hashes = self._block_hashes(seq, full)
        for i in range(seq.num_cached_blocks, full):
            block = seq.block_table[i]
            if self._hash_of[block] is None and hashes[i] not in self._cached:
                self._hash_of[block] = hashes[i]
                self._cached[hashes[i]] = block
        seq.num_cached_blocks = full

    def _block_hashes(self, seq: Sequence, count: int) -> list[bytes]:
        """Chained hashes of the sequence's first `count` blocks, extended on the sequence as needed."""
        hashes = seq.block_hashes
        bs = self.block_size
        previous = hashes[-1] if hashes else hashlib.sha256((seq.adapter_key or "").encode()).digest()
        for i in range(len(hashes), count):
            keys = array("q", seq.position_keys(i * bs, (i + 1) * bs))
            previous = hashlib.sha256(previous + keys.tobytes()).digest()
            hashes.append(previous)
        return hashes[:count]

    # ---- sequences -------------------------------------------------------------------------------

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """New blocks the sequence needs to compute `num_new_tokens` more positions."""
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    def allocate_step(self, scheduled: Iterable[ScheduledSequence]) -> None:
        """Carry out a scheduler plan's blocks: every admitted sequence first takes its cached blocks
        (so that no allocation of the step evicts one the plan counts on), then each gets its new
        blocks."""
        scheduled = list(scheduled)
        for item in scheduled:
            if item.cached_blocks is not None:
                item.seq.block_table = self.share(item.cached_blocks)
                item.seq.num_cached_blocks = len(item.cached_blocks)
        for item in scheduled:
            if item.num_new_blocks:
                item.seq.block_table.extend(self.allocate_blocks(item.num_new_blocks))

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's reference to each of its blocks and clear its table (no-op if empty).

        The last blocks are freed first, so they are evicted before the prefix that others may share.
        """
        table, seq.block_table = seq.block_table, []
        seq.num_cached_blocks = 0
        self.free_blocks(reversed(table))

    def _check_id(self, block: int) -> None:
        if not (isinstance(block, int) and 0 <= block < self.num_blocks):
            raise BlockAllocationError(f"{block!r} is not a KV block id (0..{self.num_blocks - 1})")
