"""The last line of defence: an exception nobody expected becomes a generic error with an id.

The id goes to the client (gRPC INTERNAL, HTTP 500) and into the log beside the traceback, so an
operator can find the cause of one user's report while the client learns nothing of the internals.
"""

from __future__ import annotations

import logging
import uuid

log = logging.getLogger(__name__)


def report_internal_error(where: str, error: BaseException | None = None) -> str:
    """Log `error` (default: the exception being handled), with its traceback, under a new error id;
    return the id."""
    error_id = uuid.uuid4().hex[:16]
    log.error("internal error %s in %s", error_id, where, exc_info=error if error is not None else True)
    return error_id


def internal_error_message(error_id: str) -> str:
    """What the client is told: nothing of the exception, the id to quote."""
    return f"internal server error (error id {error_id}); the server logged the details under this id"
