"""The unknown-token limit is the replica's, not each worker's: on a real
``serve --workers 2``, one caller whose connections land on both workers gets
UNKNOWN_TOKEN_BURST (plus the rate) once, not once per worker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from session_authority.core.domain import new_token
from session_authority.embedded import find_free_port
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from .support import NO_PROXY, spawn_serve, stop_serve, wait_serving

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

RATE, BURST = 0.5, 10
PER_CONNECTION = 12
#: A connection of its own per channel (no shared subchannel), for the kernel to spread.
OWN_CONNECTION = [*NO_PROXY, ("grpc.use_local_subchannel_pool", 1)]


async def test_one_caller_over_both_workers_gets_one_burst(tmp_path: Path, pg_dsn: str) -> None:
    port = find_free_port()
    log = tmp_path / "serve.log"
    process = spawn_serve(
        port,
        log,
        "--workers",
        "2",
        DATABASE_URL=pg_dsn,
        UNKNOWN_TOKEN_RATE=str(RATE),
        UNKNOWN_TOKEN_BURST=str(BURST),
    )
    channels: list[grpc.aio.Channel] = []
    try:
        # Connections until both workers have some (each Health names its worker):
        # 8 at least, and all on one worker only once in 2**63 tries.
        workers: dict[int, int] = {}
        while len(channels) < 8 or (len(workers) < 2 and len(channels) < 64):
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION)
            channels.append(channel)
            stub = pb_grpc.SessionAuthorityStub(channel)
            await wait_serving(stub, log)
            index = (await stub.Health(pb.HealthRequest(), timeout=5)).worker.index
            workers[index] = workers.get(index, 0) + 1
        assert len(workers) == 2, workers

        async def flood(channel: grpc.aio.Channel) -> list[grpc.StatusCode]:
            stub = pb_grpc.SessionAuthorityStub(channel)
            codes = []
            for _ in range(PER_CONNECTION):
                try:
                    reply = await stub.ValidateSession(
                        pb.ValidateSessionRequest(token=new_token()), timeout=10
                    )
                    assert not reply.valid
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
            return codes

        started = time.monotonic()
        results = await asyncio.gather(*(flood(channel) for channel in channels))
        elapsed = time.monotonic() - started
        codes = [code for result in results for code in result]
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        answered = codes.count(grpc.StatusCode.OK)
        # One bucket for the replica: the burst, what it refilled meanwhile, and a
        # credit of slack (per worker, the old limit let 2 x BURST through).
        assert BURST <= answered <= BURST + RATE * elapsed + 1, (answered, elapsed, workers)
        assert process.poll() is None, log.read_text()
    finally:
        for channel in channels:
            await channel.close()
        code = stop_serve(process, grace=30)
    assert code == 0, log.read_text()[-3000:]
