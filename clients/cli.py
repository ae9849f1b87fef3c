"""The client side of the CLI: `loraplex generate`, `loraplex adapters register|unregister|list|get`
and `loraplex health` (a container health check).

Both talk to a running server (`--server`, default $LORAPLEX_SERVER or 127.0.0.1:50051). A failed
call prints `loraplex COMMAND: error: STATUS: message` and exits 2 (the CLI's UserError path).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from loraplex.server.errors import UserError


def _connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument("--server", default=os.environ.get("LORAPLEX_SERVER", "127.0.0.1:50051"), metavar="HOST:PORT",
                       help="server address (default $LORAPLEX_SERVER or 127.0.0.1:50051)")
    group.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --tls-ca)")
    group.add_argument("--tls-ca", type=Path, metavar="FILE", help="PEM root certificate(s) to trust (implies --tls)")
    group.add_argument("--timeout", type=float, metavar="S", help="deadline of the call in seconds")


def _client(args: argparse.Namespace, admin_token: str | None = None):
    from loraplex.clients import Client

    roots = None
    if args.tls_ca is not None:
        if not args.tls_ca.is_file():
            raise UserError(f"--tls-ca file not found: {args.tls_ca}")
        roots = args.tls_ca.read_bytes()
    return Client(args.server, admin_token=admin_token, tls=args.tls, root_certificates=roots, timeout=args.timeout)


@contextlib.contextmanager
def _errors():
    """Client calls inside: their typed exception becomes the CLI's one-line error."""
    from loraplex.clients import LoraplexError

    try:
        yield
    except LoraplexError as error:
        raise UserError(str(error)) from None


# ---------------------------------------------------------------------- generate
def add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text on a running server (streamed to the terminal)",
        description="Send one prompt to a running loraplex server and stream the output to stdout. "
        "The demo model answers prompts of the form $'Q: <question>\\nA:'.",
    )
    parser.add_argument("prompt", metavar="PROMPT", help="the prompt text, or - to read it from stdin")
    parser.add_argument("--adapter", metavar="ID", help="a registered adapter (default: the base model)")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="default 64")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling in (0, 1] (default off)")
    parser.add_argument("--top-k", type=int, default=0, help="default off")
    parser.add_argument("--repetition-penalty", type=float, default=0.0, help="> 0 (default off)")
    parser.add_argument("--seed", type=int, help="seed of a sampled request")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    parser.add_argument("--no-stream", action="store_true", help="one unary call; print the output at the end")
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON (implies --no-stream)")
    _connection_options(parser)
    parser.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    options = dict(
        adapter=args.adapter, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    with _client(args) as client, _errors():
        if args.json:
            print(json.dumps(asdict(client.generate(prompt, **options)), indent=2))
            return 0
        if args.no_stream:
            result = client.generate(prompt, **options)
            print(result.text)
        else:
            for result in client.stream(prompt, **options):
                sys.stdout.write(result.text)
                sys.stdout.flush()
            print()
    print(f"[{result.finish_reason}: {result.prompt_tokens} prompt + {result.completion_tokens} generated tokens]",
          file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- adapters
def add_adapters_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "adapters",
        help="register, unregister, list and inspect adapters on a running server",
        description="Manage the adapters of a running loraplex server. Sources are directories on the "
        "server, inside its --adapter-root.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    register = actions.add_parser("register", help="register an adapter directory under an id")
    register.add_argument("adapter_id", metavar="ID")
    register.add_argument("source", metavar="SOURCE", help="adapter directory on the server (inside --adapter-root)")
    register.add_argument("--pin", action="store_true", help="keep it in host memory")
    register.add_argument("--preload", action="store_true", help="copy it into a device slot now")
    unregister = actions.add_parser("unregister", help="unregister an adapter (running requests finish)")
    unregister.add_argument("adapter_id", metavar="ID")
    listing = actions.add_parser("list", help="list the registered adapters")
    get = actions.add_parser("get", help="show one adapter")
    get.add_argument("adapter_id", metavar="ID")
    for sub in (register, unregister, listing, get):
        sub.add_argument("--admin-token", default=os.environ.get("LORAPLEX_ADMIN_TOKEN"), metavar="TOKEN",
                         help="the server's --admin-token (default $LORAPLEX_ADMIN_TOKEN)")
        sub.add_argument("--json", action="store_true", help="print JSON")
        _connection_options(sub)
    parser.set_defaults(func=run_adapters)


def run_adapters(args: argparse.Namespace) -> int:
    with _client(args, admin_token=args.admin_token) as client, _errors():
        if args.action == "register":
            adapters = [client.register_adapter(args.adapter_id, args.source, pin=args.pin, preload=args.preload)]
        elif args.action == "unregister":
            client.unregister_adapter(args.adapter_id)
            print(json.dumps({"unregistered": args.adapter_id}) if args.json else f"unregistered {args.adapter_id}")
            return 0
        elif args.action == "get":
            adapters = [client.get_adapter(args.adapter_id)]
        else:
            adapters = client.list_adapters()
    if args.json:
        rows = [asdict(a) for a in adapters]
        print(json.dumps(rows if args.action == "list" else rows[0], indent=2))
    else:
        print(format_adapters(adapters))
    return 0


def format_adapters(adapters) -> str:
    if not adapters:
        return "no adapters registered"
    rows = [("ID", "TYPE", "RANK", "STATE", "PINNED", "SIZE", "MODULES", "SOURCE")]
    for a in adapters:
        rows.append((a.adapter_id, a.peft_type, str(a.max_rank), a.state, "yes" if a.pinned else "no",
                     f"{a.size_bytes / 1e6:.2f} MB", ",".join(a.target_modules), a.source))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows)


# ---------------------------------------------------------------------- health
def add_health_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "health",
        help="check a server's grpc.health.v1 status (exit 0 when SERVING), e.g. as a container health check",
        description="Ask a running server's standard gRPC health service for the status of a service "
        "('' = the whole server). Prints the status; exits 0 if it is SERVING, 1 otherwise (loading, "
        "draining, unreachable).",
    )
    parser.add_argument("--service", default="", metavar="NAME",
                        help="service to check, e.g. loraplex.v1.Generator (default '': the whole server)")
    _connection_options(parser)
    parser.set_defaults(func=run_health)


def run_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2

    with _client(args) as client:
        try:
            response = client.health.Check(health_pb2.HealthCheckRequest(service=args.service),
                                           timeout=args.timeout or 5.0)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        except grpc.RpcError as error:
            status = f"{error.code().name}: {error.details()}"
    print(status)
    return 0 if status == "SERVING" else 1
