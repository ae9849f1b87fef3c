"""Regenerate the block-size table in kernels/triton/configs.py by timing candidates at the benchmark shapes.

    python benchmarks/tune_lora_kernels.py            # on a CUDA machine: print the new table (~5-10 min on an H100)
    python benchmarks/tune_lora_kernels.py --write    # ... and rewrite kernels/triton/configs.py between its markers
    python benchmarks/tune_lora_kernels.py --quick    # a smaller search (~2 min)
    python benchmarks/tune_lora_kernels.py --smoke    # tiny shapes and search on CPU, interpreted (checks the script)

For each shape class (decode: the 64-token cases with 1/8/64 rank-16 adapters; prefill: 2048 tokens
over 8 adapters), on the four module groups of a 7B decoder layer in bf16: for each tile height
block_m, the shrink and expand candidates are timed independently (their times add up) and the
best pair is kept; the block_m with the smallest total wins. Candidates that fail to compile (e.g.
too much shared memory) are skipped.
"""

from __future__ import annotations

import argparse
import itertools
import os
import pprint
import sys
from pathlib import Path

if "--smoke" in sys.argv:  # must precede the first import of triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from bench_common.lora import CASES_7B, CASES_SMOKE, GROUPS_7B, GROUPS_SMOKE, contiguous_slots, make_pools  # noqa: E402
from bench_common.timing import timer  # noqa: E402
from bench_common.tuning import BEGIN, END, emit, provenance  # noqa: E402
from loraplex.kernels.triton import configs  # noqa: E402
from loraplex.kernels.triton.expand import triton_expand  # noqa: E402
from loraplex.kernels.meta import LoRAMeta  # noqa: E402
from loraplex.kernels.triton.shrink import triton_shrink  # noqa: E402

CONFIGS_PY = Path(__file__).resolve().parent.parent / "kernels" / "triton" / "configs.py"


def search_space(shape_class: str, quick: bool, smoke: bool, allow_split_k: bool = False) -> dict:
    if smoke:
        return dict(block_m=[16], shrink=[dict(block_n=16, block_k=k, split_k=s, num_warps=4, num_stages=2)
                                          for k, s in [(32, 1), (64, 2)]],
                    expand=[dict(block_n=n, block_r=16, num_warps=4, num_stages=2) for n in (32, 64)])
    if shape_class == "decode":
        block_m = [16]
        ks, splits, warps, stages = (128, 256, 512), (1, 2, 4, 8), (4,), (2, 3)
        ns, ewarps, estages = (64, 128, 256), (4, 8), (1, 2)
    else:
        block_m = [32, 64, 128]
        ks, splits, warps, stages = (64, 128), (1, 2, 4), (4, 8), (2, 3)
        ns, ewarps, estages = (64, 128, 256), (4, 8), (2,)
    if not allow_split_k:  # split_k > 1 adds with float atomics: the same step would not give the same bits
        splits = (1,)
    if quick:
        block_m = block_m[-2:] if len(block_m) > 1 else block_m
        ks, warps, stages, ewarps, estages = ks[-2:], warps[:1], stages[:1], ewarps[:1], estages[-1:]
    return dict(
        block_m=block_m,
        shrink=[dict(block_n=16, block_k=k, split_k=s, num_warps=w, num_stages=st)
                for k, s, w, st in itertools.product(ks, splits, warps, stages)],
        expand=[dict(block_n=n, block_r=16, num_warps=w, num_stages=st)
                for n, w, st in itertools.product(ns, ewarps, estages)])


def workloads(device, groups, cases, rank=16, dtype=torch.bfloat16):
    """[(case, meta, group tensors)] for the cases of one shape class, meta left to update per block_m."""
    S = max(c.adapters for c in cases)
    out = []
    for case in cases:
        slots = contiguous_slots(case.tokens, case.adapters).to(device)
        meta = LoRAMeta.allocate(case.tokens, S, device, min_block_m=16)
        tensors = []
        for hidden, widths in groups.values():
            p = make_pools(hidden, widths, S, rank, dtype, device)
            x = torch.randn(case.tokens, hidden, device=device).to(dtype)
            y = torch.zeros(case.tokens, sum(widths), device=device, dtype=dtype)
            v = torch.zeros(len(widths), case.tokens, rank, device=device)
            tensors.append((p, x, y, v))
        out.append((slots, meta, tensors))
    return out


def total_time(bench, loads, kernel: str, cfg: dict) -> float:
    total = 0.0
    for _, meta, tensors in loads:
        for p, x, y, v in tensors:
            if kernel == "shrink":
                fn = lambda: triton_shrink(x, p.A, p.ranks, meta, out=v, config=cfg)  # noqa: E731
            else:
                fn = lambda: triton_expand(v, p.B_t, p.ranks, p.scalings, meta, y, p.offsets, p.widths,  # noqa: E731
                                           config=cfg)
            try:
                fn()
                total += bench(fn, rep=30)
            except Exception as e:  # noqa: BLE001 - a candidate that does not compile is skipped
                print(f"    skip {kernel} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                return float("inf")
    return total


def tune_class(shape_class, device, groups, cases, quick, smoke, allow_split_k=False):
    bench = timer(device)
    loads = workloads(device, groups, [c for c in cases if c.name == shape_class])
    space = search_space(shape_class, quick, smoke, allow_split_k)
    best = None
    for block_m in space["block_m"]:
        for slots, meta, _ in loads:
            meta.update(slots, contiguous=True, block_m=block_m)
        picks = {}
        for kernel in ("shrink", "expand"):
            timed = [(total_time(bench, loads, kernel, cfg), cfg) for cfg in space[kernel]]
            t, cfg = min(timed, key=lambda tc: tc[0])
            picks[kernel] = (t, cfg)
            print(f"  {shape_class} block_m={block_m} {kernel}: best {t * 1e6:.1f} µs with {cfg}")
        total = picks["shrink"][0] + picks["expand"][0]
        if best is None or total < best[0]:
            best = (total, dict(block_m=block_m, shrink=picks["shrink"][1], expand=picks["expand"][1]))
    return best


def render(table: dict, note: str) -> str:
    body = pprint.pformat(table, indent=4, width=110, sort_dicts=False)
    return (f"{BEGIN} (generated by benchmarks/tune_lora_kernels.py) ---\n# {note}\n"
            f"DECODE_MAX_TOKENS = {configs.DECODE_MAX_TOKENS}\nTABLE = {body}\n{END}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help=f"rewrite {CONFIGS_PY} (between its markers)")
    p.add_argument("--quick", action="store_true", help="a smaller search space")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--allow-split-k", action="store_true",
                   help="also try split_k > 1 (float atomics: identical steps may then differ in the last bits)")
    args = p.parse_args()
    if args.smoke:
        device, groups, cases, card = torch.device("cpu"), GROUPS_SMOKE, CASES_SMOKE, "cpu (smoke)"
    elif torch.cuda.is_available():
        device, groups, cases, card = torch.device("cuda"), GROUPS_7B, CASES_7B, torch.cuda.get_device_name()
    else:
        print("no CUDA device: run with --smoke for a CPU check of this script", file=sys.stderr)
        return 2
    table, totals = {}, []
    for shape_class in configs.SHAPE_CLASSES:
        total, entry = tune_class(shape_class, device, groups, cases, args.quick, args.smoke,
                                  args.allow_split_k)
        table[shape_class] = entry
        totals.append(f"{shape_class} {total * 1e6:.0f} µs")
    block = render(table, provenance(card, totals, "sum over the benchmark's groups and cases"))
    return emit(block, CONFIGS_PY, args.write, args.smoke)


if __name__ == "__main__":
    sys.exit(main())
