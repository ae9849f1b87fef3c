"""One generation request as the scheduler and the block manager see it: tokens, KV progress, blocks.

A sequence is laid out over *positions*: `num_virtual_tokens` virtual positions first (0 for every
adapter type served today), then its real tokens, prompt then output:

    positions:  [0 .. P)            [P .. P + len(prompt))   [P + len(prompt) .. num_positions)
                virtual (adapter)   prompt tokens            output tokens

`num_computed_tokens` counts positions, from 0, whose keys/values are in the KV cache. The next step
computes positions `[num_computed_tokens, num_computed_tokens + n)`; when that reaches
`num_positions` the model's last logits give the next token, which is appended (uncomputed) and
computed by the following step. With P = 0, position i holds `token_ids[i]`.

Hook for prompt/prefix-tuning adapters (a later issue; nothing here implements them beyond counting):
- prompt tuning feeds P virtual input embeddings: the engine computes positions [0, P) from the
  adapter's embeddings instead of token ids, like any other prefill chunk.
- prefix tuning has P precomputed KV entries per layer: the adapter store would keep them in shared,
  ref-counted blocks (`BlockManager.share`), put them at the front of `block_table` and start
  `num_computed_tokens` at P. A partly filled last shared block must be copied (or P padded to a
  block multiple) before the sequence writes its own tokens into it; after a preemption, which
  resets `num_computed_tokens` to 0, the prefix would be re-shared the same way.
"""

from __future__ import annotations

import enum
import itertools
import time


class SharedPrefix:
    """KV blocks holding positions [0, num_positions) for every sequence of one prefix adapter.

    The engine fills `blocks` (whole blocks: num_positions is a multiple of the block size) before
    the scheduler admits a sequence of that adapter, and keeps one reference to them itself.
    """

    def __init__(self, num_positions: int) -> None:
        self.num_positions = num_positions
        self.blocks: list[int] | None = None


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    """Queued: never admitted yet, or preempted (its blocks freed, to be recomputed)."""
    RUNNING = "running"
    """Admitted: holds KV blocks and is scheduled every step until it finishes."""
    FINISHED = "finished"
    """Finished or aborted; its blocks are freed and the scheduler no longer knows it."""


class Sequence:
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
        num_virtual_tokens: int = 0,
        arrival_time: float | None = None,
        extra: object = None,
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
        self.num_virtual_tokens = num_virtual_tokens
        """P virtual positions before the prompt (prompt/prefix tuning); they use KV slots."""
        self.num_computed_tokens = 0
        """Positions [0, num_computed_tokens) have their keys/values in the cache."""
        self.block_table: list[int] = []
        """KV block ids; position p lives in block_table[p // block_size] (BlockManager.slot)."""
        self.status = SequenceStatus.WAITING
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.num_preemptions = 0
        """How many times it was preempted (blocks freed, KV recomputed on readmission)."""
        self.extra = extra
        """Opaque to the scheduler: the engine's per-request state (sampling params, queue, ...)."""
        self.shared_prefix: SharedPrefix | None = None
        """Prefix tuning: blocks holding the adapter's virtual KV entries, shared by its sequences."""

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
        return self.num_virtual_tokens + len(self.token_ids)

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
        p = self.num_virtual_tokens
        return self.token_ids[max(start - p, 0) : max(stop - p, 0)]

    def __repr__(self) -> str:
        return (
            f"Sequence(seq_id={self.seq_id}, request_id={self.request_id!r}, "
            f"adapter_key={self.adapter_key!r}, status={self.status.name}, "
            f"tokens={self.num_prompt_tokens}+{self.num_output_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
