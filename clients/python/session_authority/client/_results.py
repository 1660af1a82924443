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

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp

from session_authority.client._errors import ServerError
from session_authority.v1 import session_authority_pb2 as pb

__all__ = [
    "CreatedSession",
    "EventKind",
    "HealthReport",
    "Reason",
    "Revocation",
    "RevocationEvent",
    "RevocationReason",
    "Session",
    "Source",
    "Touch",
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


class EventKind(StrEnum):
    """What a ``RevocationEvent`` carries."""

    START = "start"
    """The first event of every watch: only ``cursor`` is set (where the watch starts)."""
    REVOKED = "revoked"
    """One session was revoked."""
    HEARTBEAT = "heartbeat"
    """(Only when asked for.) Every revocation committed before ``covered`` was sent."""
    UNSPECIFIED = "unspecified"


class RevocationReason(StrEnum):
    """Who or what revoked a session (a ``RevocationEvent``'s ``reason``)."""

    EXPLICIT = "explicit"
    """Invalidate named the session."""
    USER_WIDE = "user_wide"
    """InvalidateUser."""
    EXPIRED = "expired"
    ADMIN = "admin"
    """Not through the RPCs: an operator's SQL, or an older replica."""
    UNSPECIFIED = "unspecified"


_KINDS = {
    pb.REVOCATION_EVENT_KIND_START: EventKind.START,
    pb.REVOCATION_EVENT_KIND_REVOKED: EventKind.REVOKED,
    pb.REVOCATION_EVENT_KIND_HEARTBEAT: EventKind.HEARTBEAT,
}
_REVOCATION_REASONS = {
    pb.REVOCATION_REASON_EXPLICIT: RevocationReason.EXPLICIT,
    pb.REVOCATION_REASON_USER_WIDE: RevocationReason.USER_WIDE,
    pb.REVOCATION_REASON_EXPIRED: RevocationReason.EXPIRED,
    pb.REVOCATION_REASON_ADMIN: RevocationReason.ADMIN,
}
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
    last_seen_at: datetime.datetime | None = None
    """When the session was last touched (``touch``), when the server knows it."""
    revoked_at: datetime.datetime | None = None
    """Set on a revoked session (``list_sessions(include_revoked=True)``)."""

    def as_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "session_id": self.session_id,
            "user_id": self.user_id,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "metadata": dict(self.metadata),
        }
        for name in ("last_seen_at", "revoked_at"):
            value: datetime.datetime | None = getattr(self, name)
            if value is not None:
                document[name] = value.isoformat()
        return document


@dataclass(frozen=True)
class Validation:
    """A validation's answer. ``valid=False`` is a normal answer, with its ``reason``."""

    valid: bool
    source: Source
    session: Session | None = None
    """Set when valid."""
    reason: Reason | None = None
    """Set when not valid."""
    cache_age: datetime.timedelta | None = None
    """How old the server's cached entry was (``source`` CACHE, when known)."""
    degraded: bool = False
    """A dependency was down while answering (the answer is as correct as ever)."""
    from_local_cache: bool = False
    """The server process's in-process (L1) copy answered. Not this client's own cache."""
    from_client_cache: bool = False
    """This client's own local cache (``local_cache=``) answered, without calling the server."""

    def as_json(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "reason": None if self.reason is None else str(self.reason),
            "source": str(self.source),
            "session": None if self.session is None else self.session.as_json(),
            "cache_age": None if self.cache_age is None else self.cache_age.total_seconds(),
            "degraded": self.degraded,
            "from_local_cache": self.from_local_cache,
            "from_client_cache": self.from_client_cache,
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
class Touch:
    """TouchSession's answer: the session as it stands after the call (its expiry, and
    ``last_seen_at``), and ``written``: this call wrote the new expiry to Postgres (False: it
    was coalesced with a write made within TOUCH_INTERVAL)."""

    session: Session
    written: bool

    def as_json(self) -> dict[str, Any]:
        return {"session": self.session.as_json(), "written": self.written}


@dataclass(frozen=True)
class RevocationEvent:
    """One event of ``watch_revocations``. ``cursor``: pass it as ``after=`` to resume after
    this event (on any replica). A START event carries only its cursor, and with
    ``heartbeats=True`` ``heartbeat_interval`` (seconds; None: this server sends none). A
    HEARTBEAT carries its cursor and ``covered``: every revocation committed before the point
    ``covered`` seconds after the server began the call (its monotonic clock; negative:
    before) was sent before it."""

    kind: EventKind
    cursor: str
    session_id: str = ""
    user_id: str = ""
    reason: RevocationReason = RevocationReason.UNSPECIFIED
    revoked_at: datetime.datetime | None = None
    sequence: int = 0
    covered: float | None = None
    heartbeat_interval: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": str(self.kind),
            "cursor": self.cursor,
            "session_id": self.session_id,
            "user_id": self.user_id,
            "reason": str(self.reason),
            "revoked_at": None if self.revoked_at is None else self.revoked_at.isoformat(),
            "sequence": self.sequence,
            "covered": self.covered,
            "heartbeat_interval": self.heartbeat_interval,
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
        last_seen_at=_time(message.last_seen_at) if message.HasField("last_seen_at") else None,
        revoked_at=_time(message.revoked_at) if message.HasField("revoked_at") else None,
    )


def validation(reply: pb.ValidateSessionResponse) -> Validation:
    return Validation(
        valid=reply.valid,
        source=_SOURCES.get(reply.source, Source.UNSPECIFIED),
        session=session(reply.session) if reply.valid and reply.HasField("session") else None,
        # A reply that says "not valid" without a reason the client knows is still not valid.
        reason=None if reply.valid else _REASONS.get(reply.reason, Reason.UNKNOWN),
        cache_age=reply.cache_age.ToTimedelta() if reply.HasField("cache_age") else None,
        degraded=reply.degraded,
        from_local_cache=reply.from_local_cache,
    )


def validations(reply: pb.ValidateSessionsResponse, expected: int) -> list[Validation]:
    if len(reply.results) != expected:  # the contract is one result per token, in order
        message = f"ValidateSessions answered {len(reply.results)} of {expected} tokens"
        raise ServerError(grpc.StatusCode.INTERNAL, message)
    return [validation(result) for result in reply.results]


def touch(reply: pb.TouchSessionResponse) -> Touch:
    return Touch(session(reply.session), reply.written)


def revocation_event(message: pb.RevocationEvent) -> RevocationEvent:
    return RevocationEvent(
        kind=_KINDS.get(message.kind, EventKind.UNSPECIFIED),
        cursor=message.cursor,
        session_id=message.session_id,
        user_id=message.user_id,
        reason=_REVOCATION_REASONS.get(message.reason, RevocationReason.UNSPECIFIED),
        revoked_at=_time(message.revoked_at) if message.HasField("revoked_at") else None,
        sequence=message.sequence,
        covered=message.covered.ToNanoseconds() / 1e9 if message.HasField("covered") else None,
        heartbeat_interval=(
            message.heartbeat_interval.ToNanoseconds() / 1e9
            if message.HasField("heartbeat_interval")
            else None
        ),
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
