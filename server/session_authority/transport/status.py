"""The one table from core errors to gRPC status codes.

Messages are the core's own (they name the field and never carry a token).
Anything not in the table is a bug: INTERNAL, logged once by the servicer.
"""

from __future__ import annotations

import grpc

from session_authority.core.errors import (
    CacheBusy,
    CacheReplaced,
    CacheUnavailable,
    CircuitOpen,
    CursorExpired,
    InvalidArgument,
    RateLimited,
    SessionAuthorityError,
    SessionNotFound,
    SessionNotLive,
    StoreBusy,
    StoreTimeout,
    StoreUnavailable,
    Unavailable,
)

__all__ = ["STATUS_FOR", "status_for"]

#: Most specific first; ``status_for`` walks the MRO.
STATUS_FOR: dict[type[SessionAuthorityError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    SessionNotFound: grpc.StatusCode.NOT_FOUND,
    SessionNotLive: grpc.StatusCode.FAILED_PRECONDITION,
    CursorExpired: grpc.StatusCode.FAILED_PRECONDITION,
    StoreBusy: grpc.StatusCode.UNAVAILABLE,
    StoreTimeout: grpc.StatusCode.UNAVAILABLE,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    CircuitOpen: grpc.StatusCode.UNAVAILABLE,
    CacheReplaced: grpc.StatusCode.UNAVAILABLE,
    CacheBusy: grpc.StatusCode.UNAVAILABLE,
    CacheUnavailable: grpc.StatusCode.UNAVAILABLE,
    SessionAuthorityError: grpc.StatusCode.INTERNAL,
}


def status_for(exc: SessionAuthorityError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        code = STATUS_FOR.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL
