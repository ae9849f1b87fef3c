"""Per-request sampling: validated `SamplingParams` and the batched `Sampler`.

One step of the engine hands the sampler the last-position logits of every running sequence,
`[N, V]` float32, and gets back one token and its logprob per row. Per row, in Hugging Face's order:

    logits ─ repetition penalty ─┬─ temperature == 0: argmax                      (greedy)
                                 └─ / temperature ─ top-k ─ top-p ─ draw           (sampled)
    logprob = log_softmax(raw logits)[token]     (the model's own distribution, as peft reports it)

Each sampled row draws only from its request's own `torch.Generator` (an exponential race over the
vocabulary, consuming exactly V random numbers per step), so a seeded request gives the same tokens
whatever else is in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import torch

from loraplex.server.errors import InvalidArgument

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_SEED = 2**64 - 1
"""torch.Generator.manual_seed takes any unsigned 64-bit value (proto: uint64)."""


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
    """Seeds this request's own generator: same seed, same tokens (on a GPU: for the same batches, see
    docs/api.md). None: seeded from torch's RNG."""
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


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """The generator a request samples from, on the device of the logits.

    seed None draws the seed from torch's default generator, so `torch.manual_seed` makes unseeded
    requests reproducible too (tests), while in service they differ from each other."""
    if seed is None:
        seed = int(torch.randint(0, 2**63 - 1, ()).item())
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def apply_repetition_penalty(
    logits: torch.Tensor,  # [N, V]
    penalties: Sequence[float],
    previous_tokens: Sequence[Sequence[int]],
) -> torch.Tensor:  # [N, V], a new tensor unless no row is penalised
    """Hugging Face's `RepetitionPenaltyLogitsProcessor`, each row with its own penalty: for every
    token in the row's previous tokens, a logit < 0 is multiplied by the penalty, others divided."""
    rows = [i for i, p in enumerate(penalties) if p != 1.0 and len(previous_tokens[i]) > 0]
    if not rows:
        return logits
    vocab = logits.shape[1]
    device = logits.device
    lengths = torch.tensor([len(previous_tokens[i]) for i in rows])
    cols = torch.tensor(list(chain.from_iterable(previous_tokens[i] for i in rows)), dtype=torch.long)
    # ids outside the head (embedding vocab larger than lm_head) go to a spare column, dropped below
    cols = torch.where((cols < 0) | (cols >= vocab), vocab, cols)
    row_of_col = torch.repeat_interleave(torch.arange(len(rows)), lengths)
    mask = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=device)
    mask[row_of_col.to(device), cols.to(device)] = True  # duplicate ids set the same flag twice: fine
    row_index = torch.tensor(rows, device=device)
    penalty = torch.tensor([penalties[i] for i in rows], dtype=logits.dtype, device=device)[:, None]
    selected = logits[row_index]
    penalised = torch.where(selected < 0, selected * penalty, selected / penalty)
    out = logits.clone()
    out[row_index] = torch.where(mask[:, :vocab], penalised, selected)
    return out


def apply_temperature_top_k_top_p(
    logits: torch.Tensor,  # [M, V]
    temperatures: Sequence[float],  # each > 0
    top_ks: Sequence[int],  # 0 = off
    top_ps: Sequence[float],  # 1 = off
) -> torch.Tensor:  # [M, V], removed tokens at -inf
    """Hugging Face's Temperature, TopK and TopP warpers in that order, each row with its own values.

    Rows are shifted by their maximum first: the same distribution, but a tiny temperature cannot
    overflow the scaled logits to inf (which would make the softmax NaN)."""
    device = logits.device
    vocab = logits.shape[1]
    temperature = torch.tensor(temperatures, dtype=logits.dtype, device=device)[:, None]
    scores = (logits - logits.amax(dim=-1, keepdim=True)) / temperature

    active_k = [0 < k < vocab for k in top_ks]
    if any(active_k):
        k = torch.tensor([k if a else 1 for k, a in zip(top_ks, active_k)], device=device)
        top = torch.topk(scores, max(k if a else 1 for k, a in zip(top_ks, active_k))).values  # host max: no sync
        kth = top.gather(1, (k - 1)[:, None])
        kth = torch.where(torch.tensor(active_k, device=device)[:, None], kth, -math.inf)
        scores = scores.masked_fill(scores < kth, -math.inf)  # ties with the k-th all stay, as in HF

    if any(p < 1.0 for p in top_ps):
        sorted_scores, sorted_index = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        threshold = 1 - torch.tensor(top_ps, dtype=cumulative.dtype, device=device)[:, None]
        remove = cumulative <= threshold  # top_p == 1 removes only tokens of probability 0
        remove[:, -1] = False  # the most likely token always stays
        remove = remove.scatter(1, sorted_index, remove)
        scores = scores.masked_fill(remove, -math.inf)
    return scores


class Sampler:
    """Chooses the next token of every row of a step; stateless apart from the fallback generator."""

    def __init__(self) -> None:
        self._fallback: dict[torch.device, torch.Generator] = {}

    def _fallback_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._fallback:
            self._fallback[device] = make_generator(None, device)
        return self._fallback[device]

    @torch.no_grad()
    def sample(
        self,
        logits: torch.Tensor,  # [N, V] float32, last position of each sequence
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],  # per row; None: a sampler-wide one
        previous_tokens: Sequence[Sequence[int]],  # per row, prompt + output so far
    ) -> tuple[list[int], list[float]]:
        n, vocab = logits.shape
        assert len(params) == len(generators) == len(previous_tokens) == n, "one entry per logits row"
        device = logits.device
        tokens = torch.empty(n, dtype=torch.long, device=device)

        scores = apply_repetition_penalty(
            logits, [p.repetition_penalty for p in params], previous_tokens
        )
        greedy = [i for i, p in enumerate(params) if p.greedy]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if len(greedy) == n:
            tokens = scores.argmax(dim=-1)
        elif greedy:
            index = torch.tensor(greedy, device=device)
            tokens[index] = scores[index].argmax(dim=-1)

        if sampled:
            index = torch.tensor(sampled, device=device)
            warped = apply_temperature_top_k_top_p(
                scores[index],
                [params[i].temperature for i in sampled],
                [params[i].top_k for i in sampled],
                [params[i].top_p for i in sampled],
            )
            # Exponential race: argmax(p / q), q ~ Exp(1) i.i.d., picks token t with probability p[t];
            # in log space so tokens whose probability underflows keep their (tiny) chance.
            noise = torch.empty(len(sampled), vocab, dtype=torch.float32, device=device)
        # (generator, state before its draw): a step that fails after drawing gives the draws back, so
        # its requests draw the same noise when they run again (a host-side copy, no device sync)
        drawn: list[tuple[torch.Generator, torch.Tensor]] = []
        try:
            if sampled:
                for row, i in enumerate(sampled):
                    generator = generators[i]
                    if generator is None:
                        generator = self._fallback_generator(device)
                    drawn.append((generator, generator.get_state()))
                    noise[row].exponential_(generator=generator)
                noise.clamp_(min=torch.finfo(torch.float32).tiny)  # q == 0 would give -inf - -inf = NaN
                tokens[index] = (warped - noise.log()).argmax(dim=-1)

            chosen = logits.gather(1, tokens[:, None]).squeeze(1)
            logprobs = chosen.float() - torch.logsumexp(logits.float(), dim=-1)
            # one transfer (one synchronisation) for the whole step: token ids are exact in float64
            both = torch.stack((tokens.to(torch.float64), logprobs.to(torch.float64))).tolist()
            return [int(token) for token in both[0]], both[1]
        except BaseException:
            for generator, state in reversed(drawn):
                generator.set_state(state)
            raise
