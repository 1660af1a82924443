"""Each port reached through its breaker, both wrapped the same way.

``GuardedCache`` and ``GuardedStore`` implement the port they wrap: every call
runs through the breaker (per-call timeout, failures counted in its window);
while the breaker refuses calls they raise at once without touching the
dependency (``CircuitOpen`` for the cache, ``StoreUnavailable`` for the store).
``health`` passes through unguarded: health reports the dependency itself.

The composition root stacks them over the timing wrappers of the edge::

    core → GuardedCache(breaker) → InstrumentedSessionCache → RedisSessionCache
    core → GuardedStore(breaker) → InstrumentedSessionStore → PostgresSessionStore

The cache guard also keeps the cache's failure accounting in one place: a
failed call (not a refusal) counts in ``CacheStats.errors`` and
``CoreMetrics.cache_error`` and is logged once as ``SessionCache <op> Error``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from session_authority.core.breaker import Breaker
from session_authority.core.domain import Session, TokenHash
from session_authority.core.errors import (
    CacheReplaced,
    CacheUnavailable,
    CircuitOpen,
    StoreUnavailable,
)
from session_authority.core.health import CacheHealth, CacheStats, StoreHealth
from session_authority.core.ports import (
    Cached,
    CacheEntry,
    SessionCache,
    SessionStore,
    StoreRevocation,
)
from session_authority.core.telemetry import CoreMetrics
from session_authority.core.watermark import RevocationMarks

__all__ = ["GuardedCache", "GuardedStore"]

_log = logging.getLogger("session_authority.cache")
T = TypeVar("T")


class GuardedCache:
    """A ``SessionCache`` behind the Redis breaker. ``inner`` is the cache
    itself, for the breaker's own probe (which must not be refused by it)."""

    def __init__(
        self, inner: SessionCache, breaker: Breaker, *, stats: CacheStats, metrics: CoreMetrics
    ) -> None:
        self.inner = inner
        self.breaker = breaker
        self._stats = stats
        self._metrics = metrics

    async def _call(self, operation: str, op: Callable[[], Awaitable[T]]) -> T:
        breaker = self.breaker
        if not breaker.allows():
            raise CircuitOpen(f"{breaker.name} circuit breaker {breaker.state.value}")
        try:
            return await breaker.call(op)
        except CacheUnavailable as exc:
            self._count_failure(operation, exc)
            if isinstance(exc, CacheReplaced):
                # It may have lost tombstones: stop reading it now, and let the
                # probe re-apply revocations at once rather than after the reset.
                breaker.trip(f"redis replaced: {exc}", probe_in=0.0)
            raise

    async def get(self, token_hash: TokenHash) -> Cached | None:
        return await self._call("get", lambda: self.inner.get(token_hash))

    async def fill(self, token_hash: TokenHash, entry: CacheEntry, ttl: float) -> bool:
        return await self._call("fill", lambda: self.inner.fill(token_hash, entry, ttl))

    async def ping(self) -> None:
        await self._call("ping", self.inner.ping)

    async def adopt(self) -> None:
        await self._call("adopt", self.inner.adopt)

    async def verify(self) -> None:
        await self._call("verify", self.inner.verify)

    async def mark_created(self, token_hash: TokenHash, ttl: float) -> None:
        await self._call("mark_created", lambda: self.inner.mark_created(token_hash, ttl))

    async def tombstone(self, token_hashes: Sequence[TokenHash], ttl: float) -> None:
        await self._call("tombstone", lambda: self.inner.tombstone(token_hashes, ttl))

    async def tombstone_anyway(self, token_hashes: Sequence[TokenHash], ttl: float) -> None:
        """Tombstone even while the breaker refuses calls, bounded by its timeout
        and not counted (``Breaker.attempt``): this process has stopped reading
        Redis, but the other replicas read it, and a revocation must reach it
        if it can. A failure is counted and logged like any other."""
        try:
            await self.breaker.attempt(lambda: self.inner.tombstone(token_hashes, ttl))
        except CacheUnavailable as exc:
            self._count_failure("tombstone", exc)
            raise

    async def watermark(self) -> str:
        return await self._call("watermark", self.inner.watermark)

    async def seal(
        self, token_hashes: Sequence[TokenHash], ttl: float, *, floor: str, mark: str
    ) -> str:
        return await self._call(
            "seal", lambda: self.inner.seal(token_hashes, ttl, floor=floor, mark=mark)
        )

    async def lease(self, seconds: float) -> bool:
        return await self._call("lease", lambda: self.inner.lease(seconds))

    async def release(self) -> None:
        await self._call("release", self.inner.release)

    def _count_failure(self, operation: str, exc: CacheUnavailable) -> None:
        self._stats.errors += 1
        self._metrics.cache_error(operation)
        _log.warning("SessionCache %s Error: %s", operation, exc)

    async def health(self) -> CacheHealth:
        return await self.inner.health()


class GuardedStore:
    """A ``SessionStore`` behind the Postgres breaker (``error=StoreUnavailable``):
    while it is open, calls that need the store fail at once instead of each
    waiting out a dead database's timeouts."""

    def __init__(self, inner: SessionStore, breaker: Breaker) -> None:
        self.inner = inner
        self.breaker = breaker

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        breaker = self.breaker
        if not breaker.allows():
            raise StoreUnavailable(f"{breaker.name} circuit breaker {breaker.state.value}")
        return await breaker.call(op)

    async def create(self, session: Session) -> None:
        await self._call(lambda: self.inner.create(session))

    async def find(self, token_hash: TokenHash) -> Session | None:
        return await self._call(lambda: self.inner.find(token_hash))

    async def revoke(
        self, *, token_hash: TokenHash | None = None, session_id: str | None = None
    ) -> StoreRevocation | None:
        return await self._call(
            lambda: self.inner.revoke(token_hash=token_hash, session_id=session_id)
        )

    async def revoke_user(self, user_id: str) -> list[StoreRevocation]:
        return await self._call(lambda: self.inner.revoke_user(user_id))

    async def revoked_since(self, seconds: float) -> list[TokenHash]:
        return await self._call(lambda: self.inner.revoked_since(seconds))

    async def pending_purges(self, limit: int) -> list[TokenHash]:
        return await self._call(lambda: self.inner.pending_purges(limit))

    async def confirm_purged(self, token_hashes: Sequence[TokenHash]) -> None:
        await self._call(lambda: self.inner.confirm_purged(token_hashes))

    async def revocation_marks(self) -> RevocationMarks:
        return await self._call(self.inner.revocation_marks)

    async def revocations_after(
        self, after: str, limit: int, window: float
    ) -> list[tuple[str, TokenHash]]:
        return await self._call(lambda: self.inner.revocations_after(after, limit, window))

    async def confirm_watermark(self, mark: str) -> None:
        await self._call(lambda: self.inner.confirm_watermark(mark))

    async def health(self) -> StoreHealth:
        return await self.inner.health()
