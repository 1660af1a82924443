"""TouchSession (sliding expiry) on real Redis and Postgres: the store's
conditional write, the coalescing (in process and across connections), the
lifetime cap, the race with Invalidate, and the new expiry reaching another
process within the L1 bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias
from uuid import uuid4

import asyncpg
import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from google.protobuf.duration_pb2 import Duration

from session_authority.adapters.migrate import apply_migrations
from session_authority.adapters.postgres_store import PostgresSessionStore
from session_authority.adapters.redis_cache import RedisSessionCache, cache_key
from session_authority.bootstrap import App, assemble_core
from session_authority.core.breaker import Breaker, BreakerPolicy
from session_authority.core.domain import Reason, Source, TokenHash
from session_authority.core.errors import SessionNotLive
from session_authority.core.ports import Touched
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from .support import NO_PROXY, app_settings

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

#: A channel with a connection of its own (grpc shares one between equal channels).
_OWN_CONNECTION = [*NO_PROXY, ("grpc.use_local_subchannel_pool", 1)]
#: The servers' SESSION_MAX_LIFETIME here: two hours.
MAX_LIFETIME = timedelta(hours=2)

# Counts every write of a session row, in Postgres itself (test-only trigger).
_COUNT_WRITES = """
CREATE TABLE IF NOT EXISTS test_touch_writes (session_id uuid PRIMARY KEY, n bigint NOT NULL);
CREATE OR REPLACE FUNCTION test_touch_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO test_touch_writes VALUES (NEW.session_id, 1)
    ON CONFLICT (session_id) DO UPDATE SET n = test_touch_writes.n + 1;
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS test_touch_count ON sessions;
CREATE TRIGGER test_touch_count AFTER UPDATE ON sessions
    FOR EACH ROW EXECUTE FUNCTION test_touch_count();
"""

Replicas: TypeAlias = "list[tuple[App, pb_grpc.SessionAuthorityAsyncStub]]"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pg(postgres_server: EmbeddedPostgres) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(postgres_server.url)
    await apply_migrations(conn)
    await conn.execute(_COUNT_WRITES)
    try:
        yield conn
    finally:
        await conn.execute("DROP TRIGGER IF EXISTS test_touch_count ON sessions")
        await conn.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def replicas(
    pg: asyncpg.Connection, postgres_server: EmbeddedPostgres, redis_server: EmbeddedRedis
) -> AsyncIterator[Replicas]:
    """Two processes' worth of servers on one Redis and Postgres."""
    pairs: Replicas = []
    channels: list[grpc.aio.Channel] = []
    apps: list[App] = []
    try:
        for _ in range(2):
            app = await App.start(
                app_settings(
                    postgres_server.url,
                    redis_server.url,
                    session_max_lifetime=MAX_LIFETIME.total_seconds(),
                )
            )
            apps.append(app)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=NO_PROXY)
            channels.append(channel)
            pairs.append((app, pb_grpc.SessionAuthorityStub(channel)))
        yield pairs
    finally:
        for channel in channels:
            await channel.close()
        for app in apps:
            await app.stop(0)


async def _create(
    stub: pb_grpc.SessionAuthorityAsyncStub, ttl: int = 600
) -> pb.CreateSessionResponse:
    return await stub.CreateSession(
        pb.CreateSessionRequest(user_id=f"touch-{uuid4().hex[:8]}", ttl=Duration(seconds=ttl)),
        timeout=10,
    )


async def _touch(
    stub: pb_grpc.SessionAuthorityAsyncStub,
    extend: int | None = 3600,
    *,
    token: str | None = None,
    session_id: str | None = None,
    write_through: bool = False,
) -> pb.TouchSessionResponse:
    request = pb.TouchSessionRequest(write_through=write_through)
    if token is not None:
        request.token = token
    if session_id is not None:
        request.session_id = session_id
    if extend is not None:
        request.extend_by.FromSeconds(extend)
    return await stub.TouchSession(request, timeout=20)


async def _writes(pg: asyncpg.Connection, session_id: str) -> int:
    n = await pg.fetchval("SELECT n FROM test_touch_writes WHERE session_id = $1", session_id)
    return int(n or 0)


async def _until(
    probe: Callable[[], Awaitable[object]], want: object, *, differs: bool = False
) -> None:
    """Poll ``probe`` until it returns ``want`` (``differs``: anything else), 10 s at most."""
    deadline = time.monotonic() + 10
    while True:
        got = await probe()
        if (got != want) if differs else (got == want):
            return
        assert time.monotonic() < deadline, f"still {got!r}"
        await asyncio.sleep(0.01)


async def _answered_expiry(stub: pb_grpc.SessionAuthorityAsyncStub, token: str) -> int:
    """The expiry (µs) that ValidateSession answers for ``token``."""
    reply = await stub.ValidateSession(pb.ValidateSessionRequest(token=token), timeout=10)
    return reply.session.expires_at.ToMicroseconds()


def _dt(ts: Any) -> datetime:
    return ts.ToDatetime()  # type: ignore[no-any-return]


async def test_touch_end_to_end_by_token_and_by_id(
    replicas: Replicas, pg: asyncpg.Connection
) -> None:
    _, a = replicas[0]
    created = await _create(a)
    first = await _touch(a, token=created.token)
    assert first.written
    assert _dt(first.session.expires_at) > _dt(created.session.expires_at)
    assert first.session.HasField("last_seen_at")
    assert first.session.session_id == created.session.session_id
    # Within TOUCH_INTERVAL (60 s): coalesced, by token and by id alike.
    again = await _touch(a, token=created.token)
    by_id = await _touch(a, session_id=created.session.session_id)
    assert (again.written, by_id.written) == (False, False)
    assert again.session.expires_at == by_id.session.expires_at == first.session.expires_at
    assert await _writes(pg, created.session.session_id) == 1
    # Validation never slides anything, and sees the new expiry.
    valid = await a.ValidateSession(pb.ValidateSessionRequest(token=created.token), timeout=10)
    assert valid.valid and valid.session.expires_at == first.session.expires_at
    assert await _writes(pg, created.session.session_id) == 1


async def test_touch_refusals(replicas: Replicas, pg: asyncpg.Connection) -> None:
    _, a = replicas[0]
    cases: list[tuple[pb.TouchSessionRequest, grpc.StatusCode, str]] = [
        (pb.TouchSessionRequest(), grpc.StatusCode.INVALID_ARGUMENT, "target"),
        (pb.TouchSessionRequest(session_id="nope"), grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
        (pb.TouchSessionRequest(session_id=str(uuid4())), grpc.StatusCode.NOT_FOUND, "session"),
    ]
    negative = pb.TouchSessionRequest(session_id=str(uuid4()))
    negative.extend_by.FromSeconds(-5)
    cases.append((negative, grpc.StatusCode.INVALID_ARGUMENT, "extend_by"))
    revoked = await _create(a)
    await a.Invalidate(pb.InvalidateRequest(token=revoked.token), timeout=10)
    cases.append(
        (
            pb.TouchSessionRequest(token=revoked.token),
            grpc.StatusCode.FAILED_PRECONDITION,
            "revoked",
        )
    )
    expired = await _create(a)
    await pg.execute(
        """UPDATE sessions SET created_at = now() - interval '2 hours',
                              expires_at = now() - interval '1 second'
           WHERE session_id = $1""",
        expired.session.session_id,
    )
    cases.append(
        (
            pb.TouchSessionRequest(session_id=expired.session.session_id),
            grpc.StatusCode.FAILED_PRECONDITION,
            "expired",
        )
    )
    for request, code, word in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await a.TouchSession(request, timeout=10)
        assert refused.value.code() == code, request
        assert word in (refused.value.details() or ""), refused.value.details()
    # Neither was revived in Postgres.
    rows = await pg.fetch(
        "SELECT revoked_at, expires_at > now() AS live, last_seen_at FROM sessions "
        "WHERE session_id = ANY($1::uuid[])",
        [revoked.session.session_id, expired.session.session_id],
    )
    assert all(r["last_seen_at"] is None for r in rows)
    assert sum(r["live"] for r in rows) == 1  # the revoked one's expiry was never touched
    assert sum(r["revoked_at"] is not None for r in rows) == 1


async def test_touch_is_capped_by_the_maximum_lifetime_and_never_shortens(
    replicas: Replicas, pg: asyncpg.Connection
) -> None:
    _, a = replicas[0]
    capped = await _create(a)
    reply = await _touch(a, extend=10 * 3600, token=capped.token)
    assert reply.written
    cap = _dt(capped.session.created_at) + MAX_LIFETIME
    assert _dt(reply.session.expires_at) == cap
    # A session created to live longer than the cap is never shortened by a touch.
    long = await _create(a, ttl=3 * 3600)
    reply = await _touch(a, extend=60, session_id=long.session.session_id)
    assert reply.written
    assert reply.session.expires_at == long.session.expires_at
    stored = await pg.fetchval(
        "SELECT expires_at FROM sessions WHERE session_id = $1", long.session.session_id
    )
    assert stored.replace(tzinfo=None) == _dt(long.session.expires_at)


@pytest.mark.parametrize("write_through", [False, True], ids=["behind", "through"])
async def test_a_thousand_concurrent_touches_make_one_statement_one_write_no_lock_waits(
    replicas: Replicas,
    pg: asyncpg.Connection,
    postgres_server: EmbeddedPostgres,
    write_through: bool,
) -> None:
    """1,000 touches at once of a cached session. By default every one is
    answered from the cache (the expiry as it stood) and one write goes on
    behind them; with ``write_through`` they share one statement and answer
    its new expiry. Either way: one statement, one write, no lock waits."""
    app, a = replicas[0]
    created = await _create(a)
    request = pb.ValidateSessionRequest(token=created.token)
    assert (await a.ValidateSession(request, timeout=10)).valid  # cached
    statements = 0
    inner = app.store.touch

    async def counted(**kwargs: Any) -> Touched | None:
        nonlocal statements
        statements += 1
        return await inner(**kwargs)

    app.store.touch = counted  # type: ignore[method-assign]
    # 10 connections of 100 calls each (GRPC_MAX_CONCURRENT_STREAMS): 1,000 at once.
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=_OWN_CONNECTION)
        for _ in range(10)
    ]
    sampler = _LockSampler(postgres_server.url)
    try:
        for channel in channels:
            await channel.channel_ready()
        stubs = [pb_grpc.SessionAuthorityStub(channel) for channel in channels]
        async with sampler:
            replies = await asyncio.gather(
                *(
                    _touch(stubs[i % 10], token=created.token, write_through=write_through)
                    for i in range(1000)
                )
            )
            if not write_through:  # the write behind the answers lands
                await _until(lambda: _writes(pg, created.session.session_id), 1)
                created_us = created.session.expires_at.ToMicroseconds()
                await _until(lambda: _answered_expiry(a, created.token), created_us, differs=True)
    finally:
        del app.store.touch
        for channel in channels:
            await channel.close()
    expiries = {r.session.expires_at.ToMicroseconds() for r in replies}
    if write_through:
        assert sum(r.written for r in replies) == 1
        assert len(expiries) == 1 and expiries != {created.session.expires_at.ToMicroseconds()}
    else:
        # Each answer is the expiry as it stood, or (once the write behind them
        # landed) the new one; never a third.
        assert sum(r.written for r in replies) == 0
        stored = await pg.fetchval(
            "SELECT expires_at FROM sessions WHERE session_id = $1", created.session.session_id
        )
        old_us = created.session.expires_at.ToMicroseconds()
        new_us = await _answered_expiry(a, created.token)
        assert new_us == (stored - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
        assert old_us in expiries and expiries <= {old_us, new_us}
    assert statements == 1
    assert await _writes(pg, created.session.session_id) == 1
    assert sampler.samples > 0
    assert sampler.lock_waits == 0


async def test_touches_from_many_connections_never_queue_on_the_row_lock(
    replicas: Replicas, pg: asyncpg.Connection, postgres_server: EmbeddedPostgres
) -> None:
    """Each statement on its own connection, as from many replicas at once,
    while another transaction holds the row: none waits for it (SKIP LOCKED),
    and one interval allows one write however many statements run."""
    _, a = replicas[0]
    created = await _create(a)
    store = PostgresSessionStore(
        postgres_server.url, min_size=1, max_size=20, command_timeout=30, acquire_timeout=30
    )
    hash_ = TokenHash.of(created.token)

    def touch() -> Awaitable[Touched | None]:
        return store.touch(
            token_hash=hash_,
            extend_by=timedelta(hours=1),
            max_lifetime=MAX_LIFETIME,
            interval=60.0,
        )

    holder = await asyncpg.connect(postgres_server.url)
    sampler = _LockSampler(postgres_server.url)
    try:
        async with sampler:
            tx = holder.transaction()
            await tx.start()
            await holder.execute(
                "SELECT 1 FROM sessions WHERE session_id = $1 FOR UPDATE",
                created.session.session_id,
            )
            blocked = [asyncio.ensure_future(touch()) for _ in range(40)]
            done, _ = await asyncio.wait(blocked, timeout=15)
            finished_under_lock = len(done)
            await tx.rollback()
            answers = await asyncio.gather(*blocked)
            later = await asyncio.gather(*(touch() for _ in range(40)))
    finally:
        await holder.close()
        await store.aclose()
    assert finished_under_lock == 40  # nobody waited for the held row
    assert all(t is not None and t.live and not t.written for t in answers)
    assert sum(t is not None and t.written for t in later) == 1
    assert await _writes(pg, created.session.session_id) == 1
    assert sampler.lock_waits == 0


Gated: TypeAlias = tuple["_PausableTouchStore", Any, aioredis.Redis]


@pytest_asyncio.fixture(loop_scope="module")
async def gated(
    postgres_server: EmbeddedPostgres, redis_server: EmbeddedRedis
) -> AsyncIterator[Gated]:
    """A core on the real store with a gate after each touch statement, the real
    cache, and a Redis client to look at it."""
    store = _PausableTouchStore(postgres_server.url)
    cache = RedisSessionCache.from_url(
        redis_server.url, min_connections=1, max_connections=10, timeout=5, pool_timeout=5
    )
    core = assemble_core(store, cache, breaker=Breaker(BreakerPolicy(timeout=5.0)))
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield store, core, client
    finally:
        store.gate.set()
        await core.aclose()
        await cache.aclose()
        await store.aclose()
        await client.aclose()


async def test_a_touch_racing_invalidate_never_resurrects_the_session(gated: Gated) -> None:
    """The touch's statement has written the new expiry; Invalidate commits and
    tombstones before the touch reaches Redis: the touch's fill is refused, it
    answers FAILED_PRECONDITION, and the cache still says revoked."""
    store, core, client = gated
    token, _ = await core.create(f"race-{uuid4().hex[:8]}", None, {})
    assert (await core.validate(token)).valid  # cached, with the old expiry
    store.gate.clear()
    touch = asyncio.create_task(
        core.touch(token=token, extend_by=timedelta(hours=1), write_through=True)
    )
    await store.written.wait()  # Postgres holds the new expiry; Redis not yet
    revoked = await core.invalidate(token=token)
    assert (revoked.revoked_count, revoked.cache_purged) == (1, True)
    store.gate.set()
    with pytest.raises(SessionNotLive, match="revoked"):
        await touch
    answer = await core.validate(token)
    assert (answer.valid, answer.reason, answer.source) == (
        False,
        Reason.REVOKED,
        Source.CACHE,
    )
    key = cache_key(TokenHash.of(token))
    assert await client.hget(key, "state") == "revoked"
    with pytest.raises(SessionNotLive):  # and a touch after it is refused too
        await core.touch(token=token)


async def test_a_write_behind_racing_invalidate_never_resurrects_the_session(
    gated: Gated,
) -> None:
    """The default touch of a cached session: answered from the cache at once,
    its write behind the answer. That write's statement has committed the new
    expiry when Invalidate commits and tombstones: its fill is refused, the
    cache still says revoked, and the next touch is refused."""
    store, core, client = gated
    token, session = await core.create(f"behind-{uuid4().hex[:8]}", None, {})
    assert (await core.validate(token)).valid  # cached
    store.gate.clear()
    answer = await core.touch(token=token, extend_by=timedelta(hours=1))
    assert not answer.written and answer.session.expires_at == session.expires_at
    await store.written.wait()  # the write behind: in Postgres, not yet in Redis
    revoked = await core.invalidate(token=token)
    assert (revoked.revoked_count, revoked.cache_purged) == (1, True)
    store.gate.set()
    await _until(lambda: _behind(core), 0)
    verdict = await core.validate(token)
    assert (verdict.valid, verdict.reason) == (False, Reason.REVOKED)
    key = cache_key(TokenHash.of(token))
    assert await client.hget(key, "state") == "revoked"
    with pytest.raises(SessionNotLive, match="revoked"):
        await core.touch(token=token)


async def _behind(core: Any) -> int:
    return len(core.toucher._behind)


async def test_the_new_expiry_reaches_another_process_within_the_l1_bound(
    replicas: Replicas,
) -> None:
    """B holds an L1 copy with the old expiry when A touches: once that copy's
    life (L1_CACHE_TTL_MS) is over, B answers the new expiry; A at once."""
    (_, a), (app_b, b) = replicas
    created = await _create(a)
    request = pb.ValidateSessionRequest(token=created.token)
    for stub in (a, b):
        assert (await stub.ValidateSession(request, timeout=10)).valid  # L1 copies
    local_b = app_b.core.validator._local
    assert local_b is not None
    found = local_b._entries.get(TokenHash.of(created.token).hex)
    assert found is not None, "B holds no L1 copy"
    copy_dies_at = found[0]
    touched = await _touch(a, token=created.token, write_through=True)
    assert touched.written
    new_expiry = touched.session.expires_at
    seen_a = await a.ValidateSession(request, timeout=10)
    assert seen_a.session.expires_at == new_expiry  # the writer's own copy, replaced
    await asyncio.sleep(max(0.0, copy_dies_at - time.monotonic()) + 0.01)
    seen_b = await b.ValidateSession(request, timeout=10)
    assert seen_b.valid and seen_b.session.expires_at == new_expiry


async def test_a_touch_that_joins_a_statement_begun_before_an_invalidate_is_refused(
    pg: asyncpg.Connection, postgres_server: EmbeddedPostgres, redis_server: EmbeddedRedis
) -> None:
    """A's statement (coalesced: written recently elsewhere, so no fill to be
    refused) read the session live; Invalidate returns; then B's touch joins
    A's statement still in flight. B started after the revocation returned:
    it must not be told the session is live."""
    store = _PausableTouchStore(postgres_server.url)
    cache = RedisSessionCache.from_url(
        redis_server.url, min_connections=1, max_connections=10, timeout=5, pool_timeout=5
    )
    core = assemble_core(store, cache, breaker=Breaker(BreakerPolicy(timeout=5.0)))
    try:
        token, _ = await core.create(f"late-{uuid4().hex[:8]}", None, {})
        hash_ = TokenHash.of(token)
        # Another replica wrote it just now: this process's statement writes nothing.
        written = await PostgresSessionStore.touch(
            store,
            token_hash=hash_,
            extend_by=timedelta(hours=1),
            max_lifetime=MAX_LIFETIME,
            interval=60.0,
        )
        assert written is not None and written.written
        store.gate.clear()
        first = asyncio.create_task(core.touch(token=token))
        await store.read.wait()
        assert (await core.invalidate(token=token)).cache_purged
        # write_through: straight to the statement in flight (by default it would ask
        # the cache first, find the tombstone, and then join it).
        late = asyncio.create_task(core.touch(token=token, write_through=True))
        flights = core.toucher._flights
        for _ in range(100):  # a few turns of the loop: no I/O before it joins
            if flights.callers("h:" + hash_.hex) == 2:
                break
            await asyncio.sleep(0)
        assert flights.callers("h:" + hash_.hex) == 2, "B did not join A's statement"
        store.gate.set()
        assert not (await first).written  # it began before the revocation: either answer
        with pytest.raises(SessionNotLive, match="revoked"):
            await late
    finally:
        store.gate.set()
        await core.aclose()
        await cache.aclose()
        await store.aclose()


class _PausableTouchStore(PostgresSessionStore):
    """The real store, with a gate after a touch's statement has committed."""

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn, min_size=1, max_size=5, command_timeout=5, acquire_timeout=5)
        self.read = asyncio.Event()
        self.written = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()

    async def touch(self, **kwargs: Any) -> Touched | None:
        found = await super().touch(**kwargs)
        self.read.set()
        if found is not None and found.written:
            self.written.set()
        await self.gate.wait()
        return found


class _LockSampler:
    """Samples ``pg_stat_activity`` for backends waiting on a lock, on its own
    connection, for as long as the ``async with`` block runs."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self.samples = 0
        self.lock_waits = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> _LockSampler:
        self._task = asyncio.create_task(self._run())
        await self._ready.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def _run(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        self._ready.set()
        query = _LOCK_WAITS
        try:
            while not self._stop.is_set():
                self.lock_waits += int(await conn.fetchval(query))
                self.samples += 1
                await asyncio.sleep(0.002)
        finally:
            await conn.close()


# Backends waiting on a heavyweight lock (a row lock's transaction id or tuple),
# other than this sampler and the holder of a test's own lock.
_LOCK_WAITS = """
SELECT count(*) FROM pg_stat_activity
WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()
"""
