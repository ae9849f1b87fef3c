"""Errors a user can act on, each tied to the gRPC status the API reports for it.

`UserError` is raised for bad input to a CLI command (missing file, malformed data, options that do
not fit); the CLI prints its message on one line and exits with status 2, never a traceback.

`EngineError` subclasses are raised by the engine, the adapter store and the API's admission checks;
each API front maps `code` (the name of a `grpc.StatusCode`) onto its response status, with the
message unchanged. They
are also `UserError`s so that CLI commands driving the engine in-process report them the same way.
"""


class UserError(Exception):
    """Bad input from the user; the message names what is wrong and how to fix it."""


class EngineError(UserError):
    code = "INTERNAL"


class InvalidArgument(EngineError):
    """Bad sampling values, empty or too long prompt, malformed ids."""

    code = "INVALID_ARGUMENT"


class NotFound(EngineError):
    """Unknown (or unregistered) adapter id."""

    code = "NOT_FOUND"


class AlreadyExists(EngineError):
    """An adapter id that is already registered."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(EngineError):
    """An adapter that does not fit the base model (shapes, modules, rank, unsupported options)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(EngineError):
    """Queue or memory full."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(EngineError):
    """The engine is draining or stopped."""

    code = "UNAVAILABLE"


class PermissionDenied(EngineError):
    """An adapter source outside the allowed root, or adapter paths not accepted over the API."""

    code = "PERMISSION_DENIED"


class Unauthenticated(EngineError):
    """An adapter call without the server's admin token."""

    code = "UNAUTHENTICATED"
