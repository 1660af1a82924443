"""Each port reached through its breaker, both wrapped the same way, once.

``GuardedCache`` and ``GuardedStore`` implement the port they wrap, and are
the only wrappers of either port: everything that happens around a call of a
dependency happens here, in one ``_call``:

* the **breaker**: the call runs through it (per-call timeout, failures
  counted in its window); while it refuses calls they raise at once without
  touching the dependency (``CircuitOpen`` for the cache, ``StoreUnavailable``
  for the store). A wrapper without a breaker (the store with
  ``PG_BREAKER_ENABLED=false``; the cache as its own probe sees it) only times;
* **timing**: the ``PortObserver`` (the edge's histograms) hears how long each
  call took and whether it failed. It times the call itself, inside the
  breaker, so a call cut short by the breaker's timeout is recorded with the
  time it took until then (a slow Redis or Postgres shows even when the
  caller gave up on it), and a call an open breaker refuses is not recorded;
* **error counting** (the cache): a failed call, not a refusal, counts in
  ``CacheStats.errors`` and ``CoreMetrics.cache_error`` and is logged once as
  ``SessionCache <op> Error``.

The composition root stacks nothing else::

    core → GuardedCache(breaker, observer) → RedisSessionCache
    core → GuardedStore(breaker, observer) → PostgresSessionStore

A new port method is one line here: ``return await self._call("name", lambda: ...)``.
``health`` passes through unguarded and untimed as one call: health reports
the dependency itself, and the cache's probe round trips are observed one by
one under the operation ``health`` (see ``PortObserver``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Protocol, TypeVar

from session_authority.core.breaker import Breaker
from session_authority.core.domain import Position, Session, SessionSummary, TokenHash
from session_authority.core.errors import (
    CacheReplaced,
    CacheUnavailable,
    CircuitOpen,
    SessionAuthorityError,
    StoreUnavailable,
)
from session_authority.core.health import CacheHealth, CacheStats, StoreHealth
from session_authority.core.ports import (
    Cached,
    CacheEntry,
    SessionCache,
    SessionStore,
    StoreRevocation,
    Touched,
)
from session_authority.core.telemetry import CoreMetrics
from session_authority.core.watermark import RevocationMarks

__all__ = ["BreakerCache", "GuardedCache", "GuardedStore", "PortObserver"]

_log = logging.getLogger("session_authority.cache")
T = TypeVar("T")

#: Observes one call of one operation: ``(seconds, ok)``; ``ok`` is False when
#: the call raised, cancellation included.
Observe = Callable[[float, bool], None]


class PortObserver(Protocol):
    """What the edge hears of each call of one port (its histograms)."""

    def operation(self, name: str) -> Observe:
        """The observer of every call of ``name`` (the port method's name, or
        ``health`` for each round trip of a health probe that reached the
        dependency). Asked once per operation, then kept: it is on every
        call's path."""


class BreakerCache(SessionCache, Protocol):
    """A ``SessionCache`` behind the Redis breaker, as the revoker needs it."""

    #: The cache without the breaker (timed all the same), for the breaker's
    #: own probe, which the breaker would refuse.
    inner: SessionCache

    async def tombstone_anyway(self, token_hashes: Sequence[TokenHash], ttl: float) -> None:
        """Tombstone even while the breaker refuses calls, bounded by its
        timeout and not counted; raises ``CacheUnavailable``."""


class _Guarded:
    """The one ``_call`` both wrappers share."""

    _refused: type[SessionAuthorityError]
    _error: type[SessionAuthorityError]

    def __init__(self, breaker: Breaker | None, observer: PortObserver | None) -> None:
        self.breaker = breaker
        self._observer = observer
        self._observers: dict[str, Observe] = {}

    def _observe(self, operation: str) -> Observe:
        observe = self._observers.get(operation)
        if observe is None:
            assert self._observer is not None
            observe = self._observers[operation] = self._observer.operation(operation)
        return observe

    def _timed(self, operation: str, op: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
        """``op``, timed into the observer (or ``op`` itself without one): the
        same number of frames as ``op`` plus one, however it is run."""
        if self._observer is None:
            return op
        observe = self._observe(operation)

        async def timed() -> T:
            started = time.perf_counter()
            try:
                result = await op()
            except BaseException:
                observe(time.perf_counter() - started, False)
                raise
            observe(time.perf_counter() - started, True)
            return result

        return timed

    async def _call(self, operation: str, op: Callable[[], Awaitable[T]]) -> T:
        breaker = self.breaker
        if breaker is None:
            return await self._timed(operation, op)()
        if not breaker.allows():
            raise self._refused(f"{breaker.name} circuit breaker {breaker.state.value}")
        try:
            return await breaker.call(self._timed(operation, op))
        except self._error as exc:
            self._failed(operation, exc)
            raise

    def _failed(self, operation: str, exc: SessionAuthorityError) -> None:
        """A call that failed (not one refused): nothing to count by default."""


class GuardedCache(_Guarded):
    """A ``SessionCache`` behind the Redis breaker (or, with ``breaker=None``,
    only timed: the ``inner`` it gives the breaker's probe)."""

    _refused = CircuitOpen
    _error = CacheUnavailable

    def __init__(
        self,
        cache: SessionCache,
        breaker: Breaker | None,
        *,
        stats: CacheStats | None = None,
        metrics: CoreMetrics | None = None,
        observer: PortObserver | None = None,
    ) -> None:
        super().__init__(breaker, observer)
        self._cache = cache
        self._stats = stats
        self._metrics = metrics
        self.inner: SessionCache = (
            cache
            if breaker is None or observer is None
            else GuardedCache(cache, None, observer=observer)
        )

    def _failed(self, operation: str, exc: SessionAuthorityError) -> None:
        if self.breaker is None:
            return  # the probe's own calls: the breaker judges the probe
        if self._stats is not None:
            self._stats.errors += 1
        if self._metrics is not None:
            self._metrics.cache_error(operation)
        _log.warning("SessionCache %s Error: %s", operation, exc)
        if isinstance(exc, CacheReplaced):
            # It may have lost tombstones: stop reading it now, and let the
            # probe re-apply revocations at once rather than after the reset.
            self.breaker.trip(f"redis replaced: {exc}", probe_in=0.0)

    async def get(self, token_hash: TokenHash) -> Cached | None:
        return await self._call("get", lambda: self._cache.get(token_hash))

    async def fill(self, token_hash: TokenHash, entry: CacheEntry, ttl: float) -> bool:
        return await self._call("fill", lambda: self._cache.fill(token_hash, entry, ttl))

    async def ping(self) -> None:
        await self._call("ping", self._cache.ping)

    async def adopt(self) -> None:
        await self._call("adopt", self._cache.adopt)

    async def verify(self) -> None:
        await self._call("verify", self._cache.verify)

    async def mark_created(self, token_hash: TokenHash, ttl: float) -> None:
        await self._call("mark_created", lambda: self._cache.mark_created(token_hash, ttl))

    async def tombstone(self, token_hashes: Sequence[TokenHash], ttl: float) -> None:
        await self._call("tombstone", lambda: self._cache.tombstone(token_hashes, ttl))

    async def tombstone_anyway(self, token_hashes: Sequence[TokenHash], ttl: float) -> None:
        """Tombstone even while the breaker refuses calls, bounded by its timeout
        and not counted (``Breaker.attempt``): this process has stopped reading
        Redis, but the other replicas read it, and a revocation must reach it
        if it can. A failure is counted and logged like any other."""
        op = self._timed("tombstone", lambda: self._cache.tombstone(token_hashes, ttl))
        if self.breaker is None:
            await op()
            return
        try:
            await self.breaker.attempt(op)
        except CacheUnavailable as exc:
            self._failed("tombstone", exc)
            raise

    async def watermark(self) -> str:
        return await self._call("watermark", self._cache.watermark)

    async def seal(
        self, token_hashes: Sequence[TokenHash], ttl: float, *, floor: str, mark: str
    ) -> str:
        return await self._call(
            "seal", lambda: self._cache.seal(token_hashes, ttl, floor=floor, mark=mark)
        )

    async def lease(self, seconds: float) -> bool:
        return await self._call("lease", lambda: self._cache.lease(seconds))

    async def release(self) -> None:
        await self._call("release", self._cache.release)

    async def get_many(self, token_hashes: Sequence[TokenHash]) -> list[Cached | None]:
        return await self._call("get_many", lambda: self._cache.get_many(token_hashes))

    async def health(self) -> CacheHealth:
        health = await self._cache.health()
        if health.connected and self._observer is not None:
            observe = self._observe("health")
            for milliseconds in (health.ping_ms, health.set_ms, health.get_ms):
                observe(milliseconds / 1000, True)
        return health


class GuardedStore(_Guarded):
    """A ``SessionStore`` behind the Postgres breaker (``error=StoreUnavailable``):
    while it is open, calls that need the store fail at once instead of each
    waiting out a dead database's timeouts. With ``breaker=None`` (the
    Postgres breaker disabled) it only times."""

    _refused = StoreUnavailable
    _error = StoreUnavailable

    def __init__(
        self,
        store: SessionStore,
        breaker: Breaker | None,
        *,
        observer: PortObserver | None = None,
    ) -> None:
        super().__init__(breaker, observer)
        self.inner = store

    async def create(self, session: Session) -> None:
        await self._call("create", lambda: self.inner.create(session))

    async def find(self, token_hash: TokenHash) -> Session | None:
        return await self._call("find", lambda: self.inner.find(token_hash))

    async def revoke(
        self, *, token_hash: TokenHash | None = None, session_id: str | None = None
    ) -> StoreRevocation | None:
        return await self._call(
            "revoke", lambda: self.inner.revoke(token_hash=token_hash, session_id=session_id)
        )

    async def revoke_user(self, user_id: str) -> list[StoreRevocation]:
        return await self._call("revoke_user", lambda: self.inner.revoke_user(user_id))

    async def revoked_since(self, seconds: float) -> list[TokenHash]:
        return await self._call("revoked_since", lambda: self.inner.revoked_since(seconds))

    async def pending_purges(self, limit: int) -> list[TokenHash]:
        return await self._call("pending_purges", lambda: self.inner.pending_purges(limit))

    async def confirm_purged(self, token_hashes: Sequence[TokenHash]) -> None:
        await self._call("confirm_purged", lambda: self.inner.confirm_purged(token_hashes))

    async def revocation_marks(self) -> RevocationMarks:
        return await self._call("revocation_marks", self.inner.revocation_marks)

    async def revocations_after(
        self, after: str, limit: int, window: float
    ) -> list[tuple[str, TokenHash]]:
        return await self._call(
            "revocations_after", lambda: self.inner.revocations_after(after, limit, window)
        )

    async def confirm_watermark(self, mark: str) -> None:
        await self._call("confirm_watermark", lambda: self.inner.confirm_watermark(mark))

    async def find_many(self, token_hashes: Sequence[TokenHash]) -> dict[TokenHash, Session]:
        return await self._call("find_many", lambda: self.inner.find_many(token_hashes))

    async def health(self) -> StoreHealth:
        return await self.inner.health()

    async def list_user_sessions(
        self, user_id: str, *, include_revoked: bool, after: Position | None, limit: int
    ) -> list[SessionSummary]:
        return await self._call(
            "list_user_sessions",
            lambda: self.inner.list_user_sessions(
                user_id, include_revoked=include_revoked, after=after, limit=limit
            ),
        )

    async def revoke_user_except(
        self, user_id: str, session_id: str
    ) -> list[StoreRevocation] | None:
        return await self._call(
            "revoke_user_except", lambda: self.inner.revoke_user_except(user_id, session_id)
        )

    async def page_token_key(self) -> bytes:
        return await self._call("page_token_key", self.inner.page_token_key)

    async def touch(
        self,
        *,
        token_hash: TokenHash | None = None,
        session_id: str | None = None,
        extend_by: timedelta,
        max_lifetime: timedelta,
        interval: float,
    ) -> Touched | None:
        return await self._call(
            "touch",
            lambda: self.inner.touch(
                token_hash=token_hash,
                session_id=session_id,
                extend_by=extend_by,
                max_lifetime=max_lifetime,
                interval=interval,
            ),
        )
