"""``serve --host ::`` (HOST=::): an IPv6 wildcard binds ``[::]:port`` and
answers on IPv6 loopback and (dual-stack) IPv4 loopback."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from session_authority.embedded import find_free_port
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from .support import NO_PROXY, spawn_serve, stop_serve, wait_serving

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


async def test_serve_binds_an_ipv6_host(tmp_path: Path, pg_dsn: str) -> None:
    port = find_free_port()
    log = tmp_path / "serve.log"
    process = spawn_serve(port, log, "--workers", "1", "--host", "::", DATABASE_URL=pg_dsn)
    try:
        for target in (f"[::1]:{port}", f"127.0.0.1:{port}"):
            async with grpc.aio.insecure_channel(target, options=NO_PROXY) as channel:
                stub = pb_grpc.SessionAuthorityStub(channel)
                await wait_serving(stub, log)
                created = await stub.CreateSession(pb.CreateSessionRequest(user_id="v6"), timeout=5)
                reply = await stub.ValidateSession(pb.ValidateSessionRequest(token=created.token))
                assert reply.valid, target
        assert process.poll() is None, log.read_text()
    finally:
        code = stop_serve(process)
    assert code == 0, log.read_text()[-3000:]
