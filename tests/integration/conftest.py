"""Adapters and the core on real Redis and Postgres (started by tests/conftest.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from session_authority.adapters.migrate import apply_migrations
from session_authority.adapters.postgres_store import PostgresSessionStore
from session_authority.adapters.redis_cache import RedisSessionCache
from session_authority.config import Settings
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis
from session_authority.observability import install_tracing

CACHE_TTL = 300.0


@pytest_asyncio.fixture
async def pg_dsn(postgres_server: EmbeddedPostgres) -> AsyncIterator[str]:
    """A migrated database with an empty sessions table."""
    conn = await asyncpg.connect(postgres_server.url)
    try:
        await apply_migrations(conn)
        await conn.execute("TRUNCATE sessions")
    finally:
        await conn.close()
    yield postgres_server.url


@pytest_asyncio.fixture
async def redis_client(redis_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest_asyncio.fixture
async def store(pg_dsn: str) -> AsyncIterator[PostgresSessionStore]:
    s = PostgresSessionStore(
        pg_dsn, min_size=1, max_size=10, command_timeout=5.0, acquire_timeout=5.0
    )
    await s.connect()
    yield s
    await s.aclose()


@pytest_asyncio.fixture
async def cache(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis
) -> AsyncIterator[RedisSessionCache]:
    c = RedisSessionCache.from_url(
        redis_server.url,
        min_connections=2,
        max_connections=10,
        timeout=1.0,
        pool_timeout=1.0,
    )
    yield c
    await c.aclose()


@pytest_asyncio.fixture
async def own_postgres(tmp_path: Path) -> AsyncIterator[EmbeddedPostgres]:
    """A private, migrated Postgres that this test alone may kill, freeze or restart."""
    server = EmbeddedPostgres(tmp_path / "own-pg")
    server.start()
    conn = await asyncpg.connect(server.url)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
    try:
        yield server
    finally:
        with contextlib.suppress(RuntimeError):  # not running (killed or stopped)
            server.resume()
        server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A private Redis that this test alone may kill, freeze or restart."""
    server = EmbeddedRedis(tmp_path / "own-redis")
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(RuntimeError):
            server.resume()
        server.stop()


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """An in-memory exporter on the process's SDK provider, which App uses."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    assert install_tracing(Settings(otel_traces_exporter="none")) is provider
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    # The provider stays (the API allows one per process); later spans are dropped.
    exporter.shutdown()
