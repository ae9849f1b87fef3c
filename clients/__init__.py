"""Python client of a loraplex server: `Client` (blocking) and `AsyncClient` (asyncio).

Results are plain dataclasses (`Completion`, `Adapter`, `ServerInfo`); failures raise the exception
of their gRPC status code (`NotFound`, `InvalidArgument`, ... all `LoraplexError`s). Needs only grpcio
and the generated `loraplex.v1` modules (no torch).
"""

if __name__ != "loraplex.clients":  # imported by a bare name (checkout root on sys.path): refused
    raise ImportError(
        f"{__file__} is loraplex.clients, found as {__name__!r} because the checkout root is on sys.path", name=__name__
    )

from loraplex.clients.client import ADAPTER_HEADER, DEFAULT_TARGET, AsyncClient, Client
from loraplex.clients.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LoraplexError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from loraplex.clients.types import Adapter, Completion, ServerInfo

__all__ = [
    "ADAPTER_HEADER",
    "DEFAULT_TARGET",
    "Adapter",
    "AlreadyExists",
    "AsyncClient",
    "Cancelled",
    "Client",
    "Completion",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "LoraplexError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ServerInfo",
    "Unauthenticated",
    "Unavailable",
]
