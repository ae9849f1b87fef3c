"""The gRPC servicers: proto messages <-> engine objects, and every failure onto its own status code.

Handlers never block on the model: they submit to the engine (`EngineClient`) and await its
per-request queue. Leaving a handler early (client cancel, deadline, a failed write) closes the
engine's async iterator, which aborts the sequence in the engine and frees its KV blocks and adapter
reference at once. Admission (warm-up, drain, queue limit, admin token) is admission.py's.

Engine requests get a server-made id; the client's `request_id` is only echoed back, so two clients
choosing the same id cannot collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import uuid
from typing import AsyncIterator, NoReturn

import grpc

from loraplex.server import __version__
from loraplex.server.api.admission import (
    Call,
    ServerState,
    accepting_engine,
    admin_engine,
    admit,
    check_admin_token,
    check_registration_allowed,
)
from loraplex.server.engine.client import (
    AdapterInfo,
    AdapterState,
    EngineClient,
    GenerationRequest,
    RequestOutput,
    SamplingParams,
)
from loraplex.server.errors import EngineError, InvalidArgument
from loraplex.server.failures import internal_error_message, report_internal_error
from loraplex.v1 import loraplex_pb2 as pb
from loraplex.v1 import loraplex_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

FINISH_REASONS = {
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "eos": pb.FINISH_REASON_EOS,
}
ADAPTER_STATES = {
    AdapterState.REGISTERED: pb.ADAPTER_STATE_REGISTERED,
    AdapterState.HOST: pb.ADAPTER_STATE_HOST,
    AdapterState.DEVICE: pb.ADAPTER_STATE_DEVICE,
    AdapterState.QUARANTINED: pb.ADAPTER_STATE_QUARANTINED,
}


class _Abort(Exception):
    """A status to end the RPC with; raised inside handlers, turned into context.abort at one place."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _from_engine_error(error: EngineError) -> _Abort:
    code = getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)
    return _Abort(code, str(error))


def _guarded(handler):
    """An exception the handler did not expect ends the RPC as INTERNAL with an error id, logged with
    its traceback and counted; the server keeps serving."""
    where = f"RPC {handler.__name__}"

    async def internal(self: "_Handler", context) -> NoReturn:
        error_id = report_internal_error(where)
        self.state.metrics.count_error(grpc.StatusCode.INTERNAL.name)
        await context.abort(grpc.StatusCode.INTERNAL, internal_error_message(error_id))

    if inspect.isasyncgenfunction(handler):
        @functools.wraps(handler)
        async def stream(self, request, context):
            try:
                async with contextlib.aclosing(handler(self, request, context)) as responses:
                    async for response in responses:
                        yield response
            except grpc.aio.AbortError:  # a status the handler chose (and counted)
                raise
            except Exception:
                await internal(self, context)

        return stream

    @functools.wraps(handler)
    async def unary(self, request, context):
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception:
            await internal(self, context)

    return unary


class _Handler:
    """Status-code plumbing shared by both servicers."""

    def __init__(self, state: ServerState):
        self.state = state

    async def _fail(self, context: grpc.aio.ServicerContext, abort: _Abort) -> NoReturn:
        self.state.metrics.count_error(abort.code.name)
        await context.abort(abort.code, abort.message)

    def _count_cancelled(self, context: grpc.aio.ServicerContext) -> None:
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        self.state.metrics.count_error("DEADLINE_EXCEEDED" if expired else "CANCELLED")

    def _engine(self) -> EngineClient:
        try:
            return accepting_engine(self.state)
        except EngineError as error:
            raise _from_engine_error(error) from None


class GeneratorServicer(pb_grpc.GeneratorServicer, _Handler):
    @_guarded
    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        text: list[str] = []
        token_ids: list[int] = []
        logprobs: list[float] = []
        last = RequestOutput("")
        request_id = ""
        async with contextlib.aclosing(self._outputs(request, context)) as outputs:
            async for request_id, last in outputs:
                text.append(last.text)
                token_ids.extend(last.token_ids)
                logprobs.extend(last.logprobs)
        return pb.GenerateResponse(
            request_id=request_id,
            text="".join(text),
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=FINISH_REASONS[last.finish_reason],
            usage=pb.Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens),
        )

    @_guarded
    async def GenerateStream(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        async with contextlib.aclosing(self._outputs(request, context)) as outputs:
            async for request_id, output in outputs:
                response = pb.GenerateResponse(request_id=request_id, text=output.text, token_ids=output.token_ids,
                                               logprobs=output.logprobs)
                if output.finished:
                    response.finish_reason = FINISH_REASONS[output.finish_reason]
                    response.usage.prompt_tokens = output.prompt_tokens
                    response.usage.completion_tokens = output.completion_tokens
                yield response

    @_guarded
    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context) -> pb.ServerInfo:
        try:
            engine = self._engine()
        except _Abort as abort:
            await self._fail(context, abort)
        info = engine.server_info()
        snap = engine.snapshot()
        return pb.ServerInfo(
            model=info.model_path,
            architecture=",".join(info.architectures),
            quantization=info.quantization,
            dtype=info.dtype,
            device=info.device,
            max_context_tokens=info.max_model_len,
            max_rank=info.max_rank,
            max_device_adapters=info.max_device_adapters,
            max_host_adapters=info.max_host_adapters,
            version=__version__,
            kv_cache_tokens=info.kv_cache_tokens,
            kv_cache_usage=snap.kv_cache_usage,
            running_requests=snap.num_running,
            queued_requests=snap.num_waiting,
            max_queued_requests=self.state.config.max_queued_requests,
            batch_invariant=info.batch_invariant,
            int8_threshold=info.int8_threshold,
            prefix_caching=info.prefix_caching,
            prefix_cache_tokens=snap.prefix_cache_blocks * info.block_size,
        )

    async def _outputs(self, request: pb.GenerateRequest, context) -> AsyncIterator[tuple[str, RequestOutput]]:
        """The engine outputs of one request, with admission, status codes and metrics around them."""
        state = self.state
        try:
            engine = admit(state)
            engine_request = to_generation_request(request)
        except EngineError as error:
            await self._fail(context, _from_engine_error(error))
        request_id = request.request_id or engine_request.request_id
        call = Call(state, engine, engine_request.request_id, state.metrics.track(request.adapter_id))
        # However the RPC ends (even if grpc drops this generator without closing it), the engine
        # sequence is aborted and the accounting closed.
        context.add_done_callback(lambda _: call.close())
        try:
            async with contextlib.aclosing(engine.generate(engine_request)) as outputs:
                async for output in outputs:
                    call.tracker.output(output)
                    if output.finished:
                        call.finish = output.finish_reason
                        if output.finish_reason not in FINISH_REASONS:
                            raise _output_error(output)
                    yield request_id, output
        except _Abort as abort:
            await self._fail(context, abort)
        except EngineError as error:  # refused at submission: nothing was accepted
            call.accepted = False
            await self._fail(context, _from_engine_error(error))
        except (asyncio.CancelledError, GeneratorExit):  # the client cancelled or its deadline passed
            self._count_cancelled(context)
            raise
        finally:
            call.close()


def _output_error(output: RequestOutput) -> _Abort:
    """The status for a request the engine ended without a result (after accepting it)."""
    if output.error is not None:
        return _from_engine_error(output.error)
    if output.finish_reason == "cancelled":
        return _Abort(grpc.StatusCode.CANCELLED, "the request was cancelled in the engine")
    return _Abort(grpc.StatusCode.INTERNAL, f"the engine ended the request with {output.finish_reason!r}")


def to_generation_request(request: pb.GenerateRequest) -> GenerationRequest:
    """The engine request for a proto request; InvalidArgument for values the engine cannot take."""
    sampling = request.sampling
    params = SamplingParams.from_proto_values(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        repetition_penalty=sampling.repetition_penalty,
        seed=sampling.seed if sampling.HasField("seed") else None,
        max_new_tokens=request.max_new_tokens,
        stop=tuple(request.stop),
        ignore_eos=request.ignore_eos,
        return_logprobs=request.return_logprobs,
    )
    which = request.WhichOneof("input")
    if which is None:
        raise InvalidArgument("the request has no input: set prompt or prompt_token_ids")
    if which == "prompt_token_ids":
        ids = tuple(request.prompt_token_ids.ids)
        if not ids:
            raise InvalidArgument("prompt_token_ids is empty")
        prompt = None
    else:
        ids, prompt = None, request.prompt
        if not prompt:
            raise InvalidArgument("the prompt is empty")
    return GenerationRequest(request_id=uuid.uuid4().hex, prompt=prompt, prompt_token_ids=ids,
                             adapter_id=request.adapter_id or None, sampling=params,
                             cache_prompt=not request.HasField("cache_prompt") or request.cache_prompt)


class AdaptersServicer(pb_grpc.AdaptersServicer, _Handler):
    """Adapter management; with --admin-token every call needs `authorization: Bearer <token>`."""

    @_guarded
    async def RegisterAdapter(self, request: pb.RegisterAdapterRequest, context) -> pb.Adapter:
        async def call(engine: EngineClient) -> pb.Adapter:
            check_registration_allowed(self.state.config, "sources then resolve")
            info = await engine.register_adapter(request.adapter_id, request.source, request.pin)
            if request.preload:
                await preload_adapter(engine, request.adapter_id)
                info = engine.get_adapter(request.adapter_id)
            return to_proto_adapter(info)

        return await self._admin(context, call)

    @_guarded
    async def UnregisterAdapter(self, request: pb.UnregisterAdapterRequest, context) -> pb.UnregisterAdapterResponse:
        async def call(engine: EngineClient) -> pb.UnregisterAdapterResponse:
            await engine.unregister_adapter(request.adapter_id)
            return pb.UnregisterAdapterResponse()

        return await self._admin(context, call, while_draining=True)

    @_guarded
    async def ListAdapters(self, request: pb.ListAdaptersRequest, context) -> pb.ListAdaptersResponse:
        async def call(engine: EngineClient) -> pb.ListAdaptersResponse:
            return pb.ListAdaptersResponse(adapters=[to_proto_adapter(a) for a in engine.list_adapters()])

        return await self._admin(context, call, while_draining=True)

    @_guarded
    async def GetAdapter(self, request: pb.GetAdapterRequest, context) -> pb.Adapter:
        async def call(engine: EngineClient) -> pb.Adapter:
            return to_proto_adapter(engine.get_adapter(request.adapter_id))

        return await self._admin(context, call, while_draining=True)

    async def _admin(self, context, call, while_draining: bool = False):
        try:
            sent = dict(context.invocation_metadata() or ()).get("authorization")
            check_admin_token(self.state.config, sent,
                              missing="the Adapters service of this server needs an admin token: send the metadata "
                              "'authorization: Bearer <token>' (loraplex adapters --admin-token or "
                              "$LORAPLEX_ADMIN_TOKEN)",
                              wrong="the admin token is wrong (expected 'Bearer <token>')")
            return await call(admin_engine(self.state, while_draining))
        except _Abort as abort:
            await self._fail(context, abort)
        except EngineError as error:
            await self._fail(context, _from_engine_error(error))
        except asyncio.CancelledError:
            self._count_cancelled(context)
            raise


async def preload_adapter(engine: EngineClient, adapter_id: str) -> None:
    """Put an adapter into a device slot now by running one token through it (the slot stays
    assigned until another adapter needs it)."""
    request = GenerationRequest(request_id=f"preload-{uuid.uuid4().hex}", prompt_token_ids=(0,),
                                adapter_id=adapter_id, sampling=SamplingParams(max_new_tokens=1, ignore_eos=True))
    async with contextlib.aclosing(engine.generate(request)) as outputs:
        async for output in outputs:
            if output.finished and output.error is not None:
                raise output.error


def to_proto_adapter(info: AdapterInfo) -> pb.Adapter:
    return pb.Adapter(
        adapter_id=info.adapter_id,
        source=info.source,
        peft_type=info.peft_type,
        max_rank=info.max_rank,
        target_modules=info.target_modules,
        num_virtual_tokens=info.num_virtual_tokens,
        state=ADAPTER_STATES.get(info.state, pb.ADAPTER_STATE_UNSPECIFIED),
        size_bytes=info.size_bytes,
        pinned=info.pinned,
        quarantine_reason=info.quarantine_reason or "",
    )
