"""Revocation: Postgres first, then tombstones; replay and sweep when Redis missed one.

Revocation invariant
--------------------
Once ``invalidate`` or ``invalidate_user`` has returned, no ``validate`` that
starts afterwards answers valid for those sessions, on any replica sharing the
Redis, whatever misses or fills were in flight:

1. Revocation commits in Postgres *first*; every later read of Postgres sees it.
2. It then replaces each cache entry with a *tombstone* (never a bare DEL), and
   fills are conditional in Redis (a Lua script refuses to write over a
   tombstone). A miss that read Postgres before the revocation and fills after
   it is refused, and answers "revoked". Tombstones outlive any fill that could
   race them: a fill whose Postgres read is older than ``max_fill_lag`` is
   dropped, and tombstones live for ``tombstone_ttl`` > ``max_fill_lag``.
3. If the tombstone cannot be written (Redis unreachable), this process trips
   its breaker, so it stops reading Redis at once, and the breaker's half-open
   probe (``replay_revocations``) re-applies every revocation of the last
   cache TTL from Postgres before the breaker closes and Redis is read again.
4. Every replica sweeps recent revocations into Redis periodically, which
   bounds what (3) cannot cover: a replica cut off from Redis while others
   still read it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from session_authority.core.breaker import Breaker, BreakerState
from session_authority.core.domain import (
    Revocation,
    TokenHash,
    check_session_id,
    check_user_id,
    parse_token,
)
from session_authority.core.errors import CacheUnavailable, StoreUnavailable
from session_authority.core.guarded import GuardedCache
from session_authority.core.policy import CorePolicy
from session_authority.core.ports import SessionStore
from session_authority.core.telemetry import CoreMetrics

__all__ = ["Revoker"]

_log = logging.getLogger("session_authority.cache")


class Revoker:
    """Revokes sessions and keeps the cache from contradicting Postgres."""

    def __init__(
        self,
        store: SessionStore,
        cache: GuardedCache | None,
        breaker: Breaker,
        policy: CorePolicy,
        *,
        metrics: CoreMetrics,
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._cache = cache
        self._breaker = breaker
        self._policy = policy
        self._metrics = metrics
        self._now = clock

    async def invalidate(
        self, *, token: str | None = None, session_id: str | None = None
    ) -> Revocation:
        """Revoke one session by token or session id (exactly one). Idempotent."""
        now = self._now()
        if token is not None:
            found = await self._store.revoke(now, token_hash=parse_token(token))
        else:
            sid = check_session_id(session_id or "")
            found = await self._store.revoke(now, session_id=sid)
        if found is None:
            return self._revoked(0, True)
        purged = await self._purge([found.token_hash])
        return self._revoked(int(found.revoked_now), purged)

    async def invalidate_user(self, user_id: str) -> Revocation:
        """Revoke every live session of ``user_id``."""
        user_id = check_user_id(user_id)
        hashes = await self._store.revoke_user(user_id, self._now())
        purged = await self._purge(hashes)
        return self._revoked(len(hashes), purged)

    def _revoked(self, count: int, purged: bool) -> Revocation:
        self._metrics.revoked(count, purged)
        return Revocation(revoked_count=count, cache_purged=purged)

    async def _purge(self, hashes: list[TokenHash]) -> bool:
        """Tombstone ``hashes``; on failure stop trusting the cache (see module doc)."""
        cache = self._cache
        if cache is None or not hashes:
            return True
        if self._breaker.state is BreakerState.CLOSED:
            try:
                await cache.tombstone(hashes, self._policy.tombstone_ttl)
                return True
            except CacheUnavailable:
                pass  # counted and logged by the guard
        self._breaker.trip("revocation could not be written to the cache")
        return False

    async def replay_revocations(self) -> None:
        """Re-apply recent revocations to the cache: the breaker's half-open probe.

        Any entry written before a revocation lives at most ``cache_ttl``, so
        tombstoning every session revoked in the last ``cache_ttl`` (plus the
        fill lag) leaves no stale entry behind. It talks to the cache directly:
        the breaker runs it, and would refuse it."""
        if self._cache is None:
            return
        cache = self._cache.inner
        await cache.ping()  # the probe proves Redis answers, even with nothing to replay
        window = timedelta(seconds=self._policy.cache_ttl + self._policy.max_fill_lag)
        try:
            hashes = await self._store.revoked_since(self._now() - window)
        except StoreUnavailable as exc:
            raise CacheUnavailable("cannot replay revocations: store unavailable") from exc
        if hashes:
            await cache.tombstone(hashes, self._policy.tombstone_ttl)
        _log.info("SessionCache replayed %d revocations before closing the breaker", len(hashes))

    async def sweep_revocations(self, window: float) -> int:
        """Re-apply the revocations of the last ``window`` seconds to the cache.

        Run periodically by every replica. It bounds what the invariant cannot
        cover alone: a replica that could not reach Redis when it revoked (a
        partial outage) leaves stale entries that *other* replicas can still
        read; the next sweep of any replica that reaches Redis tombstones them.
        Tombstones are idempotent, so overlapping windows cost only writes."""
        cache = self._cache
        if cache is None or self._breaker.state is not BreakerState.CLOSED:
            return 0  # an open breaker replays everything in its probe
        since = self._now() - timedelta(seconds=window)
        hashes = await self._store.revoked_since(since)
        if hashes:
            try:
                await cache.tombstone(hashes, self._policy.tombstone_ttl)
            except CacheUnavailable:
                self._breaker.trip("revocation sweep could not write to the cache")
                return 0
        return len(hashes)

    async def run_sweeper(self, interval: float, margin: float = 10.0) -> None:
        """Sweep every ``interval`` seconds until cancelled. Each sweep looks
        back ``interval + margin`` seconds (margin covers clock skew between
        replicas, whose clocks stamp ``revoked_at``)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep_revocations(interval + margin)
            except StoreUnavailable as exc:
                _log.warning("SessionCache sweep Error: %s", exc)
