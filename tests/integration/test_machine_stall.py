"""A machine stall, on real processes: the server process is frozen (SIGSTOP)
while its Redis reads are in flight, and Redis answers them while it sleeps.
When it wakes up every timer has fired late, and every answer is waiting in
its socket. Those calls must be answered from Redis (the breaker's stall
grace), not all fail at once and fall back to Postgres together."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from pathlib import Path

import grpc
import pytest

from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis, find_free_port
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from .support import NO_PROXY, spawn_serve, stop_serve, wait_serving

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.asyncio]

BREAKER_TIMEOUT = 1.0  # the default BREAKER_TIMEOUT_MS


async def test_calls_in_flight_through_a_machine_stall_are_answered_from_redis(
    tmp_path: Path, own_postgres: EmbeddedPostgres, own_redis: EmbeddedRedis
) -> None:
    port, log = find_free_port(), tmp_path / "server.log"
    server = spawn_serve(
        port,
        log,
        "--workers",
        "1",
        DATABASE_URL=own_postgres.url,
        REDIS_URL=own_redis.url,
        L1_CACHE_TTL_MS="0",  # every validation reads Redis
    )
    sources: Counter[str] = Counter()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NO_PROXY) as ch:
            stub: pb_grpc.SessionAuthorityAsyncStub = pb_grpc.SessionAuthorityStub(ch)
            await wait_serving(stub, log)
            token = (await stub.CreateSession(pb.CreateSessionRequest(user_id="stall"))).token
            request = pb.ValidateSessionRequest(token=token)
            await stub.ValidateSession(request)  # Redis holds it from now on
            running = True

            async def caller() -> None:
                while running:
                    reply = await stub.ValidateSession(request, timeout=15)
                    assert reply.valid, reply
                    sources[pb.Source.Name(reply.source)] += 1

            callers = [asyncio.create_task(caller()) for _ in range(8)]
            await asyncio.sleep(0.5)
            assert sources["SOURCE_CACHE"] > 0 and not sources["SOURCE_DATABASE"]
            own_redis.pause()  # reads pile up in flight...
            await asyncio.sleep(0.2)
            server.send_signal(signal.SIGSTOP)  # ...the process stops...
            own_redis.resume()  # ...Redis answers them into its socket...
            await asyncio.sleep(BREAKER_TIMEOUT * 2)
            before = sum(sources.values())
            server.send_signal(signal.SIGCONT)  # ...and it wakes up to late timers.
            await asyncio.sleep(1.0)
            running = False
            await asyncio.gather(*callers)
            assert sum(sources.values()) > before + 8  # it served on after waking
            # 8 calls were in flight through the stall: all answered from Redis.
            assert sources["SOURCE_DATABASE"] == 0, (sources, log.read_text()[-3000:])
    finally:
        with contextlib.suppress(ProcessLookupError):
            server.send_signal(signal.SIGCONT)
        with contextlib.suppress(RuntimeError):
            own_redis.resume()
        stop_serve(server)
