"""Start-up with dependencies down, and load shedding beyond MAX_CONCURRENT_RPCS."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2

from session_authority.adapters.migrate import apply_migrations
from session_authority.bootstrap import App
from session_authority.config import Settings
from session_authority.core.domain import new_token
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis, find_free_port
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc
from tests.third_party import aio_health_stub

from .support import NO_PROXY, app_settings

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.asyncio]


async def _status(channel: grpc.aio.Channel) -> int:
    reply = await aio_health_stub(channel).Check(
        health_pb2.HealthCheckRequest(service="session_authority.v1.SessionAuthority"), timeout=2
    )
    return int(reply.status)


async def test_starts_with_both_down_and_serves_once_postgres_answers(tmp_path: Path) -> None:
    postgres = EmbeddedPostgres(tmp_path / "pg")  # created, not started yet
    dead_redis = f"redis://127.0.0.1:{find_free_port()}/0"
    app = await App.start(
        Settings(
            database_url=postgres.url,
            redis_url=dead_redis,
            host="127.0.0.1",
            port=find_free_port(),
            breaker_timeout_ms=200,
        )
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=NO_PROXY) as ch:
            stub = pb_grpc.SessionAuthorityStub(ch)
            assert await _status(ch) == health_pb2.HealthCheckResponse.NOT_SERVING
            report = await stub.Health(pb.HealthRequest(), timeout=5)
            assert report.status == "unhealthy"
            assert report.postgres.connected is False
            assert report.redis.connected is False
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ValidateSession(pb.ValidateSessionRequest(token=new_token()), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # fails closed

            postgres.start()
            conn = await asyncpg.connect(postgres.url)
            await apply_migrations(conn)
            await conn.close()
            deadline = time.monotonic() + 15
            while await _status(ch) != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            created = await stub.CreateSession(pb.CreateSessionRequest(user_id="late-db"))
            reply = await stub.ValidateSession(pb.ValidateSessionRequest(token=created.token))
            assert reply.valid
            assert reply.source == pb.SOURCE_DATABASE
            report = await stub.Health(pb.HealthRequest(), timeout=5)
            assert report.status == "degraded"  # Redis still down: served from Postgres
    finally:
        await app.stop(0)
        postgres.stop()


async def test_calls_beyond_the_concurrency_cap_are_shed(
    own_postgres: EmbeddedPostgres, redis_server: EmbeddedRedis
) -> None:
    postgres = own_postgres
    app = await App.start(app_settings(postgres.url, redis_server.url, max_concurrent_rpcs=4))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=NO_PROXY) as ch:
            stub = pb_grpc.SessionAuthorityStub(ch)
            postgres.pause()  # uncached validations now wait until their deadline

            async def call() -> str:
                try:
                    await stub.ValidateSession(
                        pb.ValidateSessionRequest(token=new_token()), timeout=1.5
                    )
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name
                return "OK"

            codes = await asyncio.gather(*(call() for _ in range(12)))
            postgres.resume()
    finally:
        postgres.resume()
        await app.stop(0)
    assert codes.count("RESOURCE_EXHAUSTED") >= 12 - 4
    assert set(codes) <= {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
