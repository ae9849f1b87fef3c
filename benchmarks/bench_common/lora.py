"""LoRA kernel workloads shared by the kernel benchmark, the tuner and the GPU check: a 7B layer's shapes,
the cases timed, random adapter pools and the bytes a perfect kernel moves."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# One decoder layer of a 7B-class model (Llama-2-7B: no GQA), LoRA on all 7 projections, grouped by
# shared input as the engine launches them: name -> (in_features, slice widths).
GROUPS_7B = {
    "qkv": (4096, (4096, 4096, 4096)),
    "o": (4096, (4096,)),
    "gate_up": (4096, (11008, 11008)),
    "down": (11008, (4096,)),
}
# Tiny stand-ins for --smoke runs on CPU under the Triton interpreter.
GROUPS_SMOKE = {
    "qkv": (96, (96, 32, 32)),
    "o": (96, (96,)),
    "gate_up": (96, (200, 200)),
    "down": (200, (96,)),
}


@dataclass(frozen=True)
class Case:
    name: str
    tokens: int
    adapters: int   # distinct adapters, tokens split evenly and laid out contiguously by slot


CASES_7B = (Case("decode", 64, 1), Case("decode", 64, 8), Case("decode", 64, 64), Case("prefill", 2048, 8))
CASES_SMOKE = (Case("decode", 8, 1), Case("decode", 8, 8), Case("prefill", 160, 4))


@dataclass
class Pools:
    A: torch.Tensor          # [num_slices, S, r, in]
    B_t: torch.Tensor        # [S, r, out_total]
    ranks: torch.Tensor      # [num_slices, S] int32
    scalings: torch.Tensor   # [num_slices, S] fp32
    offsets: tuple[int, ...]
    widths: tuple[int, ...]


def make_pools(in_features: int, widths: tuple[int, ...], slots: int, rank: int, dtype: torch.dtype,
               device: torch.device, seed: int = 0) -> Pools:
    gen = torch.Generator(device=device).manual_seed(seed)
    ns = len(widths)
    out_total = sum(widths)
    A = (torch.randn(ns, slots, rank, in_features, generator=gen, device=device) / in_features ** 0.5).to(dtype)
    B_t = (torch.randn(slots, rank, out_total, generator=gen, device=device) / rank ** 0.5).to(dtype)
    ranks = torch.full((ns, slots), rank, dtype=torch.int32, device=device)
    scalings = torch.full((ns, slots), 2.0, dtype=torch.float32, device=device)
    offsets = tuple(sum(widths[:i]) for i in range(ns))
    return Pools(A, B_t, ranks, scalings, offsets, tuple(widths))


def contiguous_slots(tokens: int, adapters: int) -> torch.Tensor:
    """Slots 0..adapters-1, each on an equal run of tokens (the engine's layout)."""
    return (torch.arange(tokens) * adapters // tokens).to(torch.int32)


def bytes_moved(tokens: int, adapters: int, rank: int, in_features: int, widths: tuple[int, ...],
                esize: int) -> dict[str, int]:
    """Bytes a perfect kernel moves: each distinct adapter's r rows once, activations once.

    shrink: A rows of every slice + x + v written (fp32); expand: B_t rows + v read + y read and written.
    """
    ns, out_total = len(widths), sum(widths)
    v = ns * tokens * rank * 4
    shrink = adapters * ns * rank * in_features * esize + tokens * in_features * esize + v
    expand = adapters * rank * out_total * esize + v + 2 * tokens * out_total * esize
    return {"shrink": shrink, "expand": expand, "both": shrink + expand}
