"""``InstrumentedSessionCache``: a ``SessionCache`` that times every call of
the one it wraps into the ``redis_latency`` histogram (milliseconds).

It changes no behaviour: same answers, same ``CacheUnavailable``. A call cut
short by the breaker's timeout is recorded with the time it took until then,
so slow Redis shows in the histogram even when the caller gave up on it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from prometheus_client import Histogram

from session_authority.core.domain import TokenHash
from session_authority.core.health import CacheHealth
from session_authority.core.ports import Cached, CacheEntry, SessionCache

__all__ = ["InstrumentedSessionCache"]


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

    async def mark_created(self, token_hash: TokenHash, ttl: float) -> None:
        with self._timed("mark_created"):
            await self._inner.mark_created(token_hash, ttl)

    async def tombstone(self, token_hashes: Sequence[TokenHash], ttl: float) -> None:
        with self._timed("tombstone"):
            await self._inner.tombstone(token_hashes, ttl)

    async def health(self) -> CacheHealth:
        # Several round trips with their own timings (``performance``): not a
        # cache call, so not in the histogram.
        return await self._inner.health()
