"""WatchRevocations' heartbeats on real processes: a ``serve`` on a private Postgres that
each test may freeze or hold back with an open transaction.

A heartbeat claims that every revocation committed before its ``covered`` point was sent
before it, so none may go out while the server's reader cannot know that: Postgres frozen,
or a revocation waiting behind an older transaction. Counts and order, never timings: each
"none" is checked over a window many heartbeat intervals long, after a settling pause."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
import pytest_asyncio

from session_authority.client import LocalCache, LocalCacheStats, SessionAuthorityClient
from session_authority.embedded import EmbeddedPostgres, find_free_port
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc
from tests.integration.support import NO_PROXY, spawn_serve, stop_serve, wait_serving

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.asyncio]

HEARTBEAT = pb.REVOCATION_EVENT_KIND_HEARTBEAT
REVOKED = pb.REVOCATION_EVENT_KIND_REVOKED
START = pb.REVOCATION_EVENT_KIND_START
#: The window a "no heartbeat" is checked over: 12 intervals of the server's 100 ms.
QUIET = 1.2
#: Left for a heartbeat already on its way when the fault began.
SETTLE = 1.0


@pytest_asyncio.fixture
async def stub(
    own_postgres: EmbeddedPostgres, tmp_path: Path
) -> AsyncIterator[pb_grpc.SessionAuthorityAsyncStub]:
    port = find_free_port()
    log = tmp_path / "serve.log"
    proc = spawn_serve(
        port,
        log,
        "--workers",
        "1",
        DATABASE_URL=own_postgres.url,
        WATCH_HEARTBEAT_MS="100",
        PG_COMMAND_TIMEOUT_MS="500",
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NO_PROXY) as channel:
            stub: pb_grpc.SessionAuthorityAsyncStub = pb_grpc.SessionAuthorityStub(channel)
            await wait_serving(stub, log)
            yield stub
    finally:
        own_postgres.resume()
        stop_serve(proc)


class Watcher:
    """A WatchRevocations stream read by a task of its own into ``messages``."""

    def __init__(self, stub: pb_grpc.SessionAuthorityAsyncStub, heartbeats: bool = True) -> None:
        self.call = stub.WatchRevocations(pb.WatchRevocationsRequest(heartbeats=heartbeats))
        self.messages: list[pb.RevocationEvent] = []
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.call:
            self.messages.append(message)
            self._arrived.set()

    def kinds(self, since: int = 0) -> list[int]:
        return [m.kind for m in self.messages[since:]]

    async def until(self, count: int, kind: int, since: int = 0) -> None:
        async with asyncio.timeout(30):
            while self.kinds(since).count(kind) < count:
                self._arrived.clear()
                await self._arrived.wait()

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def watching(
    stub: pb_grpc.SessionAuthorityAsyncStub, heartbeats: bool = True
) -> AsyncIterator[Watcher]:
    watcher = Watcher(stub, heartbeats)
    try:
        yield watcher
    finally:
        await watcher.close()


async def test_an_idle_stream_gets_heartbeats_only_when_it_asks(
    stub: pb_grpc.SessionAuthorityAsyncStub,
) -> None:
    async with watching(stub) as asked, watching(stub, heartbeats=False) as plain:
        await asked.until(5, HEARTBEAT)
        start, beats = asked.messages[0], asked.messages[1:6]
        assert start.kind == START and start.heartbeat_interval.ToMilliseconds() == 100
        assert [b.kind for b in beats] == [HEARTBEAT] * 5
        # Each covers a later point than the one before; each cursor resumes at or after it.
        covered = [b.covered.ToNanoseconds() for b in beats]
        assert covered == sorted(covered) and len(set(covered)) == 5
        assert [b.cursor for b in beats] == sorted(b.cursor for b in beats)
        assert all(b.cursor >= start.cursor for b in beats)
        assert not any(b.session_id or b.user_id or b.HasField("revoked_at") for b in beats)
        # A watcher that did not ask (any client written before heartbeats) sees none.
        assert plain.kinds() == [START]
        assert not plain.messages[0].HasField("heartbeat_interval")


async def test_no_heartbeat_while_postgres_is_frozen(
    stub: pb_grpc.SessionAuthorityAsyncStub, own_postgres: EmbeddedPostgres
) -> None:
    async with watching(stub) as watcher:
        await watcher.until(2, HEARTBEAT)
        own_postgres.pause()
        try:
            await asyncio.sleep(SETTLE)
            frozen = len(watcher.messages)
            await asyncio.sleep(QUIET)
            assert watcher.kinds(frozen) == []  # silence: the reader cannot know
        finally:
            own_postgres.resume()
        await watcher.until(2, HEARTBEAT, since=frozen)  # back once it reads again


async def test_no_heartbeat_while_a_revocation_waits_behind_an_older_transaction(
    stub: pb_grpc.SessionAuthorityAsyncStub, own_postgres: EmbeddedPostgres
) -> None:
    created = await stub.CreateSession(pb.CreateSessionRequest(user_id="heartbeat-held"))
    held = await asyncpg.connect(own_postgres.url)
    try:
        async with watching(stub) as watcher:
            await watcher.until(2, HEARTBEAT)
            transaction = held.transaction()
            await transaction.start()
            await held.fetchval("SELECT pg_current_xact_id()")  # an xid, older than what follows
            # Nothing committed waits above the horizon yet: heartbeats go on.
            await watcher.until(2, HEARTBEAT, since=len(watcher.messages))
            revoked = await stub.Invalidate(
                pb.InvalidateRequest(session_id=created.session.session_id)
            )
            assert revoked.revoked
            await asyncio.sleep(SETTLE)
            behind = len(watcher.messages)
            await asyncio.sleep(QUIET)
            # The revocation committed but is not final below the horizon: neither its event
            # nor a heartbeat (which would claim it had been sent).
            assert watcher.kinds(behind) == []
            await transaction.rollback()
            await watcher.until(1, HEARTBEAT, since=behind)
            after = watcher.messages[behind:]
            assert after[0].kind == REVOKED
            assert after[0].session_id == created.session.session_id
            first_beat = next(i for i, m in enumerate(after) if m.kind == HEARTBEAT)
            assert first_beat > 0 and after[first_beat].cursor >= after[0].cursor
    finally:
        await held.close()


async def test_without_heartbeats_the_client_falls_back_to_the_ttl_or_refuses(
    own_postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    """A server with WATCH_HEARTBEAT_MS=0 (as an older release) announces none: the Python
    client's copies answer from START on, bounded by their ttl; with require_heartbeats, never."""
    port = find_free_port()
    log = tmp_path / "serve.log"
    proc = spawn_serve(port, log, "--workers", "1", DATABASE_URL=own_postgres.url,
                       WATCH_HEARTBEAT_MS="0")  # fmt: skip
    target = f"127.0.0.1:{port}"
    try:
        async with grpc.aio.insecure_channel(target, options=NO_PROXY) as channel:
            stub: pb_grpc.SessionAuthorityAsyncStub = pb_grpc.SessionAuthorityStub(channel)
            await wait_serving(stub, log)
            async with watching(stub) as watcher:
                await watcher.until(1, START)
                assert not watcher.messages[0].HasField("heartbeat_interval")
        await asyncio.to_thread(_fallback_and_refusal, target)
    finally:
        stop_serve(proc)


def _fallback_and_refusal(target: str) -> None:
    def stats(client: SessionAuthorityClient) -> LocalCacheStats:
        found = client.local_cache_stats
        assert found is not None
        return found

    def until_live(client: SessionAuthorityClient) -> None:
        for _ in range(3000):
            if stats(client).live:
                return
            time.sleep(0.01)
        raise AssertionError("no START")

    # Silence is normal without heartbeats: a stream never reopened for it, however short the
    # bound (a server with heartbeats would be reopened every 0.2 s here).
    ttl_only = LocalCache(ttl=60.0, reopen_after=0.2)
    strict = LocalCache(ttl=60.0, require_heartbeats=True)
    with (
        SessionAuthorityClient(target, channel_options=NO_PROXY, local_cache=ttl_only) as old,
        SessionAuthorityClient(target, channel_options=NO_PROXY, local_cache=strict) as refusing,
    ):
        until_live(old)
        until_live(refusing)
        token = old.create("heartbeat-fallback", ttl=600).token
        assert stats(old).heartbeat_interval is None and stats(old).answering
        assert [old.validate(token).from_client_cache for _ in range(3)] == [False, True, True]
        assert not stats(refusing).answering
        assert [refusing.validate(token).from_client_cache for _ in range(3)] == [False] * 3
        assert stats(refusing).hits == 0 and stats(refusing).heartbeats == 0
        time.sleep(1.0)  # 5 x reopen_after of silence
        assert (stats(old).starts, stats(old).silent_reopens) == (1, 0)
        assert (stats(refusing).starts, stats(refusing).silent_reopens) == (1, 0)
