"""End to end through a `loraplex serve` process: outputs, status codes, cancellation, metrics, drain."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import grpc
import openai
import pytest

from loraplex import clients
from loraplex.clients import AsyncClient
from loraplex.server.demo.cli import scrape
from tests.e2e.conftest import ADMIN_TOKEN
from tests.engine_support import PROMPTS, load_peft, make_engine, oracle, run_until_done, submit
from tests.servers import start_server

ADAPTERS = ("pirate", "shout")
LONG = 1000  # tokens: seconds of decoding on a CPU, so a cancelled request is surely cut short


def _register(server, *adapter_ids: str) -> None:
    with server.client(admin_token=ADMIN_TOKEN) as admin:
        registered = {a.adapter_id for a in admin.list_adapters()}
        for adapter_id in adapter_ids:
            if adapter_id not in registered:
                admin.register_adapter(adapter_id, adapter_id)  # relative to --adapter-root


def _wait_until_idle(client, timeout: float = 30.0):
    """ServerInfo once no request runs and no KV block is in use (polled, bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        info = client.server_info()
        if (info.running_requests, info.queued_requests, info.kv_cache_usage) == (0, 0, 0.0):
            return info
        assert time.monotonic() < deadline, f"the server did not free its requests: {info}"
        time.sleep(0.05)


def _total(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def test_concurrent_outputs_equal_the_engine_and_peft(server, demo_model_dir, trained_adapters):
    _register(server, *ADAPTERS)
    prompts = PROMPTS[:3]
    jobs = [(p, a) for p in range(len(prompts)) for a in (None, *ADAPTERS)]
    options = dict(max_new_tokens=12, return_logprobs=True)

    async def run_all():
        async with AsyncClient(server.address) as client:
            async def unary(p, a):
                return await client.generate(prompts[p], adapter=a, **options)

            async def stream(p, a):
                return [piece async for piece in client.stream(prompts[p], adapter=a, **options)]

            return await asyncio.gather(*(unary(p, a) for p, a in jobs), *(stream(p, a) for p, a in jobs))

    results = asyncio.run(run_all())
    unary, streams = results[: len(jobs)], results[len(jobs):]

    engine = make_engine(demo_model_dir, kv_tokens=1024, max_rank=16)
    for name in ADAPTERS:
        engine.register_adapter(name, str(trained_adapters / name))
    expected = [submit(engine, f"ref-{i}", prompts[p], adapter=a, max_new_tokens=12) for i, (p, a) in enumerate(jobs)]
    run_until_done(engine)

    for job, got, pieces, want in zip(jobs, unary, streams, expected):
        assert got.token_ids == want.token_ids, job
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4), job
        assert (got.text, got.finish_reason) == (want.text, want.final.finish_reason), job
        assert (got.prompt_tokens, got.completion_tokens) == (want.final.prompt_tokens, want.final.completion_tokens)
        assert "".join(p.text for p in pieces) == got.text, job
        assert [t for p in pieces for t in p.token_ids] == got.token_ids, job
        assert pieces[-1].finish_reason == got.finish_reason and not any(p.finished for p in pieces[:-1])
    # the adapters change the output, so the comparison above is not base-vs-base
    by_job = dict(zip(jobs, unary))
    assert by_job[(0, "pirate")].token_ids != by_job[(0, None)].token_ids

    peft_model = load_peft(demo_model_dir, trained_adapters / "pirate")
    prompt_ids = engine.tokenizer.encode(prompts[0], add_special_tokens=True)
    tokens, _ = oracle(peft_model, prompt_ids, 12, engine.tokenizer.eos_token_id)
    assert by_job[(0, "pirate")].token_ids == tokens


def test_every_status_code(server, demo_model_dir):
    _register(server, "pirate")
    with server.client() as client:
        with pytest.raises(clients.Unauthenticated, match="needs an admin token"):
            client.list_adapters()
    with server.client(admin_token="wrong") as client:
        with pytest.raises(clients.Unauthenticated, match="wrong"):
            client.register_adapter("x", "pirate")
    with server.client(admin_token=ADMIN_TOKEN) as admin:
        for source in ("../../etc", "/etc", "pirate/../../elsewhere"):
            with pytest.raises(clients.PermissionDenied, match="outside the adapter root"):
                admin.register_adapter("escape", source)
        with pytest.raises(clients.AlreadyExists):
            admin.register_adapter("pirate", "shout")
        with pytest.raises(clients.InvalidArgument, match="adapter id"):
            admin.register_adapter("bad id", "shout")
        with pytest.raises(clients.NotFound):
            admin.unregister_adapter("ghost")
    with server.client() as client:
        with pytest.raises(clients.NotFound, match="'ghost' is not registered"):
            client.generate("hi", adapter="ghost")
        for bad, match in ((dict(temperature=-1.0), "temperature"), (dict(top_p=1.5), "top_p"),
                           (dict(repetition_penalty=-2.0), "repetition_penalty"), (dict(stop=[""]), "stop")):
            with pytest.raises(clients.InvalidArgument, match=match):
                client.generate("hi", **bad)
        with pytest.raises(clients.InvalidArgument, match="outside the vocabulary"):
            client.generate(prompt_token_ids=[10**6])
        with pytest.raises(clients.InvalidArgument, match="context"):
            client.generate(prompt_token_ids=[5] * 2048)  # the demo model's context is 2048 tokens
        with pytest.raises(clients.InvalidArgument, match="empty"):
            client.generate("")
        with pytest.raises(clients.InvalidArgument, match="KV"):
            client.generate("hi", max_new_tokens=1500)  # within the context, beyond --kv-cache-tokens 1024


def test_cancellation_and_deadline_free_the_request(server):
    with server.client() as client:
        before = scrape(server.metrics_url)
        pieces = client.stream(PROMPTS[0], max_new_tokens=LONG, ignore_eos=True)
        for _ in range(3):
            next(pieces)
        busy = client.server_info()
        assert busy.running_requests == 1 and busy.kv_cache_usage > 0
        pieces.close()  # cancels the RPC
        _wait_until_idle(client)

        with pytest.raises(clients.DeadlineExceeded):
            client.generate(PROMPTS[0], max_new_tokens=LONG, ignore_eos=True, timeout=0.5)
        _wait_until_idle(client)
        after = scrape(server.metrics_url)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("loraplex_requests_total{adapter=_base,finish_reason=cancelled}") == 2
    assert delta("loraplex_request_errors_total{code=CANCELLED}") == 1
    assert delta("loraplex_request_errors_total{code=DEADLINE_EXCEEDED}") == 1
    # both stopped early: far fewer tokens than the 2 x LONG they asked for
    assert 3 <= delta("loraplex_generated_tokens_total{adapter=_base}") < LONG


def test_metrics_count_the_traffic(server):
    _register(server, "pirate")
    with server.client() as client:
        before = scrape(server.metrics_url)
        base = [client.generate(PROMPTS[1], max_new_tokens=5, ignore_eos=True) for _ in range(2)]
        pirate = list(client.stream(PROMPTS[1], adapter="pirate", max_new_tokens=5, ignore_eos=True))
        with pytest.raises(clients.NotFound):
            client.generate("hi", adapter="ghost")
        with pytest.raises(clients.InvalidArgument):
            client.generate("hi", temperature=-1.0)
        after = scrape(server.metrics_url)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("loraplex_requests_total{adapter=_base,finish_reason=length}") == 2
    assert delta("loraplex_requests_total{adapter=pirate,finish_reason=length}") == 1
    assert delta("loraplex_generated_tokens_total{adapter=_base}") == 10
    assert delta("loraplex_generated_tokens_total{adapter=pirate}") == 5
    assert delta("loraplex_prompt_tokens_total{adapter=_base}") == 2 * base[0].prompt_tokens
    assert delta("loraplex_prompt_tokens_total{adapter=pirate}") == pirate[-1].prompt_tokens
    assert delta("loraplex_request_errors_total{code=NOT_FOUND}") == 1
    assert delta("loraplex_request_errors_total{code=INVALID_ARGUMENT}") == 1
    assert delta("loraplex_time_to_first_token_seconds_count") == 3
    assert delta("loraplex_inter_token_latency_seconds_count") == 3 * 4
    assert delta("loraplex_request_duration_seconds_count") == 3
    # sequential requests of 5 tokens: at least one step each per token, one sequence per step
    steps = delta("loraplex_batch_size_tokens_count")
    assert steps >= 15 and delta("loraplex_batch_size_sequences_sum") == steps
    assert delta("loraplex_batch_distinct_adapters_sum") == 5  # the pirate request's steps
    assert delta("loraplex_batch_size_tokens_sum") == 3 * (base[0].prompt_tokens + 4)
    with server.client(admin_token=ADMIN_TOKEN) as admin:
        registered = len(admin.list_adapters())
    assert _total(after, "loraplex_adapters") == registered
    assert after["loraplex_adapter_loads_total{tier=host}"] >= registered
    assert after["loraplex_adapters{state=device}"] >= 1  # pirate ran
    assert after["loraplex_queue_depth"] == after["loraplex_running_requests"] == after["loraplex_kv_cache_usage_ratio"] == 0
    assert after["loraplex_adapter_load_seconds_count{tier=host}"] >= registered


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"loraplex.v1.Generator", "loraplex.v1.Adapters", "grpc.health.v1.Health"} <= services


def test_sigterm_drains_running_requests_then_exits_0(demo_model_dir):
    server = start_server(demo_model_dir, "--drain-grace", "60", "--kv-cache-tokens", "2048", "--http-port", "0")
    try:
        pieces: list = []
        chunks: list = []
        started = threading.Event()
        http_started = threading.Event()
        api = openai.OpenAI(base_url=server.http_url, api_key="unused", max_retries=0)

        def long_request() -> None:
            with server.client() as client:
                for piece in client.stream(PROMPTS[0], max_new_tokens=600, ignore_eos=True):
                    pieces.append(piece)
                    started.set()

        def long_http_stream() -> None:
            for chunk in api.completions.create(model=demo_model_dir.name, prompt=PROMPTS[0], max_tokens=600,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}):
                chunks.append(chunk)
                http_started.set()

        worker = threading.Thread(target=long_request)
        worker.start()
        http_worker = threading.Thread(target=long_http_stream)
        http_worker.start()
        assert started.wait(60) and http_started.wait(60)
        server.process.send_signal(signal.SIGTERM)
        with server.client() as client:
            deadline = time.monotonic() + 30
            while client.is_serving():
                assert time.monotonic() < deadline, "health still SERVING after SIGTERM"
                time.sleep(0.02)
            with pytest.raises(clients.Unavailable, match="shutting down"):
                client.generate("hi", max_new_tokens=2)
        with pytest.raises(openai.InternalServerError, match="shutting down") as refused:
            api.completions.create(model=demo_model_dir.name, prompt="hi", max_tokens=2)
        assert refused.value.status_code == 503
        assert not pieces[-1].finished, "the running request ended before the drain was checked"
        assert chunks[-1].usage is None, "the running HTTP stream ended before the drain was checked"
        worker.join(120)
        http_worker.join(120)
        assert pieces[-1].finish_reason == "length" and pieces[-1].completion_tokens == 600
        assert sum(len(p.token_ids) for p in pieces) == 600
        assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 600
        assert server.process.wait(timeout=60) == 0
        assert "draining" in server.output()
    finally:
        server.stop()
