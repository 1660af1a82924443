"""The implementations a contract test runs on, each with the few hooks the tests need.

A subject wraps one implementation of a port (the in-memory fake, or the real adapter on
its private server) and adds what no port method offers: letting time pass on the clock
the implementation judges by, planting a corrupt entry, and a twin cut off from its server.
The fakes run on a ``FakeClock`` started far from the wall clock, so a fake that read the
wall clock instead of its injected one would judge the tests' sessions wrongly.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Protocol

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from session_authority.adapters.postgres_store import PostgresSessionStore
from session_authority.adapters.redis_cache import RedisSessionCache, cache_key
from session_authority.adapters.redis_cluster import tag_of
from session_authority.adapters.redis_cluster_cache import RedisClusterSessionCache, cluster_key
from session_authority.core.domain import TokenHash, new_token
from session_authority.core.ports import CacheEntry, SessionCache, SessionStore
from session_authority.embedded import find_free_port
from tests.unit.fakes import FakeClock, InMemorySessionCache, InMemorySessionStore

__all__ = [
    "FAKE_EPOCH",
    "CacheSubject",
    "FakeCacheSubject",
    "FakeStoreSubject",
    "PostgresStoreSubject",
    "RedisCacheSubject",
    "RedisClusterCacheSubject",
    "StoreSubject",
]

#: Where the fakes' clocks start: years from the wall clock, with microseconds.
FAKE_EPOCH = datetime(2031, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)


class CacheSubject(Protocol):
    #: The implementation under test.
    cache: SessionCache
    #: The same implementation, unable to reach its server.
    unreachable: SessionCache

    async def wait(self, seconds: float) -> None:
        """Let ``seconds`` pass on the clock the cache expires entries by."""

    async def plant_foreign(self, under: TokenHash, entry: CacheEntry, ttl: float) -> None:
        """Store ``entry`` under ``under``'s key, recorded for another token hash
        (a corrupted or poisoned entry), bypassing the fill rules."""

    async def flush(self) -> None:
        """Empty the server (FLUSHDB), behind the implementation's back."""


class StoreSubject(Protocol):
    store: SessionStore
    unreachable: SessionStore

    def now(self) -> datetime:
        """The store's own "now" (Postgres ``now()``), which ``revoked_since`` judges by."""

    async def wait(self, seconds: float) -> None:
        """Let ``seconds`` pass on that clock."""


class FakeCacheSubject:
    def __init__(self) -> None:
        self.clock = FakeClock(FAKE_EPOCH)
        self.fake = InMemorySessionCache(self.clock.monotonic)
        self.cache: SessionCache = self.fake
        broken = InMemorySessionCache(self.clock.monotonic)
        broken.unavailable = True
        self.unreachable: SessionCache = broken

    async def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)

    async def plant_foreign(self, under: TokenHash, entry: CacheEntry, ttl: float) -> None:
        self.fake.put(under, entry, ttl, recorded_as=TokenHash.of(new_token()))

    async def flush(self) -> None:
        self.fake.flush()


class RedisCacheSubject:
    def __init__(self, url: str, raw: aioredis.Redis) -> None:
        self.adapter = _redis_cache(url)
        self.cache: SessionCache = self.adapter
        self._unreachable = _redis_cache(f"redis://127.0.0.1:{find_free_port()}/0")
        self.unreachable: SessionCache = self._unreachable
        self._raw = raw

    async def wait(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def plant_foreign(self, under: TokenHash, entry: CacheEntry, ttl: float) -> None:
        # Written by the adapter under another hash (so the layout is the real one),
        # then moved under the victim's key, TTL and all.
        other = TokenHash.of(new_token())
        assert await self.adapter.fill(other, entry, ttl)
        assert await self._raw.copy(cache_key(other), cache_key(under), replace=True)
        await self._raw.delete(cache_key(other))

    async def flush(self) -> None:
        await self._raw.flushdb()

    async def aclose(self) -> None:
        await self.adapter.aclose()
        await self._unreachable.aclose()


class RedisClusterCacheSubject:
    """``RedisClusterSessionCache`` on a Redis Cluster (``raw``: a cluster client)."""

    def __init__(self, url: str, raw: RedisCluster) -> None:
        self.adapter = _cluster_cache(url)
        self.cache: SessionCache = self.adapter
        self._unreachable = _cluster_cache(f"redis+cluster://127.0.0.1:{find_free_port()}")
        self.unreachable: SessionCache = self._unreachable
        self._raw = raw

    async def wait(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def plant_foreign(self, under: TokenHash, entry: CacheEntry, ttl: float) -> None:
        # As RedisCacheSubject's, from a hash of the same tag (COPY stays on one slot).
        other = TokenHash.of(new_token())
        while tag_of(other) != tag_of(under):
            other = TokenHash.of(new_token())
        assert await self.adapter.fill(other, entry, ttl)
        assert await self._raw.copy(cluster_key(other), cluster_key(under), replace=True)
        await self._raw.delete(cluster_key(other))

    async def flush(self) -> None:
        await self._raw.flushall(target_nodes=RedisCluster.PRIMARIES)

    async def aclose(self) -> None:
        await self.adapter.aclose()
        await self._unreachable.aclose()


def _cluster_cache(url: str) -> RedisClusterSessionCache:
    return RedisClusterSessionCache.from_url(
        url, min_connections=1, max_connections=4, timeout=1.0, pool_timeout=1.0
    )


def _redis_cache(url: str) -> RedisSessionCache:
    return RedisSessionCache.from_url(
        url, min_connections=1, max_connections=4, timeout=1.0, pool_timeout=1.0
    )


class FakeStoreSubject:
    def __init__(self) -> None:
        self.clock = FakeClock(FAKE_EPOCH)
        self.store: SessionStore = InMemorySessionStore(self.clock.now)
        broken = InMemorySessionStore(self.clock.now)
        broken.unavailable = True
        self.unreachable: SessionStore = broken

    def now(self) -> datetime:
        return self.clock.now()

    async def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)


class PostgresStoreSubject:
    def __init__(self, dsn: str) -> None:
        self.adapter = _postgres_store(dsn)
        self.store: SessionStore = self.adapter
        self._unreachable = _postgres_store(
            f"postgresql://postgres@127.0.0.1:{find_free_port()}/nowhere"
        )
        self.unreachable: SessionStore = self._unreachable

    def now(self) -> datetime:
        return datetime.now(UTC)  # the same machine's clock as Postgres's now()

    async def wait(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def aclose(self) -> None:
        await self.adapter.aclose()
        await self._unreachable.aclose()


def _postgres_store(dsn: str) -> PostgresSessionStore:
    return PostgresSessionStore(
        dsn, min_size=1, max_size=4, command_timeout=5.0, acquire_timeout=5.0, connect_timeout=2.0
    )
