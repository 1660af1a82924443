"""SIGTERM under load: the server process drains and exits 0. Every call that
had started completes with its normal answer; calls that arrive after shutdown
began are refused with UNAVAILABLE, never CANCELLED or UNKNOWN."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2

from session_authority.adapters.migrate import apply_migrations
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis, find_free_port
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc
from tests.third_party import aio_health_stub

from .support import server_env

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.asyncio]


async def test_sigterm_mid_load_drains_in_flight_calls(
    tmp_path: Path, postgres_server: EmbeddedPostgres, redis_server: EmbeddedRedis
) -> None:
    conn = await asyncpg.connect(postgres_server.url)
    await apply_migrations(conn)
    await conn.close()
    port = find_free_port()
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220 (started once, before any load)
        [
            str(Path(sys.executable).parent / "session-authority"),
            *("serve", "--port", str(port), "--allow-unauthenticated"),  # plaintext, loopback
        ],
        env=server_env(
            DATABASE_URL=postgres_server.url,
            REDIS_URL=redis_server.url,
            HOST="127.0.0.1",
            SHUTDOWN_GRACE_SECONDS="5",
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    target = f"127.0.0.1:{port}"
    try:
        async with grpc.aio.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as ch:
            health = aio_health_stub(ch)
            deadline = time.monotonic() + 30
            while True:
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                await asyncio.sleep(0.1)

            stub = pb_grpc.SessionAuthorityStub(ch)
            token = (await stub.CreateSession(pb.CreateSessionRequest(user_id="drain"))).token
            codes: Counter[str] = Counter()
            wrong = 0
            stop = asyncio.Event()

            async def caller() -> None:
                nonlocal wrong
                while not stop.is_set():
                    try:
                        reply = await stub.ValidateSession(
                            pb.ValidateSessionRequest(token=token), timeout=10
                        )
                    except grpc.aio.AioRpcError as exc:
                        codes[exc.code().name] += 1
                        if exc.code() == grpc.StatusCode.UNAVAILABLE:
                            # A client told "shutting down" backs off (gRPC's own
                            # reconnect backoff starts at 1 s); 0.2 s is impatient.
                            await asyncio.sleep(0.2)
                        continue
                    codes["OK"] += 1
                    wrong += not reply.valid

            callers = [asyncio.create_task(caller()) for _ in range(16)]
            await asyncio.sleep(1.0)
            ok_before = codes["OK"]
            proc.send_signal(signal.SIGTERM)
            exit_code = await asyncio.to_thread(proc.wait, 20)
            await asyncio.sleep(0.3)  # let callers see the closed server
            stop.set()
            await asyncio.gather(*callers)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()

    assert exit_code == 0, (tmp_path / "server.log").read_text()
    assert ok_before > 0
    assert wrong == 0
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert codes["UNAVAILABLE"] > 0  # calls after shutdown were refused, not lost
    text = (tmp_path / "server.log").read_text()
    assert "session-authority stopped" in text
