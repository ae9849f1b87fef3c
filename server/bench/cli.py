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
import random
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from loraplex.server.bench.report import bandwidth_floor, machine_info, render, render_scale
from loraplex.server.bench.workload import ALL_PROJECTIONS, POPULARITY_LAWS, ModelShape
from loraplex.server.errors import UserError

# Targets of the CPU workload (the defaults), as ratios between the systems' throughputs.
TARGETS = {"mixed_over_base": 0.8, "mixed_over_peft": 4.0, "base_over_hf": 1.0}
SYSTEM_LABELS = {
    "mixed": "(a) loraplex, mixed adapters",
    "base": "(b) loraplex, base model",
    "peft": "(c) peft generate, adapter_names",
    "hf": "(d) transformers generate, base",
}


@dataclass(frozen=True)
class BenchConfig:
    shape: ModelShape = field(default_factory=ModelShape)
    num_adapters: int = 16
    ranks: tuple[int, ...] = (16,)
    """Adapter i gets ranks[i % len(ranks)]: one value, or several for mixed ranks in one batch."""
    targets: tuple[str, ...] = ALL_PROJECTIONS
    popularity: str = "distinct"
    """How requests pick adapters: distinct, uniform or zipf."""
    zipf_s: float = 1.0
    batch: int = 16
    """Requests submitted together (concurrency)."""
    prompt_len: int = 32
    new_tokens: int = 32
    quantization: str = "none"
    dtype: str = "float32"
    adapter_dtype: str = "auto"
    """loraplex's LoRA storage (--adapter-dtype): auto = the model's dtype, or bfloat16."""
    device: str = "cpu"
    rounds: int = 5
    """Measured rounds; each runs every system once."""
    warmup: int = 1
    """Unmeasured rounds first (allocations, caches, lazy initialisation)."""
    threads: int = 0
    """torch intra-op threads (0: torch's default, one per core)."""
    seed: int = 0
    peft: bool = True
    hf: bool = True

    def __post_init__(self) -> None:
        if self.popularity not in POPULARITY_LAWS:
            raise UserError(f"--popularity must be one of {', '.join(POPULARITY_LAWS)}, got {self.popularity!r}")
        for name in ("num_adapters", "batch", "prompt_len", "new_tokens", "rounds"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.threads < 0:
            raise UserError("--warmup and --threads must be >= 0")
        if not self.ranks or min(self.ranks) < 1:
            raise UserError(f"--ranks must be positive integers, got {self.ranks}")
        if self.popularity == "distinct" and self.batch > self.num_adapters:
            raise UserError(f"--popularity distinct needs --adapters >= --batch ({self.batch}), got {self.num_adapters}")
        unknown = set(self.targets) - set(ALL_PROJECTIONS)
        if unknown:
            raise UserError(f"--targets: unknown projections {sorted(unknown)}; choose from {', '.join(ALL_PROJECTIONS)}")
        if self.quantization != "none" and not self.device.startswith("cuda") and self.dtype == "float16":
            raise UserError("4-/8-bit bases on CPU compute in float32 or bfloat16")

    @property
    def adapter_ranks(self) -> list[int]:
        return [self.ranks[i % len(self.ranks)] for i in range(self.num_adapters)]


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


# ---------------------------------------------------------------------------------- the local run
def prepare(config: BenchConfig, workdir: Path, log) -> tuple[Path, dict[str, Path]]:
    """Generate (or reuse, when workdir holds the same settings) the model and the adapters."""
    from loraplex.server.bench.workload import build_adapters, build_model

    save_dtype = config.dtype  # a half-precision run writes half the bytes (1B-parameter GPU runs)
    spec = {"shape": asdict(config.shape), "ranks": config.adapter_ranks, "targets": list(config.targets),
            "seed": config.seed, "save_dtype": save_dtype}
    spec_file = workdir / "bench-spec.json"
    model_dir, adapter_root = workdir / "model", workdir / "adapters"
    ids = [f"a{i:04d}" for i in range(config.num_adapters)]
    if spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
        log(f"reusing the model and {len(ids)} adapters in {workdir}")
    else:
        spec_file.unlink(missing_ok=True)
        log(f"generating a {config.shape.hidden_size} x {config.shape.num_layers} model and "
            f"{len(ids)} adapters in {workdir}")
        build_model(model_dir, config.shape, seed=config.seed, save_dtype=save_dtype)
        build_adapters(model_dir, adapter_root, config.adapter_ranks, config.targets, seed=config.seed,
                       save_dtype=save_dtype, log=log)
        spec_file.write_text(json.dumps(spec))
    return model_dir, {adapter_id: adapter_root / adapter_id for adapter_id in ids}


def engine_config(config: BenchConfig, model_dir: Path, num_slots: int):
    from loraplex.server.config import AdapterConfig, CacheConfig, EngineConfig, ModelConfig

    per_request = config.prompt_len + config.new_tokens
    return EngineConfig(
        model=ModelConfig(path=model_dir, quantization=config.quantization, dtype=config.dtype, device=config.device),
        cache=CacheConfig(block_size=16, num_tokens=max(4096, 2 * config.batch * per_request)),
        adapters=AdapterConfig(max_rank=max(config.ranks), max_device_adapters=num_slots,
                               max_host_adapters=num_slots, dtype=config.adapter_dtype),
        seed=config.seed,
    )


def bench_local(config: BenchConfig, workdir: Path, log) -> dict:
    from loraplex.server.bench.measure import median_ratio, round_orders, summarize
    from loraplex.server.bench.systems import GenerateSystem, LoraplexSystem, load_hf_model, load_peft_model
    from loraplex.server.bench.workload import draw_adapters, random_prompts

    model_dir, adapters = prepare(config, workdir, log)
    ids = list(adapters)
    log("loading loraplex" + (", peft" if config.peft else "") + (", transformers" if config.hf else ""))
    loraplex = LoraplexSystem.create(engine_config(config, model_dir, num_slots=len(ids)), adapters)
    pad = loraplex.engine.tokenizer.pad_token_id
    systems: dict[str, object] = {"mixed": loraplex, "base": loraplex}
    if config.peft:
        systems["peft"] = GenerateSystem(load_peft_model(model_dir, adapters, config.dtype, config.quantization,
                                                         config.device), config.device, pad)
    if config.hf:
        systems["hf"] = GenerateSystem(load_hf_model(model_dir, config.dtype, config.quantization, config.device),
                                       config.device, pad)

    rng = random.Random(config.seed)
    runs: dict[str, list] = {name: [] for name in systems}
    orders = round_orders(list(systems), config.warmup + config.rounds)
    for index, order in enumerate(orders):
        prompts = random_prompts(config.shape.vocab_size, config.batch, config.prompt_len, rng)
        picks = [ids[i] for i in draw_adapters(config.popularity, len(ids), config.batch, rng, config.zipf_s)]
        measured = index >= config.warmup
        label = f"round {index - config.warmup + 1}/{config.rounds}" if measured else f"warm-up {index + 1}"
        line = []
        for name in order:
            result = run_system(name, systems[name], prompts, picks, config.new_tokens)
            line.append(f"{name} {result.throughput:.1f}")
            if measured:
                runs[name].append(result)
        log(f"{label}: " + ", ".join(line) + " tok/s")

    summaries = {name: summarize(SYSTEM_LABELS[name], runs[name], systems[name].resident_bytes()).as_dict()
                 for name in systems}
    summaries["mixed"]["name"] += f" ({config.popularity})"
    result = {
        "mode": "local",
        "config": bench_config_dict(config),
        "machine": machine_info(config),
        "systems": summaries,
        "mixed_over_base": median_ratio(runs["mixed"], runs["base"]),
        "mixed_over_peft": median_ratio(runs["mixed"], runs["peft"]) if config.peft else None,
        "base_over_hf": median_ratio(runs["base"], runs["hf"]) if config.hf else None,
        "peft_over_hf": median_ratio(runs["peft"], runs["hf"]) if config.peft and config.hf else None,
        "targets": TARGETS if is_target_workload(config) else None,
    }
    result["bandwidth"] = bandwidth_floor(config, loraplex, adapters, summaries)
    loraplex.close()
    return result


def run_system(name: str, system, prompts, picks, new_tokens: int):
    if name == "mixed":
        return system.run(prompts, picks, new_tokens)
    if name == "base":
        return system.run(prompts, [None] * len(prompts), new_tokens)
    if name == "peft":
        return system.run(prompts, picks, new_tokens)
    return system.run(prompts, None, new_tokens)


def bench_grpc(config: BenchConfig, address: str, adapter_ids, admin_token, log) -> dict:
    from loraplex.server.bench.measure import median_ratio, round_orders, summarize
    from loraplex.server.bench.systems import GrpcSystem
    from loraplex.server.bench.workload import draw_adapters, random_prompts

    system = GrpcSystem(address, admin_token)
    ids = list(adapter_ids) if adapter_ids else system.adapter_ids()
    if not ids:
        raise UserError(f"the server at {address} has no LoRA adapter registered (or give --adapter-ids)")
    if config.popularity == "distinct" and len(ids) < config.batch:
        raise UserError(f"--popularity distinct needs at least --batch ({config.batch}) adapters; "
                        f"the server has {len(ids)}")
    rng = random.Random(config.seed)
    runs: dict[str, list] = {"mixed": [], "base": []}
    for index, order in enumerate(round_orders(["mixed", "base"], config.warmup + config.rounds)):
        prompts = random_prompts(config.shape.vocab_size, config.batch, config.prompt_len, rng)
        picks = [ids[i] for i in draw_adapters(config.popularity, len(ids), config.batch, rng, config.zipf_s)]
        line = []
        for name in order:
            result = system.run(prompts, picks if name == "mixed" else [None] * len(prompts), config.new_tokens)
            line.append(f"{name} {result.throughput:.1f}")
            if index >= config.warmup:
                runs[name].append(result)
        log(f"round {index + 1}: " + ", ".join(line) + " tok/s")
    summaries = {name: summarize(SYSTEM_LABELS[name] + " (gRPC)", runs[name], None).as_dict() for name in runs}
    return {
        "mode": "grpc",
        "address": address,
        "config": {**bench_config_dict(config), "adapters_used": len(ids)},
        "machine": machine_info(config),
        "systems": summaries,
        "mixed_over_base": median_ratio(runs["mixed"], runs["base"]),
        "mixed_over_peft": None,
        "base_over_hf": None,
        "peft_over_hf": None,
        "targets": None,
    }


def is_target_workload(config: BenchConfig) -> bool:
    default = BenchConfig()
    return replace(config, rounds=default.rounds, warmup=default.warmup, threads=default.threads,
                   adapter_dtype=default.adapter_dtype,
                   seed=default.seed, peft=True, hf=True) == default


def bench_config_dict(config: BenchConfig) -> dict:
    data = asdict(config)
    data["shape"] = asdict(config.shape)
    data["ranks"] = list(config.ranks)
    data["targets"] = list(config.targets)
    return data


def main(argv: list[str] | None = None) -> int:
    """`python -m loraplex.server.bench.cli`: the subcommand on its own."""
    from loraplex.server.cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
