"""Per-request sampling: validated `SamplingParams` and the batched `Sampler`.

One step of the engine hands the sampler the last-position logits of every running sequence,
`[N, V]` float32, and gets back one token and its logprob per row. Per row, in Hugging Face's order:

    logits ─ repetition penalty ─┬─ temperature == 0: argmax                      (greedy)
                                 └─ / temperature ─ top-k ─ top-p ─ draw           (sampled)
    logprob = log_softmax(raw logits)[token]     (the model's own distribution, as peft reports it)

A step samples in two halves, so that nothing but the result crosses between host and device:

    batch = sampler.prepare(params, seeds, draws, histories, keys)  # host: per-row arrays, 2 CPU tensors
    logits = runner.execute(inputs, batch.attach)                   # they ride in the step's one copy
    tokens, logprobs = sampler.sample(logits, batch)                # device work, one read back

(`sample_direct` does both halves without a runner, sending the arrays with `.to`.) Row subsets,
temperatures, top-k/top-p, penalties, seeds and draw numbers are all in the batch; host-known sizes
(how many rows are greedy, the largest top-k) shape the device work as Python ints.

Draws: no generator objects. A sampled row races Philox noise keyed by its request's 64-bit seed, at
counter (token, draw number), the draw number being how many tokens the request sampled before
(`kernels/exponential_race.py`; on CUDA one Triton launch for every sampled row). Worked example: seed
7, third output token (draw 2): token 5's uniform is word 1 of Philox4x32-10(key (7, 0), counter
(1, 2, 0, 0)). It depends on nothing else, so a seeded request gives the same tokens alone or in any
batch and row, and a failed step rerun draws the same numbers (the draw number advances only with the
sequence's output).

Repetition penalty: `Sampler.seen [max_rows, V]` (bool, on the device) marks each penalised sequence's
history tokens (prompt + output) in its own row, taken the first time it samples with a penalty and
kept until `release`. The host counts how many history tokens a row has marked, so a step sends only
the new ones (the whole history the first time, then the previous sampled token). Marking is
idempotent and the count advances only when `sample` returns, so a failed step does no harm. When
every row is held, a sequence absent from the step gives its row up and re-marks its history later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from loraplex.kernels.exponential_race import exponential_race, seed_bits
from loraplex.server.errors import InvalidArgument
from loraplex.server.model.step_buffers import StepAttachment

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_SEED = 2**64 - 1
"""Seeds are unsigned 64-bit (proto: uint64): Philox's 64-bit key."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    """0 selects greedy decoding (argmax); otherwise logits are divided by it. Finite, >= 0."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p. In (0, 1]."""
    top_k: int = 0
    """Keep only the top_k most likely tokens; 0 turns it off. >= 0."""
    repetition_penalty: float = 1.0
    """HF's CTRL-style penalty on tokens of the prompt and the output; 1 turns it off. Finite, > 0."""
    seed: int | None = None
    """Keys this request's noise: same seed, same tokens, whatever else is in the batch (on a GPU up to
    logits differences, see docs/api.md). None: the engine draws one from its own seeded RNG."""
    max_new_tokens: int = 16
    """Generation stops after this many new tokens. >= 1."""
    stop: tuple[str, ...] = ()
    """Generation stops when the output text contains one of these; it is not part of the output."""
    ignore_eos: bool = False
    """Keep generating past the EOS token (until max_new_tokens or a stop string)."""
    return_logprobs: bool = False
    """Report the logprob of each chosen token under the model's unmodified distribution."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))  # proto repeated fields arrive as lists
        t = self.temperature
        if not (_is_number(t) and math.isfinite(t) and t >= 0):
            raise InvalidArgument(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (_is_int(self.top_k) and self.top_k >= 0):
            raise InvalidArgument(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        r = self.repetition_penalty
        if not (_is_number(r) and math.isfinite(r) and r > 0):
            raise InvalidArgument(f"repetition_penalty must be a finite number > 0 (1 = off), got {r!r}")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed <= MAX_SEED):
            raise InvalidArgument(f"seed must be an integer in [0, 2**64 - 1] or unset, got {self.seed!r}")
        if not (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1):
            raise InvalidArgument(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        self._check_stop()
        for name in ("ignore_eos", "return_logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgument(f"{name} must be a boolean, got {getattr(self, name)!r}")

    def _check_stop(self) -> None:
        if not isinstance(self.stop, tuple):
            raise InvalidArgument(f"stop must be a list of strings, got {type(self.stop).__name__}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidArgument(f"stop allows at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_STRING_CHARS:
                raise InvalidArgument(
                    f"stop[{i}] must be a non-empty string of at most {MAX_STOP_STRING_CHARS} characters, "
                    f"got {s!r:.80}"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_proto_values(
        cls,
        *,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        repetition_penalty: float = 0.0,
        seed: int | None = None,
        max_new_tokens: int = 0,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        return_logprobs: bool = False,
    ) -> SamplingParams:
        """Build from proto3 scalars, where an unset field reads 0: top_p, repetition_penalty and
        max_new_tokens of 0 mean "the default". Pass `seed=None` unless the message has it set
        (`optional uint64 seed`, `msg.HasField("seed")`), since 0 is a valid seed."""
        return cls(
            temperature=temperature,
            top_p=top_p if top_p != 0 else cls.top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty if repetition_penalty != 0 else cls.repetition_penalty,
            seed=seed,
            max_new_tokens=max_new_tokens if max_new_tokens != 0 else cls.max_new_tokens,
            stop=tuple(stop),
            ignore_eos=ignore_eos,
            return_logprobs=return_logprobs,
        )


def apply_repetition_penalty(
    logits: torch.Tensor,   # [N, V]
    rows: torch.Tensor,     # [P] int64, the penalised rows of logits
    penalty: torch.Tensor,  # [P] float32, each != 1
    seen: torch.Tensor,     # [P, V] bool, the tokens each penalised row has seen
) -> torch.Tensor:  # [N, V], a new tensor
    """Hugging Face's `RepetitionPenaltyLogitsProcessor`, each row with its own penalty: a seen token's
    logit < 0 is multiplied by the penalty, others divided."""
    selected = logits.index_select(0, rows)
    factor = penalty.to(logits.dtype)[:, None]
    penalised = torch.where(selected < 0, selected * factor, selected / factor)
    return logits.index_copy(0, rows, torch.where(seen, penalised, selected))


def apply_temperature_top_k_top_p(
    logits: torch.Tensor,       # [M, V]
    temperature: torch.Tensor,  # [M] float32, each > 0
    top_k: torch.Tensor,        # [M] int64, 0 = off, else < V
    top_p: torch.Tensor,        # [M] float32, 1 = off
    max_top_k: int,             # the largest top_k (host-known; 0: no row filters by top-k)
    any_top_p: bool,            # whether some top_p < 1 (host-known)
) -> torch.Tensor:  # [M, V], removed tokens at -inf
    """Hugging Face's Temperature, TopK and TopP warpers in that order, each row with its own values.

    Rows are shifted by their maximum first: the same distribution, but a tiny temperature cannot
    overflow the scaled logits to inf (which would make the softmax NaN)."""
    scores = (logits - logits.amax(dim=-1, keepdim=True)) / temperature.to(logits.dtype)[:, None]
    if max_top_k > 0:
        top = torch.topk(scores, max_top_k).values
        kth = top.gather(1, (top_k.clamp(min=1) - 1)[:, None])
        kth = torch.where((top_k > 0)[:, None], kth, -math.inf)
        scores = scores.masked_fill(scores < kth, -math.inf)  # ties with the k-th all stay, as in HF
    if any_top_p:
        sorted_scores, sorted_index = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        threshold = 1 - top_p.to(cumulative.dtype)[:, None]
        remove = cumulative <= threshold  # top_p == 1 removes only tokens of probability 0
        remove[:, -1] = False  # the most likely token always stays
        remove = remove.scatter(1, sorted_index, remove)
        scores = scores.masked_fill(remove, -math.inf)
    return scores


INT_FIELDS = ("greedy", "sampled", "top_k", "seed", "draw", "penalised", "mask_row", "fresh", "marks")
FLOAT_FIELDS = ("temperature", "top_p", "penalty")
"""The arrays of a `SampleBatch`, packed in this order into one int64 and one float32 tensor:
greedy/sampled/penalised: row indices of logits; top_k, seed (a uint64's bits), draw, temperature,
top_p: one per sampled row; mask_row, penalty: one per penalised row; fresh: mask rows to clear;
marks: flat indices row * V + token of `Sampler.seen` to set."""


@dataclass
class _MaskRow:
    row: int
    """The sequence's row of `Sampler.seen`."""
    marked: int = 0
    """History tokens [0, marked) are set in the row (advanced when `sample` returns)."""


@dataclass
class SampleBatch:
    """A step's sampling as the host prepared it: every per-row value in `attach` (host arrays; the
    runner fills in device views), and the sizes, known on the host, that shape the device work."""

    attach: StepAttachment
    fields: dict[str, tuple[int, int, int]]
    """Name -> (array, start, stop) in `attach`."""
    num_rows: int
    num_greedy: int
    num_penalised: int
    max_top_k: int
    any_top_p: bool
    marked: list[tuple[Hashable, _MaskRow, int]]
    """(key, its mask row, history length) to record once the marks are on the device."""
    one_off: list[Hashable]
    """Keys of rows without a sequence, released when `sample` ends."""

    def views(self) -> dict[str, torch.Tensor]:
        arrays = self.attach.device
        if len(arrays) != len(self.attach.host):
            raise RuntimeError("the sample batch was not sent: pass batch.attach to runner.execute")
        return {name: arrays[a][start:stop] for name, (a, start, stop) in self.fields.items()}


class Sampler:
    """Chooses the next token of every row of a step: `prepare` on the host, `sample` on the device.

    Owns the repetition-penalty mask `seen [max_rows, vocab]` (bool, on the device), one row per
    sequence that samples with a penalty, kept until `release`."""

    def __init__(self, vocab: int, device: torch.device | str = "cpu", max_rows: int = 256) -> None:
        if not (_is_int(vocab) and vocab >= 1 and _is_int(max_rows) and max_rows >= 1):
            raise ValueError(f"vocab and max_rows must be integers >= 1, got {vocab!r} and {max_rows!r}")
        self.vocab = vocab
        self.seen = torch.zeros(max_rows, vocab, dtype=torch.bool, device=device)
        self._free = list(range(max_rows - 1, -1, -1))  # mask rows no sequence holds
        self._rows: dict[Hashable, _MaskRow] = {}

    def release(self, key: Hashable) -> None:
        """The sequence `key` ended: its mask row (if any) goes back to the free rows."""
        state = self._rows.pop(key, None)
        if state is not None:
            self._free.append(state.row)

    def _take_row(self, keep: set) -> int:
        if self._free:
            return self._free.pop()
        for key in self._rows:  # the oldest holder not in this step; it re-marks when it samples again
            if key not in keep:
                return self._rows.pop(key).row
        raise ValueError(f"more penalised rows in one step than the sampler's {self.seen.shape[0]} mask rows")

    def prepare(
        self,
        params: Sequence[SamplingParams],
        seeds: Sequence[int | None],        # per row, in [0, 2**64); None only for greedy rows
        draws: Sequence[int],               # per row, tokens the request sampled before
        histories: Sequence[Sequence[int]],  # per row, prompt + output so far
        keys: Sequence[Hashable] | None = None,  # per row, the sequence (its mask row); None: one-off rows
    ) -> SampleBatch:
        """Host work only: the step's per-row arrays, to send with the step (`batch.attach`)."""
        n = len(params)
        if not len(seeds) == len(draws) == len(histories) == n or (keys is not None and len(keys) != n):
            raise ValueError("prepare takes one seed, draw number and history (and key) per row")
        one_off: list[Hashable] = []
        if keys is None:
            keys = one_off = [object() for _ in range(n)]
        elif len(set(keys)) != n:
            raise ValueError("a key appears twice in one step")
        vocab = self.vocab
        ints: dict[str, list[int]] = {name: [] for name in INT_FIELDS}
        floats: dict[str, list[float]] = {name: [] for name in FLOAT_FIELDS}
        marked: list[tuple[Hashable, _MaskRow, int]] = []
        in_step = set(keys)
        max_top_k, any_top_p = 0, False
        for i, p in enumerate(params):
            if p.greedy:
                ints["greedy"].append(i)
            else:
                seed, draw = seeds[i], draws[i]
                if not (_is_int(seed) and 0 <= seed <= MAX_SEED):
                    raise ValueError(f"row {i} samples: its seed must be an integer in [0, 2**64), got {seed!r}")
                if not (_is_int(draw) and 0 <= draw < 2**63):
                    raise ValueError(f"row {i}: the draw number must be an integer in [0, 2**63), got {draw!r}")
                top_k = p.top_k if p.top_k < vocab else 0  # k >= V keeps every token
                max_top_k = max(max_top_k, top_k)
                any_top_p = any_top_p or p.top_p < 1
                ints["sampled"].append(i)
                ints["top_k"].append(top_k)
                ints["seed"].append(seed_bits(seed))
                ints["draw"].append(draw)
                floats["temperature"].append(p.temperature)
                floats["top_p"].append(p.top_p)
            if p.repetition_penalty != 1.0:
                key, history = keys[i], histories[i]
                state = self._rows.get(key)
                if state is None:
                    state = self._rows[key] = _MaskRow(self._take_row(in_step))
                start = state.marked
                if start == 0 or start > len(history):  # new row (or a history that shrank): clear it
                    start = 0
                    ints["fresh"].append(state.row)
                base = state.row * vocab
                # ids beyond the head (an embedding larger than lm_head) have no logit to penalise
                ints["marks"].extend(base + t for t in history[start:] if 0 <= t < vocab)
                marked.append((key, state, len(history)))
                ints["penalised"].append(i)
                ints["mask_row"].append(state.row)
                floats["penalty"].append(p.repetition_penalty)
        fields: dict[str, tuple[int, int, int]] = {}
        packed: tuple[list[int], list[float]] = ([], [])
        for array, names, values in ((0, INT_FIELDS, ints), (1, FLOAT_FIELDS, floats)):
            for name in names:
                start = len(packed[array])
                packed[array].extend(values[name])
                fields[name] = (array, start, len(packed[array]))
        attach = StepAttachment([torch.tensor(packed[0], dtype=torch.int64),
                                 torch.tensor(packed[1], dtype=torch.float32)])
        return SampleBatch(attach, fields, n, len(ints["greedy"]), len(ints["penalised"]), max_top_k, any_top_p,
                           marked, one_off)

    @torch.no_grad()
    def penalise(self, logits: torch.Tensor, batch: SampleBatch) -> torch.Tensor:  # [N, V]
        """Mark the batch's new history tokens in `seen`, then apply the repetition penalty."""
        if batch.num_penalised == 0:
            return logits
        f = batch.views()
        if f["fresh"].numel():
            self.seen.index_fill_(0, f["fresh"], False)
        if f["marks"].numel():
            self.seen.view(-1).index_fill_(0, f["marks"], True)
        return apply_repetition_penalty(logits, f["penalised"], f["penalty"], self.seen.index_select(0, f["mask_row"]))

    @torch.no_grad()
    def sample(
        self,
        logits: torch.Tensor,  # [N, V] float32, last position of each sequence
        batch: SampleBatch,    # prepared for these rows, sent with the step
    ) -> tuple[list[int], list[float]]:
        n, vocab = logits.shape
        if n != batch.num_rows or vocab != self.vocab:
            raise ValueError(f"logits of shape {(n, vocab)} for a batch of {batch.num_rows} rows over {self.vocab}")
        try:
            f = batch.views()
            scores = self.penalise(logits, batch)
            if batch.num_greedy == n:
                tokens = scores.argmax(dim=-1)
            else:
                tokens = torch.empty(n, dtype=torch.long, device=logits.device)
                if batch.num_greedy:
                    tokens.index_copy_(0, f["greedy"], scores.index_select(0, f["greedy"]).argmax(dim=-1))
                warped = apply_temperature_top_k_top_p(
                    scores.index_select(0, f["sampled"]), f["temperature"], f["top_k"], f["top_p"],
                    batch.max_top_k, batch.any_top_p)
                tokens.index_copy_(0, f["sampled"], exponential_race(warped.float(), f["seed"], f["draw"]))
            chosen = logits.gather(1, tokens[:, None]).squeeze(1)
            logprobs = chosen.float() - torch.logsumexp(logits.float(), dim=-1)
            # one transfer (one synchronisation) for the whole step: token ids are exact in float64
            both = torch.stack((tokens.to(torch.float64), logprobs.to(torch.float64))).tolist()
        finally:
            for key in batch.one_off:
                self.release(key)
        for key, state, length in batch.marked:  # the marks are on the device now
            if self._rows.get(key) is state:
                state.marked = length
        return [int(token) for token in both[0]], both[1]

    def sample_direct(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        seeds: Sequence[int | None],
        draws: Sequence[int],
        histories: Sequence[Sequence[int]],
        keys: Sequence[Hashable] | None = None,
    ) -> tuple[list[int], list[float]]:
        """`prepare` and `sample` without a runner: the batch goes to the device with `.to` (tests, tools)."""
        batch = self.prepare(params, seeds, draws, histories, keys)
        batch.attach.device = [t.to(logits.device) for t in batch.attach.host]
        return self.sample(logits, batch)
