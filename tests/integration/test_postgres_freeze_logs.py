"""A frozen Postgres must show in the logs as the outage it is, never as an
asyncio "Task exception was never retrieved" traceback at ERROR.

The traceback came from asyncpg's ``Pool.release``: it shields a release task
of its own; when the caller is cancelled while that release waits for a
frozen Postgres to confirm a query's cancellation, the task later fails with
nobody to retrieve it. In the server the second cancellation is the Postgres
breaker's per-call timeout (pool wait + statement timeout), which lands just
as the release's own budget (the pool wait) runs out."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time

import grpc
import pytest

from session_authority.adapters.postgres_store import PostgresSessionStore
from session_authority.bootstrap import App
from session_authority.core.domain import TokenHash, new_token
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from .support import NO_PROXY, app_settings

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.asyncio]


def _asyncio_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    gc.collect()  # "never retrieved" is logged when the failed task is collected
    return [r.getMessage() for r in caplog.records if r.name == "asyncio"]


async def test_a_release_cut_short_on_a_frozen_database_logs_no_traceback(
    own_postgres: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    store = PostgresSessionStore(
        own_postgres.url, min_size=1, max_size=2, command_timeout=60, acquire_timeout=0.5
    )
    try:
        assert (await store.health()).connected
        own_postgres.pause()
        query = asyncio.create_task(store.find(TokenHash("00" * 32)))
        await asyncio.sleep(0.3)  # the query is sent and waits on the frozen server
        query.cancel()  # a deadline: the release now waits for the cancellation...
        await asyncio.sleep(0.1)
        query.cancel()  # ...and is cut short by a second one (the breaker's timeout)
        with contextlib.suppress(asyncio.CancelledError):
            await query
        await asyncio.sleep(1.0)  # the release's 0.5 s budget runs out meanwhile
        assert _asyncio_errors(caplog) == []
        own_postgres.resume()
        # The terminated connection was replaced: the store answers again.
        for _ in range(50):
            if (await store.health()).connected:
                break
            await asyncio.sleep(0.1)
        assert await store.find(TokenHash("00" * 32)) is None
    finally:
        own_postgres.resume()
        await store.aclose()


async def test_postgres_freeze_and_thaw_under_load_log_no_asyncio_error(
    own_postgres: EmbeddedPostgres,
    redis_server: EmbeddedRedis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    # Small timeouts make the breaker's per-call bound (0.5 + 1 s) meet the
    # release's budget (0.5 s after the 1 s statement timeout) within seconds.
    app = await App.start(
        app_settings(
            own_postgres.url,
            redis_server.url,
            pg_pool_timeout_ms=500,
            pg_command_timeout_ms=1000,
            pg_breaker_reset_timeout_ms=1000,
        )
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=NO_PROXY)
    stub = pb_grpc.SessionAuthorityStub(channel)
    try:
        created = await stub.CreateSession(pb.CreateSessionRequest(user_id="freeze"))
        own_postgres.pause()
        stop_at = time.monotonic() + 6.0

        async def caller(kind: int) -> None:
            while time.monotonic() < stop_at:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    if kind == 0:  # uncached: needs Postgres, cut by the deadline
                        request = pb.ValidateSessionRequest(token=new_token())
                        await stub.ValidateSession(request, timeout=0.5)
                    elif kind == 1:
                        await stub.CreateSession(pb.CreateSessionRequest(user_id="f"), timeout=3)
                    else:
                        await stub.Invalidate(pb.InvalidateRequest(token=created.token), timeout=2)
                await asyncio.sleep(0.05)

        await asyncio.gather(*(caller(i % 3) for i in range(6)))
        own_postgres.resume()
        for _ in range(100):  # thawed: serving again within seconds
            if app.serving:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.ValidateSession(
                        pb.ValidateSessionRequest(token=new_token()), timeout=2
                    )
                    assert not reply.valid
                    break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the server did not serve again after Postgres thawed")
    finally:
        own_postgres.resume()
        await channel.close()
        await app.stop(0)
    assert _asyncio_errors(caplog) == []
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors, "the freeze was not noticed"
    assert all(m.startswith("Postgres unavailable") for m in errors), errors
