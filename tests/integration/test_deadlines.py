"""The caller's deadline bounds all work done for it; bounded pools fail cleanly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from session_authority.adapters.postgres_store import PostgresSessionStore
from session_authority.bootstrap import App
from session_authority.core.domain import new_token
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from .support import NO_PROXY, app_settings

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.asyncio]


@pytest_asyncio.fixture
async def frozen_world(
    own_postgres: EmbeddedPostgres, redis_server: EmbeddedRedis
) -> AsyncIterator[tuple[App, EmbeddedPostgres, pb_grpc.SessionAuthorityAsyncStub]]:
    app = await App.start(
        app_settings(
            own_postgres.url,
            redis_server.url,
            pg_pool_min=1,
            pg_pool_max=2,
            pg_pool_timeout_ms=300,
            pg_command_timeout_ms=60_000,  # only the caller's deadline may stop a query
        )
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=NO_PROXY)
    try:
        yield app, own_postgres, pb_grpc.SessionAuthorityStub(channel)
    finally:
        own_postgres.resume()
        await channel.close()
        await app.stop(0)


async def test_deadline_bounds_a_query_to_a_frozen_database(
    frozen_world: tuple[App, EmbeddedPostgres, pb_grpc.SessionAuthorityAsyncStub],
) -> None:
    app, postgres, stub = frozen_world
    created = await stub.CreateSession(pb.CreateSessionRequest(user_id="deadline"))
    await stub.ValidateSession(pb.ValidateSessionRequest(token=created.token))  # now cached
    postgres.pause()
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ValidateSession(pb.ValidateSessionRequest(token=new_token()), timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5  # bounded by the deadline, not the 60 s query timeout
    # Cached sessions still validate while the database is frozen.
    cached = await stub.ValidateSession(pb.ValidateSessionRequest(token=created.token), timeout=2)
    assert cached.valid
    assert cached.source == pb.SOURCE_CACHE
    postgres.resume()
    # The cancelled call did not keep a connection: the pool serves again.
    for _ in range(50):
        stats = app.store.pool_stats()
        if stats.pending == 0 and stats.available == stats.size:
            break
        await asyncio.sleep(0.1)
    assert app.store.pool_stats().pending == 0
    reply = await stub.ValidateSession(pb.ValidateSessionRequest(token=new_token()), timeout=5)
    assert reply.valid is False


async def test_exhausted_pool_fails_cleanly_with_unavailable(
    frozen_world: tuple[App, EmbeddedPostgres, pb_grpc.SessionAuthorityAsyncStub],
) -> None:
    app, _, stub = frozen_world
    # Hold both connections of the pool (PG_POOL_MAX=2) as two slow callers
    # would; a validation that needs the database then waits at most
    # PG_POOL_TIMEOUT_MS (300 ms) for one, and is refused cleanly.
    async with app.store._connection(), app.store._connection():
        assert app.store.pool_stats().available == 0
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ValidateSession(pb.ValidateSessionRequest(token=new_token()), timeout=5)
        waited = time.monotonic() - started
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "pool exhausted" in (caught.value.details() or "")
        assert waited < 4  # refused by the pool timeout, long before the 5 s deadline
        # The refused caller is not left waiting. The process's own loops (the
        # health probe, the revocation sweep, the event reader) also ask this
        # pool now and then and are refused the same way after 300 ms, so the
        # count is read until it is back to 0 while both connections are still
        # held: a waiter left behind would keep it above 0 for good.
        for _ in range(500):
            if app.store.pool_stats().pending == 0:
                break
            await asyncio.sleep(0.01)
        assert app.store.pool_stats().pending == 0
        assert app.store.pool_stats().available == 0  # still held: nobody was served meanwhile
    reply = await stub.ValidateSession(pb.ValidateSessionRequest(token=new_token()), timeout=5)
    assert reply.valid is False


async def test_work_done_stands_when_the_connection_reset_after_it_fails(
    own_postgres: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    """What the caller did is not turned into an error by the pool's handling of its
    connection afterwards: a connection handed back inside a transaction is rolled
    back by asyncpg (no store method leaves one; the reset query is off, see
    ``postgres_options``), Postgres freezes between the two, the rollback times out
    (``PG_COMMAND_TIMEOUT_MS``): the caller gets no error, the connection is replaced."""
    store = PostgresSessionStore(
        own_postgres.url, min_size=1, max_size=1, command_timeout=0.5, acquire_timeout=5
    )
    try:
        async with store._connection() as conn:
            await conn.execute("BEGIN")
            assert await conn.fetchval("SELECT 1") == 1
            own_postgres.pause()  # the caller is done; the rollback will find Postgres frozen
        assert "postgres connection not reset after use, replaced" in caplog.text
        own_postgres.resume()
        async with store._connection() as conn:  # the pool opened another connection
            assert await conn.fetchval("SELECT 2") == 2
    finally:
        own_postgres.resume()
        await store.aclose()
