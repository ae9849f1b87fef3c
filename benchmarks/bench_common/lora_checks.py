"""Correctness of the Triton LoRA kernels against the float32 reference, shared by lora_kernels_gpu.py and
the GPU check's kernels section: rank padding poisoned with NaN, mixed ranks, 1-3 unequal slices, every
adapter mix, and one CUDA graph captured once and replayed with new slots."""

from __future__ import annotations

import torch

from bench_common.lora import make_pools
from loraplex.kernels.meta import LoRAMeta
from loraplex.kernels.testing import expand_reference, shrink_reference
from loraplex.kernels.triton.expand import triton_expand
from loraplex.kernels.triton.shrink import triton_shrink

TOLERANCE = {torch.bfloat16: dict(atol=6e-2, rtol=3e-2), torch.float16: dict(atol=1e-2, rtol=1e-2),
             torch.float32: dict(atol=1e-4, rtol=1e-4)}
RANKS = (1, 8, 16, 64)
# (tokens, hidden, slice widths, adapter mix): decode- and prefill-sized steps, odd hidden sizes
CASES = ((1, 96, (96,), "identical"), (7, 200, (200, 53, 53), "no_adapter"),
         (64, 4096, (4096, 1024, 1024), "distinct"), (133, 3424, (3424, 1715), "skewed"),
         (2048, 4096, (4096, 1024, 1024), "zipf"), (300, 11008, (4096,), "no_adapter"))
# --smoke: small enough for the Triton interpreter
SMOKE_CASES = CASES[:2] + ((133, 200, (200, 96), "skewed"),)


def slots_for(mix: str, T: int, S: int, gen: torch.Generator) -> torch.Tensor:
    if mix == "distinct":
        s = torch.arange(T) % S
    elif mix == "identical":
        s = torch.full((T,), 3)
    elif mix == "zipf":
        p = 1.0 / torch.arange(1, S + 1, dtype=torch.float64)
        s = torch.multinomial(p / p.sum(), T, replacement=True, generator=gen)
    elif mix == "skewed":
        s = torch.zeros(T, dtype=torch.long)
        s[: min(3, T - 1)] = torch.arange(1, min(3, T - 1) + 1)
    else:  # no_adapter
        s = torch.randint(0, S // 2, (T,), generator=gen)
        s[torch.rand(T, generator=gen) < 1 / 3] = -1
    return s[torch.randperm(T, generator=gen)].to(torch.int32)


def check_case(T, hidden, widths, mix, dtype, device, seed) -> str | None:
    """None if the kernels match the reference, else a description of the mismatch."""
    gen = torch.Generator().manual_seed(seed)
    S, R, ns = 12, 64, len(widths)
    slots = slots_for(mix, T, S, gen)
    ranks = torch.tensor(RANKS)[torch.randint(len(RANKS), (ns, S), generator=gen)].to(torch.int32)
    if ns > 1:
        ranks[-1, int(slots.max().clamp(min=0))] = 0
    offsets = tuple(sum(widths[:i]) for i in range(ns))
    out_total = sum(widths)
    A = torch.randn(ns, S, R, hidden, generator=gen) / hidden ** 0.5
    B_t = torch.randn(S, R, out_total, generator=gen) / 4
    for s in range(S):
        for i in range(ns):
            r = int(ranks[i, s])
            A[i, s, r:] = float("nan")
            B_t[s, r:, offsets[i]:offsets[i] + widths[i]] = float("nan")
    scalings = 0.5 + 1.5 * torch.rand(ns, S, generator=gen)
    scalings[ranks == 0] = float("nan")
    x = torch.randn(T, hidden, generator=gen)
    y0 = torch.randn(T, out_total, generator=gen)
    x, A, B_t, y0 = (t.to(dtype).to(device) for t in (x, A, B_t, y0))
    ranks, scalings, slots_d = ranks.to(device), scalings.to(device), slots.to(device)

    meta = LoRAMeta.allocate(max(T, 16), S, device).update(slots_d)
    v = torch.full((ns, T, R), 12345.0, device=device)
    triton_shrink(x, A, ranks, meta, out=v)
    y = y0.clone()
    triton_expand(v, B_t, ranks, scalings, meta, y, offsets, widths)

    v_ref = shrink_reference(x, A, ranks, slots)
    y_ref = expand_reference(v_ref, B_t, ranks, scalings, slots, y0.clone(), offsets, widths)
    slots_l = slots.long()
    r_t = ranks.cpu().long()[:, slots_l.clamp(min=0)]
    vmask = ((torch.arange(R) < r_t.unsqueeze(-1)) & (slots_l >= 0).view(1, -1, 1)).to(device)
    touched = torch.zeros(T, out_total, dtype=torch.bool)
    for i in range(ns):
        touched[:, offsets[i]:offsets[i] + widths[i]] = ((slots_l >= 0) & (r_t[i] > 0)).unsqueeze(1)
    touched = touched.to(device)
    try:
        torch.testing.assert_close(v[vmask], v_ref[vmask], **TOLERANCE[torch.float32])
        rest = v[~vmask]
        assert ((rest == 12345.0) | (rest == 0)).all(), "shrink wrote outside v[:, t, :rank]"
        assert torch.equal(y[~touched], y0[~touched]), "expand changed y outside its tokens/slices"
        torch.testing.assert_close(y[touched].float(), y_ref[touched].float(), **TOLERANCE[dtype])
    except AssertionError as e:
        return str(e).splitlines()[0]
    return None


def check_graph(device: torch.device) -> str | None:
    """Capture shrink+expand in a CUDA graph, change the step's slots (same T), replay, compare."""
    T, hidden, widths, S, R = 64, 512, (512, 128, 128), 16, 16
    ns = len(widths)
    p = make_pools(hidden, widths, S, R, torch.bfloat16, device)
    p.ranks[:, 1::2] = 8
    p.ranks[2, 3] = 0
    meta = LoRAMeta.allocate(T, S, device, max_slices=ns, max_rank=R)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(T, hidden, device=device).to(torch.bfloat16)
    y0 = torch.randn(T, sum(widths), device=device).to(torch.bfloat16)
    y = y0.clone()

    def step():
        v = meta.workspace(ns, R)
        triton_shrink(x, p.A, p.ranks, meta, out=v)
        triton_expand(v, p.B_t, p.ranks, p.scalings, meta, y, p.offsets, p.widths)

    meta.update(slots_for("zipf", T, S, gen).to(device))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for mix in ("no_adapter", "distinct", "skewed"):
        slots = slots_for(mix, T, S, gen)
        meta.update(slots.to(device))     # outside the graph: rewrites the buffers in place
        y.copy_(y0)
        graph.replay()
        v_ref = shrink_reference(x, p.A, p.ranks, slots)
        y_ref = expand_reference(v_ref, p.B_t, p.ranks, p.scalings, slots, y0.clone(), p.offsets, p.widths)
        try:
            torch.testing.assert_close(y.float(), y_ref.float(), **TOLERANCE[torch.bfloat16])
        except AssertionError as e:
            return f"{mix}: " + str(e).splitlines()[0]
    return None
