"""The requests the client sends, built (and checked for what the client can check) in one place
shared by the sync and asyncio clients. The server checks everything again."""

from __future__ import annotations

import datetime
from collections.abc import Mapping

from google.protobuf.duration_pb2 import Duration

from session_authority.v1 import session_authority_pb2 as pb

__all__ = ["create", "health", "invalidate", "invalidate_user", "validate"]


def validate(token: str) -> pb.ValidateSessionRequest:
    return pb.ValidateSessionRequest(token=token)


def create(
    user_id: str,
    ttl: float | datetime.timedelta | None,
    metadata: Mapping[str, str] | None,
) -> pb.CreateSessionRequest:
    request = pb.CreateSessionRequest(user_id=user_id, metadata=dict(metadata or {}))
    if ttl is not None:
        seconds = ttl.total_seconds() if isinstance(ttl, datetime.timedelta) else float(ttl)
        if seconds <= 0:
            raise ValueError("ttl must be positive")
        duration = Duration()
        duration.FromTimedelta(datetime.timedelta(seconds=seconds))
        request.ttl.CopyFrom(duration)
    return request


def invalidate(token: str | None, session_id: str | None) -> pb.InvalidateRequest:
    if (token is None) == (session_id is None):
        raise ValueError("invalidate takes exactly one of token= and session_id=")
    if token is not None:
        return pb.InvalidateRequest(token=token)
    assert session_id is not None
    return pb.InvalidateRequest(session_id=session_id)


def invalidate_user(user_id: str) -> pb.InvalidateUserRequest:
    return pb.InvalidateUserRequest(user_id=user_id)


def health() -> pb.HealthRequest:
    return pb.HealthRequest()
