"""Envoy routes on `x-adapter-id` (deploy/envoy/envoy.yaml): every call of both clients must carry it.

A bare grpc.aio server with only an interceptor records each call's metadata and answers UNIMPLEMENTED;
every public method of `Client` and `AsyncClient` is called against it. A method added to a client
without an entry in CALLS fails here, so a new call cannot skip the header unnoticed."""

from __future__ import annotations

import asyncio
import inspect
import threading

import grpc
import pytest

from loraplex.clients import ADAPTER_HEADER, AsyncClient, Client, LoraplexError

pytestmark = pytest.mark.timeout(120)

# method -> (args, kwargs, the adapter id the header must carry)
CALLS = {
    "generate": (("hi",), {"adapter": "pirate"}, "pirate"),
    "stream": (("hi",), {}, ""),
    "server_info": ((), {}, ""),
    "register_adapter": (("robot", "robot"), {}, "robot"),
    "unregister_adapter": (("robot",), {}, "robot"),
    "list_adapters": ((), {}, ""),
    "get_adapter": (("shout",), {}, "shout"),
    "is_serving": ((), {}, ""),
    "wait_until_serving": ((), {"timeout": 0.3, "poll": 0.1}, ""),
}
NOT_CALLS = {"close"}


class Recorder(grpc.aio.ServerInterceptor):
    def __init__(self):
        self.calls: list[tuple[str, str | None]] = []

    async def intercept_service(self, continuation, details):
        self.calls.append((details.method, dict(details.invocation_metadata or ()).get(ADAPTER_HEADER)))
        return await continuation(details)  # no servicer: UNIMPLEMENTED


@pytest.fixture(scope="module")
def recorder():
    recorder = Recorder()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        server = grpc.aio.server(interceptors=[recorder])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield recorder.calls, f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def public_methods(cls) -> set[str]:
    return {name for name, value in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")}


def test_every_client_method_is_listed():
    for cls in (Client, AsyncClient):
        assert public_methods(cls) - NOT_CALLS == set(CALLS), f"update CALLS for {cls.__name__}"


def test_every_sync_call_carries_the_adapter_header(recorder):
    calls, target = recorder
    with Client(target, admin_token="t", timeout=5) as client:
        for name, (args, kwargs, want) in CALLS.items():
            calls.clear()
            try:
                result = getattr(client, name)(*args, **kwargs)
                if inspect.isgenerator(result):
                    list(result)
            except LoraplexError:
                pass  # UNIMPLEMENTED (or Unavailable from wait_until_serving): only the metadata matters
            assert calls and all(header == want for _, header in calls), (name, calls)


def test_every_async_call_carries_the_adapter_header(recorder):
    calls, target = recorder

    async def main():
        async with AsyncClient(target, admin_token="t", timeout=5) as client:
            for name, (args, kwargs, want) in CALLS.items():
                calls.clear()
                try:
                    result = getattr(client, name)(*args, **kwargs)
                    if inspect.isasyncgen(result):
                        [_ async for _ in result]
                    else:
                        await result
                except LoraplexError:
                    pass
                assert calls and all(header == want for _, header in calls), (name, calls)

    asyncio.run(main())
