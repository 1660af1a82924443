"""Timing wrappers, one per port, the same shape for both:

* ``InstrumentedSessionCache``: a ``SessionCache`` that times every call of the
  one it wraps into ``redis_latency`` (milliseconds), by operation.
* ``InstrumentedSessionStore``: a ``SessionStore`` that times every call into
  ``postgres_query_duration_seconds``, by operation and outcome (``ok``, or
  ``error`` when the call raised, cancellation included).

The operation is the port method's name. Neither changes behaviour: same
answers, same ``CacheUnavailable`` / ``StoreUnavailable``. They wrap the
adapter directly and sit inside any breaker, so a call cut short by the
breaker's timeout is recorded with the time it took until then (slow Redis or
Postgres shows even when the caller gave up on it), and a call an open
breaker refuses never reaches them.

``health`` is not timed as one call: it is several round trips with timings of
their own. The cache's PING, SET and GET round trips of a health probe that
reached Redis go into ``redis_latency`` under the operation ``health``: the
health sampler probes every 5 s, so the histogram always holds current
samples, and HighLatency (p99 over the last 2 minutes) describes the Redis of
now, not the timeouts of an outage that is over, even on a replica with no
traffic. A probe that failed adds nothing (RedisDown reports it). The store's
health stays out of ``postgres_query_duration_seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from prometheus_client import Histogram

from session_authority.core.domain import Session, TokenHash
from session_authority.core.health import CacheHealth, StoreHealth
from session_authority.core.ports import (
    Cached,
    CacheEntry,
    SessionCache,
    SessionStore,
    StoreRevocation,
)

__all__ = ["InstrumentedSessionCache", "InstrumentedSessionStore"]


class InstrumentedSessionCache:
    def __init__(self, inner: SessionCache, latency_ms: Histogram) -> None:
        self._inner = inner
        self._latency = latency_ms

    @contextmanager
    def _timed(self, operation: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._latency.labels(operation).observe((time.perf_counter() - started) * 1000)

    async def get(self, token_hash: TokenHash) -> Cached | None:
        with self._timed("get"):
            return await self._inner.get(token_hash)

    async def fill(self, token_hash: TokenHash, entry: CacheEntry, ttl: float) -> bool:
        with self._timed("fill"):
            return await self._inner.fill(token_hash, entry, ttl)

    async def ping(self) -> None:
        with self._timed("ping"):
            await self._inner.ping()

    async def adopt(self) -> None:
        with self._timed("adopt"):
            await self._inner.adopt()

    async def verify(self) -> None:
        with self._timed("verify"):
            await self._inner.verify()

    async def mark_created(self, token_hash: TokenHash, ttl: float) -> None:
        with self._timed("mark_created"):
            await self._inner.mark_created(token_hash, ttl)

    async def tombstone(self, token_hashes: Sequence[TokenHash], ttl: float) -> None:
        with self._timed("tombstone"):
            await self._inner.tombstone(token_hashes, ttl)

    async def health(self) -> CacheHealth:
        health = await self._inner.health()
        if health.connected:
            observe = self._latency.labels("health").observe
            for milliseconds in (health.ping_ms, health.set_ms, health.get_ms):
                observe(milliseconds)
        return health


class InstrumentedSessionStore:
    def __init__(self, inner: SessionStore, duration_seconds: Histogram) -> None:
        self._inner = inner
        self._duration = duration_seconds

    @contextmanager
    def _timed(self, operation: str) -> Iterator[None]:
        started = time.perf_counter()
        outcome = "error"
        try:
            yield
            outcome = "ok"
        finally:
            self._duration.labels(operation, outcome).observe(time.perf_counter() - started)

    async def create(self, session: Session) -> None:
        with self._timed("create"):
            await self._inner.create(session)

    async def find(self, token_hash: TokenHash) -> Session | None:
        with self._timed("find"):
            return await self._inner.find(token_hash)

    async def revoke(
        self, *, token_hash: TokenHash | None = None, session_id: str | None = None
    ) -> StoreRevocation | None:
        with self._timed("revoke"):
            return await self._inner.revoke(token_hash=token_hash, session_id=session_id)

    async def revoke_user(self, user_id: str) -> list[StoreRevocation]:
        with self._timed("revoke_user"):
            return await self._inner.revoke_user(user_id)

    async def revoked_since(self, seconds: float) -> list[TokenHash]:
        with self._timed("revoked_since"):
            return await self._inner.revoked_since(seconds)

    async def pending_purges(self, limit: int) -> list[TokenHash]:
        with self._timed("pending_purges"):
            return await self._inner.pending_purges(limit)

    async def confirm_purged(self, token_hashes: Sequence[TokenHash]) -> None:
        with self._timed("confirm_purged"):
            await self._inner.confirm_purged(token_hashes)

    async def health(self) -> StoreHealth:
        return await self._inner.health()
