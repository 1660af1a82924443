"""The requests the client sends, built (and checked for what the client can check) in one place
shared by the sync and asyncio clients. The server checks everything again."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence

from google.protobuf.duration_pb2 import Duration

from session_authority.v1 import session_authority_pb2 as pb

__all__ = [
    "MAX_BATCH",
    "create",
    "health",
    "invalidate",
    "invalidate_user",
    "list_sessions",
    "touch",
    "validate",
    "validate_many",
    "watch",
]

#: Tokens per ValidateSessions call (the server refuses more): longer lists are sent in slices.
MAX_BATCH = 100


def validate(token: str) -> pb.ValidateSessionRequest:
    return pb.ValidateSessionRequest(token=token)


def validate_many(tokens: Sequence[str]) -> pb.ValidateSessionsRequest:
    return pb.ValidateSessionsRequest(tokens=list(tokens))


def _duration(seconds: float | datetime.timedelta, name: str) -> Duration:
    value = seconds.total_seconds() if isinstance(seconds, datetime.timedelta) else float(seconds)
    if not value > 0:
        raise ValueError(f"{name} must be positive")
    duration = Duration()
    duration.FromTimedelta(datetime.timedelta(seconds=value))
    return duration


def create(
    user_id: str,
    ttl: float | datetime.timedelta | None,
    metadata: Mapping[str, str] | None,
) -> pb.CreateSessionRequest:
    request = pb.CreateSessionRequest(user_id=user_id, metadata=dict(metadata or {}))
    if ttl is not None:
        request.ttl.CopyFrom(_duration(ttl, "ttl"))
    return request


def invalidate(token: str | None, session_id: str | None) -> pb.InvalidateRequest:
    if (token is None) == (session_id is None):
        raise ValueError("invalidate takes exactly one of token= and session_id=")
    if token is not None:
        return pb.InvalidateRequest(token=token)
    assert session_id is not None
    return pb.InvalidateRequest(session_id=session_id)


def invalidate_user(user_id: str, except_session_id: str | None) -> pb.InvalidateUserRequest:
    return pb.InvalidateUserRequest(user_id=user_id, except_session_id=except_session_id or "")


def list_sessions(
    user_id: str, include_revoked: bool, page_size: int, page_token: str
) -> pb.ListUserSessionsRequest:
    if page_size < 0:
        raise ValueError("page_size must not be negative (0: the server's default)")
    return pb.ListUserSessionsRequest(
        user_id=user_id,
        include_revoked=include_revoked,
        page_size=page_size,
        page_token=page_token,
    )


def touch(
    token: str | None,
    session_id: str | None,
    extend_by: float | datetime.timedelta | None,
    write_through: bool = False,
) -> pb.TouchSessionRequest:
    if (token is None) == (session_id is None):
        raise ValueError("touch takes exactly one of token= and session_id=")
    if token is not None:
        request = pb.TouchSessionRequest(token=token, write_through=write_through)
    else:
        assert session_id is not None
        request = pb.TouchSessionRequest(session_id=session_id, write_through=write_through)
    if extend_by is not None:
        request.extend_by.CopyFrom(_duration(extend_by, "extend_by"))
    return request


def watch(after: str, heartbeats: bool = False) -> pb.WatchRevocationsRequest:
    return pb.WatchRevocationsRequest(after=after, heartbeats=heartbeats)


def health() -> pb.HealthRequest:
    return pb.HealthRequest()
