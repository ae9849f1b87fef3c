"""Which torch strategy should serve LoRA on CPU: per-segment matmuls or gather + bmm?

    .venv/bin/python benchmarks/lora_torch_cpu.py [--quick]

Times shrink + expand (one module, h_in = h_out = hidden, rank r, float32) for the segment loop of
``loraplex.kernels.torch_ops`` and the gather strategy below side by side in one run, at decode sizes (T = 16..64 tokens over
4-16 adapters) and prefill sizes, tokens laid out contiguously by slot as the engine does.
Prints a markdown table; ratio > 1 means the segment loop is faster.
"""

from __future__ import annotations

import argparse
import time

import torch

from loraplex.kernels import torch_ops
from loraplex.kernels.meta import LoRAMeta


def gather_shrink(x, A, ranks, meta, out):
    """Every token's weights gathered, rank padding zeroed, one batched matmul per slice."""
    num_slices, _, R, _ = A.shape
    slots = meta.slots.long()
    has = slots >= 0
    sc = slots.clamp(min=0)
    cols = torch.arange(R, device=x.device)
    for i in range(num_slices):
        keep = (cols < ranks[i].long()[sc].unsqueeze(1)) & has.unsqueeze(1)
        # Zero the gathered rank padding: a matmul may mix a NaN row into the others (CPU bf16 does).
        w = torch.where(keep.unsqueeze(2), A[i].index_select(0, sc), 0.0)   # [T, R, in]
        res = torch.bmm(w, x.unsqueeze(-1)).squeeze(-1)       # [T, R]
        out[i] = torch.where(keep, res.float(), 0.0)
    return out


def gather_expand(v, B_t, ranks, scalings, meta, y, offsets, widths):
    slots = meta.slots.long()
    has = slots >= 0
    sc = slots.clamp(min=0)
    cols = torch.arange(v.shape[2], device=y.device)
    w_all = B_t.index_select(0, sc)                           # [T, R, out_total]
    for i, (off, w) in enumerate(zip(offsets, widths)):
        r_t = ranks[i].long()[sc]
        keep = (cols < r_t.unsqueeze(1)) & has.unsqueeze(1)
        vs = torch.where(keep, v[i].float(), 0.0).to(B_t.dtype)
        # Zero the gathered rank padding too: 0 · (whatever the pool holds there) must stay 0.
        b = torch.where(keep.unsqueeze(2), w_all[:, :, off:off + w], 0.0)
        delta = torch.bmm(vs.unsqueeze(1), b).squeeze(1)      # [T, w]
        s = torch.where(has & (r_t > 0), scalings[i][sc], 0.0).unsqueeze(1)
        ys = y[:, off:off + w]
        touched = (has & (r_t > 0)).unsqueeze(1)
        ys.copy_(torch.where(touched, (ys.float() + s * delta.float()).to(y.dtype), ys))
    return y


def _time(fn, reps: int) -> float:
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return min(samples)  # the machine is shared: the minimum is the least disturbed sample


def run_case(T: int, n_adapters: int, hidden: int, rank: int, num_slices: int, reps: int) -> dict:
    S = max(n_adapters, 16)
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(num_slices, S, rank, hidden, generator=gen) * 0.05
    B_t = torch.randn(S, rank, num_slices * hidden, generator=gen) * 0.05
    ranks = torch.full((num_slices, S), rank, dtype=torch.int32)
    scalings = torch.full((num_slices, S), 2.0)
    slots = torch.sort(torch.arange(T) % n_adapters).values  # contiguous by slot
    meta = LoRAMeta.allocate(T, S, "cpu").update(slots, contiguous=True)
    x = torch.randn(T, hidden, generator=gen)
    y = torch.zeros(T, num_slices * hidden)
    v = torch.empty(num_slices, T, rank)

    plans = torch_ops.PlanCache()

    def segment():
        torch_ops.torch_shrink(x, A, ranks, meta, out=v, plans=plans)
        torch_ops.torch_expand(v, B_t, ranks, scalings, meta, y, plans=plans)

    def gather():
        gather_shrink(x, A, ranks, meta, v)
        gather_expand(v, B_t, ranks, scalings, meta, y, tuple(range(0, num_slices * hidden, hidden)),
                      (hidden,) * num_slices)

    seg = _time(segment, reps)
    gat = _time(gather, reps)
    return dict(T=T, adapters=n_adapters, hidden=hidden, rank=rank, slices=num_slices,
                segment_us=seg * 1e6, gather_us=gat * 1e6)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer cases and repetitions")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared, loaded machine 2 threads "
                        "stall for milliseconds in tiny ops and the timings mean nothing)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    reps = 5 if args.quick else 20
    cases = [(T, a, 512, 16, 1) for T in (16, 32, 64) for a in (4, 8, 16)]
    cases += [(64, 16, 512, 16, 3), (512, 4, 512, 16, 1), (2048, 8, 512, 16, 1), (2048, 8, 2048, 16, 1)]
    if args.quick:
        cases = [cases[0], cases[8], cases[-3]]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, contiguous layout")
    print("| T | adapters | hidden | rank | slices | segment loop (µs) | gather+bmm (µs) | gather / segment |")
    print("|---|---|---|---|---|---|---|---|")
    for case in cases:
        r = run_case(*case, reps=reps)
        print(f"| {r['T']} | {r['adapters']} | {r['hidden']} | {r['rank']} | {r['slices']} | "
              f"{r['segment_us']:.0f} | {r['gather_us']:.0f} | {r['gather_us'] / r['segment_us']:.2f} |")


if __name__ == "__main__":
    main()
