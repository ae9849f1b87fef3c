"""The GPU run of `loraplex bench` (issue 7), in one command, under 5 minutes on an H100/H200.

    bash scripts/install.sh                                      # CUDA torch + loraplex into .venv
    .venv/bin/python benchmarks/engine_gpu.py --json engine-gpu.json
    .venv/bin/python benchmarks/engine_gpu.py --smoke            # CPU, toy sizes: checks the script only

Model: Llama-shaped, ~1.0 B parameters (hidden 2048, 22 layers, MLP 5632, 32 heads, 4 KV heads;
TinyLlama's shape with a 2,048-token vocabulary), random weights, saved in bfloat16. Adapters: 64
peft LoRA adapters, rank 16 on all 7 projections. Workload: 64 concurrent requests, each on its own
adapter ("distinct"), 128-token prompts, 32 new tokens, against the same requests on the base model.

It runs the base in bfloat16 and then in NF4 (bitsandbytes, bfloat16 compute). For each it prints
`loraplex bench`'s table: (a) mixed, (b) base, (c) peft `generate` with `adapter_names` (bfloat16
only by default: peft's loop over 64 adapters is the slowest part of the run), (d) transformers
`generate`; the ratios; and the decode step time against the bandwidth floor (base weights + the
step's 64 adapters read once at the card's measured copy bandwidth).

Budget (estimated, not yet measured on a GPU): generating the model and adapters ~30 s, loading
~45 s, the bfloat16 runs ~70 s (peft's generate over 64 adapters ~20 s a run) plus Triton compiles,
the NF4 phase ~1 min. `--deadline` (seconds, default 280) skips the NF4 phase if fewer than 80 s are
left, and says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from loraplex.server.bench.compare import bench_local
from loraplex.server.bench.config import BenchConfig
from loraplex.server.bench.report import render
from loraplex.server.bench.workload import ModelShape

GPU = BenchConfig(
    shape=ModelShape(hidden_size=2048, num_layers=22, intermediate_size=5632, num_heads=32, num_kv_heads=4,
                     vocab_size=2048),
    num_adapters=64, ranks=(16,), popularity="distinct", batch=64, prompt_len=128, new_tokens=32,
    dtype="bfloat16", device="cuda", rounds=2, warmup=1, threads=0,
)
SMOKE = BenchConfig(
    shape=ModelShape(hidden_size=64, num_layers=2, intermediate_size=160, num_heads=4, num_kv_heads=2, vocab_size=300),
    num_adapters=4, ranks=(4,), batch=4, prompt_len=8, new_tokens=4, dtype="float32", device="cpu", rounds=1,
    warmup=0, threads=1,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="FILE", help="write both results as JSON")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU (checks the script, not the speed)")
    parser.add_argument("--nf4-peft", action="store_true", help="also run (c) on the NF4 base")
    parser.add_argument("--workdir", type=Path, help="keep the model and adapters here (default: a temporary directory)")
    parser.add_argument("--deadline", type=float, default=280.0, help="seconds for the whole run (default 280)")
    args = parser.parse_args()
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    import torch

    base = SMOKE if args.smoke else GPU
    if base.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on CPU", file=sys.stderr)
        return 2
    runs = [("bfloat16", replace(base, dtype="bfloat16" if not args.smoke else base.dtype)),
            ("nf4", replace(base, quantization="nf4", peft=args.nf4_peft or args.smoke,
                            dtype="bfloat16" if not args.smoke else base.dtype))]
    results = {}
    with tempfile.TemporaryDirectory(prefix="loraplex-gpu-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        for name, config in runs:
            elapsed = time.monotonic() - started
            if results and elapsed > args.deadline - 80:  # the NF4 phase (no peft) takes about a minute
                log(f"skipping {name}: {elapsed:.0f} s spent of the {args.deadline:.0f} s deadline")
                results[name] = {"skipped": f"deadline ({elapsed:.0f} s spent)"}
                continue
            log(f"{name}: starting")
            result = bench_local(config, workdir, log)
            results[name] = result
            print(render(result), flush=True)
            log(f"{name}: done")
    summary = {name: {key: result.get(key) for key in ("mixed_over_base", "mixed_over_peft", "base_over_hf",
                                                       "peft_over_hf", "bandwidth", "skipped")}
               for name, result in results.items()}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    log("finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
