"""The client library against a scripted fake server: metadata, conversions, typed exceptions."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from loraplex import clients
from loraplex.clients import ADAPTER_HEADER, AsyncClient, Client
from loraplex.v1 import loraplex_pb2 as pb
from loraplex.v1 import loraplex_pb2_grpc as pb_grpc

CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: clients.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: clients.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: clients.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: clients.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: clients.ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: clients.Unavailable,
    grpc.StatusCode.PERMISSION_DENIED: clients.PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: clients.Unauthenticated,
    grpc.StatusCode.INTERNAL: clients.Internal,
}


class FakeServicer(pb_grpc.GeneratorServicer, pb_grpc.AdaptersServicer):
    """Records each call's metadata; a prompt naming a status code makes the call fail with it."""

    def __init__(self):
        self.metadata: list[tuple[str, dict[str, str]]] = []

    def _record(self, method: str, context) -> dict[str, str]:
        metadata = dict(context.invocation_metadata())
        self.metadata.append((method, metadata))
        return metadata

    async def Generate(self, request, context):
        self._record("Generate", context)
        if request.prompt in grpc.StatusCode.__members__:
            await context.abort(grpc.StatusCode[request.prompt], f"because the prompt said {request.prompt}")
        return pb.GenerateResponse(request_id=request.request_id, text=request.prompt.upper(), token_ids=[1, 2],
                                   logprobs=[-0.5, -0.25], finish_reason=pb.FINISH_REASON_EOS,
                                   usage=pb.Usage(prompt_tokens=3, completion_tokens=2))

    async def GenerateStream(self, request, context):
        self._record("GenerateStream", context)
        for i, piece in enumerate(request.prompt.split()):
            yield pb.GenerateResponse(request_id=request.request_id, text=piece, token_ids=[i])
        yield pb.GenerateResponse(request_id=request.request_id, finish_reason=pb.FINISH_REASON_LENGTH,
                                  usage=pb.Usage(prompt_tokens=1, completion_tokens=i + 1))

    async def RegisterAdapter(self, request, context):
        metadata = self._record("RegisterAdapter", context)
        return pb.Adapter(adapter_id=request.adapter_id, source=request.source, peft_type="LORA", max_rank=8,
                          target_modules=["q_proj"], state=pb.ADAPTER_STATE_HOST, size_bytes=10,
                          pinned=metadata.get("authorization") == "Bearer s3cret")

    async def ListAdapters(self, request, context):
        self._record("ListAdapters", context)
        return pb.ListAdaptersResponse(adapters=[pb.Adapter(adapter_id="a", state=pb.ADAPTER_STATE_DEVICE)])


@pytest.fixture(scope="module")
def fake():
    servicer = FakeServicer()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        server = grpc.aio.server()
        pb_grpc.add_GeneratorServicer_to_server(servicer, server)
        pb_grpc.add_AdaptersServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield servicer, f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_results_are_converted_and_every_call_names_its_adapter(fake):
    servicer, target = fake
    servicer.metadata.clear()
    with Client(target, admin_token="s3cret") as client:
        result = client.generate("hello", adapter="pirate", request_id="r1")
        assert result == clients.Completion("r1", "HELLO", [1, 2], [-0.5, -0.25], "eos", 3, 2)
        pieces = list(client.stream("a b c", request_id="r2"))
        assert [p.text for p in pieces] == ["a", "b", "c", ""] and [p.finished for p in pieces] == [False] * 3 + [True]
        assert pieces[-1].finish_reason == "length" and pieces[-1].completion_tokens == 3
        adapter = client.register_adapter("robot", "robot")
        assert adapter.state == "host" and adapter.pinned  # the fake pins when it sees the token
        assert [a.state for a in client.list_adapters()] == ["device"]
    headers = [(method, md.get(ADAPTER_HEADER), md.get("authorization")) for method, md in servicer.metadata]
    assert headers == [
        ("Generate", "pirate", None),
        ("GenerateStream", "", None),  # the base model: the header is there, empty
        ("RegisterAdapter", "robot", "Bearer s3cret"),  # the admin token only on Adapters calls
        ("ListAdapters", "", "Bearer s3cret"),
    ]


@pytest.mark.parametrize("code", list(CODES), ids=lambda c: c.name)
def test_each_status_code_raises_its_own_exception(fake, code):
    _, target = fake
    with Client(target) as client:
        with pytest.raises(CODES[code]) as raised:
            client.generate(code.name)
    assert raised.value.code == code and raised.value.message == f"because the prompt said {code.name}"
    assert isinstance(raised.value, clients.LoraplexError) and str(raised.value).startswith(code.name)


def test_unreachable_server_is_unavailable():
    with Client("127.0.0.1:1", timeout=5) as client:
        with pytest.raises(clients.Unavailable):
            client.generate("hi")
        assert not client.is_serving(timeout=0.5)


def test_async_client_matches_the_sync_one(fake):
    servicer, target = fake

    async def main():
        async with AsyncClient(target) as client:
            unary = await client.generate("hi there", adapter="shout")
            pieces = [p async for p in client.stream("hi there", adapter="shout")]
            with pytest.raises(clients.NotFound):
                await client.generate("NOT_FOUND")
            return unary, pieces

    servicer.metadata.clear()
    unary, pieces = asyncio.run(main())
    assert unary.text == "HI THERE" and "".join(p.text for p in pieces) == "hithere"
    assert [md[ADAPTER_HEADER] for _, md in servicer.metadata] == ["shout", "shout", ""]


def test_an_adapter_id_grpc_cannot_send_as_a_header_still_reaches_the_server(fake):
    """gRPC refuses non-ASCII header values; the request goes without the routing header, so the server
    can refuse the malformed id itself (INVALID_ARGUMENT) instead of the client failing with INTERNAL."""
    servicer, target = fake
    servicer.metadata.clear()
    with Client(target) as client:
        client.generate("hi", adapter="é")
        client.generate("hi", adapter="a\nb")
    assert [md[ADAPTER_HEADER] for _, md in servicer.metadata] == ["", ""]


def test_request_needs_exactly_one_input():
    from loraplex.clients.types import generate_request

    with pytest.raises(ValueError):
        generate_request()
    with pytest.raises(ValueError):
        generate_request("a", prompt_token_ids=[1])
    request = generate_request(prompt_token_ids=[5, 6], seed=0, top_p=0.5)
    assert request.WhichOneof("input") == "prompt_token_ids" and request.sampling.HasField("seed")
    assert not generate_request("x").sampling.HasField("seed")
