"""The servicer and server in process (a real engine on the random-weight demo model): lifecycle,
the status codes that need a server of their own configuration, preload and pin, TLS, the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex import clients
from loraplex.clients import Client
from loraplex.server.api.config import ServerConfig
from loraplex.server.cli import main
from tests.api.helpers import PROMPT, ServerThread, engine_config, fetch


@pytest.fixture(scope="module")
def server(demo_model_dir, adapter_root):
    """Adapter root, max rank 16 (so 'wide' does not fit), KV for 1024 tokens, 2 requests in flight."""
    config = ServerConfig(engine=engine_config(demo_model_dir, adapter_root=adapter_root), port=0, metrics_port=0,
                          max_queued_requests=2)
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


def test_health_and_generation_wait_for_the_model(demo_model_dir):
    thread = ServerThread(ServerConfig(engine=engine_config(demo_model_dir), port=0, metrics_port=0)).start(load=False)
    try:
        with Client(thread.address) as client:
            assert not client.is_serving()
            with pytest.raises(clients.Unavailable, match="warming up"):
                client.generate("hi")
            with grpc.insecure_channel(thread.address) as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="loraplex.v1.Generator"))
                assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            thread.call(thread.server.load())
            assert client.is_serving()
            assert client.generate("hi", max_new_tokens=2, ignore_eos=True).completion_tokens == 2
    finally:
        thread.stop()


def test_statuses_of_registration(server, adapter_root, tmp_path):
    with Client(server.address) as client:
        small = client.register_adapter("small", "small", pin=True, preload=True)
        assert (small.peft_type, small.max_rank, small.pinned, small.state) == ("LORA", 4, True, "device")
        assert small.source == str(adapter_root / "small")
        with pytest.raises(clients.AlreadyExists, match="already registered"):
            client.register_adapter("small", "small")
        with pytest.raises(clients.FailedPrecondition, match="rank"):
            client.register_adapter("wide", "wide")
        with pytest.raises(clients.InvalidArgument, match="adapter id"):
            client.register_adapter("../evil", "small")
        outside = tmp_path / "outside"
        shutil.copytree(adapter_root / "small", outside)
        (adapter_root / "link").symlink_to(outside)
        for source in ("../outside", str(outside), "link"):
            with pytest.raises(clients.PermissionDenied, match="outside the adapter root"):
                client.register_adapter("escape", source)
        assert [a.adapter_id for a in client.list_adapters()] == ["small"]
        client.unregister_adapter("small")
        with pytest.raises(clients.NotFound):
            client.get_adapter("small")


def test_kv_that_never_fits_is_invalid_and_a_full_queue_is_resource_exhausted(server):
    with Client(server.address) as client:
        with pytest.raises(clients.InvalidArgument, match="KV"):  # a retry can never fit: not RESOURCE_EXHAUSTED
            client.generate("hi", max_new_tokens=1500)  # fits the context (2048), not the 1024-token cache
        first = client.stream(PROMPT, max_new_tokens=900, ignore_eos=True)
        second = client.stream(PROMPT, max_new_tokens=900, ignore_eos=True)
        next(first), next(second)  # both accepted and running
        with pytest.raises(clients.ResourceExhausted, match="--max-queued-requests 2"):
            client.generate(PROMPT, max_new_tokens=2)
        first.close(), second.close()  # cancels both
        info = client.server_info()
        for _ in range(100):
            if info.running_requests == 0 and info.kv_cache_usage == 0:
                break
            info = client.server_info()
        assert (info.running_requests, info.kv_cache_usage, info.max_queued_requests) == (0, 0.0, 2)
        assert client.generate(PROMPT, max_new_tokens=2, ignore_eos=True).completion_tokens == 2


def test_server_info_describes_the_model(server, demo_model_dir):
    with Client(server.address) as client:
        info = client.server_info()
    assert (info.model, info.architecture, info.quantization, info.dtype, info.device) == (
        str(demo_model_dir), "LlamaForCausalLM", "none", "float32", "cpu")
    assert (info.max_context_tokens, info.max_rank, info.max_device_adapters, info.kv_cache_tokens) == (2048, 16, 4, 1024)
    assert info.version
    assert info.batch_invariant and info.int8_threshold == 0.0  # float32 on CPU


def test_a_failing_adapter_fails_alone_then_is_quarantined(server, adapter_root):
    engine = server.server.state.engine.engine
    runner = engine.runner
    execute = runner.execute

    def faulty(inputs, attach=None):
        key = engine.store._current.get("flaky")
        if key is not None and engine.store._entries[key].slot in {item.slot for item in inputs}:
            raise RuntimeError("injected fault")
        return execute(inputs, attach)

    runner.execute = faulty
    try:
        with Client(server.address, admin_token=None) as client:
            client.register_adapter("flaky", "small")
            for then in ("", "; it is now quarantined"):
                with pytest.raises(clients.Internal, match=f"adapter 'flaky' failed in the engine step{then}; "
                                                           "other requests were not affected; .*error id"):
                    client.generate(PROMPT, adapter="flaky", max_new_tokens=2)
            assert client.generate(PROMPT, max_new_tokens=2, ignore_eos=True).completion_tokens == 2
            with pytest.raises(clients.FailedPrecondition, match="adapter 'flaky' is quarantined"):
                client.generate(PROMPT, adapter="flaky", max_new_tokens=2)
            adapter = client.get_adapter("flaky")
            assert adapter.state == "quarantined" and "error id" in adapter.quarantine_reason
            text = fetch(server.server.metrics_url)
            assert 'loraplex_adapters{state="quarantined"} 1.0' in text
            assert "loraplex_adapter_quarantines_total 1.0" in text and "loraplex_step_failures_total 2.0" in text
            client.unregister_adapter("flaky")
    finally:
        runner.execute = execute


def test_without_adapter_root_the_api_reads_no_paths(demo_model_dir, adapter_root):
    thread = ServerThread(ServerConfig(engine=engine_config(demo_model_dir), port=0, metrics_port=0,
                                       warmup=False)).start()
    try:
        with Client(thread.address) as client:
            with pytest.raises(clients.PermissionDenied, match="--adapter-root"):
                client.register_adapter("small", str(adapter_root / "small"))
    finally:
        thread.stop()
    permissive = ServerConfig(engine=engine_config(demo_model_dir), port=0, metrics_port=0, warmup=False,
                              allow_any_adapter_path=True, adapters=(("boot", str(adapter_root / "small")),))
    thread = ServerThread(permissive).start()
    try:
        with Client(thread.address) as client:
            assert client.register_adapter("small", str(adapter_root / "small")).adapter_id == "small"
            assert [a.adapter_id for a in client.list_adapters()] == ["boot", "small"]
    finally:
        thread.stop()


def test_cli_generate_and_adapters(server, capsys):
    address = server.address
    assert main(["adapters", "register", "small2", "small", "--server", address]) == 0
    assert main(["adapters", "list", "--server", address]) == 0
    listing = capsys.readouterr().out
    assert "small2" in listing and "LORA" in listing and "host" in listing
    assert main(["generate", "--server", address, "--adapter", "small2", "--max-new-tokens", "5", "--ignore-eos",
                 PROMPT]) == 0
    captured = capsys.readouterr()
    with Client(address) as client:
        expected = client.generate(PROMPT, adapter="small2", max_new_tokens=5, ignore_eos=True).text
    assert captured.out == expected + "\n" and "[length: " in captured.err
    assert main(["generate", "--server", address, "--adapter", "nope", "hi"]) == 2
    assert "error: NOT_FOUND: adapter 'nope' is not registered" in capsys.readouterr().err
    assert main(["adapters", "unregister", "small2", "--server", address]) == 0


def test_metrics_endpoint_is_prometheus_text(server):
    text = fetch(server.server.metrics_url)
    for name in ("loraplex_requests_total", "loraplex_queue_depth", "loraplex_kv_cache_usage_ratio",
                 "loraplex_adapters", "loraplex_adapter_loads_total", "loraplex_batch_size_tokens_bucket"):
        assert f"\n{name}" in text, name


def _metric(text: str, series: str) -> float:
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_prefix_cache_over_grpc_with_metrics_and_server_info(server):
    prompt = PROMPT * 6  # several full 16-token blocks
    series = ('loraplex_prefix_cache_queries_total{adapter="_base"}', 'loraplex_prefix_cache_hits_total{adapter="_base"}')
    before = [_metric(fetch(server.server.metrics_url), name) for name in series]
    with Client(server.address) as client:
        options = dict(max_new_tokens=4, ignore_eos=True, return_logprobs=True)
        cold = client.generate(prompt, cache_prompt=False, **options)  # neither looked up nor counted
        first = client.generate(prompt, **options)
        hit = client.generate(prompt, **options)
        assert cold.token_ids == first.token_ids == hit.token_ids
        assert max(abs(a - b) for a, b in zip(cold.logprobs, hit.logprobs)) < 1e-4
        info = client.server_info()
        for _ in range(100):  # the engine frees the last request's blocks on its next step
            if info.running_requests == 0 and info.kv_cache_usage == 0:
                break
            info = client.server_info()
        assert info.prefix_caching and info.prefix_cache_tokens >= 16 and info.kv_cache_usage == 0
    text = fetch(server.server.metrics_url)
    queries, hits = (_metric(text, name) - old for name, old in zip(series, before))
    assert queries == 2 * first.prompt_tokens and 0 < hits < first.prompt_tokens and hits % 16 == 0
    assert "\nloraplex_prefix_cache_blocks " in text and "\nloraplex_prefix_cache_evictions_total " in text


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls(demo_model_dir, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, env={**os.environ, "OPENSSL_CONF": "/dev/null"})
    thread = ServerThread(ServerConfig(engine=engine_config(demo_model_dir), port=0, metrics_port=0, warmup=False,
                                       tls_cert=cert, tls_key=key, http_port=0)).start()
    try:
        with Client(thread.address, root_certificates=cert.read_bytes()) as client:
            assert client.generate("hi", max_new_tokens=1, ignore_eos=True).completion_tokens == 1
        with Client(thread.address, timeout=5) as plaintext:
            with pytest.raises(clients.Unavailable):
                plaintext.generate("hi")
        # the HTTP API serves the same certificate
        url = thread.server.http_url
        assert url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(url + "/models", context=context, timeout=10) as response:
            assert json.loads(response.read())["data"][0]["id"] == demo_model_dir.name
        with pytest.raises(OSError):  # plaintext: the server drops the connection
            urllib.request.urlopen(url.replace("https://", "http://") + "/models", timeout=10)
    finally:
        thread.stop()


def test_serve_refuses_bad_flags_in_one_line(demo_model_dir, tmp_path, capsys):
    base = ["serve", "--model", str(demo_model_dir), "--device", "cpu", "--port", "0", "--metrics-port", "0"]
    for extra, message in (
        (["--tls-cert", str(tmp_path / "c.pem")], "--tls-cert and --tls-key go together"),
        (["--adapter", "pirate"], "expected ID=PATH"),
        (["--max-queued-requests", "0"], "--max-queued-requests must be >= 1"),
        (["--adapter-root", str(tmp_path / "missing")], "is not a directory"),
        (["--quantization", "none", "--max-device-adapters", "4", "--max-host-adapters", "2"], "max_host_adapters"),
        (["--dtype", "bfloat16", "--adapter-dtype", "bfloat16"], "--adapter-dtype bfloat16 is for a float32 model on CPU"),
        (["--int8-threshold", "-1"], "int8_threshold must be >= 0"),
    ):
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("loraplex serve: error: ") and message in err and err.count("\n") == 1, err


def test_a_bad_startup_adapter_stops_the_start(demo_model_dir, tmp_path):
    config = ServerConfig(engine=engine_config(demo_model_dir), port=0, metrics_port=0, warmup=False,
                          adapters=(("ghost", str(tmp_path / "nowhere")),))
    thread = ServerThread(config)
    try:
        with pytest.raises(Exception, match="--adapter ghost="):
            thread.start()
    finally:
        thread.stop()


def test_message_size_limits(server):
    from loraplex.server.api.config import MAX_RECEIVE_BYTES
    from loraplex.v1 import loraplex_pb2 as pb
    from loraplex.v1 import loraplex_pb2_grpc as pb_grpc

    huge = "x" * (MAX_RECEIVE_BYTES + 1)
    with Client(server.address) as client:  # the client refuses to send it
        with pytest.raises(clients.ResourceExhausted):
            client.generate(huge)
    options = [("grpc.max_send_message_length", 2 * MAX_RECEIVE_BYTES)]
    with grpc.insecure_channel(server.address, options=options) as channel:  # the server refuses to read it
        with pytest.raises(grpc.RpcError) as raised:
            pb_grpc.GeneratorStub(channel).Generate(pb.GenerateRequest(prompt=huge))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
