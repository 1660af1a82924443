"""The client's errors: one small tree, mapped from gRPC status codes in one place (``mapped``).

::

    SessionAuthorityError            any failed call; .code (grpc.StatusCode) and .details kept
    ├── InvalidArgument              INVALID_ARGUMENT, OUT_OF_RANGE: the request is wrong
    ├── Unauthenticated              UNAUTHENTICATED: no or an invalid API key / certificate
    ├── PermissionDenied             PERMISSION_DENIED: authenticated, not allowed this RPC
    ├── Unavailable                  UNAVAILABLE: no answer (retried first, when idempotent)
    ├── DeadlineExceeded             DEADLINE_EXCEEDED: no answer within the deadline
    ├── ResourceExhausted            RESOURCE_EXHAUSTED: the server sheds load
    ├── Cancelled                    CANCELLED
    └── ServerError                  any other code (INTERNAL, UNKNOWN, UNIMPLEMENTED, ...)

An invalid session is not an error: ``validate`` answers ``Validation(valid=False, ...)``.
``Unavailable`` and ``DeadlineExceeded`` mean "cannot know": never read them as "invalid".

No message, repr or attribute holds a token: the server never echoes one, and whatever the
call carried as a secret is cut out of the details as a second line of defence.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

__all__ = [
    "Cancelled",
    "DeadlineExceeded",
    "InvalidArgument",
    "PermissionDenied",
    "ResourceExhausted",
    "ServerError",
    "SessionAuthorityError",
    "Unauthenticated",
    "Unavailable",
    "mapped",
]

_REDACTED = "<redacted>"


class SessionAuthorityError(Exception):
    """A call that failed. ``code`` is the gRPC status, ``details`` its message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}" if details else code.name)
        self.code = code
        self.details = details

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code.name}, details={self.details!r})"


class InvalidArgument(SessionAuthorityError):
    """The request is wrong (the message names the field)."""


class Unauthenticated(SessionAuthorityError):
    """No credentials, or credentials the server does not accept."""


class PermissionDenied(SessionAuthorityError):
    """Authenticated, and not allowed to call this RPC (mutations need the allow-list)."""


class Unavailable(SessionAuthorityError):
    """No answer: refused, reset, TLS failed, or the server cannot know (its database is
    down). Idempotent calls were retried before this was raised."""


class DeadlineExceeded(SessionAuthorityError):
    """No answer within the call's deadline."""


class ResourceExhausted(SessionAuthorityError):
    """The server refused the call to protect itself (admission limits)."""


class Cancelled(SessionAuthorityError):
    """The call was cancelled."""


class ServerError(SessionAuthorityError):
    """Any other status: INTERNAL, UNKNOWN, UNIMPLEMENTED, DATA_LOSS, ..."""


_BY_CODE: dict[grpc.StatusCode, type[SessionAuthorityError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def mapped(exc: grpc.RpcError, secrets: Iterable[str] = ()) -> SessionAuthorityError:
    """Our error for a failed call, with every one of ``secrets`` cut out of its details.
    Raise it ``from None``: grpc's own exception is not chained, so that its text (which
    names the call's peer and details, never the request) does not travel with ours."""
    # A sync call's error is a grpc.Call, an asyncio call's an AioRpcError: both have these.
    code_of, details_of = getattr(exc, "code", None), getattr(exc, "details", None)
    code = code_of() if callable(code_of) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details = str((details_of() if callable(details_of) else None) or "")
    for secret in secrets:
        if secret:
            details = details.replace(secret, _REDACTED)
    return _BY_CODE.get(code, ServerError)(code, details)
