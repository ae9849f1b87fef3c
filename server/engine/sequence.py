"""One generation request as the scheduler and the block manager see it: tokens, KV progress, blocks.

A sequence is laid out over *positions*: `num_virtual_positions` virtual positions first (a prompt or
prefix tuning adapter's virtual tokens; 0 for every other adapter type), then its real tokens,
prompt then output:

    positions:  [0 .. P)            [P .. P + len(prompt))   [P + len(prompt) .. num_positions)
                virtual (adapter)   prompt tokens            output tokens

`num_computed_tokens` counts positions, from 0, whose keys/values are in the KV cache. The next step
computes positions `[num_computed_tokens, num_computed_tokens + n)`; when that reaches
`num_positions` the model's last logits give the next token, which is appended (uncomputed) and
computed by the following step. With P = 0, position i holds `token_ids[i]`.

Virtual positions: prompt tuning computes [0, P) from the adapter's embeddings instead of token ids,
like any other prefill chunk. Prefix tuning has precomputed keys/values, padded to whole blocks
(`num_shared_positions`): the engine writes them into the sequence's first blocks (or finds them in
the prefix cache) and the sequence starts with those positions computed.
"""

from __future__ import annotations

import enum
import itertools
import time
from typing import Generic, TypeVar

ExtraT = TypeVar("ExtraT")


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    """Queued: never admitted yet, or preempted (its blocks freed, to be recomputed)."""
    RUNNING = "running"
    """Admitted: holds KV blocks and is scheduled every step until it finishes."""
    FINISHED = "finished"
    """Finished or aborted; its blocks are freed and the scheduler no longer knows it."""


class Sequence(Generic[ExtraT]):
    """A request's token state; owned by the scheduler, read by the engine and the model runner.

    Append generated tokens with `append_token` only (the scheduler's `update` does): `token_ids`,
    `output_token_ids` and the counters are kept in step without copying per step. The lists are
    returned as they are, not copied: do not mutate them.
    """

    _ids = itertools.count()

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        *,
        max_new_tokens: int,
        adapter_key: str | None = None,
        num_virtual_positions: int = 0,
        num_shared_positions: int = 0,
        cache_prompt: bool = True,
        arrival_time: float | None = None,
        extra: ExtraT = None,
    ) -> None:
        self.seq_id: int = next(Sequence._ids)
        """Unique in this process, increasing in creation order."""
        self.request_id = request_id
        self.adapter_key = adapter_key
        """The adapter store's key of the registration this request holds ("<id>#<n>"); None is the
        bare base model."""
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.token_ids: list[int] = list(self.prompt_token_ids)
        """Prompt then output tokens (real tokens only, no virtual positions)."""
        self.max_new_tokens = max_new_tokens
        """Upper bound on output tokens; the engine stops the sequence when it is reached."""
        self.num_virtual_positions = num_virtual_positions
        """P virtual positions before the prompt (prompt/prefix tuning); they use KV slots. For prefix
        tuning, the adapter's virtual tokens padded to whole blocks."""
        self.num_shared_positions = num_shared_positions
        """Leading positions whose KV the engine writes rather than computes, shared through the
        prefix cache even when `cache_prompt` is off (prefix tuning's padded virtual positions)."""
        self.cache_prompt = cache_prompt
        """Whether its full blocks are looked up in and added to the prefix cache."""
        self.block_hashes: list[bytes] = []
        """Prefix-cache hashes of its first full blocks, computed once (BlockManager)."""
        self.num_cached_blocks = 0
        """Leading blocks of `block_table` already named in the prefix cache."""
        self.num_computed_tokens = 0
        """Positions [0, num_computed_tokens) have their keys/values in the cache."""
        self.block_table: list[int] = []
        """KV block ids; position p lives in slot block_table[p // block_size] * block_size + p % block_size."""
        self.status = SequenceStatus.WAITING
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.num_preemptions = 0
        """How many times it was preempted (blocks freed, KV recomputed on readmission)."""
        self.extra: ExtraT = extra
        """Opaque to the scheduler: the engine's per-request state (sampling params, queue, ...)."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Real tokens, prompt plus output."""
        return len(self.token_ids)

    @property
    def num_positions(self) -> int:
        """Virtual plus real positions: the KV slots needed once every token is computed."""
        return self.num_virtual_positions + len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Positions still to compute: the whole prompt at first, 1 while decoding."""
        return self.num_positions - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """More than one position left to compute (a prompt, or a recomputation after preemption)."""
        return self.num_uncomputed_tokens > 1

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Add a sampled token; its KV is computed by the next step."""
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)

    def token_ids_at(self, start: int, stop: int) -> list[int]:
        """Real token ids at positions [start, stop); virtual positions have none and are left out."""
        p = self.num_virtual_positions
        return self.token_ids[max(start - p, 0) : max(stop - p, 0)]

    def position_keys(self, start: int, stop: int) -> list[int]:
        """What positions [start, stop) hold, for the prefix cache: token ids, and -1 - p for virtual
        position p (whose content the adapter registration, the hash chain's root, determines)."""
        p = self.num_virtual_positions
        return [-1 - i for i in range(start, min(stop, p))] + self.token_ids_at(start, stop)

    def __repr__(self) -> str:
        return (
            f"Sequence(seq_id={self.seq_id}, request_id={self.request_id!r}, "
            f"adapter_key={self.adapter_key!r}, status={self.status.name}, "
            f"tokens={self.num_prompt_tokens}+{self.num_output_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
