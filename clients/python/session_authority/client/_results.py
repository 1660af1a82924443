"""What the client's calls answer: frozen dataclasses, never the generated messages.

Tokens are secrets: ``Session`` and ``Validation`` never hold one, and ``CreatedSession`` (the one
answer that carries a token, once) keeps it out of its repr.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp

from session_authority.v1 import session_authority_pb2 as pb

__all__ = [
    "CreatedSession",
    "HealthReport",
    "Reason",
    "Revocation",
    "Session",
    "Source",
    "UserRevocation",
    "Validation",
]


class Reason(StrEnum):
    """Why a session is not valid."""

    UNKNOWN = "unknown"
    """No session has this token."""
    EXPIRED = "expired"
    REVOKED = "revoked"


class Source(StrEnum):
    """Which tier answered a validation."""

    CACHE = "cache"
    DATABASE = "database"
    TOKEN_FORMAT = "token_format"
    """Not the shape of one of our tokens: no tier was asked."""
    UNSPECIFIED = "unspecified"


_REASONS = {
    pb.REASON_UNKNOWN: Reason.UNKNOWN,
    pb.REASON_EXPIRED: Reason.EXPIRED,
    pb.REASON_REVOKED: Reason.REVOKED,
}
_SOURCES = {
    pb.SOURCE_CACHE: Source.CACHE,
    pb.SOURCE_DATABASE: Source.DATABASE,
    pb.SOURCE_TOKEN_FORMAT: Source.TOKEN_FORMAT,
}


@dataclass(frozen=True)
class Session:
    """A session as the authority knows it (never its token)."""

    session_id: str
    user_id: str
    created_at: datetime.datetime
    expires_at: datetime.datetime
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def as_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "user_id": self.user_id,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "metadata": dict(self.metadata),
        }


@dataclass(frozen=True)
class Validation:
    """A validation's answer. ``valid=False`` is a normal answer, with its ``reason``."""

    valid: bool
    source: Source
    session: Session | None = None
    """Set when valid."""
    reason: Reason | None = None
    """Set when not valid."""

    def as_json(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "reason": None if self.reason is None else str(self.reason),
            "source": str(self.source),
            "session": None if self.session is None else self.session.as_json(),
        }


@dataclass(frozen=True)
class CreatedSession:
    """A new session and its token: the only time the token is ever seen. Store it as a
    secret; its repr shows ``token=<redacted>``."""

    token: str = field(repr=False)
    session: Session

    def __repr__(self) -> str:
        return f"CreatedSession(token=<redacted>, session={self.session!r})"


@dataclass(frozen=True)
class Revocation:
    """Invalidate's answer. ``revoked``: a live session was revoked by this call (False: it
    was already revoked, expired or unknown; the call is idempotent). ``cache_purged`` and
    ``propagated``: see the proto (``InvalidateResponse``)."""

    revoked: bool
    cache_purged: bool
    propagated: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "revoked": self.revoked,
            "cache_purged": self.cache_purged,
            "propagated": self.propagated,
        }


@dataclass(frozen=True)
class UserRevocation:
    """InvalidateUser's answer: how many live sessions were revoked."""

    revoked_count: int
    cache_purged: bool
    propagated: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "revoked_count": self.revoked_count,
            "cache_purged": self.cache_purged,
            "propagated": self.propagated,
        }


@dataclass(frozen=True)
class HealthReport:
    """The Health RPC's document. ``status``: "healthy", "degraded" or "unhealthy";
    ``document``: the whole document as the runbook's jq paths read it (proto field names)."""

    status: str
    errors: tuple[str, ...]
    document: Mapping[str, Any] = field(repr=False)

    @property
    def healthy(self) -> bool:
        return self.status == "healthy"


def _time(stamp: Timestamp) -> datetime.datetime:
    return stamp.ToDatetime(tzinfo=datetime.UTC)


def session(message: pb.Session) -> Session:
    return Session(
        session_id=message.session_id,
        user_id=message.user_id,
        created_at=_time(message.created_at),
        expires_at=_time(message.expires_at),
        metadata=MappingProxyType(dict(message.metadata)),
    )


def validation(reply: pb.ValidateSessionResponse) -> Validation:
    return Validation(
        valid=reply.valid,
        source=_SOURCES.get(reply.source, Source.UNSPECIFIED),
        session=session(reply.session) if reply.valid and reply.HasField("session") else None,
        # A reply that says "not valid" without a reason the client knows is still not valid.
        reason=None if reply.valid else _REASONS.get(reply.reason, Reason.UNKNOWN),
    )


def created(reply: pb.CreateSessionResponse) -> CreatedSession:
    return CreatedSession(token=reply.token, session=session(reply.session))


def revocation(reply: pb.InvalidateResponse) -> Revocation:
    return Revocation(reply.revoked, reply.cache_purged, reply.propagated)


def user_revocation(reply: pb.InvalidateUserResponse) -> UserRevocation:
    return UserRevocation(reply.revoked_count, reply.cache_purged, reply.propagated)


def health(reply: pb.HealthResponse) -> HealthReport:
    document = MessageToDict(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return HealthReport(reply.status, tuple(reply.errors), MappingProxyType(document))
