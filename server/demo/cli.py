"""`loraplex demo`: the whole system on the embedded demo model, in one command.

1. Build the demo model (pretrained on the bundled corpus) and train the three demo LoRA adapters
   (pirate, shout, robot) into a cache directory, unless they are cached already.
2. Start a server in this process, register the adapters through the API (as any client would).
3. Ask every eval question of every adapter and of the base model, all at once (half streamed, half
   unary), so requests for four different models share the engine's batches.
4. Print each answer beside its adapter, the batch statistics from the /metrics endpoint, and where
   to scrape it; with --serve, keep serving until Ctrl-C.

Cached builds live in directories named after their settings and the data they were built from
(model-p300-<hash>, adapters-p300-t100-<hash>; see `data_version`), each
written under a temporary name and renamed when complete, so an interrupted run never leaves a
half-built cache behind and different settings do not overwrite each other.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import signal
import sys
import time
import urllib.request
from importlib import resources
from pathlib import Path

from loraplex.server.demo.model import DEFAULT_PRETRAIN_STEPS, SPEC_FILE
from loraplex.server.errors import UserError

ADAPTERS = ("pirate", "shout", "robot")
# Measured on the pretrained demo model: at 100 steps and lr 3e-3 the pirate and robot adapters answer
# every eval question in their style; lr 1e-3 needs more steps, 5e-3 at 80 steps garbles more words.
DEFAULT_TRAIN_STEPS = 100
TRAIN_LR = 3e-3
DEFAULT_MAX_NEW_TOKENS = 40
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loraplex" / "demo"
BASE_LABEL = "(base)"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="build the demo model and adapters, serve them, and batch requests for all of them",
        description="Build (or reuse) the small demo model and three LoRA adapters trained on it "
        "(pirate, shout, robot), start a server, send every demo question to every adapter and the "
        "base model at once, and print the answers and the batch statistics.",
    )
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, metavar="DIR",
                        help=f"where the model and adapters are kept (default {DEFAULT_CACHE})")
    parser.add_argument("--pretrain-steps", type=int, default=DEFAULT_PRETRAIN_STEPS, metavar="N",
                        help=f"demo model pretraining steps, 0 for random weights (default {DEFAULT_PRETRAIN_STEPS})")
    parser.add_argument("--train-steps", type=int, default=DEFAULT_TRAIN_STEPS, metavar="N",
                        help=f"LoRA training steps per adapter (default {DEFAULT_TRAIN_STEPS})")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                        help=f"tokens per answer at most (default {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--serve", action="store_true", help="keep the server up afterwards until Ctrl-C")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, metavar="PORT",
                        help="gRPC port (default 50051 with --serve, else any free port)")
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="metrics port (default 9400 with --serve, else any free port)")
    parser.add_argument("--device", help="cpu or cuda[:N] (default cuda when available)")
    parser.set_defaults(func=run)


# ---------------------------------------------------------------------- the cache
def _build_atomically(final: Path, build) -> None:
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    build(partial)
    partial.rename(final)


def _log(line: str) -> None:
    print(line, flush=True)


@functools.cache
def data_version() -> str:
    """A short hash of what the demo builds from (the bundled corpus, the demo datasets and the
    package version): cache directories carry it, so an upgrade never serves a stale cached build."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256()
    data = resources.files("loraplex.server.data")
    for name in ("corpus.txt", *(f"{adapter}.jsonl" for adapter in ADAPTERS)):
        digest.update(data.joinpath(name).read_bytes())
    try:
        digest.update(version("loraplex").encode())
    except PackageNotFoundError:
        pass
    return digest.hexdigest()[:8]


def ensure_model(cache: Path, pretrain_steps: int, log=_log) -> Path:
    from loraplex.server.demo.model import build_demo_model

    model = cache / f"model-p{pretrain_steps}-{data_version()}"
    if (model / SPEC_FILE).is_file():
        log(f"demo model: cached in {model}")
        return model
    log(f"demo model: building, {pretrain_steps} pretraining steps on the bundled corpus ...")
    started = time.perf_counter()
    _build_atomically(model, lambda out: build_demo_model(out, pretrain_steps=pretrain_steps, log=_indent(log)))
    log(f"demo model: built in {time.perf_counter() - started:.0f} s -> {model}")
    return model


def ensure_adapters(cache: Path, model: Path, pretrain_steps: int, train_steps: int, log=_log) -> Path:
    from loraplex.server.train import TrainConfig, train
    from loraplex.server.train.trainer import SUMMARY_FILE

    root = cache / f"adapters-p{pretrain_steps}-t{train_steps}-{data_version()}"
    root.mkdir(parents=True, exist_ok=True)
    for name in ADAPTERS:
        out = root / name
        if (out / SUMMARY_FILE).is_file():
            log(f"adapter {name}: cached in {out}")
            continue
        log(f"adapter {name}: training LoRA for {train_steps} steps ...")
        with resources.as_file(resources.files("loraplex.server.data").joinpath(f"{name}.jsonl")) as data:
            def build(partial: Path) -> None:
                summary = train(TrainConfig(model=model, method="lora", data=data, out=partial,
                                            max_steps=train_steps, lr=TRAIN_LR, seed=0, quiet=True))
                log(f"adapter {name}: loss {summary.train_loss_first:.2f} -> {summary.train_loss_last:.2f} "
                    f"in {summary.seconds:.0f} s")

            _build_atomically(out, build)
    return root


def _indent(log):
    return lambda line: log(f"  {line}")


# ---------------------------------------------------------------------- the traffic
def questions() -> list[str]:
    text = resources.files("loraplex.server.data").joinpath("eval_questions.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def prompt_for(question: str) -> str:
    return f"Q: {question}\nA:"


async def ask_everything(client, max_new_tokens: int) -> tuple[dict[tuple[str, str | None], str], int]:
    """Every question to every adapter and the base model at once; alternate streamed and unary.
    Returns the answers by (question, adapter) and how many were streamed."""
    jobs = [(q, adapter) for q in questions() for adapter in (None, *ADAPTERS)]
    options = dict(max_new_tokens=max_new_tokens, stop=["\n"])

    async def ask(index: int, question: str, adapter: str | None) -> str:
        prompt = prompt_for(question)
        if index % 2:
            return "".join([piece.text async for piece in client.stream(prompt, adapter=adapter, **options)])
        return (await client.generate(prompt, adapter=adapter, **options)).text

    answers = await asyncio.gather(*(ask(i, q, a) for i, (q, a) in enumerate(jobs)))
    return dict(zip(jobs, answers)), len(jobs) // 2


def print_answers(answers: dict[tuple[str, str | None], str]) -> None:
    width = max(len(name) for name in (BASE_LABEL, *ADAPTERS))
    for question in dict.fromkeys(q for q, _ in answers):
        print(f"\nQ: {question}")
        for adapter in (None, *ADAPTERS):
            print(f"  {(adapter or BASE_LABEL).ljust(width)} {answers[(question, adapter)].rstrip()}")


# ---------------------------------------------------------------------- batch statistics
def scrape(url: str) -> dict[str, float]:
    """Sample name (with labels) -> value, from a Prometheus text endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def batch_statistics(before: dict[str, float], after: dict[str, float]) -> list[str]:
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    steps = delta("loraplex_batch_size_tokens_count")
    if not steps:
        return ["no engine steps ran"]
    # steps with exactly k distinct adapters, from the histogram's cumulative integer buckets
    cumulative = [(k, delta(f"loraplex_batch_distinct_adapters_bucket{{le={k:.1f}}}")) for k in range(0, 5)]
    by_count = {k: n - (cumulative[k - 1][1] if k else 0) for k, n in cumulative}
    spread = ", ".join(f"{k}: {int(n)}" for k, n in by_count.items() if n)
    return [
        f"engine steps        {int(steps)}",
        f"mean batch          {delta('loraplex_batch_size_sequences_sum') / steps:.1f} sequences, "
        f"{delta('loraplex_batch_size_tokens_sum') / steps:.1f} tokens per step",
        f"distinct adapters   {delta('loraplex_batch_distinct_adapters_sum') / steps:.2f} per step on average "
        f"(steps by number of adapters: {spread})",
        f"tokens generated    {int(_total(after, 'loraplex_generated_tokens_total') - _total(before, 'loraplex_generated_tokens_total'))}",
    ]


def _total(samples: dict[str, float], name: str) -> float:
    """Sum over the label sets of one metric."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


# ---------------------------------------------------------------------- the command
def run(args: argparse.Namespace) -> int:
    if args.pretrain_steps < 0:
        raise UserError(f"--pretrain-steps must be >= 0 (0: random weights), got {args.pretrain_steps}")
    for flag, value in (("--train-steps", args.train_steps), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own lines say what is happening
    started = time.perf_counter()
    cache = args.cache_dir.expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    model = ensure_model(cache, args.pretrain_steps)
    adapter_root = ensure_adapters(cache, model, args.pretrain_steps, args.train_steps)
    return asyncio.run(_serve_and_ask(args, model, adapter_root, started))


def _server_config(args: argparse.Namespace, model: Path, adapter_root: Path):
    import dataclasses

    import torch

    from loraplex.kernels import devices
    from loraplex.server.api.config import ServerConfig
    from loraplex.server.config import AdapterConfig, CacheConfig, EngineConfig, ModelConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")
    model_config = ModelConfig(path=model, quantization="nf4" if on_cuda else "none",
                               dtype="bfloat16" if on_cuda else "float32", device=device)
    engine = EngineConfig(
        model=dataclasses.replace(model_config, device=str(devices.normalize(model_config.device))),
        cache=CacheConfig(num_tokens=16384),
        adapters=AdapterConfig(max_rank=16, max_device_adapters=4, max_host_adapters=8, adapter_root=adapter_root),
    )
    default_port, default_metrics = (50051, 9400) if args.serve else (0, 0)
    return ServerConfig(engine=engine, host=args.host,
                        port=default_port if args.port is None else args.port,
                        metrics_port=default_metrics if args.metrics_port is None else args.metrics_port)


async def _serve_and_ask(args: argparse.Namespace, model: Path, adapter_root: Path, started: float) -> int:
    from loraplex.clients import AsyncClient
    from loraplex.server.api.server import LoraplexServer

    server = LoraplexServer(_server_config(args, model, adapter_root), log=lambda line: None)
    try:
        await server.start()
        print(f"server: listening on {server.address}, metrics on {server.metrics_url}")
        async with AsyncClient(server.address) as client:
            for name in ADAPTERS:
                await client.register_adapter(name, name)  # relative to the adapter root
            print(f"server: registered {', '.join(ADAPTERS)}")
            before = await asyncio.to_thread(scrape, server.metrics_url)
            asked = time.perf_counter()
            answers, streamed = await ask_everything(client, args.max_new_tokens)
            seconds = time.perf_counter() - asked
            after = await asyncio.to_thread(scrape, server.metrics_url)
        print_answers(answers)
        print(f"\n{len(answers)} requests ({len(questions())} questions x base model + {len(ADAPTERS)} adapters; "
              f"{streamed} streamed, {len(answers) - streamed} unary), all in flight at once: {seconds:.1f} s")
        for line in batch_statistics(before, after):
            print(f"  {line}")
        print(f"metrics: {server.metrics_url}" + ("" if args.serve else "  (up while `loraplex demo --serve` runs)"))
        print(f"demo: done in {time.perf_counter() - started:.0f} s")
        if args.serve:
            await _serve_until_signal(server)
    finally:
        await server.stop()
    return 0


async def _serve_until_signal(server) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    example = prompt_for(questions()[0]).replace("\n", "\\n")
    print(f"\nserving on {server.address} until Ctrl-C; try:\n"
          f"  loraplex generate --server {server.address} --adapter pirate $'{example}'\n"
          f"  loraplex adapters list --server {server.address}\n"
          f"  curl -s {server.metrics_url} | grep ^loraplex_", flush=True)
    await stop.wait()
    print("demo: stopping", file=sys.stderr)
    await server.drain(grace=10.0)
