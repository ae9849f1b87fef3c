"""The OpenAI-compatible HTTP API (FastAPI on uvicorn), beside the gRPC API on the same engine.

    POST /v1/completions, /v1/chat/completions   (stream: true -> server-sent events ending in [DONE])
    GET  /v1/models, /v1/models/{model}            the base model and every registered adapter
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter   vLLM's dynamic adapter endpoints
    GET  /health, /metrics

uvicorn runs as a task on the event loop that already runs grpc.aio, so an HTTP handler calls the
same engine (`EngineClient`), `ServerState` and adapter registry as a gRPC handler, with no locks or
thread hand-off: admission (`admit`), request accounting (`Call`) and metrics are admission.py's,
shared with the gRPC API. The signal handling stays with `server.run` (one drain for both APIs), so
uvicorn's is turned off.

Errors are OpenAI's error object with the HTTP status of the gRPC status the same failure gets on the
gRPC API, and are counted in `loraplex_request_errors_total` under that gRPC status name. A client
that disconnects (before or during a stream) aborts its engine request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.server.api import openai_protocol as oa
from loraplex.server.api.admission import (
    Call,
    ServerState,
    accepting_engine,
    admin_engine,
    admit,
    check_admin_token,
    check_registration_allowed,
    default_max_new_tokens,
)
from loraplex.server.engine.client import EngineClient, GenerationRequest, RequestOutput
from loraplex.server.errors import EngineError, InvalidArgument, NotFound
from loraplex.server.errors import UserError
from loraplex.server.failures import internal_error_message, report_internal_error

log = logging.getLogger(__name__)

# the HTTP status of each gRPC status (google.rpc's mapping), so both APIs report a failure alike
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "ABORTED": 409, "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499, "INTERNAL": 500, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 429: "rate_limit_error", 503: "service_unavailable"}
SSE_DONE = b"data: [DONE]\n\n"


class ApiError(Exception):
    """A failure to answer with OpenAI's error object; `code` is the gRPC status name."""

    def __init__(self, code: str, message: str, param: str | None = None, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self._status = status

    @classmethod
    def of(cls, error: EngineError) -> "ApiError":
        return cls(error.code, str(error), getattr(error, "param", None))

    @property
    def status(self) -> int:
        return self._status or HTTP_STATUS.get(self.code, 500)

    def body(self) -> dict[str, Any]:
        kind = ERROR_TYPES.get(self.status, "internal_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Disconnected(Exception):
    """The client closed the connection before the answer was ready."""


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class HttpApi:
    """The FastAPI application over one `ServerState`."""

    def __init__(self, state: ServerState):
        self.state = state
        self.chat_template = state.config.chat_template.read_text() if state.config.chat_template else None
        app = FastAPI(title="loraplex", version="1", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_exception_handler(RequestValidationError, self._invalid_body)
        app.add_exception_handler(StarletteHTTPException, self._http_exception)
        app.post("/v1/completions")(self._guarded(self.completions))
        app.post("/v1/chat/completions")(self._guarded(self.chat_completions))
        app.get("/v1/models")(self._guarded(self.list_models))
        app.get("/v1/models/{model:path}")(self._guarded(self.get_model))
        app.post("/v1/load_lora_adapter")(self._guarded(self.load_lora_adapter))
        app.post("/v1/unload_lora_adapter")(self._guarded(self.unload_lora_adapter))
        app.get("/health")(self._guarded(self.health))
        app.get("/metrics")(self.metrics)
        self.app = app

    @property
    def model_name(self) -> str:
        return self.state.config.model_name

    # ------------------------------------------------------------------ error plumbing
    def _fail(self, error: ApiError) -> JSONResponse:
        self.state.metrics.count_error(error.code)
        return JSONResponse(error.body(), status_code=error.status)

    def _internal(self, where: str) -> ApiError:
        """Log the exception being handled under a fresh id; the client gets only the id."""
        return ApiError("INTERNAL", internal_error_message(report_internal_error(where)))

    def _guarded(self, handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        """Every failure of `handler` as OpenAI's error object; an unexpected exception as a 500."""

        @functools.wraps(handler)
        async def guarded(*args, **kwargs) -> Response:
            try:
                return await handler(*args, **kwargs)
            except ApiError as error:
                return self._fail(error)
            except EngineError as error:
                return self._fail(ApiError.of(error))
            except _Disconnected:  # counted by the generation it cancelled
                return Response(status_code=499)  # nobody reads it
            except Exception:
                return self._fail(self._internal(handler.__name__))

        return guarded

    async def _invalid_body(self, request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request body"}
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", first["msg"])
            return self._fail(ApiError("INVALID_ARGUMENT", f"the request body is not valid JSON: {detail}"))
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else f"invalid request body: {first['msg']}"
        return self._fail(ApiError("INVALID_ARGUMENT", message, param))

    async def _http_exception(self, request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "NOT_FOUND", 405: "UNIMPLEMENTED"}.get(exc.status_code, "INVALID_ARGUMENT")
        status = exc.status_code if exc.status_code < 500 else None
        return self._fail(ApiError(code, f"{request.method} {request.url.path}: {exc.detail}", status=status))

    # ------------------------------------------------------------------ generation
    async def completions(self, body: oa.CompletionRequest, request: Request) -> Response:
        body.check_supported()
        prompts = body.prompts()
        if body.max_tokens is not None and body.max_tokens < 1:
            raise oa.BadParameter("max_tokens", f"max_tokens must be >= 1, got {body.max_tokens}")
        sampling = body.sampling(body.max_tokens or 16, logprobs=body.logprobs is not None)
        return await self._generate(request, body, prompts, sampling, chat=False)

    async def chat_completions(self, body: oa.ChatCompletionRequest, request: Request) -> Response:
        body.check_supported()
        engine = accepting_engine(self.state)
        prompt_ids = self._apply_chat_template(engine, body)
        limit = body.max_new_tokens
        if limit is not None and limit < 1:
            name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            raise oa.BadParameter(name, f"{name} must be >= 1, got {limit}")
        if limit is None:  # OpenAI's default: up to the context; here also within the KV cache
            limit = default_max_new_tokens(engine, len(prompt_ids))
        sampling = body.sampling(limit, logprobs=body.logprobs)
        return await self._generate(request, body, [(None, prompt_ids)], sampling, chat=True)

    def _apply_chat_template(self, engine: EngineClient, body: oa.ChatCompletionRequest) -> tuple[int, ...]:
        tokenizer = engine.get_tokenizer()
        template = self.chat_template or getattr(tokenizer, "chat_template", None)
        if not template:
            raise oa.BadParameter("messages", "this model has no chat template (none in its tokenizer files, and the "
                                  "server was started without --chat-template FILE); use /v1/completions")
        messages = [message.template_dict(i) for i, message in enumerate(body.messages)]
        try:
            text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as error:  # jinja's TemplateError, or the template's own raise_exception
            raise oa.BadParameter("messages", f"the chat template rejected the messages: {error}") from None
        # the template writes any special tokens (BOS) itself
        return tuple(tokenizer.encode(text, add_special_tokens=False))

    async def _generate(self, request: Request, body: oa.CompletionRequest | oa.ChatCompletionRequest,
                        prompts: list[tuple[str | None, tuple[int, ...] | None]], sampling, chat: bool) -> Response:
        """One engine request per prompt (choice `index` = the prompt's position), answered together."""
        model = body.model or self.model_name
        adapter_id = None if model == self.model_name else model
        generations: list[_Generation] = []
        try:
            for prompt, prompt_ids in prompts:
                engine = admit(self.state)
                engine_request = GenerationRequest(request_id=uuid.uuid4().hex, prompt=prompt,
                                                   prompt_token_ids=prompt_ids, adapter_id=adapter_id, sampling=sampling,
                                                   cache_prompt=body.cache_prompt)
                generations.append(_Generation(self.state, engine, engine_request, self.model_name))
            response_id = ("chatcmpl-" if chat else "cmpl-") + generations[0].request.request_id
            tokenizer = engine.get_tokenizer()
            if not body.stream:
                results = await _unless_disconnected(request, _all(g.collect() for g in generations))
            else:
                # the first outputs are awaited before the 200 goes out, so a refused request gets its own status
                firsts = await _unless_disconnected(request, _all(g.next() for g in generations))
        except BaseException as error:
            if not isinstance(error, (_Disconnected, asyncio.CancelledError)):
                for generation in generations:
                    generation.failed = True  # the siblings of a failed prompt end with its error, not cancelled
            for generation in generations:
                await generation.aclose()
            raise
        if body.stream:
            stream = _Stream(self, generations, firsts, response_id, model, chat, body.include_usage,
                             sampling.return_logprobs, tokenizer)
            return _EventStream(stream)
        for generation in generations:
            await generation.aclose()

        def decoded(result: oa.Accumulated) -> list[str]:
            return [tokenizer.decode([t]) for t in result.token_ids] if sampling.return_logprobs else []

        if chat:
            (result,) = results
            logprobs = oa.chat_logprobs(decoded(result), result.logprobs) if sampling.return_logprobs else None
            return JSONResponse(oa.chat_body(response_id, model, "".join(result.text), result.last, logprobs))
        choices = [oa.completion_choice(i, "".join(result.text), result.last,
                                        oa.completion_logprobs(decoded(result), result.logprobs, 0)
                                        if sampling.return_logprobs else None)
                   for i, result in enumerate(results)]
        return JSONResponse(oa.completion_body(response_id, model, choices, [r.last for r in results]))

    # ------------------------------------------------------------------ models
    async def list_models(self) -> Response:
        return JSONResponse({"object": "list", "data": self._models()})

    async def get_model(self, model: str) -> Response:
        for entry in self._models():
            if entry["id"] == model:
                return JSONResponse(entry)
        raise ApiError("NOT_FOUND", f"model {model!r} is neither the base model ({self.model_name!r}) nor a "
                       "registered adapter", "model")

    def _models(self) -> list[dict[str, Any]]:
        engine = admin_engine(self.state, while_draining=True)  # listing works while draining, as on gRPC
        info = engine.server_info()
        created = int(time.time())
        base = {"id": self.model_name, "object": "model", "created": created, "owned_by": "loraplex",
                "root": info.model_path, "parent": None, "max_model_len": info.max_model_len}
        adapters = [{"id": a.adapter_id, "object": "model", "created": created, "owned_by": "loraplex",
                     "root": a.source, "parent": self.model_name} for a in engine.list_adapters()]
        return [base, *adapters]

    # ------------------------------------------------------------------ vLLM's dynamic adapters
    async def load_lora_adapter(self, request: Request) -> Response:
        self._authenticate(request)
        body = await _json_object(request, ("lora_name", "lora_path"))
        engine = accepting_engine(self.state)
        check_registration_allowed(self.state.config, "lora_path then resolves")
        name = body["lora_name"]
        await engine.register_adapter(name, body["lora_path"])
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, request: Request) -> Response:
        self._authenticate(request)
        body = await _json_object(request, ("lora_name",))
        name = body["lora_name"]
        await admin_engine(self.state, while_draining=True).unregister_adapter(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    def _authenticate(self, request: Request) -> None:
        check_admin_token(self.state.config, request.headers.get("authorization"),
                          missing="adapter loading on this server needs the admin token: send the header "
                          "'Authorization: Bearer <token>'",
                          wrong="the admin token is wrong (expected 'Authorization: Bearer <token>')")

    # ------------------------------------------------------------------ health and metrics
    async def health(self) -> Response:
        accepting_engine(self.state)
        return Response(status_code=200)

    async def metrics(self) -> Response:
        # the endpoint picker scrapes every pod many times a second: render off the loop the streams share
        page = await asyncio.to_thread(generate_latest, self.state.metrics.registry)
        return Response(page, media_type=CONTENT_TYPE_LATEST)


async def _json_object(request: Request, required: tuple[str, ...]) -> dict[str, Any]:
    """The request's JSON object with each `required` field a non-empty string."""
    try:
        body = json.loads(await request.body() or b"null")
    except ValueError as error:
        raise InvalidArgument(f"the request body is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise InvalidArgument(f"the request body must be a JSON object with {', '.join(required)}")
    for name in required:
        if not isinstance(body.get(name), str) or not body[name]:
            raise oa.BadParameter(name, f"{name} is missing or not a non-empty string")
    return body


async def _all(coroutines) -> list:
    """The results of all `coroutines`, run concurrently; when one fails, the others are cancelled."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until_disconnected(request: Request) -> None:
    # once the body is read, the next ASGI message is http.disconnect: the client went away
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable):
    """The result of `work`; _Disconnected (and `work` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task.cancelled():
        raise _Disconnected()
    return task.result()


class _Generation:
    """One HTTP generation request in the engine: accounting and metrics as on the gRPC API."""

    def __init__(self, state: ServerState, engine: EngineClient, request: GenerationRequest, model_name: str):
        self.request = request
        self.model_name = model_name
        self.metrics = state.metrics
        self.call = Call(state, engine, request.request_id, state.metrics.track(request.adapter_id))
        self.outputs = engine.generate(request)
        self.started = False
        self.done = False
        self.failed = False
        """Ended with an error that was answered (and counted) already."""

    async def next(self) -> RequestOutput:
        """The next output; EngineError if the engine refused the request or ended it without a result."""
        self.started = True
        try:
            output = await self.outputs.__anext__()
        except NotFound as error:  # refused at submission: nothing was accepted
            self.call.accepted = False
            self.failed = True
            if self.request.adapter_id is not None:
                raise ApiError(error.code, f"model {self.request.adapter_id!r} is neither the base model "
                               f"({self.model_name!r}) nor a registered adapter: {error}", "model") from None
            raise
        except EngineError:
            self.call.accepted = False
            self.failed = True
            raise
        self.call.tracker.output(output)
        if output.finished:
            self.done = True
            self.call.finish = output.finish_reason
            if output.finish_reason not in oa.FINISH_REASONS:
                self.failed = True
                raise _output_error(output)
        return output

    async def collect(self) -> oa.Accumulated:
        everything = oa.Accumulated()
        while not self.done:
            everything.add(await self.next())
        return everything

    async def aclose(self) -> None:
        """Release the request however it ended; one that ended early without an error was cancelled by
        its client (a disconnect), and is counted so."""
        if not self.started:
            self.call.accepted = False  # never reached the engine: not a request to count
        elif not (self.done or self.failed or self.call.closed):
            self.metrics.count_error("CANCELLED")
        try:
            # one being iterated by a task (a cancelled pump) is closed by that task's cancellation
            if not self.outputs.ag_running:
                await self.outputs.aclose()
        finally:
            self.call.close()  # also aborts the engine request if it is still running


def _output_error(output: RequestOutput) -> EngineError:
    """The error of a request the engine ended without a result (after accepting it)."""
    if output.error is not None:
        return output.error
    error = EngineError(f"the engine ended the request with {output.finish_reason!r}")
    if output.finish_reason == "cancelled":
        error.code = "CANCELLED"
    return error


class _Stream:
    """The server-sent events of one streamed request (one choice per prompt), from its first outputs on."""

    def __init__(self, api: HttpApi, generations: list[_Generation], firsts: list[RequestOutput], response_id: str,
                 model: str, chat: bool, include_usage: bool, logprobs: bool, tokenizer):
        self.api = api
        self.generations = generations
        self.firsts = firsts
        self.response_id = response_id
        self.model = model
        self.chat = chat
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.tokenizer = tokenizer
        self.created = int(time.time())
        self.offsets = [0] * len(generations)

    def _chunk(self, index: int, output: RequestOutput) -> dict[str, Any]:
        tokens = [self.tokenizer.decode([t]) for t in output.token_ids] if self.logprobs else []
        if self.chat:
            logprobs = oa.chat_logprobs(tokens, output.logprobs) if self.logprobs else None
            delta = {"content": output.text} if output.text or not output.finished else {}
            return oa.chat_chunk(self.response_id, self.created, self.model, delta, output, logprobs,
                                 self.include_usage)
        logprobs = oa.completion_logprobs(tokens, output.logprobs, self.offsets[index]) if self.logprobs else None
        self.offsets[index] += sum(map(len, tokens))
        return oa.completion_chunk(self.response_id, self.created, self.model, index, output.text, output, logprobs,
                                   self.include_usage)

    async def _outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) as the engine produces them, every prompt's first output first."""
        for index, first in enumerate(self.firsts):
            yield index, first
        if len(self.generations) == 1:  # no merging needed: no task or queue per token
            generation, output = self.generations[0], self.firsts[0]
            while not output.finished:
                output = await generation.next()
                yield 0, output
            return
        queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()

        async def pump(index: int) -> None:
            output = self.firsts[index]
            try:
                while not output.finished:
                    output = await self.generations[index].next()
                    queue.put_nowait((index, output, None))
            except Exception as error:
                queue.put_nowait((index, None, error))

        pumps = [asyncio.ensure_future(pump(i)) for i, first in enumerate(self.firsts) if not first.finished]
        running = len(pumps)
        try:
            while running:
                index, output, error = await queue.get()
                if error is not None:
                    raise error
                running -= output.finished
                yield index, output
        finally:
            for task in pumps:
                task.cancel()

    async def events(self) -> AsyncIterator[bytes]:
        metrics = self.api.state.metrics
        lasts = list(self.firsts)
        try:
            if self.chat:
                yield _sse(oa.chat_chunk(self.response_id, self.created, self.model,
                                         {"role": "assistant", "content": ""}, None, None, self.include_usage))
            async for index, output in self._outputs():
                lasts[index] = output
                yield _sse(self._chunk(index, output))
            if self.include_usage:
                kind = "chat.completion.chunk" if self.chat else "text_completion"
                yield _sse(oa.usage_chunk(kind, self.response_id, self.created, self.model, lasts))
        except Exception as exc:  # the status line is gone: the error travels as an event
            error = ApiError.of(exc) if isinstance(exc, EngineError) else self.api._internal("stream")
            for generation in self.generations:
                generation.failed = True
            metrics.count_error(error.code)
            yield _sse(error.body())
        finally:
            for generation in self.generations:
                await generation.aclose()
        yield SSE_DONE


class _EventStream(StreamingResponse):
    """A stream's response; its request is released even if the response never starts (the client
    went away between the first output and the first byte)."""

    def __init__(self, stream: _Stream):
        super().__init__(stream.events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.generations = stream.generations

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for generation in self.generations:
                await generation.aclose()


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: `server.run` drains both APIs on SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """The HTTP API served by uvicorn as a task of the running event loop."""

    # seconds an open HTTP response gets to finish when the server stops (as gRPC's stop grace)
    STOP_GRACE = 1.0

    def __init__(self, state: ServerState):
        self.api = HttpApi(state)
        self.tls = state.config.tls_cert is not None
        self.port = 0
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: a free port) and serve; returns the bound port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as error:
            sock.close()
            raise UserError(f"cannot serve the HTTP API on {host}:{port} (is the port in use?): {error}") from None
        sock.listen(1024)
        sock.setblocking(False)
        server_config = self.api.state.config
        tls = {"ssl_certfile": str(server_config.tls_cert), "ssl_keyfile": str(server_config.tls_key)} if self.tls else {}
        config = uvicorn.Config(self.api.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=self.STOP_GRACE, **tls)
        self._server = _Uvicorn(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # uvicorn failed to start: raise its error
                raise UserError(f"the HTTP API on {host}:{port} did not start")
            await asyncio.sleep(0.01)
        self.port = sock.getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._server = None
