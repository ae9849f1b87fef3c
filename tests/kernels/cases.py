"""Random LoRA problems for the kernel tests: adapter mixes, mixed ranks, poisoned rank padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIXES = ("distinct", "identical", "zipf", "skewed", "no_adapter")
RANK_CHOICES = (1, 8, 16, 64)

# Poison for shrink's output: finite, so that a NaN read from rank padding shows up in v.
V_POISON = 12345.0

# Absolute and relative tolerance against the fp32 reference, per input dtype.
TOLERANCE = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=3e-2),
}


def token_slots(mix: str, T: int, S: int, gen: torch.Generator) -> torch.Tensor:
    """Per-token slots (−1 = no adapter) in random order.

    distinct:   tokens spread round-robin over every slot (one token per slot when T <= S)
    identical:  every token on one slot
    zipf:       slot k drawn with probability ∝ 1/(k+1)
    skewed:     one slot takes all but a few tokens, each of the others gets one (punica's deadlock case)
    no_adapter: a third of the tokens have no adapter, the rest spread over half the slots
    """
    if mix == "distinct":
        slots = torch.arange(T) % S
    elif mix == "identical":
        slots = torch.full((T,), int(torch.randint(S, (1,), generator=gen)))
    elif mix == "zipf":
        p = 1.0 / torch.arange(1, S + 1, dtype=torch.float64)
        slots = torch.multinomial(p / p.sum(), T, replacement=True, generator=gen)
    elif mix == "skewed":
        slots = torch.zeros(T, dtype=torch.long)
        few = min(T - 1, S - 1, 3)
        if few > 0:
            slots[:few] = torch.arange(1, few + 1)
    elif mix == "no_adapter":
        slots = torch.randint(0, max(1, S // 2), (T,), generator=gen)
        slots[torch.rand(T, generator=gen) < 1 / 3] = -1
    else:
        raise ValueError(mix)
    perm = torch.randperm(T, generator=gen)
    return slots[perm].to(torch.int32)


def slice_widths(num_slices: int, hidden: int) -> tuple[int, ...]:
    """Unequal widths (a GQA-like q/k/v), none a multiple of the usual block sizes."""
    return {1: (hidden,), 2: (hidden, hidden // 2 + 3), 3: (hidden, hidden // 4 + 1, hidden // 4 + 1)}[num_slices]


@dataclass
class Problem:
    x: torch.Tensor          # [T, hidden]
    A: torch.Tensor          # [num_slices, S, max_rank, hidden], rows >= rank are NaN
    B_t: torch.Tensor        # [S, max_rank, out_total], rows >= rank are NaN
    ranks: torch.Tensor      # [num_slices, S] int32
    scalings: torch.Tensor   # [num_slices, S] fp32, NaN where the rank is 0
    slots: torch.Tensor      # [T] int32
    offsets: tuple[int, ...]
    widths: tuple[int, ...]
    y0: torch.Tensor         # [T, out_total], the base output before expand

    def rank_mask(self) -> torch.Tensor:
        """[num_slices, T, max_rank]: True where v is defined (token has a slot, column < rank)."""
        ns, _, R, _ = self.A.shape
        slots = self.slots.long()
        r_t = self.ranks.long()[:, slots.clamp(min=0)]                 # [ns, T]
        return (torch.arange(R) < r_t.unsqueeze(-1)) & (slots >= 0).view(1, -1, 1)

    def touched(self) -> torch.Tensor:
        """[T, out_total]: True where expand may change y."""
        slots = self.slots.long()
        mask = torch.zeros(self.y0.shape, dtype=torch.bool)
        for i, (off, w) in enumerate(zip(self.offsets, self.widths)):
            r_t = self.ranks.long()[i, slots.clamp(min=0)]
            mask[:, off:off + w] = ((slots >= 0) & (r_t > 0)).unsqueeze(1)
        return mask


def make_problem(T: int, hidden: int, num_slices: int, mix: str, dtype: torch.dtype, seed: int,
                 S: int = 12, max_rank: int = 64, rank_zero: bool = True) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    slots = token_slots(mix, T, S, gen)
    idx = torch.randint(len(RANK_CHOICES), (num_slices, S), generator=gen)
    ranks = torch.tensor(RANK_CHOICES)[idx].clamp(max=max_rank).to(torch.int32)
    used = sorted(set(slots.tolist()) - {-1})
    # Every rank in one batch: the used slots cycle through RANK_CHOICES on slice 0.
    for j, slot in enumerate(used):
        ranks[0, slot] = min(RANK_CHOICES[j % len(RANK_CHOICES)], max_rank)
    if rank_zero and num_slices > 1 and used:
        ranks[num_slices - 1, used[0]] = 0   # an adapter that does not target the last slice
    widths = slice_widths(num_slices, hidden)
    offsets = tuple(sum(widths[:i]) for i in range(num_slices))
    out_total = sum(widths)

    x = torch.randn(T, hidden, generator=gen)
    A = torch.randn(num_slices, S, max_rank, hidden, generator=gen) / hidden ** 0.5
    B_t = torch.randn(S, max_rank, out_total, generator=gen) / 4.0
    nan = float("nan")
    for s in range(S):
        for i, (off, w) in enumerate(zip(offsets, widths)):
            r = int(ranks[i, s])
            A[i, s, r:] = nan                      # kernels must never read rank padding
            B_t[s, r:, off:off + w] = nan
    scalings = (0.5 + 1.5 * torch.rand(num_slices, S, generator=gen)).float()
    scalings[ranks == 0] = float("nan")          # rank-0 slices must be skipped, not scaled by 0
    y0 = torch.randn(T, out_total, generator=gen)
    return Problem(x.to(dtype), A.to(dtype), B_t.to(dtype), ranks, scalings, slots, offsets, widths,
                   y0.to(dtype))


def layout(problem: Problem, contiguous: bool) -> tuple[Problem, bool]:
    """For contiguous=True, reorder the tokens so each slot's tokens form one run (as the engine does)."""
    if not contiguous:
        return problem, False
    key = problem.slots.long().clone()
    key[key < 0] = 1 << 20
    perm = torch.sort(key, stable=True).indices
    p = problem
    return Problem(p.x[perm].contiguous(), p.A, p.B_t, p.ranks, p.scalings, p.slots[perm].contiguous(),
                   p.offsets, p.widths, p.y0[perm].contiguous()), True


def check_v(v: torch.Tensor, v_ref: torch.Tensor, mask: torch.Tensor, **tol) -> None:
    """v matches where defined; elsewhere it holds the poison or 0 (split-K zeroes v), nothing else."""
    assert not v[mask].isnan().any(), "shrink left NaN in v[:, t, :rank] (read rank padding?)"
    assert (v[mask] != V_POISON).all(), "shrink left part of v[:, t, :rank] unwritten"
    torch.testing.assert_close(v[mask], v_ref[mask], **tol)
    rest = v[~mask]
    assert ((rest == V_POISON) | (rest == 0)).all(), "shrink wrote v outside [:, t, :rank]"
