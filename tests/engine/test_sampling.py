"""The sampler against Hugging Face's logits processors, and SamplingParams validation."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from loraplex.server.errors import InvalidArgument
from loraplex.server.model.sampling import (
    SamplingParams,
    Sampler,
    apply_repetition_penalty,
    apply_temperature_top_k_top_p,
    make_generator,
)

V = 64


def random_logits(n, seed=0, scale=1.0):
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * scale


def sample(logits, params, generators=None, previous=None):
    n = logits.shape[0]
    generators = generators if generators is not None else [make_generator(i, "cpu") for i in range(n)]
    previous = previous if previous is not None else [[] for _ in range(n)]
    return Sampler().sample(logits, params, generators, previous)


# ---- greedy and logprobs ----


def test_greedy_is_argmax_and_logprob_is_the_raw_log_softmax():
    logits = random_logits(8, scale=3.0)
    tokens, logprobs = sample(logits, [SamplingParams()] * 8)
    assert tokens == logits.argmax(dim=-1).tolist()
    expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(logprobs), expected, atol=1e-6)


def test_logprob_of_a_sampled_row_ignores_penalty_temperature_and_filters():
    logits = random_logits(6, seed=1)
    params = [SamplingParams(temperature=0.3, top_k=5, top_p=0.8, repetition_penalty=1.7)] * 6
    previous = [list(range(V))] * 6  # every token penalised: the chosen one's logit changed too
    tokens, logprobs = sample(logits, params, previous=previous)
    raw = torch.log_softmax(logits, dim=-1)
    for row, (token, logprob) in enumerate(zip(tokens, logprobs)):
        assert logprob == pytest.approx(raw[row, token].item(), abs=1e-6)
        processed = torch.log_softmax(logits[row] / 0.3, dim=-1)[token].item()
        assert abs(logprob - processed) > 1e-3  # the two differ, so the check above means something


def test_greedy_rows_stay_argmax_in_a_batch_with_sampled_rows():
    logits = random_logits(10, seed=2)
    params = [SamplingParams() if i % 2 else SamplingParams(temperature=1.5) for i in range(10)]
    tokens, _ = sample(logits, params)
    argmax = logits.argmax(dim=-1).tolist()
    assert [tokens[i] for i in range(1, 10, 2)] == [argmax[i] for i in range(1, 10, 2)]
    assert [tokens[i] for i in range(0, 10, 2)] != [argmax[i] for i in range(0, 10, 2)]


# ---- top-k, top-p, temperature ----


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=5.0, top_p=1e-6),
        SamplingParams(temperature=5.0, top_p=1e-9),  # 1 - top_p rounds to 1: every token is "removed"
    ],
    ids=["top_k=1", "top_p=1e-6", "top_p=1e-9"],
)
def test_keeping_one_token_equals_greedy(params):
    logits = random_logits(40, seed=3)  # flat enough that an unfiltered draw would often miss argmax
    assert sample(logits, [params] * 40)[0] == logits.argmax(dim=-1).tolist()
    unfiltered = SamplingParams(temperature=params.temperature)
    assert sample(logits, [unfiltered] * 40)[0] != logits.argmax(dim=-1).tolist()


def hf_warp(row, temperature, top_k, top_p):
    scores = TemperatureLogitsWarper(temperature)(None, row[None].clone())
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores[0]


def test_temperature_top_k_top_p_match_hugging_face_warpers():
    logits = random_logits(6, seed=4, scale=2.0)
    logits[0, 7] = logits[0, 9] = logits[0].max() + 1  # a tie at the k-th value: HF keeps both
    logits[5] = -math.inf
    logits[5, 10:14] = 1.0  # four tokens of probability 0.25: the cumulative sums hit 1 - top_p exactly
    rows = [(0.7, 1, 1.0), (1.0, 5, 1.0), (0.5, 0, 0.9), (2.0, 10, 0.6), (1.3, 0, 1.0), (1.0, 0, 0.5)]
    temperatures, top_ks, top_ps = zip(*rows)
    ours = apply_temperature_top_k_top_p(logits, temperatures, top_ks, top_ps)
    for i, (t, k, p) in enumerate(rows):
        theirs = hf_warp(logits[i], t, k, p)
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(theirs)), f"row {i}: kept tokens differ"
        assert torch.allclose(ours[i].softmax(-1), theirs.softmax(-1), atol=1e-6)
    assert torch.isfinite(ours[0]).sum() == 2
    assert 1 < torch.isfinite(ours[2]).sum() < V  # top-p alone did cut something
    assert torch.isfinite(ours[5]).sum() == 2  # HF removes a token whose cumulative sum == 1 - top_p


def test_draws_stay_inside_the_top_k_set_and_cover_it():
    logits = random_logits(1, seed=5)
    params = SamplingParams(temperature=2.0, top_k=3)
    n = 300
    tokens, _ = sample(logits.expand(n, V), [params] * n)
    assert set(tokens) == set(logits[0].topk(3).indices.tolist())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_draw_frequencies_follow_softmax_of_logits_over_temperature(temperature):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 4000
    tokens, _ = Sampler().sample(
        logits.expand(n, -1),
        [SamplingParams(temperature=temperature)] * n,
        [make_generator(10_000 + i, "cpu") for i in range(n)],
        [[]] * n,
    )
    counts = torch.bincount(torch.tensor(tokens), minlength=6).float() / n
    expected = torch.softmax(logits[0] / temperature, dim=-1)
    # 4000 draws: standard error <= 0.008; temperatures 0.5 vs 1 vs 2 differ by >= 0.15 on token 0
    assert torch.allclose(counts, expected, atol=0.03), (counts, expected)


def test_tiny_temperature_does_not_overflow():
    logits = random_logits(4, seed=6, scale=50.0)
    tokens, logprobs = sample(logits, [SamplingParams(temperature=1e-30)] * 4)
    assert tokens == logits.argmax(dim=-1).tolist()
    assert all(math.isfinite(x) for x in logprobs)


# ---- repetition penalty ----


def test_repetition_penalty_matches_hugging_face_processor():
    logits = random_logits(4, seed=7, scale=2.0)
    previous = [[1, 5, 5, 9, 60], [], [2, 3, 4, 2, 63, 0], [7, 8]]
    penalties = [1.3, 1.8, 0.7, 1.0]
    ours = apply_repetition_penalty(logits, penalties, previous)
    for i, (penalty, ids) in enumerate(zip(penalties, previous)):
        processor = RepetitionPenaltyLogitsProcessor(penalty)
        theirs = processor(torch.tensor([ids], dtype=torch.long), logits[i : i + 1])
        assert torch.equal(ours[i], theirs[0])
    assert not torch.equal(ours[0], logits[0]) and not torch.equal(ours[2], logits[2])
    assert torch.equal(ours[3], logits[3])  # penalty 1 is off


def test_repetition_penalty_steers_greedy_away_from_repeated_tokens():
    logits = torch.tensor([[3.0, 2.5, -1.0, 0.1], [3.0, 2.5, -1.0, 0.1]])
    params = [SamplingParams(repetition_penalty=1.5), SamplingParams()]
    tokens, logprobs = sample(logits, params, previous=[[0, 2], [0, 2]])
    assert tokens == [1, 0]  # 3.0 / 1.5 = 2.0 < 2.5 for the penalised row only
    assert logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1)[1].item(), abs=1e-6)


def test_repetition_penalty_ignores_ids_outside_the_logits():
    logits = random_logits(1, seed=8)
    out = apply_repetition_penalty(logits, [2.0], [[V, V + 5, -1, 3]])
    theirs = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[3]]), logits)
    assert torch.equal(out, theirs)


# ---- seeds ----


def decode_steps(seed, others, steps=12):
    """Sample `steps` tokens for one seeded request placed among `others` (params, seed) rows."""
    sampler = Sampler()
    rows = others[: len(others) // 2] + [(SamplingParams(temperature=1.0, top_k=40, seed=seed), seed)]
    rows += others[len(others) // 2 :]
    me = len(others) // 2
    generators = [None if s is None else make_generator(s, "cpu") for _, s in rows]
    previous = [[] for _ in rows]
    out = []
    for step in range(steps):
        logits = random_logits(len(rows), seed=100 + step)
        logits[me] = random_logits(1, seed=1000 + step)[0]  # my row's logits do not depend on the batch
        tokens, _ = sampler.sample(logits, [p for p, _ in rows], generators, previous)
        out.append(tokens[me])
        for prev, token in zip(previous, tokens):
            prev.append(token)
    return out


def test_seeded_request_gives_the_same_tokens_whatever_else_is_in_the_batch():
    alone = decode_steps(42, [])
    others = [
        (SamplingParams(temperature=0.8, seed=7), 7),
        (SamplingParams(), None),
        (SamplingParams(temperature=1.2, top_p=0.9), None),
        (SamplingParams(temperature=1.0, seed=42), 42),  # same seed, another request: own generator
        (SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.2), None),
    ]
    assert decode_steps(42, others) == alone
    assert decode_steps(42, others[:2]) == alone
    assert decode_steps(43, others) != alone
    assert len(set(alone)) > 3  # really sampled, not a constant argmax


def test_unseeded_rows_follow_torch_global_rng():
    logits = random_logits(16, seed=9)
    params = [SamplingParams(temperature=1.0)] * 16
    torch.manual_seed(0)
    first = Sampler().sample(logits, params, [None] * 16, [[]] * 16)[0]
    torch.manual_seed(0)
    again = Sampler().sample(logits, params, [None] * 16, [[]] * 16)[0]
    torch.manual_seed(1)
    other = Sampler().sample(logits, params, [None] * 16, [[]] * 16)[0]
    assert first == again != other


# ---- SamplingParams ----


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "1"),
        ("top_p", 0.0),
        ("top_p", -0.5),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_k", True),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.nan),
        ("repetition_penalty", math.inf),
        ("seed", -1),
        ("seed", 2**64),
        ("seed", 1.5),
        ("max_new_tokens", 0),
        ("max_new_tokens", -4),
        ("max_new_tokens", 8.0),
        ("stop", ("",)),
        ("stop", ("ok", 3)),
        ("stop", ("x" * 257,)),
        ("stop", tuple(str(i) for i in range(17))),
        ("stop", "STOP"),
        ("ignore_eos", 1),
        ("return_logprobs", "yes"),
    ],
)
def test_invalid_values_raise_invalid_argument_naming_the_field(field, value):
    with pytest.raises(InvalidArgument, match=field):
        SamplingParams(**{field: value})


def test_boundary_values_are_accepted():
    params = SamplingParams(
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        repetition_penalty=1e-3,
        seed=2**64 - 1,
        max_new_tokens=1,
        stop=["x" * 256] + [str(i) for i in range(15)],
        ignore_eos=True,
        return_logprobs=True,
    )
    assert params.stop[0] == "x" * 256 and isinstance(params.stop, tuple)
    assert SamplingParams(seed=0, top_p=1e-9, temperature=100.0).seed == 0
    make_generator(2**64 - 1, "cpu")  # the largest seed is one torch accepts


def test_from_proto_values_reads_zero_as_unset():
    unset = SamplingParams.from_proto_values(
        temperature=0.7, top_p=0.0, repetition_penalty=0.0, max_new_tokens=0
    )
    assert unset == SamplingParams(temperature=0.7)
    params = SamplingParams.from_proto_values(
        top_p=0.5, repetition_penalty=1.2, max_new_tokens=3, seed=0, stop=["a"]
    )
    assert params == SamplingParams(top_p=0.5, repetition_penalty=1.2, max_new_tokens=3, seed=0, stop=("a",))
    assert params.seed == 0  # a set seed of 0 is a seed, not "unset"
    with pytest.raises(InvalidArgument, match="top_p"):
        SamplingParams.from_proto_values(top_p=-1.0)


def test_a_sample_that_fails_after_drawing_gives_the_draws_back(monkeypatch):
    """A failed step's requests run again (the engine isolates the failure): they must draw the same
    noise then, as if the failed attempt never happened."""
    logits = random_logits(3, seed=5)
    params = [SamplingParams(temperature=1.0, seed=s) for s in (1, 2, 3)]
    generators = [make_generator(s, "cpu") for s in (1, 2, 3)]
    before = [g.get_state() for g in generators]
    expected = Sampler().sample(logits, params, [make_generator(s, "cpu") for s in (1, 2, 3)], [[]] * 3)

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "logsumexp", broken)  # runs after every row has drawn its noise
        with pytest.raises(RuntimeError, match="injected"):
            Sampler().sample(logits, params, generators, [[]] * 3)
    assert all(torch.equal(g.get_state(), state) for g, state in zip(generators, before))
    assert Sampler().sample(logits, params, generators, [[]] * 3) == expected
