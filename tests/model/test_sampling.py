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
)

V = 64


def random_logits(n, seed=0, scale=1.0):
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * scale


def sample(logits, params, seeds=None, previous=None):
    n = logits.shape[0]
    seeds = seeds if seeds is not None else list(range(n))
    previous = previous if previous is not None else [[] for _ in range(n)]
    return Sampler(logits.shape[1]).sample_direct(logits, params, seeds, [0] * n, previous)


def sent(batch):
    """The batch as the runner leaves it: device views of its host arrays (here copies, on CPU)."""
    batch.attach.device = [t.clone() for t in batch.attach.host]
    return batch


def warp(logits, temperatures, top_ks, top_ps):
    top_ks = [k if k < logits.shape[1] else 0 for k in top_ks]
    return apply_temperature_top_k_top_p(logits, torch.tensor(temperatures), torch.tensor(top_ks),
                                         torch.tensor(top_ps), max(top_ks), any(p < 1 for p in top_ps))


def penalise(logits, penalties, previous, sampler=None):
    sampler = sampler or Sampler(logits.shape[1])
    n = logits.shape[0]
    batch = sampler.prepare([SamplingParams(repetition_penalty=p) for p in penalties], [None] * n, [0] * n,
                            previous, keys=list(range(n)))
    return sampler.penalise(logits, sent(batch))


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
    ours = warp(logits, temperatures, top_ks, top_ps)
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
    tokens, _ = sample(logits.expand(n, -1), [SamplingParams(temperature=temperature)] * n,
                       seeds=[10_000 + i for i in range(n)])
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
    ours = penalise(logits, penalties, previous)
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
    out = penalise(logits, [2.0], [[V, V + 5, -1, 3]])
    theirs = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[3]]), logits)
    assert torch.equal(out, theirs)


# ---- seeds ----


def decode_steps(seed, others, steps=12):
    """Sample `steps` tokens for one seeded request placed among `others` (params, seed) rows."""
    sampler = Sampler(V)
    rows = others[: len(others) // 2] + [(SamplingParams(temperature=1.0, top_k=40, seed=seed), seed)]
    rows += others[len(others) // 2 :]
    me = len(others) // 2
    seeds = [s if s is not None else 1000 + i for i, (_, s) in enumerate(rows)]
    previous = [[] for _ in rows]
    out = []
    for step in range(steps):
        logits = random_logits(len(rows), seed=100 + step)
        logits[me] = random_logits(1, seed=1000 + step)[0]  # my row's logits do not depend on the batch
        tokens, _ = sampler.sample_direct(logits, [p for p, _ in rows], seeds, [step] * len(rows), previous,
                                          keys=list(range(len(rows))))
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
        (SamplingParams(temperature=1.0, seed=2**64 - 1), 2**64 - 1),
        (SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.2), None),
    ]
    assert decode_steps(42, others) == alone
    assert decode_steps(42, others[:2]) == alone
    assert decode_steps(42, others[::-1]) == alone  # another row of the batch
    assert decode_steps(43, others) != alone
    assert len(set(alone)) > 3  # really sampled, not a constant argmax


def test_the_draw_number_selects_the_noise():
    logits = random_logits(1, seed=9).expand(16, V)
    params = [SamplingParams(temperature=1.0)] * 16
    sampler = Sampler(V)
    first = sampler.sample_direct(logits, params, [5] * 16, list(range(16)), [[]] * 16)[0]
    assert sampler.sample_direct(logits, params, [5] * 16, list(range(16)), [[]] * 16)[0] == first
    assert len(set(first)) > 3  # same seed, each draw its own noise
    assert sampler.sample_direct(logits, params, [6] * 16, list(range(16)), [[]] * 16)[0] != first


def test_the_penalty_mask_follows_each_sequence_across_steps_and_row_changes():
    """Rows marked step by step (only the new tokens sent) penalise exactly as a fresh mask would, also
    when sequences end, rows are reused, and a sequence absent from a step loses its row to another."""
    sampler = Sampler(V, max_rows=3)
    histories = {key: [key, 2 * key + 1, V + key] for key in range(6)}  # V + key: beyond the head
    live = [0, 1, 2]
    for step in range(8):
        if step == 3:
            sampler.release(1)  # finished: its row goes to 3
            live = [0, 2, 3]
        if step == 5:
            live = [4, 5]  # 0, 2 and 3 hold every row: 4 and 5 take the oldest holders', 0 and 2
        if step == 7:
            live = [0, 3]  # 0 re-marks its whole history (in 4's row); 3 kept its row
        logits = random_logits(len(live), seed=step, scale=3.0)
        penalties = [1.5 + 0.1 * key for key in live]
        batch = sent(sampler.prepare([SamplingParams(repetition_penalty=p) for p in penalties], [None] * len(live),
                                     [0] * len(live), [histories[k] for k in live], keys=live))
        _, start, stop = batch.fields["marks"]
        fresh = {0: live, 3: [3], 5: live, 7: [0]}.get(step, [])
        assert stop - start == sum(sum(t < V for t in histories[k]) if k in fresh else 1 for k in live)
        ours = sampler.penalise(logits, batch)
        tokens, _ = sampler.sample(logits, batch)  # marks the same tokens again: no harm
        assert torch.equal(ours, penalise(logits, penalties, [histories[k] for k in live]))
        assert tokens == ours.argmax(dim=-1).tolist()
        for key, token in zip(live, tokens):
            histories[key].append(token)
    with pytest.raises(ValueError, match="3 mask rows"):
        sampler.prepare([SamplingParams(repetition_penalty=2.0)] * 4, [None] * 4, [0] * 4, [[1]] * 4,
                        keys=[10, 11, 12, 13])


def test_a_failed_step_leaves_the_penalty_mask_consistent(monkeypatch):
    """A step can fail before its marks reach the device (the runner raised) or after (the sampler
    raised): either way the rerun penalises as if the failed attempt never happened."""
    logits = random_logits(2, seed=5)
    logits[0, 1], logits[0, 20] = 4.0, 3.0  # penalised, 4 / 1.7 < 3: greedy picks 20
    params = [SamplingParams(repetition_penalty=1.7), SamplingParams(temperature=1.0, seed=2, repetition_penalty=1.7)]
    previous = [[1, 2, 3], [4, 5]]
    expected = Sampler(V).sample_direct(logits, params, [1, 2], [3, 3], previous, keys=["a", "b"])
    assert expected[0][0] == 20
    sampler = Sampler(V)
    sampler.prepare(params, [1, 2], [3, 3], previous, keys=["a", "b"])  # never sent: execute raised

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "logsumexp", broken)  # after the marks and the draws
        with pytest.raises(RuntimeError, match="injected"):
            sampler.sample_direct(logits, params, [1, 2], [3, 3], previous, keys=["a", "b"])
    assert sampler.sample_direct(logits, params, [1, 2], [3, 3], previous, keys=["a", "b"]) == expected
    previous[0].append(expected[0][0])
    previous[1].append(expected[0][1])
    again = Sampler(V).sample_direct(logits, params, [1, 2], [4, 4], previous, keys=["a", "b"])
    assert sampler.sample_direct(logits, params, [1, 2], [4, 4], previous, keys=["a", "b"]) == again


def test_prepare_refuses_what_it_cannot_sample():
    sampler = Sampler(V)
    hot = SamplingParams(temperature=1.0)
    with pytest.raises(ValueError, match="seed"):
        sampler.prepare([hot], [None], [0], [[]])
    with pytest.raises(ValueError, match="seed"):
        sampler.prepare([hot], [2**64], [0], [[]])
    with pytest.raises(ValueError, match="draw number"):
        sampler.prepare([hot], [1], [-1], [[]])
    with pytest.raises(ValueError, match="one seed"):
        sampler.prepare([hot], [1], [0, 0], [[]])
    with pytest.raises(ValueError, match="twice"):
        sampler.prepare([hot, hot], [1, 2], [0, 0], [[], []], keys=[3, 3])
    with pytest.raises(RuntimeError, match="not sent"):
        sampler.sample(random_logits(1), sampler.prepare([hot], [1], [0], [[]]))
    with pytest.raises(ValueError, match="logits of shape"):
        sampler.sample_direct(random_logits(2), [hot], [1], [0], [[]])


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
    assert sample(random_logits(1), [SamplingParams(temperature=1.0, seed=2**64 - 1)], seeds=[2**64 - 1])[0]


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
