"""The Python client of session-authority.

``SessionAuthorityClient`` (blocking) and ``AsyncSessionAuthorityClient`` (asyncio) call the
service with safe defaults (a deadline on every call, retries of idempotent calls on
UNAVAILABLE, keepalive matched to the server, round robin over ``dns:///`` targets) and answer
with frozen dataclasses. Failures raise a ``SessionAuthorityError`` subclass (the tree is drawn
in ``_errors``); an invalid session is a normal answer, never an error.

A new RPC is a request builder (``_requests``), a result type (``_results``), its name in
``_config.IDEMPOTENT`` when it may be retried, and one small method on each client.

The revocation-safe local cache (``local_cache=True`` or ``LocalCache(...)``, off by default,
fed by WatchRevocations; ``_local_cache`` states its invariant and bound) answers in
``validate`` before the remote call, keyed by the token's SHA-256, and steps aside (asks the
server) whenever its stream is not live; the stream is one more long call on the same channel,
whose keepalive (``Keepalive``, pings during calls) notices a dead connection.
"""

from session_authority.client._aio import AsyncSessionAuthorityClient
from session_authority.client._config import Deadlines, Hedging, Keepalive, Retry, Tls
from session_authority.client._errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    ServerError,
    SessionAuthorityError,
    Unauthenticated,
    Unavailable,
)
from session_authority.client._local_cache import LocalCache, LocalCacheStats
from session_authority.client._results import (
    CreatedSession,
    EventKind,
    HealthReport,
    Reason,
    Revocation,
    RevocationEvent,
    RevocationReason,
    Session,
    Source,
    Touch,
    UserRevocation,
    Validation,
)
from session_authority.client._sync import SessionAuthorityClient
from session_authority.client._watch import AsyncRevocationWatch, RevocationWatch

__all__ = [
    "AsyncRevocationWatch",
    "AsyncSessionAuthorityClient",
    "Cancelled",
    "CreatedSession",
    "DeadlineExceeded",
    "Deadlines",
    "EventKind",
    "HealthReport",
    "Hedging",
    "InvalidArgument",
    "Keepalive",
    "LocalCache",
    "LocalCacheStats",
    "PermissionDenied",
    "Reason",
    "ResourceExhausted",
    "Retry",
    "Revocation",
    "RevocationEvent",
    "RevocationReason",
    "RevocationWatch",
    "ServerError",
    "Session",
    "SessionAuthorityClient",
    "SessionAuthorityError",
    "Source",
    "Tls",
    "Touch",
    "Unauthenticated",
    "Unavailable",
    "UserRevocation",
    "Validation",
]
