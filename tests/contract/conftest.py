"""One fixture per port, parametrized over its implementations.

``fake`` needs no I/O. ``redis`` and ``postgres`` run the real adapters on the private
servers of tests/conftest.py, started only when such a param is selected; they carry the
``integration`` mark, so ``-m "not integration"`` keeps the fake half only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from session_authority.adapters.migrate import apply_migrations
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis

from .subjects import (
    CacheSubject,
    FakeCacheSubject,
    FakeStoreSubject,
    PostgresStoreSubject,
    RedisCacheSubject,
    StoreSubject,
)


@pytest_asyncio.fixture(params=["fake", pytest.param("redis", marks=pytest.mark.integration)])
async def cache_subject(request: pytest.FixtureRequest) -> AsyncIterator[CacheSubject]:
    if request.param == "fake":
        yield FakeCacheSubject()
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
