"""The OpenAI-compatible HTTP API through the official `openai` client, against a real server (in
process, gRPC and HTTP on one engine): the same greedy tokens as the gRPC API, streaming, models,
every error status as the SDK's exception type, disconnects, vLLM's adapter endpoints, shared batches."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import openai
import pytest
from transformers import AutoTokenizer

from loraplex import clients
from loraplex.clients import Client
from loraplex.server.api import openai_protocol
from loraplex.server.api.config import ServerConfig
from tests.api.helpers import PROMPT, ServerThread, engine_config, scrape

pytestmark = pytest.mark.timeout(300)

TOKEN = "admin-secret"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where do fish live?"}]
LONG = 1000  # tokens: seconds of decoding, so a disconnected request is surely cut short


@pytest.fixture(scope="module")
def server(demo_model_dir, adapter_root, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(TEMPLATE)
    config = ServerConfig(engine=engine_config(demo_model_dir, adapter_root=adapter_root), port=0, metrics_port=0,
                          http_port=0, served_model_name="demo", admin_token=TOKEN, chat_template=template,
                          adapters=(("small", str(adapter_root / "small")),))
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir):
    return AutoTokenizer.from_pretrained(demo_model_dir)


def sdk(server, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.server.http_url, api_key=api_key, max_retries=0, timeout=60)


def grpc_client(server) -> Client:
    return Client(server.address, admin_token=TOKEN)


def chat_prompt_ids(tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template(MESSAGES, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def post(url: str, body: dict, timeout: float = 60):
    """A plain HTTP POST of JSON (no SDK), as curl would send it."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=timeout)


def health(server) -> int:
    try:
        with urllib.request.urlopen(server.server.http_url.removesuffix("/v1") + "/health", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def wait_until_idle(server, timeout: float = 30.0) -> None:
    engine = server.server.state.engine
    deadline = time.monotonic() + timeout
    while engine.num_live_requests() or engine.snapshot().kv_cache_usage:
        assert time.monotonic() < deadline, "the server did not free the request"
        time.sleep(0.02)


# ---------------------------------------------------------------------- same tokens as gRPC
@pytest.mark.parametrize("model", ["demo", "small"])
def test_completions_unary_and_streamed_equal_grpc(server, model):
    adapter = None if model == "demo" else model
    with grpc_client(server) as client:
        expected = client.generate(PROMPT, adapter=adapter, max_new_tokens=12, ignore_eos=True, return_logprobs=True)
    api = sdk(server)
    unary = api.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True},
                                   logprobs=0)
    choice = unary.choices[0]
    assert (unary.object, unary.model, choice.finish_reason) == ("text_completion", model, "length")
    assert choice.text == expected.text
    assert (unary.usage.prompt_tokens, unary.usage.completion_tokens) == (expected.prompt_tokens, 12)
    assert unary.usage.total_tokens == expected.prompt_tokens + 12
    assert choice.logprobs.token_logprobs == pytest.approx(expected.logprobs, abs=1e-6)
    assert len(choice.logprobs.tokens) == len(choice.logprobs.text_offset) == 12

    chunks = list(api.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    *pieces, last = chunks
    assert "".join(c.choices[0].text for c in pieces) == expected.text
    assert [c.choices[0].finish_reason for c in pieces][-1] == "length"
    assert all(c.usage is None for c in pieces) and last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (expected.prompt_tokens, 12)


def test_completions_take_token_ids_stop_strings_and_seeds(server):
    api = sdk(server)
    with grpc_client(server) as client:
        ids = client.generate(PROMPT, max_new_tokens=1).prompt_tokens
        free = client.generate(PROMPT, max_new_tokens=16, ignore_eos=True)
        sampled = client.generate(PROMPT, max_new_tokens=8, temperature=0.9, top_p=0.9, top_k=20, seed=7,
                                  repetition_penalty=1.2, ignore_eos=True)
    assert ids > 0
    stop = free.text[3:6]
    if stop.strip():
        cut = api.completions.create(model="demo", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True})
        assert cut.choices[0].text == free.text[:free.text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
    tokens = AutoTokenizer.from_pretrained(server.server.config.engine.model.path).encode(PROMPT)
    by_ids = api.completions.create(model="demo", prompt=tokens, max_tokens=16, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == free.text
    engine = server.server.state.engine
    looked_up = engine.snapshot().prefix_cache_queries.get(None, 0)
    uncached = api.completions.create(model="demo", prompt=tokens, max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True, "cache_prompt": False})
    assert uncached.choices[0].text == free.text
    assert engine.snapshot().prefix_cache_queries.get(None, 0) == looked_up  # not even looked up
    seeded = api.completions.create(model="demo", prompt=PROMPT, max_tokens=8, temperature=0.9, top_p=0.9, seed=7,
                                    extra_body={"top_k": 20, "repetition_penalty": 1.2, "ignore_eos": True}, user="u1")
    assert seeded.choices[0].text == sampled.text


def test_several_prompts_give_one_choice_each_as_vllm(server, tokenizer):
    prompts = [PROMPT, "The sea", "In the morning"]
    with grpc_client(server) as client:
        expected = [client.generate(p, adapter="small", max_new_tokens=6, ignore_eos=True).text for p in prompts]
    api = sdk(server)
    unary = api.completions.create(model="small", prompt=prompts, max_tokens=6, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert [c.index for c in unary.choices] == [0, 1, 2]
    assert [c.text for c in unary.choices] == expected
    assert unary.usage.completion_tokens == 18
    by_ids = api.completions.create(model="small", prompt=[tokenizer.encode(p) for p in prompts], max_tokens=6,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert [c.text for c in by_ids.choices] == expected
    texts = ["", "", ""]
    finished = []
    chunks = list(api.completions.create(model="small", prompt=prompts, max_tokens=6, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        if choice.finish_reason:
            finished.append(choice.index)
    assert texts == expected and sorted(finished) == [0, 1, 2]
    assert chunks[-1].usage.completion_tokens == 18 and chunks[-1].choices == []

    # one bad prompt fails the request and stops the others; leaving a stream early stops them all
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        api.completions.create(model="small", prompt=[tokenizer.encode(PROMPT), [10**6]], max_tokens=LONG,
                               extra_body={"ignore_eos": True})
    stream = api.completions.create(model="small", prompt=prompts, max_tokens=LONG, stream=True,
                                    extra_body={"ignore_eos": True})
    for _ in range(4):
        next(iter(stream))
    stream.close()
    wait_until_idle(server)
    assert server.server.state.in_flight == 0


@pytest.mark.parametrize("model", ["demo", "small"])
def test_chat_unary_and_streamed_equal_grpc_on_the_chat_template(server, tokenizer, model):
    adapter = None if model == "demo" else model
    with grpc_client(server) as client:
        expected = client.generate(prompt_token_ids=chat_prompt_ids(tokenizer), adapter=adapter, max_new_tokens=10,
                                   ignore_eos=True, return_logprobs=True)
    api = sdk(server)
    unary = api.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=10, temperature=0,
                                        logprobs=True, top_logprobs=0, extra_body={"ignore_eos": True})
    choice = unary.choices[0]
    assert (unary.object, choice.message.role, choice.finish_reason) == ("chat.completion", "assistant", "length")
    assert choice.message.content == expected.text
    assert [t.logprob for t in choice.logprobs.content] == pytest.approx(expected.logprobs, abs=1e-6)
    assert (unary.usage.prompt_tokens, unary.usage.completion_tokens) == (expected.prompt_tokens, 10)

    chunks = list(api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, temperature=0,
                                              stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    *pieces, last = chunks
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == expected.text
    assert pieces[-1].choices[0].finish_reason == "length" and last.choices == []
    assert last.usage.completion_tokens == 10


def test_sse_wire_format_ends_in_done(server):
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True, "ignore_eos": True}
    with post(server.server.http_url + "/completions", body) as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.decode().rstrip("\n") for line in response if line.strip()]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]" and len(events) >= 4


# ---------------------------------------------------------------------- models
def test_models_list_the_base_model_and_every_adapter_of_either_api(server, adapter_root):
    api = sdk(server)
    with grpc_client(server) as client:
        client.register_adapter("via-grpc", "other")
    try:
        models = {m.id: m for m in api.models.list()}
        assert set(models) == {"demo", "small", "via-grpc"}
        assert models["demo"].parent is None and models["small"].parent == "demo"
        assert models["via-grpc"].root == str(adapter_root / "other")
        assert api.models.retrieve("small").id == "small"
        with pytest.raises(openai.NotFoundError):
            api.models.retrieve("ghost")
        # served over HTTP although registered over gRPC
        assert api.completions.create(model="via-grpc", prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1
    finally:
        with grpc_client(server) as client:
            client.unregister_adapter("via-grpc")


# ---------------------------------------------------------------------- errors
def test_every_error_status_through_the_sdk(server):
    api = sdk(server)
    before = scrape(server.server.metrics_url)
    bad_requests = [
        dict(n=2), dict(temperature=-1), dict(top_p=1.5), dict(logprobs=2), dict(stop=[""]), dict(max_tokens=0),
        dict(prompt=""), dict(prompt=["a", ""]), dict(prompt=[10**6]), dict(presence_penalty=0.5),
        dict(prompt=[5] * 2048), dict(echo=True), dict(extra_body={"repetition_penalty": 0}),
    ]
    for bad in bad_requests:
        kwargs = {"model": "demo", "prompt": PROMPT, "max_tokens": 2, **bad}
        with pytest.raises(openai.BadRequestError) as caught:
            api.completions.create(**kwargs)
        error = caught.value.body
        assert error["type"] == "invalid_request_error" and error["code"] == "INVALID_ARGUMENT", bad
        assert error["message"]
    with pytest.raises(openai.BadRequestError, match="n must be 1") as caught:
        api.chat.completions.create(model="demo", messages=MESSAGES, n=3)
    assert caught.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        api.chat.completions.create(model="demo", messages=MESSAGES, logprobs=True, top_logprobs=3)
    with pytest.raises(openai.BadRequestError, match="messages"):
        api.chat.completions.create(model="demo", messages=[])
    with pytest.raises(openai.BadRequestError, match="image_url"):
        api.chat.completions.create(model="demo", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}])
    with pytest.raises(openai.BadRequestError, match="messages"):  # a body that is not the schema
        api.chat.completions.create(model="demo", messages="hello")
    with pytest.raises(openai.NotFoundError, match="neither the base model") as caught:
        api.completions.create(model="ghost", prompt=PROMPT)
    assert caught.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="ghost", messages=MESSAGES, stream=True)
    with pytest.raises(openai.BadRequestError, match="KV"):  # beyond the 1024-token cache: 400 (a 429 is retried)
        api.completions.create(model="demo", prompt=PROMPT, max_tokens=1500)
    with pytest.raises(openai.NotFoundError):
        api.post("/no/such/route", cast_to=str)
    raw = urllib.request.Request(server.server.http_url + "/completions", data=b"{not json",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(raw, timeout=30)
    assert caught.value.code == 400 and "not valid JSON" in json.loads(caught.value.read())["error"]["message"]
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(urllib.request.Request(server.server.http_url + "/completions", method="DELETE"),
                               timeout=30)
    assert caught.value.code == 405 and json.loads(caught.value.read())["error"]["type"] == "invalid_request_error"
    after = scrape(server.server.metrics_url)
    errors = after.get("loraplex_request_errors_total{code=INVALID_ARGUMENT}", 0) - \
        before.get("loraplex_request_errors_total{code=INVALID_ARGUMENT}", 0)
    assert errors == len(bad_requests) + 7
    assert after.get("loraplex_request_errors_total{code=RESOURCE_EXHAUSTED}", 0) == \
        before.get("loraplex_request_errors_total{code=RESOURCE_EXHAUSTED}", 0)


def test_an_unexpected_exception_is_a_500_with_an_error_id_in_the_log(server, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(openai_protocol, "completion_body", broken)
    before = scrape(server.server.metrics_url).get("loraplex_request_errors_total{code=INTERNAL}", 0)
    with caplog.at_level(logging.ERROR, logger="loraplex.server.api.http"):
        with pytest.raises(openai.InternalServerError) as caught:
            sdk(server).completions.create(model="demo", prompt=PROMPT, max_tokens=2)
    assert caught.value.status_code == 500
    message = caught.value.body["message"]
    assert "a bug" not in message and "error id" in message
    error_id = message.split("error id ")[1].split(")")[0]
    record = next(r for r in caplog.records if error_id in r.getMessage())
    assert record.exc_info and "a bug" in str(record.exc_info[1])
    assert scrape(server.server.metrics_url)["loraplex_request_errors_total{code=INTERNAL}"] == before + 1
    wait_until_idle(server)  # the request's engine side was closed too

    # once a stream has started, the error is its last event
    real_chunk = openai_protocol.completion_chunk
    calls = []

    def breaks_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug mid-stream")
        return real_chunk(*args, **kwargs)

    monkeypatch.setattr(openai_protocol, "completion_chunk", breaks_second)
    stream = sdk(server).completions.create(model="demo", prompt=PROMPT, max_tokens=LONG, stream=True,
                                            extra_body={"ignore_eos": True})
    with caplog.at_level(logging.ERROR, logger="loraplex.server.api.http"):
        with pytest.raises(openai.APIError, match="internal server error"):
            list(stream)
    assert any("a bug mid-stream" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    assert scrape(server.server.metrics_url)["loraplex_request_errors_total{code=INTERNAL}"] == before + 2
    wait_until_idle(server)  # stopped at once, not after LONG tokens


# ---------------------------------------------------------------------- disconnects
def test_a_disconnect_cancels_the_request_and_frees_its_blocks(server):
    before = scrape(server.server.metrics_url)
    api = sdk(server)
    stream = api.completions.create(model="small", prompt=PROMPT, max_tokens=LONG, temperature=0, stream=True,
                                    extra_body={"ignore_eos": True})
    next(iter(stream))
    next(iter(stream))
    info = scrape(server.server.metrics_url)
    running = [k for k in info if k.startswith("loraplex_lora_requests_info{")]
    assert running == ["loraplex_lora_requests_info{max_lora=4,running_lora_adapters=small,waiting_lora_adapters=}"]
    assert info["loraplex_kv_cache_usage_ratio"] > 0
    stream.close()
    wait_until_idle(server)

    # a unary request whose client gives up
    url = urllib.parse.urlsplit(server.server.http_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=0.5)
    connection.request("POST", "/v1/completions", json.dumps({"model": "demo", "prompt": PROMPT, "max_tokens": LONG,
                                                              "ignore_eos": True}),
                       headers={"Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        connection.getresponse()
    connection.close()
    wait_until_idle(server)
    after = scrape(server.server.metrics_url)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("loraplex_requests_total{adapter=small,finish_reason=cancelled}") == 1
    assert delta("loraplex_requests_total{adapter=_base,finish_reason=cancelled}") == 1
    assert delta("loraplex_request_errors_total{code=CANCELLED}") == 2
    assert 2 <= delta("loraplex_generated_tokens_total{adapter=small}") < LONG
    assert delta("loraplex_generated_tokens_total{adapter=_base}") < LONG
    idle = [k for k in after if k.startswith("loraplex_lora_requests_info{")]
    assert idle == ["loraplex_lora_requests_info{max_lora=4,running_lora_adapters=,waiting_lora_adapters=}"]


# ---------------------------------------------------------------------- one engine for both APIs
def test_a_mixed_burst_over_http_and_grpc_shares_batches(server):
    """4 requests per API: a step of more than 4 sequences held requests of both."""
    before = scrape(server.server.metrics_url)

    async def burst():
        api = openai.AsyncOpenAI(base_url=server.server.http_url, api_key="unused", max_retries=0)

        async def http(i: int) -> str:
            stream = await api.completions.create(model="small" if i % 2 else "demo", prompt=PROMPT, max_tokens=24,
                                                  temperature=0, stream=True, extra_body={"ignore_eos": True})
            return "".join([chunk.choices[0].text async for chunk in stream])

        async with clients.AsyncClient(server.address) as client:
            async def grpc_call(i: int) -> str:
                result = await client.generate(PROMPT, adapter="small" if i % 2 else None, max_new_tokens=24,
                                               ignore_eos=True)
                return result.text

            results = await asyncio.gather(*(http(i) for i in range(4)), *(grpc_call(i) for i in range(4)))
        await api.close()
        return results

    results = asyncio.run(burst())
    assert results[:4] == results[4:]  # same greedy text on either API
    after = scrape(server.server.metrics_url)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    steps = delta("loraplex_batch_size_sequences_count")
    at_most_4 = delta("loraplex_batch_size_sequences_bucket{le=4.0}")
    assert steps - at_most_4 >= 1, "no step held more sequences than one API sent"
    assert delta("loraplex_requests_total{adapter=small,finish_reason=length}") == 4
    assert delta("loraplex_requests_total{adapter=_base,finish_reason=length}") == 4


# ---------------------------------------------------------------------- vLLM's adapter endpoints
def test_load_and_unload_lora_adapter_with_the_jail_and_the_token(server, adapter_root, tmp_path):
    admin = sdk(server, api_key=TOKEN)  # the SDK sends its key as 'Authorization: Bearer ...'

    def load(client, name: str, path: str) -> str:
        return client.post("/load_lora_adapter", cast_to=str, body={"lora_name": name, "lora_path": path})

    with pytest.raises(openai.AuthenticationError, match="admin token"):
        load(sdk(server), "loaded", "other")
    with pytest.raises(urllib.error.HTTPError) as caught:  # no Authorization header at all
        post(server.server.http_url + "/load_lora_adapter", {"lora_name": "x", "lora_path": "other"})
    assert caught.value.code == 401 and "needs the admin token" in caught.value.read().decode()
    outside = tmp_path / "outside"
    shutil.copytree(adapter_root / "other", outside)
    for path in ("../outside", str(outside)):
        with pytest.raises(openai.PermissionDeniedError, match="outside the adapter root"):
            load(admin, "escape", path)
    with pytest.raises(openai.BadRequestError, match="lora_path"):
        admin.post("/load_lora_adapter", cast_to=str, body={"lora_name": "x"})
    with pytest.raises(openai.ConflictError):
        load(admin, "small", "other")

    assert "added successfully" in load(admin, "loaded", "other")
    assert "added successfully" in load(admin, "loaded-abs", str(adapter_root / "other"))
    with grpc_client(server) as client:  # one registry: gRPC sees and serves it
        assert {"loaded", "loaded-abs"} <= {a.adapter_id for a in client.list_adapters()}
        via_grpc = client.generate(PROMPT, adapter="loaded", max_new_tokens=6, ignore_eos=True)
    via_http = admin.completions.create(model="loaded", prompt=PROMPT, max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert via_http.choices[0].text == via_grpc.text

    for name in ("loaded", "loaded-abs"):
        admin.post("/unload_lora_adapter", cast_to=str, body={"lora_name": name})
    with pytest.raises(openai.NotFoundError):
        admin.post("/unload_lora_adapter", cast_to=str, body={"lora_name": "loaded"})
    with grpc_client(server) as client:
        with pytest.raises(clients.NotFound):
            client.get_adapter("loaded")
    with pytest.raises(openai.NotFoundError):
        admin.completions.create(model="loaded", prompt=PROMPT, max_tokens=2)


# ---------------------------------------------------------------------- a server of its own
def test_warm_up_no_chat_template_no_adapter_root_and_drain(demo_model_dir):
    config = ServerConfig(engine=engine_config(demo_model_dir), port=0, metrics_port=0, http_port=0,
                          drain_grace=60)
    thread = ServerThread(config).start(load=False)
    try:
        api = sdk(thread)
        assert health(thread) == 503
        with pytest.raises(openai.InternalServerError, match="warming up") as caught:
            api.completions.create(model=demo_model_dir.name, prompt=PROMPT)
        assert caught.value.status_code == 503
        thread.call(thread.server.load())
        assert health(thread) == 200
        assert [m.id for m in api.models.list()] == [demo_model_dir.name]  # the default served name
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            api.chat.completions.create(model=demo_model_dir.name, messages=MESSAGES)
        with pytest.raises(openai.PermissionDeniedError, match="--adapter-root"):
            api.post("/load_lora_adapter", cast_to=str, body={"lora_name": "x", "lora_path": "/tmp"})

        # a drain lets a running stream finish and refuses new requests
        stream = api.completions.create(model=demo_model_dir.name, prompt=PROMPT, max_tokens=60, temperature=0,
                                        stream=True, extra_body={"ignore_eos": True})
        pieces = [next(iter(stream))]
        drained = {}
        draining = threading.Thread(target=lambda: drained.setdefault("ok", thread.call(thread.server.drain(60))))
        draining.start()
        deadline = time.monotonic() + 30
        while not thread.server.state.draining:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(openai.InternalServerError, match="shutting down"):
            api.completions.create(model=demo_model_dir.name, prompt=PROMPT)
        pieces += list(stream)
        draining.join(60)
        assert drained["ok"] is True
        assert pieces[-1].choices[0].finish_reason == "length"
        assert sum(len(p.choices[0].text) for p in pieces) > 0
    finally:
        thread.stop()
