"""Seeded sampling without generator objects: Philox noise addressed by (seed, draw, token), and the
exponential race over it. The torch implementation (CPU, and the reference of the Triton kernel in
``kernels/triton/exponential_race.py``, which draws the same uniforms bit for bit).

Semantics, for row m with 64-bit seed s and draw number d (how many tokens the request sampled before):

    x        = Philox4x32-10(key = (s mod 2**32, s >> 32), counter = (v // 4, d mod 2**32, d >> 32, 0))[v % 4]
    u[m, v]  = (2 * (x >> 9) + 1) * 2**-24          uniform on 2**23 points of (0, 1), exact in float32
    token[m] = argmax_v(scores[m, v] - log(-log(u[m, v])))       (NaN scores never win)

-log(u) is Exp(1), so argmax(p / q) with q ~ Exp(1) picks token v with probability softmax(scores)[v]
(the exponential race, or Gumbel-max); in log space so tokens whose probability underflows keep their
tiny chance. A row's noise depends on (s, d) only, never on the batch or the row it sits in. Worked
example: seed 7, third token (d = 2), token 5 reads word 1 of Philox(key (7, 0), counter (1, 2, 0, 0)).
u is never 0 or 1 (no infinite key); 23 bits make tokens of probability below ~1e-7 slightly off.
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
ROUNDS = 10
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85  # Random123's Weyl increments of the key
MUL_A, MUL_B = 0xD2511F53, 0xCD9E8D57  # Random123's round multipliers


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b, a < 2**32 and b in [0, 2**32) held in int64: b is split in
    16-bit halves so every product stays below 2**49."""
    low = a * (b & 0xFFFF)
    high = a * (b >> 16)  # a * b = high * 2**16 + low
    s = ((high & 0xFFFF) << 16) + low
    return (high >> 16) + (s >> 32), s & M32


def philox4x32(c0, c1, c2, c3, k0, k1) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding uint32 values (broadcastable); returns the 4 words."""
    for _ in range(ROUNDS):
        hi_b, lo_b = _mul32(MUL_B, c2)
        hi_a, lo_a = _mul32(MUL_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & M32, (k1 + KEY_B) & M32
    return c0, c1, c2, c3


def seed_bits(seed: int) -> int:
    """A seed in [0, 2**64) as the int64 with the same bits (how rows carry it in the step buffer)."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed - 2**64 if seed >= 2**63 else seed


def uniforms(
    seeds: torch.Tensor,  # [M] int64, the seeds' bits (seed_bits)
    draws: torch.Tensor,  # [M] int64, >= 0
    vocab: int,
) -> torch.Tensor:  # [M, vocab] float32 in (0, 1)
    seeds, draws = seeds.long()[:, None], draws.long()[:, None]
    counter = torch.arange(-(-vocab // 4), device=seeds.device)[None, :]  # one Philox call serves 4 tokens
    words = philox4x32(counter, draws & M32, draws >> 32, torch.zeros_like(counter), seeds & M32, (seeds >> 32) & M32)
    x = torch.stack(words, dim=-1).flatten(1)[:, :vocab]  # token v: word v % 4 of counter v // 4
    return ((x >> 9) * 2 + 1).to(torch.float32) * 2.0**-24


def exponential_race_torch(
    scores: torch.Tensor,  # [M, V] float32, removed tokens at -inf
    seeds: torch.Tensor,   # [M] int64
    draws: torch.Tensor,   # [M] int64
) -> torch.Tensor:  # [M] int64
    keys = scores - torch.log(-torch.log(uniforms(seeds, draws, scores.shape[1])))
    return torch.where(keys.isnan(), -torch.inf, keys).argmax(dim=-1)


def exponential_race(scores: torch.Tensor, seeds: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """The race of every row in one launch on CUDA (Triton), in torch elsewhere; same uniforms."""
    if scores.device.type == "cuda":
        from .triton.exponential_race import triton_exponential_race

        return triton_exponential_race(scores, seeds, draws)
    return exponential_race_torch(scores, seeds, draws)
