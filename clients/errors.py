"""Typed exceptions for the gRPC status codes a loraplex server returns.

    try:
        client.generate("Q: Hi\\nA:", adapter="pirate")
    except loraplex.clients.NotFound as error:
        print(error.code, error.message)
"""

from __future__ import annotations

import grpc


class LoraplexError(Exception):
    """A call failed; `code` is the grpc.StatusCode, `message` the server's explanation."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(LoraplexError):
    """Bad sampling values, an empty prompt, a prompt longer than the context, a malformed id."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LoraplexError):
    """The adapter is not registered."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(LoraplexError):
    """An adapter with this id is already registered."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(LoraplexError):
    """The adapter does not fit the base model (shapes, modules, rank above the server's maximum)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(LoraplexError):
    """The server's queue or KV cache is full for this request; retry later or ask for less."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(LoraplexError):
    """The server is unreachable, warming up or shutting down; retry (elsewhere)."""

    code = grpc.StatusCode.UNAVAILABLE


class PermissionDenied(LoraplexError):
    """The adapter source is outside the server's adapter root, or the server takes no paths."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(LoraplexError):
    """The Adapters service needs the server's admin token (missing or wrong)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class DeadlineExceeded(LoraplexError):
    """The call's timeout passed; the server stopped the request."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(LoraplexError):
    code = grpc.StatusCode.CANCELLED


class Internal(LoraplexError):
    """A bug in the server; the message says where."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE = {cls.code: cls for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition,
                                      ResourceExhausted, Unavailable, PermissionDenied, Unauthenticated,
                                      DeadlineExceeded, Cancelled, Internal)}


def from_rpc_error(error: grpc.RpcError) -> LoraplexError:
    """The typed exception for a failed call (sync or asyncio grpc)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = (error.details() if hasattr(error, "details") else None) or str(error)
    cls = _BY_CODE.get(code, LoraplexError)
    return cls(message, code)
