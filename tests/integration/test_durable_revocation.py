"""The revocation promise against an adversary, on real Redis and Postgres
processes: once Invalidate/InvalidateUser has returned OK, no later validation
answers valid for those sessions, on any replica. Each test is a way it broke
before (issue 9), and fails on the code before it:

1. Redis killed and restarted from an RDB saved before the revocation;
2. the revoking replica SIGKILLed while Redis was frozen, then a fresh replica;
3. replicas whose clocks disagree with Postgres's by more than a session's life;
4. a 50,000-session InvalidateUser, which must confirm its purge and open no breaker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from uuid import uuid4

import asyncpg
import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from session_authority.adapters.postgres_store import PostgresSessionStore
from session_authority.adapters.redis_cache import RedisSessionCache, cache_key
from session_authority.bootstrap import App, assemble_core
from session_authority.core.breaker import Breaker, BreakerPolicy
from session_authority.core.domain import Reason, Revocation, TokenHash, new_token
from session_authority.core.policy import utcnow
from session_authority.core.service import SessionAuthority
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis, find_free_port
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from .support import NO_PROXY, app_settings, spawn_serve, stop_serve, wait_serving

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.asyncio]

HOUR = timedelta(hours=1)


async def _never_valid(stub: pb_grpc.SessionAuthorityAsyncStub, token: str, times: int) -> None:
    for _ in range(times):
        reply = await stub.ValidateSession(pb.ValidateSessionRequest(token=token), timeout=5)
        assert (reply.valid, reply.reason) == (False, pb.REASON_REVOKED), reply


@pytest_asyncio.fixture
async def app(own_postgres: EmbeddedPostgres, own_redis: EmbeddedRedis) -> AsyncIterator[App]:
    started = await App.start(app_settings(own_postgres.url, own_redis.url))
    try:
        yield started
    finally:
        with contextlib.suppress(RuntimeError):
            own_redis.resume()
        await started.stop(0)


def _stub(app: App) -> tuple[grpc.aio.Channel, pb_grpc.SessionAuthorityAsyncStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=NO_PROXY)
    return channel, pb_grpc.SessionAuthorityStub(channel)


# --- 1. a Redis restored from an older snapshot ----------------------------------------------


async def test_redis_restarted_from_an_rdb_older_than_the_revocation(
    app: App, own_redis: EmbeddedRedis
) -> None:
    channel, stub = _stub(app)
    raw = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        token = (await stub.CreateSession(pb.CreateSessionRequest(user_id="rdb"))).token
        for _ in range(2):
            await stub.ValidateSession(pb.ValidateSessionRequest(token=token))
        key = cache_key(TokenHash.of(token))
        assert await raw.hexists(key, "i")  # a live session (redis_codec)
        await raw.save()  # what Redis's default persistence does on its own
        reply = await stub.Invalidate(pb.InvalidateRequest(token=token))
        assert (reply.revoked, reply.cache_purged) == (True, True)
        assert await raw.hget(key, "state") == "revoked"
        await raw.aclose()

        own_redis.kill()  # SIGKILL: no save on the way down
        own_redis.restart()  # loads the dump: the live entry is back
        raw = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
        assert await raw.hexists(key, "i")  # a live session (redis_codec)

        # redis-py reconnects silently; the new connection meets a new run_id.
        await _never_valid(stub, token, times=50)
        deadline = time.monotonic() + 10
        while await raw.hget(key, "state") != "revoked":  # the probe re-applied it
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await _never_valid(stub, token, times=20)
    finally:
        await raw.aclose()
        await channel.close()


# --- 2. the revoking replica dies while Redis is frozen -------------------------------------------


async def test_revoker_killed_while_redis_frozen_then_a_fresh_replica(
    tmp_path: Path, own_postgres: EmbeddedPostgres, own_redis: EmbeddedRedis
) -> None:
    port, log = find_free_port(), tmp_path / "revoker.log"
    revoker = spawn_serve(port, log, DATABASE_URL=own_postgres.url, REDIS_URL=own_redis.url)
    fresh: App | None = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NO_PROXY) as ch:
            stub: pb_grpc.SessionAuthorityAsyncStub = pb_grpc.SessionAuthorityStub(ch)
            await wait_serving(stub, log)
            token = (await stub.CreateSession(pb.CreateSessionRequest(user_id="frozen"))).token
            for _ in range(2):
                await stub.ValidateSession(pb.ValidateSessionRequest(token=token))
            own_redis.pause()
            reply = await stub.Invalidate(pb.InvalidateRequest(token=token), timeout=10)
            assert (reply.revoked, reply.cache_purged) == (True, False)  # Postgres holds it
        revoker.send_signal(signal.SIGKILL)  # a deploy, a crash, the autoscaler
        revoker.wait(10)
        own_redis.resume()  # the stale live entry is still in Redis

        fresh = await App.start(app_settings(own_postgres.url, own_redis.url))
        channel, stub = _stub(fresh)
        try:
            await _never_valid(stub, token, times=50)  # from the very first call
        finally:
            await channel.close()
    finally:
        if revoker.poll() is None:
            revoker.kill()
            revoker.wait(10)
        with contextlib.suppress(RuntimeError):
            own_redis.resume()
        if fresh is not None:
            await fresh.stop(0)


# --- 3. clocks that disagree --------------------------------------------------------------------


def _skewed(seconds: float) -> Callable[[], datetime]:
    return lambda: utcnow() + timedelta(seconds=seconds)


async def _replica(
    dsn: str, redis_url: str, clock: Callable[[], datetime]
) -> tuple[SessionAuthority, PostgresSessionStore, RedisSessionCache]:
    store = PostgresSessionStore(dsn, min_size=1, max_size=4, command_timeout=5, acquire_timeout=5)
    cache = RedisSessionCache.from_url(
        redis_url, min_connections=1, max_connections=4, timeout=1, pool_timeout=1
    )
    core = assemble_core(store, cache, breaker=Breaker(BreakerPolicy()), clock=clock)
    await core.replay_revocations()  # adopt Redis, as App.start does
    return core, store, cache


async def test_a_fast_clock_does_not_decide_what_is_revoked(
    own_postgres: EmbeddedPostgres, own_redis: EmbeddedRedis
) -> None:
    honest, store_a, cache_a = await _replica(own_postgres.url, own_redis.url, utcnow)
    fast, store_b, cache_b = await _replica(own_postgres.url, own_redis.url, _skewed(5))
    closing: list[PostgresSessionStore | RedisSessionCache] = [store_a, cache_a, store_b, cache_b]
    try:
        token, _ = await honest.create("skew", timedelta(seconds=4), {})
        assert (await honest.validate(token)).valid  # cached, 4 s of real life left
        # The fast replica thinks it expired a second ago; Postgres's clock, which
        # decides, says it had 4 s left: revoked (before: "revoked: false").
        assert await fast.invalidate(token=token) == Revocation(1, True)
        answer = await honest.validate(token)
        assert (answer.valid, answer.reason) == (False, Reason.REVOKED)
    finally:
        for core in (honest, fast):
            await core.aclose()
        for adapter in closing:
            await adapter.aclose()


async def test_the_drain_ignores_how_far_the_revokers_clock_is_off(
    own_postgres: EmbeddedPostgres, own_redis: EmbeddedRedis
) -> None:
    """A revoker 20 s behind Postgres whose tombstone failed: the drain is keyed
    by Postgres's pending mark, not by the revoker's clock."""
    reader, reader_store, reader_cache = await _replica(
        own_postgres.url, own_redis.url, _skewed(+20)
    )
    closing: list[PostgresSessionStore | RedisSessionCache] = [reader_store, reader_cache]
    dead_redis = f"redis://127.0.0.1:{find_free_port()}/0"
    store = PostgresSessionStore(
        own_postgres.url, min_size=1, max_size=4, command_timeout=5, acquire_timeout=5
    )
    cut_off = RedisSessionCache.from_url(
        dead_redis, min_connections=0, max_connections=2, timeout=0.2, pool_timeout=0.2
    )
    closing += [store, cut_off]
    slow = assemble_core(store, cut_off, breaker=Breaker(BreakerPolicy()), clock=_skewed(-20))
    try:
        token, _ = await reader.create("skew", None, {})
        assert (await reader.validate(token)).valid
        assert (await slow.invalidate(token=token)).cache_purged is False
        assert await reader.drain_revocations() == 1
        answer = await reader.validate(token)
        assert (answer.valid, answer.reason) == (False, Reason.REVOKED)
    finally:
        for core in (reader, slow):
            await core.aclose()
        for adapter in closing:
            await adapter.aclose()


# --- 4. a mass logout --------------------------------------------------------------------------


async def test_invalidate_user_of_50000_sessions_confirms_its_purge(
    app: App, own_postgres: EmbeddedPostgres, own_redis: EmbeddedRedis
) -> None:
    user, count = f"user-{uuid4().hex[:8]}", 50_000
    channel, stub = _stub(app)
    conn = await asyncpg.connect(own_postgres.url)
    raw = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        # 50,000 sessions straight into Postgres (CreateSession one by one would
        # take minutes here); a few of them also created and cached the normal way.
        now = utcnow()
        rows = [
            (
                uuid4(),
                bytes.fromhex(TokenHash.of(new_token()).hex),
                user,
                now,
                now + timedelta(hours=1),
            )
            for _ in range(count - 3)
        ]
        await conn.copy_records_to_table(
            "sessions",
            records=rows,
            columns=["session_id", "token_hash", "user_id", "created_at", "expires_at"],
        )
        tokens = [
            (await stub.CreateSession(pb.CreateSessionRequest(user_id=user))).token
            for _ in range(3)
        ]
        for token in tokens:
            assert (await stub.ValidateSession(pb.ValidateSessionRequest(token=token))).valid
        opened = app.core.breaker.opened_count

        reply = await stub.InvalidateUser(pb.InvalidateUserRequest(user_id=user), timeout=60)

        assert (reply.revoked_count, reply.cache_purged, reply.propagated) == (count, True, True)
        assert app.core.breaker.opened_count == opened  # no breaker opened
        assert await conn.fetchval("SELECT count(*) FROM sessions WHERE purge_pending") == 0
        sample = [bytes(r[1]).hex() for r in rows[:: count // 50]]
        states = [await raw.hget(cache_key(TokenHash(h)), "state") for h in sample]
        assert states == ["revoked"] * len(sample)
        for token in tokens:
            reply_v = await stub.ValidateSession(pb.ValidateSessionRequest(token=token))
            assert (reply_v.valid, reply_v.reason) == (False, pb.REASON_REVOKED)
    finally:
        await raw.aclose()
        await conn.close()
        await channel.close()


# --- 5. a replay of 200,000 revocations -------------------------------------------------------


async def test_a_replay_of_200000_revocations_closes_each_workers_breaker_at_its_first_probe(
    tmp_path: Path, own_postgres: EmbeddedPostgres, own_redis: EmbeddedRedis
) -> None:
    """200,000 revocations in the replay window and a flushed Redis: both
    workers must replay them into it. Each probe's cost is bounded (sealed
    chunks; a worker skips what another has sealed meanwhile), so each
    worker's first probe closes its breaker; before, each re-wrote all of them
    and ran out of its 10 s, twice ("probe failed: " with no cause)."""
    count = 200_000
    port, log = find_free_port(), tmp_path / "serve.log"
    server = spawn_serve(
        port, log, "--workers", "2", DATABASE_URL=own_postgres.url, REDIS_URL=own_redis.url
    )
    conn = await asyncpg.connect(own_postgres.url)
    raw = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NO_PROXY) as ch:
            stub: pb_grpc.SessionAuthorityAsyncStub = pb_grpc.SessionAuthorityStub(ch)
            await wait_serving(stub, log)
            # One statement, not 200,000 calls: revoked a moment ago, not expired.
            await conn.execute(
                """INSERT INTO sessions (session_id, token_hash, user_id, created_at,
                                         expires_at, revoked_at)
                   SELECT gen_random_uuid(), sha256(int8send(g) || $1::bytea), 'mass',
                          now(), now() + interval '1 hour', now()
                   FROM generate_series(1, $2::bigint) g""",
                uuid4().bytes,
                count,
            )
            newest = await conn.fetchval(
                """SELECT lpad(max(revocation_xid)::text, 20, '0') || ':~' FROM sessions"""
            )
            deadline = time.monotonic() + 120
            while await conn.fetchval("SELECT confirmed FROM revocation_watermark") < newest:
                assert time.monotonic() < deadline, "the sweeps did not seal them"
                await asyncio.sleep(0.2)
            before = len(_lines(log))
            started = time.monotonic()
            await raw.flushall()  # the cache lost: both workers must replay all of them

            closed: set[int] = set()
            while len(closed) < 2:
                assert time.monotonic() < started + 120, log.read_text()[-3000:]
                await asyncio.sleep(0.1)
                after = _lines(log)[before:]
                # A probe may stop past its budget, sealed ("replay continues"),
                # and the next resumes; none may run out of time or fail.
                failed = [str(x["message"]) for x in after if "probe failed" in str(x["message"])]
                assert failed == [], failed
                closed = {
                    int(line["pid"])  # type: ignore[call-overload]
                    for line in after
                    if "probe succeeded" in str(line["message"])
                }
            took = time.monotonic() - started
            replays = [
                f"{line['time']} {line['pid']} {line['message']}"
                for line in _lines(log)[before:]
                if "SessionCache" in str(line["message"]) or "breaker" in str(line["message"])
            ]
            print(f"\n200,000 revocations: both breakers closed {took:.2f}s after FLUSHALL")
            print("\n".join(replays))
            # One worker writes them (the replay lease); the other waits and
            # writes what is left, not all of them again.
            written = sum(
                int(found.group(1))
                for text in replays
                if "SessionCache replay" in text
                and (found := re.search(r"(?:replayed|continues:) (\d+) revocations", text))
            )
            assert count <= written <= count * 1.25, replays
            hashes = await conn.fetch(
                "SELECT token_hash FROM sessions WHERE user_id = 'mass' ORDER BY random() LIMIT 50"
            )
            keys = [cache_key(TokenHash(bytes(r[0]).hex())) for r in hashes]
            states = [await raw.hget(key, "state") for key in keys]
            assert states == ["revoked"] * len(hashes)
    finally:
        await raw.aclose()
        await conn.close()
        stop_serve(server)


def _lines(log: Path) -> list[dict[str, object]]:
    """The server's log, one JSON object per line."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            found.append(json.loads(line))
    return found
