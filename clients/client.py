"""`Client` (blocking) and `AsyncClient` (asyncio) for a loraplex server.

    from loraplex.clients import Client
    with Client("127.0.0.1:50051") as client:
        print(client.generate("Q: Where do fish live?\\nA:", adapter="pirate", max_new_tokens=32).text)
        for piece in client.stream("Q: What is a ship?\\nA:", adapter="robot"):
            print(piece.text, end="", flush=True)

Every call carries an `x-adapter-id` metadata header with the adapter it concerns (empty for the base
model and for calls about no adapter), so a proxy can route on it without parsing the body. Failed
calls raise the `loraplex.clients.errors` exception of their status code. Leaving a stream early
cancels the request on the server, which frees its resources at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.clients import types
from loraplex.clients.errors import LoraplexError, Unavailable, from_rpc_error
from loraplex.clients.types import Adapter, Completion, ServerInfo
from loraplex.v1 import loraplex_pb2 as pb
from loraplex.v1 import loraplex_pb2_grpc as pb_grpc

ADAPTER_HEADER = "x-adapter-id"
DEFAULT_TARGET = "127.0.0.1:50051"
# The server's limits (loraplex.server.api.config): a request above 4 MiB fails here, before sending.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 4 * 1024 * 1024),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


def _credentials(tls: bool, root_certificates: bytes | None) -> grpc.ChannelCredentials | None:
    if not tls and root_certificates is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


class _Base:
    def __init__(self, target: str, admin_token: str | None, timeout: float | None):
        self.target = target
        self.admin_token = admin_token
        self.timeout = timeout

    def _metadata(self, adapter_id: str | None, admin: bool = False) -> tuple[tuple[str, str], ...]:
        # gRPC cannot send a non-ASCII header; such an id is malformed and the server says so (INVALID_ARGUMENT)
        routable = adapter_id and adapter_id.isascii() and adapter_id.isprintable()
        metadata = [(ADAPTER_HEADER, adapter_id if routable else "")]
        if admin and self.admin_token:
            metadata.append(("authorization", f"Bearer {self.admin_token}"))
        return tuple(metadata)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


class Client(_Base):
    """A blocking client. `target` is "host:port"; `tls=True` (or `root_certificates`) for a TLS server.

    `admin_token` is sent on Adapters calls only; `timeout` (seconds) is the default deadline of every
    call, None for none."""

    def __init__(self, target: str = DEFAULT_TARGET, *, admin_token: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, timeout: float | None = None):
        super().__init__(target, admin_token, timeout)
        credentials = _credentials(tls, root_certificates)
        self.channel = (grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS) if credentials
                        else grpc.insecure_channel(target, options=CHANNEL_OPTIONS))
        self.generator = pb_grpc.GeneratorStub(self.channel)
        self.adapters = pb_grpc.AdaptersStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request, adapter_id: str | None, timeout: float | None, admin: bool = False):
        try:
            return method(request, timeout=self._timeout(timeout), metadata=self._metadata(adapter_id, admin))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: str | None = None, *, adapter: str | None = None, timeout: float | None = None,
                 **options) -> Completion:
        """The whole output. Options: prompt_token_ids, max_new_tokens, temperature, top_p, top_k,
        repetition_penalty, seed, stop, ignore_eos, return_logprobs, request_id, cache_prompt."""
        request = types.generate_request(prompt, adapter=adapter, **options)
        return types.completion(self._call(self.generator.Generate, request, adapter, timeout))

    def stream(self, prompt: str | None = None, *, adapter: str | None = None, timeout: float | None = None,
               **options) -> Iterator[Completion]:
        """The output piece by piece; the last piece has finish_reason and the token counts."""
        request = types.generate_request(prompt, adapter=adapter, **options)
        call = self.generator.GenerateStream(request, timeout=self._timeout(timeout),
                                             metadata=self._metadata(adapter))
        try:
            for response in call:
                yield types.completion(response)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()  # a no-op once the stream has ended; frees the request if the caller left early

    def server_info(self, timeout: float | None = None) -> ServerInfo:
        return types.server_info(self._call(self.generator.GetServerInfo, pb.GetServerInfoRequest(), None, timeout))

    # ------------------------------------------------------------------ adapters
    def register_adapter(self, adapter_id: str, source: str, *, pin: bool = False, preload: bool = False,
                         timeout: float | None = None) -> Adapter:
        request = pb.RegisterAdapterRequest(adapter_id=adapter_id, source=str(source), pin=pin, preload=preload)
        return types.adapter(self._call(self.adapters.RegisterAdapter, request, adapter_id, timeout, admin=True))

    def unregister_adapter(self, adapter_id: str, *, timeout: float | None = None) -> None:
        request = pb.UnregisterAdapterRequest(adapter_id=adapter_id)
        self._call(self.adapters.UnregisterAdapter, request, adapter_id, timeout, admin=True)

    def list_adapters(self, *, timeout: float | None = None) -> list[Adapter]:
        response = self._call(self.adapters.ListAdapters, pb.ListAdaptersRequest(), None, timeout, admin=True)
        return [types.adapter(a) for a in response.adapters]

    def get_adapter(self, adapter_id: str, *, timeout: float | None = None) -> Adapter:
        request = pb.GetAdapterRequest(adapter_id=adapter_id)
        return types.adapter(self._call(self.adapters.GetAdapter, request, adapter_id, timeout, admin=True))

    # ------------------------------------------------------------------ health
    def is_serving(self, timeout: float = 1.0) -> bool:
        """Whether the server's health service reports SERVING (False if it cannot be reached)."""
        try:
            response = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout,
                                         metadata=self._metadata(None))
        except grpc.RpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def wait_until_serving(self, timeout: float = 60.0, poll: float = 0.1) -> None:
        """Block until the server reports SERVING (it has loaded and warmed up); Unavailable after `timeout` s."""
        deadline = time.monotonic() + timeout
        while not self.is_serving(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise Unavailable(f"the server at {self.target} did not report SERVING within {timeout:g} s")
            time.sleep(poll)


class AsyncClient(_Base):
    """The asyncio twin of `Client`: the same methods, awaited; `stream` is an async iterator."""

    def __init__(self, target: str = DEFAULT_TARGET, *, admin_token: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, timeout: float | None = None):
        super().__init__(target, admin_token, timeout)
        credentials = _credentials(tls, root_certificates)
        self.channel = (grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS) if credentials
                        else grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS))
        self.generator = pb_grpc.GeneratorStub(self.channel)
        self.adapters = pb_grpc.AdaptersStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method, request, adapter_id: str | None, timeout: float | None, admin: bool = False):
        try:
            return await method(request, timeout=self._timeout(timeout), metadata=self._metadata(adapter_id, admin))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def generate(self, prompt: str | None = None, *, adapter: str | None = None,
                       timeout: float | None = None, **options) -> Completion:
        request = types.generate_request(prompt, adapter=adapter, **options)
        return types.completion(await self._call(self.generator.Generate, request, adapter, timeout))

    async def stream(self, prompt: str | None = None, *, adapter: str | None = None,
                     timeout: float | None = None, **options) -> AsyncIterator[Completion]:
        request = types.generate_request(prompt, adapter=adapter, **options)
        call = self.generator.GenerateStream(request, timeout=self._timeout(timeout),
                                             metadata=self._metadata(adapter))
        try:
            async for response in call:
                yield types.completion(response)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def server_info(self, timeout: float | None = None) -> ServerInfo:
        message = await self._call(self.generator.GetServerInfo, pb.GetServerInfoRequest(), None, timeout)
        return types.server_info(message)

    async def register_adapter(self, adapter_id: str, source: str, *, pin: bool = False, preload: bool = False,
                               timeout: float | None = None) -> Adapter:
        request = pb.RegisterAdapterRequest(adapter_id=adapter_id, source=str(source), pin=pin, preload=preload)
        return types.adapter(await self._call(self.adapters.RegisterAdapter, request, adapter_id, timeout,
                                              admin=True))

    async def unregister_adapter(self, adapter_id: str, *, timeout: float | None = None) -> None:
        request = pb.UnregisterAdapterRequest(adapter_id=adapter_id)
        await self._call(self.adapters.UnregisterAdapter, request, adapter_id, timeout, admin=True)

    async def list_adapters(self, *, timeout: float | None = None) -> list[Adapter]:
        response = await self._call(self.adapters.ListAdapters, pb.ListAdaptersRequest(), None, timeout, admin=True)
        return [types.adapter(a) for a in response.adapters]

    async def get_adapter(self, adapter_id: str, *, timeout: float | None = None) -> Adapter:
        request = pb.GetAdapterRequest(adapter_id=adapter_id)
        return types.adapter(await self._call(self.adapters.GetAdapter, request, adapter_id, timeout, admin=True))

    async def is_serving(self, timeout: float = 1.0) -> bool:
        try:
            response = await self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout,
                                               metadata=self._metadata(None))
        except grpc.RpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    async def wait_until_serving(self, timeout: float = 60.0, poll: float = 0.1) -> None:
        deadline = time.monotonic() + timeout
        while not await self.is_serving(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise Unavailable(f"the server at {self.target} did not report SERVING within {timeout:g} s")
            await asyncio.sleep(poll)


__all__ = ["ADAPTER_HEADER", "AsyncClient", "Client", "LoraplexError"]
