"""Errors of the session authority core.

Every failure the core expects is one of these; anything else is a bug and
the transport reports it as INTERNAL (logged once). The tree::

    SessionAuthorityError
    ├── InvalidArgument      bad input; names the offending field (never echoes a token)
    ├── RateLimited          this caller sent too many unknown tokens; retry later
    ├── SessionNotFound      no session has this token or id (TouchSession)
    ├── SessionNotLive       the session is revoked or expired; it needs a live one
    ├── CursorExpired        a WatchRevocations cursor older than the retention (or
    │                        another database's): the watcher must start over
    ├── Unavailable          the authority cannot answer now (fails closed: never "valid")
    │   └── StoreUnavailable   Postgres, the source of truth, is unreachable or failing
    └── CacheUnavailable     Redis is unreachable, failing or slow; handled inside the
        │                    core by falling back to the store
        ├── CircuitOpen      the Redis breaker refused the call without making it
        ├── CacheBusy        no pooled connection came free in time: a queue of
        │                    ours, judged like a slow call (see breaker_policy.py)
        └── CacheReplaced    Redis is not the server whose state we trusted
                             (restarted, restored, failed over or flushed)

Adapters translate driver exceptions into these in one place each, with
``raise ... from exc``. ``asyncio.CancelledError`` is never caught by them.
"""

from __future__ import annotations

__all__ = [
    "CacheBusy",
    "CacheReplaced",
    "CacheUnavailable",
    "CircuitOpen",
    "CursorExpired",
    "InvalidArgument",
    "RateLimited",
    "SessionAuthorityError",
    "SessionNotFound",
    "SessionNotLive",
    "StoreBusy",
    "StoreTimeout",
    "StoreUnavailable",
    "Unavailable",
]


class SessionAuthorityError(Exception):
    """Base of every error the core raises on purpose."""


class InvalidArgument(SessionAuthorityError):
    """A request field is missing or malformed."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class RateLimited(SessionAuthorityError):
    """The caller is over a limit (unknown tokens reaching Postgres); nothing was asked."""


class SessionNotFound(SessionAuthorityError):
    """No session has this token or session id (an operation that needs one)."""


class SessionNotLive(SessionAuthorityError):
    """The session exists but is revoked or expired, and the operation
    (TouchSession) needs a live one: it is never revived."""


class CursorExpired(SessionAuthorityError):
    """A watch cannot resume after this cursor: events after it were pruned,
    or it is another database's. The watcher must drop what it cached."""


class Unavailable(SessionAuthorityError):
    """The authority cannot give a trustworthy answer right now."""


class StoreUnavailable(Unavailable):
    """The session store (Postgres) failed or could not be reached."""


class StoreTimeout(StoreUnavailable):
    """A Postgres statement ran past its timeout (``PG_COMMAND_TIMEOUT_MS``).
    The breaker judges it as a slow call (counted only if Postgres answered
    nothing meanwhile): one statement stuck behind a lock, or whose timer
    fired late after a machine stall, says little about the others."""


class StoreBusy(StoreUnavailable):
    """No pooled Postgres connection came free within the pool timeout: the
    wait was in this process's own queue, not in Postgres. The breaker judges
    it as a slow call (counted only if Postgres answered nothing meanwhile),
    as it judges ``CacheBusy``."""


class CacheUnavailable(SessionAuthorityError):
    """The session cache (Redis) failed, timed out, or its breaker is open."""


class CircuitOpen(CacheUnavailable):
    """The cache's breaker is refusing calls: the call was not made (not a
    new failure, so it is neither counted nor logged as one)."""


class CacheBusy(CacheUnavailable):
    """No pooled connection came free within the pool timeout: the wait was in
    this process's own queue, not in Redis. The breaker judges it as a slow
    call (counted only if Redis answered nothing meanwhile)."""


class CacheReplaced(CacheUnavailable):
    """The cache answers, but it is not the server (or the state) we trusted:
    it may have lost tombstones. Nothing may be read from it until revocations
    are re-applied (the breaker's probe does that)."""
