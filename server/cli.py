"""The `loraplex` command line: one subcommand per module, each registering its own parser.

Each subcommand module exposes `add_parser(subparsers)`, which adds its parser and sets `func` to a
callable taking the parsed namespace and returning an exit status. Heavy imports (torch,
transformers) happen inside those callables so that `loraplex --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from loraplex.clients import cli as client_cli
from loraplex.server import __version__
from loraplex.server.api import cli as serve_cli
from loraplex.server.bench import cli as bench
from loraplex.server.demo import cli as demo
from loraplex.server.demo import model as demo_model
from loraplex.server.errors import UserError
from loraplex.server.train import cli as train_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraplex",
        description="Multi-adapter LLM inference server and PEFT adapter trainer.",
    )
    parser.add_argument("--version", action="version", version=f"loraplex {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_parser(subparsers)
    serve_cli.add_parser(subparsers)
    client_cli.add_generate_parser(subparsers)
    client_cli.add_adapters_parser(subparsers)
    client_cli.add_health_parser(subparsers)
    demo_model.add_parser(subparsers)
    train_cli.add_parser(subparsers)
    bench.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as error:
        print(f"loraplex {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loraplex {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
