"""Revocations that outlive the revoking process and the Redis that held their
tombstones, on the in-memory fakes (the same scenarios run on real processes in
tests/integration/test_durable_revocation.py):

* a Redis that comes back as another server (restart from an older snapshot,
  failover) or empty (flush) is repaired before anything reads it;
* a revocation whose tombstone failed stays pending in the store and any
  replica's drain finishes it;
* a caller that shares a load without a clean miss of its own reads again, and
  a shared answer is judged at the caller's own time;
* a mass revocation is written in chunks, each far under the breaker timeout.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
import pytest_asyncio

from session_authority.core.assembly import assemble_core
from session_authority.core.breaker import Breaker, BreakerPolicy, BreakerState
from session_authority.core.domain import Reason, Revocation, Session, Source, TokenHash
from session_authority.core.policy import CorePolicy
from session_authority.core.ports import CachedVerdict
from session_authority.core.revocation import TOMBSTONE_CHUNK
from session_authority.core.service import SessionAuthority

from .fakes import FakeClock, InMemorySessionCache, InMemorySessionStore, until

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(10)]

TOMBSTONE = CachedVerdict(Reason.REVOKED)


@dataclass
class Replica:
    svc: SessionAuthority
    breaker: Breaker

    def state(self) -> BreakerState:
        return self.breaker.state


@dataclass
class World:
    clock: FakeClock
    store: InMemorySessionStore
    cache: InMemorySessionCache
    replicas: list[Replica]

    def replica(
        self, cache: InMemorySessionCache | None = None, call_timeout: float = 5.0
    ) -> Replica:
        """A timeout far longer than any test's held call, unless one hangs on purpose."""
        breaker = Breaker(BreakerPolicy(timeout=call_timeout), clock=self.clock.monotonic)
        svc = assemble_core(
            self.store,
            cache or self.cache,
            breaker=breaker,
            policy=CorePolicy(),
            clock=self.clock.now,
            rng=random.Random(3).random,
        )
        replica = Replica(svc, breaker)
        self.replicas.append(replica)
        return replica

    async def started(
        self, cache: InMemorySessionCache | None = None, call_timeout: float = 5.0
    ) -> Replica:
        """A replica as App.start leaves it: Redis adopted, revocations replayed."""
        replica = self.replica(cache, call_timeout)
        await replica.svc.replay_revocations()
        return replica


@pytest_asyncio.fixture
async def world() -> AsyncIterator[World]:
    clock = FakeClock()
    w = World(clock, InMemorySessionStore(clock.now), InMemorySessionCache(clock.monotonic), [])
    yield w
    if w.store.gate is not None:
        w.store.gate.set()
    for replica in w.replicas:
        await replica.svc.aclose()


async def cached_session(r: Replica, user: str | None = None) -> str:
    token, _ = await r.svc.create(user or f"user-{uuid.uuid4().hex}", None, {})
    assert (await r.svc.validate(token)).source is Source.DATABASE
    assert (await r.svc.validate(token)).source is Source.CACHE
    return token


async def never_valid(r: Replica, token: str, times: int = 5) -> None:
    for _ in range(times):
        answer = await r.svc.validate(token)
        assert (answer.valid, answer.reason) == (False, Reason.REVOKED), answer


# --- a replaced Redis --------------------------------------------------------------------------


async def test_redis_restarted_from_a_snapshot_older_than_the_revocation(world: World) -> None:
    r = await world.started()
    token = await cached_session(r)
    rdb = world.cache.snapshot()  # the live entry, saved before the revocation
    assert await r.svc.invalidate(token=token) == Revocation(1, True)
    world.cache.restart(rdb)  # killed, and back from that dump: the live entry is back
    assert isinstance(world.cache.peek(TokenHash.of(token)), Session)

    # The first call meets another server: nothing is read from it, the breaker
    # opens and probes at once, and the probe re-applies the revocation.
    await never_valid(r, token, times=1)
    await until(lambda: r.state() is BreakerState.CLOSED, rounds=1000)
    assert world.cache.peek(TokenHash.of(token)) == TOMBSTONE
    await never_valid(r, token)


async def test_a_redis_rewound_in_place_is_caught_by_the_next_drain(world: World) -> None:
    """Same server, same marker (it comes back with the data): only the
    watermark, below what Postgres confirmed, tells (issue 20, finding 2)."""
    r = await world.started()
    token = await cached_session(r)
    backup = world.cache.snapshot()
    assert await r.svc.invalidate(token=token) == Revocation(1, True)
    await r.svc.drain_revocations()  # a sweep seals the revocation
    world.cache.rewind(backup)  # FLUSHALL + RESTORE, DEBUG RELOAD, SWAPDB
    assert isinstance(world.cache.peek(TokenHash.of(token)), Session)
    assert await r.svc.drain_revocations() == 0
    assert r.state() is not BreakerState.CLOSED  # nothing reads it from now on
    await never_valid(r, token)
    await until(lambda: r.state() is BreakerState.CLOSED, rounds=1000)
    assert world.cache.peek(TokenHash.of(token)) == TOMBSTONE  # replayed
    await never_valid(r, token)


async def test_a_rewind_right_after_a_revocation_is_repaired_by_the_next_drain(
    world: World,
) -> None:
    """Rewound before any sweep sealed the revocation: the watermarks agree,
    and the drain writes what was revoked since the confirmed one."""
    r = await world.started()
    token = await cached_session(r)
    backup = world.cache.snapshot()
    assert await r.svc.invalidate(token=token) == Revocation(1, True)
    world.cache.rewind(backup)
    await r.svc.drain_revocations()
    assert world.cache.peek(TokenHash.of(token)) == TOMBSTONE
    await never_valid(r, token)


async def test_a_flushed_redis_is_repaired_by_the_next_drain(world: World) -> None:
    r = await world.started()
    token = await cached_session(r)
    assert await r.svc.invalidate(token=token) == Revocation(1, True)
    world.cache.flush()
    assert await r.svc.drain_revocations() == 0  # the marker is gone: tripped instead
    assert r.state() is not BreakerState.CLOSED
    await until(lambda: r.state() is BreakerState.CLOSED, rounds=1000)
    assert world.cache.peek(TokenHash.of(token)) == TOMBSTONE


async def test_a_replica_never_reads_a_redis_it_has_not_adopted(world: World) -> None:
    r = world.replica()
    # A Redis not adopted yet: what App.start leaves when its start-up replay
    # failed, or a replaced Redis (the guard trips with an immediate probe).
    r.breaker.trip("start-up", probe_in=0.0)
    token, _ = await r.svc.create(f"user-{uuid.uuid4().hex}", None, {})
    assert (await r.svc.validate(token)).source is Source.DATABASE  # cache bypassed
    await until(lambda: r.state() is BreakerState.CLOSED, rounds=1000)
    assert world.cache.calls["adopt"] == 1


# --- pending revocations ---------------------------------------------------------------------


async def test_a_failed_purge_stays_pending_until_any_replica_drains_it(world: World) -> None:
    reader = await world.started()
    cut_off = InMemorySessionCache(world.clock.monotonic)
    revoker = await world.started(cut_off)
    token = await cached_session(reader)
    cut_off.unavailable = True
    assert await revoker.svc.invalidate(token=token) == Revocation(1, False)
    assert world.store.pending() == {TokenHash.of(token)}
    del world.replicas[1]  # the revoker dies: nothing of it survives but Postgres
    await revoker.svc.aclose()

    assert (await reader.svc.validate(token)).valid  # the documented gap, until a drain
    assert await reader.svc.drain_revocations() == 1
    assert world.store.pending() == set()
    await never_valid(reader, token)
    fresh = await world.started()  # a replica started later finds nothing left to do
    await never_valid(fresh, token)


async def test_a_fresh_replica_replays_before_its_first_read(world: World) -> None:
    old = await world.started(call_timeout=0.05)
    token = await cached_session(old)
    world.cache.hanging = True  # Redis frozen while the revocation commits
    assert await old.svc.invalidate(token=token) == Revocation(1, False)
    await old.svc.aclose()
    world.replicas.clear()
    world.cache.hanging = False
    assert isinstance(world.cache.peek(TokenHash.of(token)), Session)  # still stale
    fresh = await world.started()
    assert world.cache.peek(TokenHash.of(token)) == TOMBSTONE
    await never_valid(fresh, token)


async def test_a_mass_revocation_is_written_in_chunks(world: World) -> None:
    r = await world.started()
    user = f"user-{uuid.uuid4().hex}"
    sessions = 2 * TOMBSTONE_CHUNK + 1
    for _ in range(sessions):
        await r.svc.create(user, None, {})
    before = world.cache.calls["tombstone"]
    assert await r.svc.invalidate_user(user) == Revocation(sessions, True)
    assert world.cache.calls["tombstone"] - before == 3
    assert r.breaker.opened_count == 0
    assert world.store.pending() == set()


# --- sharing a load ------------------------------------------------------------------------------


async def test_a_caller_whose_lookup_failed_does_not_share_a_load_begun_before_it(
    world: World,
) -> None:
    """Its failed lookup proves nothing: a tombstone may have been there. The load
    it joins read Postgres before the revocation and filled just before the
    tombstone landed, so the load's "valid" is confirmed, and still stale."""
    r = await world.started()
    token, _ = await r.svc.create(f"user-{uuid.uuid4().hex}", None, {})
    token_hash = TokenHash.of(token)
    world.cache.fill_gate = asyncio.Event()
    first = asyncio.create_task(r.svc.validate(token))  # clean miss, read, fill applied
    await world.cache.wait_parked_fills(1)
    assert await r.svc.invalidate(token=token) == Revocation(1, True)  # tombstone lands
    world.cache.unavailable = True  # the next caller's lookup fails...
    late = asyncio.create_task(r.svc.validate(token))  # ...and it joins the load, late
    await until(lambda: r.svc.validator.callers(token_hash) == 2)
    world.cache.unavailable = False
    world.cache.fill_gate.set()
    await first  # started before the revocation returned: either answer is allowed
    answer = await late
    assert (answer.valid, answer.reason) == (False, Reason.REVOKED)


async def test_a_shared_answer_is_judged_at_the_callers_own_time(world: World) -> None:
    r = await world.started()
    token, _ = await r.svc.create(f"user-{uuid.uuid4().hex}", timedelta(seconds=10), {})
    world.store.gate = asyncio.Event()
    world.cache.fill_gate = asyncio.Event()
    first = asyncio.create_task(r.svc.validate(token))
    await world.store.wait_parked(1)
    second = asyncio.create_task(r.svc.validate(token))  # a clean miss: joins the load
    await until(lambda: r.svc.validator.callers(TokenHash.of(token)) == 2)
    world.store.gate.set()
    await world.cache.wait_parked_fills(1)  # the load judged "valid" at its own time
    world.clock.advance(10)  # the session expires before the answer reaches the callers
    world.cache.fill_gate.set()
    for answer in (await first, await second):
        assert (answer.valid, answer.reason) == (False, Reason.EXPIRED)
