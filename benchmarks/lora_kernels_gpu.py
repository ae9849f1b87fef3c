"""Check the Triton LoRA kernels in bf16/fp16 against the reference, then time them at 7B shapes.

    python benchmarks/lora_kernels_gpu.py [--json results.json]     # on a CUDA machine, < 3 min on an H100
    python benchmarks/lora_kernels_gpu.py --smoke                   # tiny shapes on CPU, interpreted

1. Correctness: shrink and expand (the real shrink -> expand chain) in bfloat16 and float16 against
   the fp32 reference, rank padding poisoned with NaN, mixed ranks 1..64, 1-3 unequal slices,
   decode- and prefill-sized steps, every adapter mix. Any failure makes the exit status 1.
2. Copy bandwidth of the card (1 GiB device-to-device copy).
3. Timing, bf16, rank 16, one decoder layer of a 7B model (h=4096, ffn=11008, LoRA on q/k/v/o and
   gate/up/down in 4 launches each of shrink and expand): 64 decode tokens over 1, 8 and 64 distinct
   adapters, 2048 prefill tokens over 8 adapters. Per module group: shrink, expand and both (GPU
   time, triton.testing.do_bench, L2 flushed between reps), the ideal bytes moved, achieved GB/s,
   fraction of the copy bandwidth, and the speedup over the torch reference and over a peft-style
   loop (peft's mixed-batch forward: per module, per adapter, gather rows, lora_B(lora_A(x)) * s,
   scatter-add). Then the whole layer (4 groups) replayed from one CUDA graph, which also checks
   that the launches capture (no host sync, no allocation).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--smoke" in sys.argv:  # must precede the first import of triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_common.lora import (CASES_7B, CASES_SMOKE, GROUPS_7B, GROUPS_SMOKE, bytes_moved,  # noqa: E402
                               contiguous_slots, make_pools)
from bench_common.lora_checks import CASES as CHECK_CASES, SMOKE_CASES, check_case, check_graph  # noqa: E402
from bench_common.timing import copy_bandwidth, timer  # noqa: E402
from loraplex.kernels.meta import LoRAMeta  # noqa: E402
from loraplex.kernels.testing import expand_reference, shrink_reference  # noqa: E402
from loraplex.kernels.triton.expand import triton_expand  # noqa: E402
from loraplex.kernels.triton.shrink import triton_shrink  # noqa: E402


# ----------------------------------------------------------------------------- correctness
def run_checks(device: torch.device, smoke: bool) -> int:
    cases = SMOKE_CASES if smoke else CHECK_CASES
    dtypes = (torch.float16,) if smoke else (torch.bfloat16, torch.float16)
    failures = 0
    print("## correctness against the fp32 reference")
    for dtype in dtypes:
        for n, (T, hidden, widths, mix) in enumerate(cases):
            err = check_case(T, hidden, widths, mix, dtype, device, seed=n)
            failures += err is not None
            print(f"  {str(dtype)[6:]:9s} T={T:5d} hidden={hidden:5d} slices={widths} {mix:10s} "
                  f"{'ok' if err is None else 'FAIL: ' + err}")
    if device.type == "cuda":
        err = check_graph(device)
        failures += err is not None
        print(f"  CUDA graph: capture once, new slots per replay: {'ok' if err is None else 'FAIL: ' + err}")
    return failures


# ----------------------------------------------------------------------------- timing
def peft_style(x, y, lora_A, lora_B, scaling, slots_host, offsets, widths):
    """peft's LoRA mixed-batch forward, one module (slice) at a time, one adapter at a time."""
    for i, (off, w) in enumerate(zip(offsets, widths)):
        for slot in sorted(set(slots_host) - {-1}):
            rows = [t for t, s in enumerate(slots_host) if s == slot]
            out = F.linear(F.linear(x[rows], lora_A[i][slot]), lora_B[i][slot]) * scaling
            y[rows, off:off + w] += out.to(y.dtype)


def layer_graph_time(device, steps, bench) -> float:
    """GPU time of all groups' shrink+expand replayed from one CUDA graph (no launch overhead)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for step in steps:
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for step in steps:
            step()
    return bench(graph.replay)


def run_timing(device, groups, cases, copy_bw, rank=16, dtype=torch.bfloat16):
    bench = timer(device)
    S = max(c.adapters for c in cases)
    rows, layers = [], []
    for case in cases:
        slots = contiguous_slots(case.tokens, case.adapters)
        slots_host = slots.tolist()
        meta = LoRAMeta.allocate(case.tokens, S, device, max_slices=3, max_rank=rank)
        meta.update(slots.to(device), contiguous=True)
        steps = []
        for name, (hidden, widths) in groups.items():
            p = make_pools(hidden, widths, S, rank, dtype, device)
            x = torch.randn(case.tokens, hidden, device=device).to(dtype)
            y = torch.zeros(case.tokens, sum(widths), device=device, dtype=dtype)
            # One scratch per group: the graph below replays all groups back to back.
            v = torch.empty(len(widths), case.tokens, rank, device=device)

            def shrink(x=x, p=p, v=v):
                triton_shrink(x, p.A, p.ranks, meta, out=v)

            def expand(p=p, v=v, y=y):
                triton_expand(v, p.B_t, p.ranks, p.scalings, meta, y, p.offsets, p.widths)

            def both(shrink=shrink, expand=expand):
                shrink()
                expand()

            def reference():
                vr = shrink_reference(x, p.A, p.ranks, slots)
                expand_reference(vr, p.B_t, p.ranks, p.scalings, slots, y, p.offsets, p.widths)

            lora_A = [[p.A[i, s].contiguous() for s in range(S)] for i in range(len(widths))]
            lora_B = [[p.B_t[s, :, o:o + w].T.contiguous() for s in range(S)] for o, w in
                      zip(p.offsets, p.widths)]

            def peft():
                peft_style(x, y, lora_A, lora_B, 2.0, slots_host, p.offsets, p.widths)

            t = {k: bench(fn) for k, fn in (("shrink", shrink), ("expand", expand), ("both", both))}
            t["reference"] = bench(reference, rep=20)
            t["peft"] = bench(peft, rep=20)
            del lora_A, lora_B
            steps.append(both)
            nbytes = bytes_moved(case.tokens, case.adapters, rank, hidden, widths, p.A.element_size())
            gbs = nbytes["both"] / t["both"]
            rows.append(dict(case=f"{case.name} T={case.tokens} adapters={case.adapters}", group=name,
                             shrink_us=t["shrink"] * 1e6, expand_us=t["expand"] * 1e6, both_us=t["both"] * 1e6,
                             mb=nbytes["both"] / 1e6, gbs=gbs / 1e9, bw_frac=gbs / copy_bw,
                             shrink_bw_frac=nbytes["shrink"] / t["shrink"] / copy_bw,
                             expand_bw_frac=nbytes["expand"] / t["expand"] / copy_bw,
                             reference_us=t["reference"] * 1e6, peft_us=t["peft"] * 1e6,
                             vs_reference=t["reference"] / t["both"], vs_peft=t["peft"] / t["both"]))
        graph_s = layer_graph_time(device, steps, bench) if device.type == "cuda" else float("nan")
        layers.append(dict(case=rows[-1]["case"], graph_us=graph_s * 1e6))
        del steps
    return rows, layers


def print_table(rows, layers, copy_bw):
    print(f"\n## timing: bf16, rank 16, one 7B decoder layer; copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    print("| case | group | shrink µs | expand µs | both µs | MB moved | GB/s | % copy BW (shrink / expand) "
          "| reference µs | peft loop µs | × reference | × peft loop |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['group']} | {r['shrink_us']:.1f} | {r['expand_us']:.1f} | {r['both_us']:.1f} | "
              f"{r['mb']:.1f} | {r['gbs']:.0f} | {100 * r['bw_frac']:.0f}% ({100 * r['shrink_bw_frac']:.0f}% / "
              f"{100 * r['expand_bw_frac']:.0f}%) | {r['reference_us']:.0f} | {r['peft_us']:.0f} | "
              f"{r['vs_reference']:.1f} | {r['vs_peft']:.1f} |")
    by_case: dict[str, list] = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    graph_us = {layer["case"]: layer["graph_us"] for layer in layers}
    print("\n| case | layer µs (sum of groups) | layer µs (one CUDA graph) | MB moved | % copy BW (graph) "
          "| × reference | × peft loop |")
    print("|---|---|---|---|---|---|---|")
    for case, rs in by_case.items():
        both = sum(r["both_us"] for r in rs)
        mb = sum(r["mb"] for r in rs)
        g = graph_us[case]
        print(f"| {case} | {both:.1f} | {g:.1f} | {mb:.1f} | {100 * mb * 1e6 / (g * 1e-6) / copy_bw:.0f}% | "
              f"{sum(r['reference_us'] for r in rs) / both:.1f} | {sum(r['peft_us'] for r in rs) / both:.1f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--skip-checks", action="store_true")
    args = p.parse_args()
    t0 = time.time()
    if args.smoke:
        device, groups, cases = torch.device("cpu"), GROUPS_SMOKE, CASES_SMOKE
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke for a CPU check of this script", file=sys.stderr)
            return 2
        device, groups, cases = torch.device("cuda"), GROUPS_7B, CASES_7B
        import triton
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    failures = 0 if args.skip_checks else run_checks(device, args.smoke)
    copy_bw = copy_bandwidth(device)
    rows, layers = run_timing(device, groups, cases, copy_bw)
    print_table(rows, layers, copy_bw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(torch.cuda.get_device_name()) if device.type == "cuda" else "cpu (smoke)",
                           copy_bw_gbs=copy_bw / 1e9, failures=failures, rows=rows, layers=layers), f, indent=1)
    print(f"\n{failures} correctness failure(s); {time.time() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
