"""The one error vocabulary of berth.

Every layer raises these; the gRPC server maps them to status codes in exactly
one place (:func:`grpc_status`), the CLI maps them to exit codes. Messages must
name the field or object at fault ("namespace \"x\": not found"), because they
travel unchanged to the operator.
"""

from __future__ import annotations

from grpclib.const import Status


class BerthError(Exception):
    """Base of all expected errors; ``status`` is the gRPC code it maps to."""

    status: Status = Status.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(BerthError):
    status = Status.INVALID_ARGUMENT


class NotFound(BerthError):
    status = Status.NOT_FOUND


class AlreadyExists(BerthError):
    status = Status.ALREADY_EXISTS


class FailedPrecondition(BerthError):
    status = Status.FAILED_PRECONDITION


class Unavailable(BerthError):
    status = Status.UNAVAILABLE


class Unimplemented(BerthError):
    status = Status.UNIMPLEMENTED


class PermissionDenied(BerthError):
    status = Status.PERMISSION_DENIED


class ResourceExhausted(BerthError):
    status = Status.RESOURCE_EXHAUSTED


class Aborted(BerthError):
    status = Status.ABORTED


class DeadlineExceeded(BerthError):
    status = Status.DEADLINE_EXCEEDED


class Canceled(BerthError):
    status = Status.CANCELLED


class Internal(BerthError):
    status = Status.INTERNAL


_BY_STATUS: dict[Status, type[BerthError]] = {
    cls.status: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unavailable,
        Unimplemented,
        PermissionDenied,
        ResourceExhausted,
        Aborted,
        DeadlineExceeded,
        Canceled,
        Internal,
    )
}


def grpc_status(exc: BaseException) -> tuple[Status, str]:
    """Map any exception to the gRPC status and message a client sees.

    Unexpected exceptions become INTERNAL with their text; they are bugs and
    the server logs them with a traceback.
    """
    if isinstance(exc, BerthError):
        return exc.status, exc.message
    return Status.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def from_grpc_status(status: Status, message: str) -> BerthError:
    """The inverse mapping, for clients (CLI, shim client) that re-raise."""
    cls = _BY_STATUS.get(status, BerthError)
    err = cls(message)
    if cls is BerthError:
        err.status = status
    return err
