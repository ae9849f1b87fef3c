"""`loraplex bench`: throughput and latency of mixed-adapter batches, side by side in one process.

One workload (a batch of requests, all submitted at once) runs on:

    (a) loraplex, each request on the adapter a popularity law draws for it (distinct/uniform/zipf)
    (b) loraplex, the same requests on the base model only
    (c) peft `generate` with `adapter_names`: the same model, adapters and batch
    (d) transformers `generate` on the base model: the same batch

The model and adapters are generated (random weights, saved with `save_pretrained`, read back
through the real load paths). Systems run in rounds that rotate their order; every reported ratio is
the median over rounds of the ratio within a round, so slow drift of a shared machine cancels out.
The defaults are the CPU target workload: hidden 512 × 8 layers, 16 distinct rank-16 adapters on
all 7 projections, batch 16, 32-token prompts, 32 new tokens.

`--scale` runs the adapter-swapping benchmark instead (`scale`), `--shared-prefix` the prefix-caching
one (`prefix`), `--grpc ADDRESS` drives a running server with concurrent streaming clients instead of
an in-process engine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from loraplex.server.bench.compare import bench_grpc, bench_local
from loraplex.server.bench.config import BenchConfig
from loraplex.server.bench.report import machine_info, render, render_scale
from loraplex.server.bench.workload import ALL_PROJECTIONS, POPULARITY_LAWS, ModelShape
from loraplex.server.errors import UserError


# --------------------------------------------------------------------------------------------- CLI
def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    if text == "all":
        return ALL_PROJECTIONS
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure mixed-adapter throughput against the base model, peft and transformers",
        description=__doc__.split("\n\n")[0] + " Defaults are the CPU target workload.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Ratios: mixed_over_base = (a)/(b), mixed_over_peft = (a)/(c), base_over_hf = (b)/(d), "
        "each the median over rounds of the within-round ratio.",
    )
    defaults = BenchConfig()
    shape = ModelShape()
    model = parser.add_argument_group("model (generated, random weights)")
    model.add_argument("--hidden", type=int, default=shape.hidden_size, help=f"hidden size (default {shape.hidden_size})")
    model.add_argument("--layers", type=int, default=shape.num_layers, help=f"decoder layers (default {shape.num_layers})")
    model.add_argument("--intermediate", type=int, help="MLP size (default ~8/3 × hidden, a multiple of 32)")
    model.add_argument("--heads", type=int, default=shape.num_heads, help=f"attention heads (default {shape.num_heads})")
    model.add_argument("--kv-heads", type=int, default=shape.num_kv_heads,
                       help=f"key/value heads (default {shape.num_kv_heads})")
    model.add_argument("--vocab", type=int, default=shape.vocab_size,
                       help=f"vocabulary size, at most ~2080 (the bundled corpus' BPE; default {shape.vocab_size})")
    model.add_argument("--quantization", choices=("none", "nf4", "int8"), default=defaults.quantization,
                       help="base weights (default none)")
    model.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default float32 on CPU, bfloat16 on CUDA")
    model.add_argument("--device", default=defaults.device, help="cpu or cuda[:N] (default cpu)")
    model.add_argument("--adapter-dtype", choices=("auto", "bfloat16"), default=defaults.adapter_dtype,
                       help="loraplex's LoRA weight storage, as `serve --adapter-dtype` (default auto: the "
                       "model's dtype; bfloat16: half the bytes, float32 CPU models only)")
    adapters = parser.add_argument_group("adapters (peft LoRA, random non-zero weights)")
    adapters.add_argument("--adapters", type=int, default=defaults.num_adapters, metavar="N",
                          help=f"adapters to generate (default {defaults.num_adapters})")
    adapters.add_argument("--ranks", type=_ints, default=defaults.ranks, metavar="R[,R...]",
                          help="rank, or ranks cycled over the adapters for mixed ranks (default 16)")
    adapters.add_argument("--targets", type=_names, default=defaults.targets, metavar="NAMES",
                          help="projections, comma-separated, or 'all' (default all 7)")
    adapters.add_argument("--popularity", choices=POPULARITY_LAWS, default=defaults.popularity,
                          help="how requests pick adapters (default distinct)")
    adapters.add_argument("--zipf-s", type=float, default=defaults.zipf_s, help="zipf exponent (default 1.0)")
    load = parser.add_argument_group("workload and measurement")
    load.add_argument("--batch", type=int, default=defaults.batch, help=f"concurrent requests (default {defaults.batch})")
    load.add_argument("--prompt-len", type=int, default=defaults.prompt_len, help=f"prompt tokens (default {defaults.prompt_len})")
    load.add_argument("--new-tokens", type=int, default=defaults.new_tokens,
                      help=f"generated tokens per request (default {defaults.new_tokens})")
    load.add_argument("--rounds", type=int, default=defaults.rounds, help=f"measured rounds (default {defaults.rounds})")
    load.add_argument("--warmup", type=int, default=defaults.warmup, help=f"unmeasured rounds (default {defaults.warmup})")
    load.add_argument("--threads", type=int, default=defaults.threads,
                      help="torch intra-op threads (default 0: torch's default, one per core, as a server runs; "
                      "on a VM shared with busy neighbours, 1 gives steadier numbers)")
    load.add_argument("--seed", type=int, default=defaults.seed, help="seed of weights, adapters and draws (default 0)")
    load.add_argument("--no-peft", action="store_true", help="skip (c)")
    load.add_argument("--no-hf", action="store_true", help="skip (d)")
    load.add_argument("--workdir", type=Path, metavar="DIR",
                      help="keep the generated model and adapters here and reuse them when the settings match "
                      "(default: a temporary directory, removed afterwards)")
    load.add_argument("--json", nargs="?", const="-", metavar="FILE",
                      help="write the results as JSON to FILE, or to stdout without FILE (the table then goes to stderr)")
    prefix = parser.add_argument_group("shared-prefix run (--shared-prefix): prefix caching on and off")
    prefix.add_argument("--shared-prefix", action="store_true",
                        help="run the prefix-caching benchmark instead: each adapter's requests start with its own "
                        "system prompt, followed by a --prompt-len user turn")
    prefix.add_argument("--system-len", type=int, default=512, metavar="N",
                        help="tokens of each adapter's system prompt (default 512)")
    scale = parser.add_argument_group("scale run (--scale): many adapters, few device slots")
    scale.add_argument("--scale", action="store_true",
                       help="run the adapter-swapping benchmark (zipf over many adapters) instead")
    scale.add_argument("--scale-adapters", type=int, default=1000, metavar="N", help="registered adapters (default 1000)")
    scale.add_argument("--scale-slots", type=int, default=16, metavar="N", help="device slots (default 16)")
    scale.add_argument("--scale-host", type=int, default=64, metavar="N",
                       help="adapters kept in host memory (default 64; the rest are re-read from disk)")
    scale.add_argument("--scale-requests", type=int, default=256, metavar="N", help="requests per run (default 256)")
    scale.add_argument("--scale-concurrency", type=int, default=32, metavar="N",
                       help="sequences running at once (default 32)")
    scale.add_argument("--scale-hidden", type=int, default=256, help="scale model hidden size (default 256)")
    scale.add_argument("--scale-layers", type=int, default=4, help="scale model layers (default 4)")
    scale.add_argument("--scale-rank", type=int, default=8, help="scale adapters' rank (default 8)")
    remote = parser.add_argument_group("through gRPC (--grpc)")
    remote.add_argument("--grpc", metavar="ADDRESS",
                        help="drive a running `loraplex serve` at ADDRESS (host:port) instead: (a) and (b) only, "
                        "over the adapters the server has registered")
    remote.add_argument("--adapter-ids", type=_names, metavar="IDS",
                        help="with --grpc: adapter ids to use (default: every LoRA adapter the server lists)")
    remote.add_argument("--admin-token", default=os.environ.get("LORAPLEX_ADMIN_TOKEN"),
                        help="with --grpc: token for ListAdapters (default $LORAPLEX_ADMIN_TOKEN)")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    on_cuda = args.device.startswith("cuda")
    try:
        shape = ModelShape(hidden_size=args.hidden, num_layers=args.layers,
                           intermediate_size=args.intermediate or ModelShape.default_intermediate(args.hidden),
                           num_heads=args.heads, num_kv_heads=args.kv_heads, vocab_size=args.vocab)
    except ValueError as error:
        raise UserError(str(error)) from None
    dtype = args.dtype or ("bfloat16" if on_cuda else "float32")
    from loraplex.kernels.cpu.backend import check_adapter_dtype

    try:
        check_adapter_dtype(args.adapter_dtype, dtype, args.device)
    except ValueError as error:
        raise UserError(str(error)) from None
    return BenchConfig(
        shape=shape, num_adapters=args.adapters, ranks=args.ranks, targets=args.targets,
        popularity=args.popularity, zipf_s=args.zipf_s, batch=args.batch, prompt_len=args.prompt_len,
        new_tokens=args.new_tokens, quantization=args.quantization,
        dtype=dtype, device=args.device, adapter_dtype=args.adapter_dtype, rounds=args.rounds,
        warmup=args.warmup, threads=args.threads, seed=args.seed, peft=not args.no_peft, hf=not args.no_hf,
    )


def run(args: argparse.Namespace) -> int:
    import logging

    import torch
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    config = config_from_args(args)
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {config.device}, but no CUDA device is available")
    to_stderr = args.json == "-"
    out = sys.stderr if to_stderr else sys.stdout

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    with _workdir(args.workdir) as workdir:
        if args.scale:
            from loraplex.server.bench.scale import ScaleConfig, run_scale

            scale = ScaleConfig(
                num_adapters=args.scale_adapters, slots=args.scale_slots, host=args.scale_host,
                requests=args.scale_requests, concurrency=args.scale_concurrency,
                hidden_size=args.scale_hidden, num_layers=args.scale_layers, rank=args.scale_rank,
                prompt_len=config.prompt_len, new_tokens=config.new_tokens, rounds=config.rounds,
                zipf_s=config.zipf_s, dtype=config.dtype, device=config.device, seed=config.seed,
            )
            result = run_scale(scale, workdir, log)
            result["machine"] = machine_info(config)
            print(render_scale(result), file=out)
        elif args.shared_prefix:
            from loraplex.server.bench.prefix import bench_prefix, render_prefix

            if args.system_len < 1:
                raise UserError(f"--system-len must be >= 1, got {args.system_len}")
            result = bench_prefix(config, args.system_len, workdir, log)
            print(render_prefix(result), file=out)
        elif args.grpc:
            result = bench_grpc(config, args.grpc, args.adapter_ids, args.admin_token, log)
            print(render(result), file=out)
        else:
            result = bench_local(config, workdir, log)
            print(render(result), file=out)
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


class _workdir:
    """The given directory (kept), or a temporary one (removed)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> Path:
        if self.path is not None:
            self.path.mkdir(parents=True, exist_ok=True)
            return self.path
        self._tmp = tempfile.TemporaryDirectory(prefix="loraplex-bench-")
        return Path(self._tmp.name)

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    """`python -m loraplex.server.bench.cli`: the subcommand on its own."""
    from loraplex.server.cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
