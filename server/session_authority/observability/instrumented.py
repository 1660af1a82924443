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
from collections.abc import Callable, Sequence

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
from session_authority.core.watermark import RevocationMarks

__all__ = ["InstrumentedSessionCache", "InstrumentedSessionStore"]


class _Children(dict[str, Callable[[float], None]]):
    """A histogram's labelled ``observe`` by key, each looked up on first use
    (so a series appears when first observed) and then kept: the wrappers sit
    on every validation's path, and a ``labels()`` lookup takes a lock."""

    def __init__(self, lookup: Callable[[str], Callable[[float], None]]) -> None:
        super().__init__()
        self._lookup = lookup

    def __missing__(self, key: str) -> Callable[[float], None]:
        observe = self[key] = self._lookup(key)
        return observe


class _Timed:
    """``with``: observes how long the block took, into ``ok`` or, when it
    raised (cancellation included), ``error``. A class: a generator-based
    context manager costs about three times as much per call."""

    __slots__ = ("_error", "_ok", "_scale", "_started")

    def __init__(
        self, ok: Callable[[float], None], error: Callable[[float], None], scale: float = 1.0
    ) -> None:
        self._ok, self._error, self._scale = ok, error, scale
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        elapsed = (time.perf_counter() - self._started) * self._scale
        (self._ok if kind is None else self._error)(elapsed)


class InstrumentedSessionCache:
    def __init__(self, inner: SessionCache, latency_ms: Histogram) -> None:
        self._inner = inner
        self._latency = latency_ms
        self._ms = _Children(lambda operation: latency_ms.labels(operation).observe)

    def _timed(self, operation: str) -> _Timed:
        return _Timed(self._ms[operation], self._ms[operation], scale=1000)

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

    async def watermark(self) -> str:
        with self._timed("watermark"):
            return await self._inner.watermark()

    async def seal(
        self, token_hashes: Sequence[TokenHash], ttl: float, *, floor: str, mark: str
    ) -> str:
        with self._timed("seal"):
            return await self._inner.seal(token_hashes, ttl, floor=floor, mark=mark)

    async def lease(self, seconds: float) -> bool:
        with self._timed("lease"):
            return await self._inner.lease(seconds)

    async def release(self) -> None:
        with self._timed("release"):
            await self._inner.release()

    async def health(self) -> CacheHealth:
        health = await self._inner.health()
        if health.connected:
            observe = self._ms["health"]
            for milliseconds in (health.ping_ms, health.set_ms, health.get_ms):
                observe(milliseconds)
        return health


class InstrumentedSessionStore:
    def __init__(self, inner: SessionStore, duration_seconds: Histogram) -> None:
        self._inner = inner
        self._duration = duration_seconds
        self._s = _Children(lambda key: duration_seconds.labels(*key.split(":")).observe)

    def _timed(self, operation: str) -> _Timed:
        return _Timed(self._s[f"{operation}:ok"], self._s[f"{operation}:error"])

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

    async def revocation_marks(self) -> RevocationMarks:
        with self._timed("revocation_marks"):
            return await self._inner.revocation_marks()

    async def revocations_after(
        self, after: str, limit: int, window: float
    ) -> list[tuple[str, TokenHash]]:
        with self._timed("revocations_after"):
            return await self._inner.revocations_after(after, limit, window)

    async def confirm_watermark(self, mark: str) -> None:
        with self._timed("confirm_watermark"):
            await self._inner.confirm_watermark(mark)

    async def health(self) -> StoreHealth:
        return await self._inner.health()
