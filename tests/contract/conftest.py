"""One fixture per port, parametrized over its implementations.

``fake`` needs no I/O. ``redis`` and ``postgres`` run the real adapters on the private
servers of tests/conftest.py, ``cluster`` the cluster adapter on a private Redis Cluster
(``redis_cluster``), started only when such a param is selected; they carry the
``integration`` mark, so ``-m "not integration"`` keeps the fake half only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from session_authority.adapters.migrate import apply_migrations
from session_authority.embedded import (
    EmbeddedCluster,
    EmbeddedPostgres,
    EmbeddedRedis,
    find_cluster_redis_server,
)

from .subjects import (
    CacheSubject,
    FakeCacheSubject,
    FakeStoreSubject,
    PostgresStoreSubject,
    RedisCacheSubject,
    RedisClusterCacheSubject,
    StoreSubject,
)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    """Three masters and three replicas from ``redis-server`` 7 (Debian's)."""
    binary = find_cluster_redis_server()
    if binary is None:
        pytest.fail("no redis-server 7 (and redis-cli) on PATH: run `make tls-servers` (Debian's)")
    cluster = EmbeddedCluster(tmp_path_factory.mktemp("redis-cluster"), binary)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest_asyncio.fixture(
    params=[
        "fake",
        pytest.param("redis", marks=pytest.mark.integration),
        pytest.param("cluster", marks=pytest.mark.integration),
    ]
)
async def cache_subject(request: pytest.FixtureRequest) -> AsyncIterator[CacheSubject]:
    if request.param == "fake":
        yield FakeCacheSubject()
        return
    if request.param == "cluster":
        cluster: EmbeddedCluster = request.getfixturevalue("redis_cluster")
        node = cluster.nodes[0]
        nodes = RedisCluster(host=node.host, port=node.port, decode_responses=True)
        await nodes.flushall(target_nodes=RedisCluster.PRIMARIES)
        on_cluster = RedisClusterCacheSubject(cluster.url, nodes)
        try:
            yield on_cluster
        finally:
            await on_cluster.aclose()
            await nodes.aclose()
        return
    server: EmbeddedRedis = request.getfixturevalue("redis_server")
    raw = aioredis.Redis.from_url(server.url, decode_responses=True)
    await raw.flushdb()
    subject = RedisCacheSubject(server.url, raw)
    try:
        yield subject
    finally:
        await subject.aclose()
        await raw.aclose()


@pytest_asyncio.fixture(params=["fake", pytest.param("postgres", marks=pytest.mark.integration)])
async def store_subject(request: pytest.FixtureRequest) -> AsyncIterator[StoreSubject]:
    if request.param == "fake":
        yield FakeStoreSubject()
        return
    server: EmbeddedPostgres = request.getfixturevalue("postgres_server")
    conn = await asyncpg.connect(server.url)
    try:
        await apply_migrations(conn)
        await conn.execute("TRUNCATE sessions")  # revoked_since answers for the whole table
    finally:
        await conn.close()
    subject = PostgresStoreSubject(server.url)
    try:
        yield subject
    finally:
        await subject.aclose()
