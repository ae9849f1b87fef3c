"""The exponential race: the Triton kernel (interpreted on CPU) against the torch implementation, and the
properties of the noise both draw (Philox4x32-10 addressed by seed, draw number and token)."""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels.exponential_race import exponential_race_torch, philox4x32, seed_bits, uniforms
from loraplex.kernels.triton.exponential_race import triton_exponential_race

SEEDS = [0, 1, 7, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]


def as_rows(seeds, draws):
    return torch.tensor([seed_bits(s) for s in seeds]), torch.tensor(draws)


@pytest.mark.parametrize("counter, key, expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_matches_random123_known_answers(counter, key, expected):
    words = philox4x32(*(torch.tensor([c]) for c in counter), *(torch.tensor([k]) for k in key))
    assert tuple(w.item() for w in words) == expected


@pytest.mark.parametrize("M, V", [(1, 1), (3, 5), (8, 1000), (5, 2051)])
def test_triton_draws_the_reference_uniforms_and_tokens_exactly(M, V):
    g = torch.Generator().manual_seed(M * V)
    scores = torch.randn(M, V, generator=g) * 3
    scores[0, : V // 2] = -torch.inf  # a filtered row
    if M > 2:
        scores[1] = -torch.inf  # every token removed: token 0, as torch.argmax
        scores[2, V // 3] = torch.nan  # NaN never wins
    seeds, draws = as_rows([SEEDS[i % len(SEEDS)] for i in range(M)], [(i * 2**31 + i) for i in range(M)])
    drawn = torch.full((M, V), -1.0)
    tokens = triton_exponential_race(scores, seeds, draws, uniforms=drawn)
    assert torch.equal(drawn, uniforms(seeds, draws, V))
    assert torch.equal(tokens, exponential_race_torch(scores, seeds, draws))
    if M > 2:
        assert tokens[1] == 0 and tokens[2] != V // 3
    assert bool(((drawn > 0) & (drawn < 1)).all())


def test_a_row_draws_the_same_whatever_else_is_in_the_batch():
    V = 300
    seeds, draws = as_rows(SEEDS, list(range(len(SEEDS))))
    together = uniforms(seeds, draws, V)
    for i in range(len(SEEDS)):
        alone = uniforms(seeds[i : i + 1], draws[i : i + 1], V)
        assert torch.equal(alone[0], together[i])
    flipped = uniforms(seeds.flip(0), draws.flip(0), V)
    assert torch.equal(flipped, together.flip(0))


def test_seeds_and_draws_select_different_noise():
    V = 64
    u = uniforms(*as_rows(SEEDS + [7, 7], [0] * len(SEEDS) + [1, 2**32]), V)
    assert len({tuple(row.tolist()) for row in u}) == len(u)  # every (seed, draw) its own stream


def test_uniforms_are_uniform():
    u = uniforms(*as_rows(range(200), [3] * 200), 1000).flatten()
    counts = torch.bincount((u * 50).long(), minlength=50).double()
    expected = u.numel() / 50
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 49 + 8 * 10  # 49 degrees of freedom: mean 49, sd ~10
    assert u.mean().item() == pytest.approx(0.5, abs=0.002)


def test_tokens_follow_the_softmax_over_many_draws():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, -torch.inf])
    n = 20_000
    tokens = exponential_race_torch(logits.expand(n, -1), *as_rows([2**64 - 1] * n, list(range(n))))
    counts = torch.bincount(tokens, minlength=7).double()
    assert counts[6] == 0
    expected = torch.softmax(logits[:6].double(), dim=0) * n
    chi2 = ((counts[:6] - expected) ** 2 / expected).sum().item()
    assert chi2 < 5 + 8 * 3.2  # 5 degrees of freedom: mean 5, sd ~3.2


def test_seeds_outside_64_bits_are_refused():
    assert seed_bits(2**64 - 1) == -1 and seed_bits(2**63) == -(2**63)
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match="seed"):
            seed_bits(bad)


def test_the_launcher_checks_its_arguments():
    scores = torch.zeros(2, 8)
    seeds, draws = as_rows([1, 2], [0, 0])
    with pytest.raises(ValueError, match="seeds has 1 rows"):
        triton_exponential_race(scores, seeds[:1], draws)
    with pytest.raises(TypeError, match="draws has dtype int32"):
        triton_exponential_race(scores, seeds, draws.int())
    with pytest.raises(TypeError, match="scores has dtype float16"):
        triton_exponential_race(scores.half(), seeds, draws)
