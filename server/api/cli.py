"""`loraplex serve`: flags -> ServerConfig (with its EngineConfig) -> server.run."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from loraplex.server.errors import UserError

EPILOG = """\
adapters: --adapter ID=PATH registers an adapter before the server reports SERVING (repeatable).
RegisterAdapter over the API reads only directories inside --adapter-root (anything resolving
outside it, through '..', symlinks or absolute paths, gets PERMISSION_DENIED); without
--adapter-root it is refused unless --allow-any-adapter-path is given, since a remote caller should
not make the server read arbitrary paths. --adapter paths are taken from the working directory and,
with --adapter-root, must lie inside it too.
--adapter-repo DIR serves every adapter of DIR without a register call: a request for an unregistered
id registers DIR/ID/ first (ids follow the registration rules; a symlink out of DIR is refused), so
replicas sharing a volume all serve all of its adapters.

HTTP: --http-port PORT also serves OpenAI's Completions and Chat Completions APIs (/v1/completions,
/v1/chat/completions, /v1/models) and vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter on the
same engine; `model` is an adapter id or the base model's name (--served-model-name, default the
model directory's name). Adapter loading follows the RegisterAdapter rules above, with the admin token
as 'Authorization: Bearer TOKEN'.

batch invariance: with --dtype float32 on CPU a request's tokens (and seeded samples) do not depend on
the other requests sharing its steps, for --quantization none, nf4, and int8 with --int8-threshold 0
(the default). float16/bfloat16 change reduction order with the batch (near-ties can flip), and GPUs are
not measured yet; GetServerInfo's batch_invariant says which holds.

faults: a step that raises ends only the requests that cause it (the others keep their exact tokens);
an adapter whose requests fail in two steps is quarantined (FAILED_PRECONDITION until re-registered).

signals: SIGTERM or SIGINT turns health to NOT_SERVING, refuses new requests (UNAVAILABLE) and lets
running ones (gRPC and HTTP) finish for up to --drain-grace seconds; a second signal stops at once. Exit status 0.
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a base model and its PEFT adapters over gRPC (and OpenAI-compatible HTTP)",
        description="Serve one base model and many PEFT adapters over gRPC and, with --http-port, OpenAI's "
        "HTTP API, batching requests for different adapters (and the base model) together. Prometheus "
        "metrics on a separate port.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, type=Path, metavar="DIR", help="Hugging Face model directory")
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    net.add_argument("--port", type=int, default=50051, help="gRPC port, 0 for any free port (default 50051)")
    net.add_argument("--metrics-port", type=int, default=9400,
                     help="Prometheus /metrics port, 0 for any free port (default 9400)")
    net.add_argument("--http-port", type=int, metavar="PORT",
                     help="serve the OpenAI-compatible HTTP API on PORT, 0 for any free port (default: off)")
    net.add_argument("--served-model-name", metavar="NAME",
                     help="the base model's name in the HTTP API (default: the --model directory's name)")
    net.add_argument("--chat-template", type=Path, metavar="FILE",
                     help="Jinja chat template for /v1/chat/completions (default: the tokenizer's own)")
    net.add_argument("--tls-cert", type=Path, metavar="FILE",
                     help="PEM certificate chain (with --tls-key), for gRPC and the HTTP API")
    net.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM private key (with --tls-cert)")
    net.add_argument("--admin-token", metavar="TOKEN", default=os.environ.get("LORAPLEX_ADMIN_TOKEN"),
                     help="require 'authorization: Bearer TOKEN' on the Adapters service "
                     "(default $LORAPLEX_ADMIN_TOKEN, which keeps it out of the process list)")
    net.add_argument("--max-queued-requests", type=int, default=1024, metavar="N",
                     help="requests in flight (queued or running) beyond which new ones get "
                     "RESOURCE_EXHAUSTED (default 1024)")
    net.add_argument("--drain-grace", type=float, default=30.0, metavar="S",
                     help="seconds running requests get to finish after SIGTERM (default 30)")
    model = parser.add_argument_group("model")
    model.add_argument("--quantization", choices=("nf4", "int8", "none"),
                       help="base weights (default nf4 on CUDA, none on CPU)")
    model.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                       help="compute dtype (default bfloat16 on CUDA, float32 on CPU)")
    model.add_argument("--device", help="cpu or cuda[:N] (default cuda when available)")
    model.add_argument("--int8-threshold", type=float, default=0.0, metavar="T",
                       help="LLM.int8 outlier threshold with --quantization int8 (default 0: pure vector-wise "
                       "int8, each request's tokens independent of the batch; bitsandbytes' usual 6.0 runs input "
                       "columns above T in ANY request of a step in 16 bits, so requests change each other's tokens)")
    model.add_argument("--enforce-eager", action="store_true",
                       help="run decode steps eagerly on CUDA too: no CUDA graphs (debugging, profiling)")
    model.add_argument("--kv-cache-tokens", type=int, metavar="N",
                       help="KV cache capacity in tokens (default: 90%% of free GPU memory; 32768 on CPU)")
    model.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                       help="recompute every prompt from its first token instead of reusing the KV of a prefix an "
                       "earlier request of the same adapter computed (on by default; a request can opt out with "
                       "cache_prompt)")
    adapters = parser.add_argument_group("adapters")
    adapters.add_argument("--adapter", action="append", default=[], metavar="ID=PATH",
                          help="register an adapter at start (repeatable)")
    adapters.add_argument("--adapter-root", type=Path, metavar="DIR",
                          help="adapter sources must resolve inside DIR (relative ones are taken from it)")
    adapters.add_argument("--adapter-repo", type=Path, metavar="DIR",
                          help="register an unregistered adapter id on first use from DIR/ID/ (just in time)")
    adapters.add_argument("--allow-any-adapter-path", action="store_true",
                          help="without --adapter-root, let RegisterAdapter read any path (trusted callers only)")
    adapters.add_argument("--max-rank", type=int, default=64, help="largest LoRA rank served (default 64)")
    adapters.add_argument("--adapter-dtype", choices=("auto", "bfloat16"), default="auto",
                          help="LoRA weight storage: auto = the model's dtype (exact, default); bfloat16 = half "
                               "the bytes for a float32 model on CPU (weights rounded to bfloat16 once)")
    adapters.add_argument("--max-device-adapters", type=int, default=8, metavar="N",
                          help="device slots: distinct adapters in one step (default 8)")
    adapters.add_argument("--max-host-adapters", type=int, default=32, metavar="N",
                          help="adapters kept converted in host memory (default 32)")
    parser.set_defaults(func=run)


def parse_adapter(text: str) -> tuple[str, str]:
    """ID=PATH, the path taken from the working directory as usual on a command line."""
    adapter_id, sep, path = text.partition("=")
    if not sep or not adapter_id or not path:
        raise UserError(f"--adapter {text!r}: expected ID=PATH, e.g. --adapter pirate=adapters/pirate")
    return adapter_id, str(Path(path).resolve())


def config_from_args(args: argparse.Namespace):
    import torch

    from loraplex.kernels import devices
    from loraplex.kernels.cpu.backend import check_adapter_dtype
    from loraplex.server.api.config import ServerConfig
    from loraplex.server.config import AdapterConfig, CacheConfig, EngineConfig, ModelConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        raise UserError(f"--device {device}, but no CUDA device is available")
    if on_cuda and ":" in device and device.split(":", 1)[1].isdigit() \
            and int(device.split(":", 1)[1]) >= torch.cuda.device_count():
        raise UserError(f"--device {device}, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    dtype = args.dtype or ("bfloat16" if on_cuda and torch.cuda.is_bf16_supported() else
                           "float16" if on_cuda else "float32")
    if not args.model.is_dir():
        raise UserError(f"--model {args.model} is not a directory")
    for flag, path in (("--adapter-root", args.adapter_root), ("--adapter-repo", args.adapter_repo)):
        if path is not None and not path.is_dir():
            raise UserError(f"{flag} {path} is not a directory")
    try:
        check_adapter_dtype(args.adapter_dtype, dtype, device)  # refused before the model loads
        model = ModelConfig(path=args.model, quantization=args.quantization or ("nf4" if on_cuda else "none"),
                            dtype=dtype, device=device, int8_threshold=args.int8_threshold)
        # "cuda" as the device its tensors report (the current one, "cuda:0" unless set): what GetServerInfo says
        model = dataclasses.replace(model, device=str(devices.normalize(model.device)))
        engine = EngineConfig(
            model=model,
            cache=CacheConfig(num_tokens=args.kv_cache_tokens, prefix_caching=args.prefix_caching),
            adapters=AdapterConfig(max_rank=args.max_rank, max_device_adapters=args.max_device_adapters,
                                   max_host_adapters=args.max_host_adapters, adapter_root=args.adapter_root,
                                   adapter_repo=args.adapter_repo, dtype=args.adapter_dtype),
            enforce_eager=args.enforce_eager,
        )
    except ValueError as error:  # the config dataclasses name the field and the allowed values
        raise UserError(str(error)) from None
    return ServerConfig(
        engine=engine,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        http_port=args.http_port,
        served_model_name=args.served_model_name,
        chat_template=args.chat_template,
        adapters=tuple(parse_adapter(a) for a in args.adapter),
        allow_any_adapter_path=args.allow_any_adapter_path,
        admin_token=args.admin_token,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        drain_grace=args.drain_grace,
        max_queued_requests=args.max_queued_requests,
    )


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from loraplex.server.api import server

    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hf_logging.disable_progress_bar()  # a server's log is no terminal
    return asyncio.run(server.run(config_from_args(args)))
