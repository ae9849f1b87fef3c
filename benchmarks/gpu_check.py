"""The one prepared GPU check of loraplex: what a session lent a GPU runs first.

    python benchmarks/gpu_check.py                 # CUDA: <= 8 min on an H100/H200
    python benchmarks/gpu_check.py --smoke         # CPU, tiny shapes, float32, Triton interpreter (the logic only)

The JSON result goes to ``--json FILE``, else to ``$OUT/gpu_check.json`` when ``$OUT`` is set; it is
rewritten after every section, so a run stopped early keeps what it found. HF_HUB_OFFLINE=1 is set
before anything imports huggingface_hub (the device has no network; every model here is made locally).
Sections, most information first, each a module of gpu_check_sections/ (this file runs them in order
and writes the JSON); each is independent (a failure is recorded with its traceback and the next
section runs):

0. preflight What the rest needs from the machine, written before any other section (whatever --only
             says): a C compiler and Python.h, with which Triton builds its launcher stubs (without
             either no Triton kernel launches on CUDA: kernels, attention, engine, nf4, decode fail),
             and accelerate (without it transformers cannot load the 4-bit model: nf4, train qlora).
1. kernels   Triton shrink/expand in bfloat16 and float16 against the float32 reference (mixed ranks,
             poisoned rank padding, 1-3 unequal slices, every adapter mix), then one CUDA graph captured
             once and replayed with new slots.
2. attention The Triton paged attention kernel in bfloat16 and float16 against the float32 reference
             (decode and prefill chunks, ragged contexts ending mid-block, GQA, a window, prefix padding),
             then decode at 4,096-token contexts (64 sequences, 32 query / 8 KV heads, head_dim 128): K/V
             bytes over kernel time against measured copy bandwidth (target >= ATTENTION_TARGET), the
             time of the torch path (gathered K/V + SDPA) on the same batch, and the same fraction for
             4 sequences (keys split over programs).
3. engine    The whole engine in bfloat16 on a random GQA Llama with every adapter type (LoRA with
             mixed ranks, DoRA, AdaLoRA, IA3, prefix, prompt, P-tuning) and the base model in one mixed
             batch, against each request alone and against peft's forward: the largest logprob
             difference (peft scoring the engine's own tokens; bound BF16_LOGPROB_TOL), the greedy token
             agreement rate and the first differing position (bf16 near-ties may flip; wrong adapters,
             devices or offsets show as large logprob differences from the first token on).
4. nf4       The same on an NF4 base (DoRA's norms from the dequantized 4-bit weights), and the peak GPU
             memory of a 2,048-token prefill.
5. decode    Decode step time at batch 64 (64 requests, each its own rank-16 LoRA adapter) against the
             bandwidth floor (base weights + each distinct adapter's bytes once / measured copy
             bandwidth; target <= DECODE_FLOOR_TARGET), whether decode ran as captured CUDA graphs, the same
             batch's decode throughput with 8 distinct adapters over the base model's (target >=
             MIXED_OVER_BASE_TARGET), kernel launches per step and the GPU-busy fraction of a step.
6. load      Host -> device adapter load time (host tier -> device slot: pinned, already in the
             serving dtype, copied on the runner's copy stream) against the PCIe floor (adapter bytes /
             measured pinned host-to-device bandwidth; target <= 2x), and the host time until
             ``load_slot`` returns (what the step loop waits for).
7. train     ``loraplex train --method qlora`` and ``--method dora`` for a few dozen steps on the GPU:
             the loss falls, and the adapter is then served (its greedy tokens against peft's).

With ``--smoke`` every section runs on the CPU at toy sizes; what only CUDA can show (graphs, peak
memory, launches, busy fraction, PCIe) is recorded as "skipped: needs CUDA".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # read when huggingface_hub is imported (by transformers, peft)
SMOKE = "--smoke" in sys.argv
if SMOKE:  # before the first import of triton; the engine's LoRA then runs the interpreted Triton kernels
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["LORAPLEX_LORA_BACKEND"] = "triton"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check_sections.attention import section_attention  # noqa: E402
from gpu_check_sections.context import GPU_SIZES, SMOKE_SIZES, Context  # noqa: E402
from gpu_check_sections.decode import section_decode  # noqa: E402
from gpu_check_sections.engine import section_engine  # noqa: E402
from gpu_check_sections.kernels import section_kernels  # noqa: E402
from gpu_check_sections.load import section_load  # noqa: E402
from gpu_check_sections.nf4 import section_nf4  # noqa: E402
from gpu_check_sections.preflight import section_preflight  # noqa: E402
from gpu_check_sections.train import section_train  # noqa: E402

SECTIONS = (("kernels", section_kernels), ("attention", section_attention), ("engine", section_engine),
            ("nf4", section_nf4),
            ("decode", section_decode), ("load", section_load), ("train", section_train))


def environment(ctx: Context) -> dict:
    import transformers
    import triton

    info = dict(smoke=ctx.smoke, device=str(ctx.device), dtype=ctx.dtype, python=sys.version.split()[0],
                torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__)
    try:
        import bitsandbytes
        import peft

        info.update(peft=peft.__version__, bitsandbytes=bitsandbytes.__version__)
    except ImportError as error:
        info["missing"] = str(error)
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, sms=props.multi_processor_count)
    return info


def run_section(run, ctx: Context) -> dict:
    """The section's result with its status and seconds; an exception is recorded with its traceback."""
    started = time.monotonic()
    try:
        result = run(ctx)
        result["status"] = "ok" if result.get("ok", True) else "failed"
    except Exception:  # noqa: BLE001 - recorded, and the next section runs
        result = dict(status="error", traceback=traceback.format_exc())
    result["seconds"] = time.monotonic() - started
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, float32, Triton interpreter")
    parser.add_argument("--json", type=Path, help="result file (default: $OUT/gpu_check.json when $OUT is set)")
    parser.add_argument("--only", help="comma-separated sections to run (default: all; preflight always runs)")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds; sections not started by then are skipped (default 450)")
    parser.add_argument("--workdir", type=Path, help="keep models and adapters here (default: a temporary directory)")
    args = parser.parse_args()
    started = time.monotonic()
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for a CPU check of this script", file=sys.stderr)
        return 2
    out = args.json or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    only = set(args.only.split(",")) if args.only else {name for name, _ in SECTIONS}
    names = ["preflight"] + [name for name, _ in SECTIONS]  # preflight runs whatever --only says
    unknown = only - set(names)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {names}")
    if args.smoke:
        torch.set_num_threads(1)  # tiny ops: a second thread only adds stalls on a shared machine

    with tempfile.TemporaryDirectory(prefix="loraplex-gpu-check-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ctx = Context(device=torch.device("cpu" if args.smoke else "cuda:0"),
                      dtype="float32" if args.smoke else "bfloat16",
                      sizes=SMOKE_SIZES if args.smoke else GPU_SIZES, work=work, smoke=args.smoke)
        report: dict = dict(sections={})

        def save() -> None:
            report["seconds"] = time.monotonic() - started
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(report, indent=1, default=str) + "\n")

        report["sections"]["preflight"] = run_section(section_preflight, ctx)
        save()  # before anything imports transformers or launches a kernel
        report["environment"] = environment(ctx)
        save()
        for name, run in SECTIONS:
            if name not in only:
                continue
            elapsed = time.monotonic() - started
            if elapsed > args.budget:
                report["sections"][name] = dict(status=f"skipped: budget ({elapsed:.0f} s of {args.budget:.0f} s spent)")
                save()
                continue
            print(f"[{elapsed:6.1f}s] {name} ...", file=sys.stderr, flush=True)
            result = run_section(run, ctx)
            report["sections"][name] = result
            print(f"[{time.monotonic() - started:6.1f}s] {name}: {result['status']}", file=sys.stderr, flush=True)
            if ctx.cuda:
                torch.cuda.empty_cache()
            save()
    print(json.dumps({name: {key: value for key, value in section.items() if not isinstance(value, (dict, list))}
                      for name, section in report["sections"].items()}, indent=1, default=str))
    return 0 if all(section["status"] == "ok" for section in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
