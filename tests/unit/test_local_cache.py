"""The in-process (L1) cache on the fakes: hits without Redis, revocations pushed
to every process before Invalidate returns, no L1 hits for a process that is not
sure it hears revocations, and no stale copy stored after a drop."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from session_authority.core.assembly import assemble_core
from session_authority.core.breaker import Breaker, BreakerPolicy, BreakerState
from session_authority.core.domain import Reason, Revocation, Source, TokenHash
from session_authority.core.local import LocalCache
from session_authority.core.policy import CorePolicy
from session_authority.core.ports import CachedVerdict
from session_authority.core.revocation import PUSH_LIMIT
from session_authority.core.service import SessionAuthority

from .fakes import (
    FakeClock,
    InMemoryRevocationFeed,
    InMemoryRevocationHub,
    InMemorySessionCache,
    InMemorySessionStore,
)

pytestmark = [pytest.mark.timeout(10)]

L1_TTL = 1.0


@dataclass
class Process:
    svc: SessionAuthority
    local: LocalCache
    feed: InMemoryRevocationFeed
    breaker: Breaker


@dataclass
class World:
    clock: FakeClock
    store: InMemorySessionStore
    cache: InMemorySessionCache
    hub: InMemoryRevocationHub
    processes: list[Process]

    async def process(self) -> Process:
        local = LocalCache(1000, L1_TTL, clock=self.clock.monotonic)
        feed = self.hub.feed(local)
        breaker = Breaker(BreakerPolicy(timeout=5.0), clock=self.clock.monotonic)
        svc = assemble_core(
            self.store,
            self.cache,
            breaker=breaker,
            policy=CorePolicy(),
            clock=self.clock.now,
            rng=random.Random(5).random,
            local=local,
            feed=feed,
        )
        await svc.replay_revocations()  # adopt the cache, as App.start does
        proc = Process(svc, local, feed, breaker)
        self.processes.append(proc)
        return proc


@pytest_asyncio.fixture
async def world() -> AsyncIterator[World]:
    clock = FakeClock()
    w = World(
        clock,
        InMemorySessionStore(clock.now),
        InMemorySessionCache(clock.monotonic),
        InMemoryRevocationHub(),
        [],
    )
    yield w
    for gate in (w.cache.get_gate, w.cache.fill_gate):
        if gate is not None:
            gate.set()
    for proc in w.processes:
        await proc.svc.aclose()


async def _token(p: Process) -> str:
    token, _ = await p.svc.create(f"user-{uuid.uuid4().hex}", None, {})
    return token


# --- LocalCache ---------------------------------------------------------------------------


def test_entries_live_at_most_the_ttl_and_never_past_the_redis_entry() -> None:
    clock = FakeClock()
    local = LocalCache(10, 1.0, clock=clock.monotonic)
    a, b = TokenHash("a" * 64), TokenHash("b" * 64)
    session_like = CachedVerdict(Reason.REVOKED)
    assert local.put(a, session_like, ttl_left=300, version=local.version)
    assert local.put(b, session_like, ttl_left=0.2, version=local.version)
    clock.advance(0.5)
    assert local.get(a) is session_like and local.get(b) is None
    clock.advance(0.5)
    assert local.get(a) is None


def test_the_oldest_entries_go_first_beyond_the_bound() -> None:
    local = LocalCache(2, 1.0)
    hashes = [TokenHash(c * 64) for c in "abc"]
    for h in hashes:
        local.put(h, CachedVerdict(Reason.REVOKED), 1.0, local.version)
    assert len(local) == 2 and local.get(hashes[0]) is None


def test_a_copy_read_before_a_drop_is_not_stored_after_it() -> None:
    local = LocalCache(10, 1.0)
    h = TokenHash("a" * 64)
    version = local.version
    local.drop([TokenHash("b" * 64)])  # any revocation in between
    assert not local.put(h, CachedVerdict(Reason.REVOKED), 1.0, version)
    assert local.get(h) is None


# --- the service with L1 -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_hot_session_is_answered_from_l1_without_asking_redis(world: World) -> None:
    p = await world.process()
    token = await _token(p)
    assert (await p.svc.validate(token)).source is Source.DATABASE  # filled: Redis and L1
    gets = world.cache.calls["get"]
    for _ in range(100):
        answer = await p.svc.validate(token)
        assert (answer.valid, answer.source) == (True, Source.CACHE)
    assert world.cache.calls["get"] == gets
    world.clock.advance(L1_TTL)  # the copy is older than the L1 TTL: ask Redis again
    assert (await p.svc.validate(token)).source is Source.CACHE
    assert world.cache.calls["get"] == gets + 1


@pytest.mark.asyncio
async def test_a_revocation_reaches_every_process_before_invalidate_returns(world: World) -> None:
    a, b, c = [await world.process() for _ in range(3)]
    token = await _token(a)
    for proc in (a, b, c):
        assert (await proc.svc.validate(token)).valid  # each has its L1 copy
    assert await a.svc.invalidate(token=token) == Revocation(1, True, propagated=True)
    for proc in (a, b, c):
        answer = await proc.svc.validate(token)
        assert (answer.valid, answer.reason) == (False, Reason.REVOKED)


@pytest.mark.asyncio
async def test_an_unacknowledged_push_is_reported(world: World) -> None:
    a, b = await world.process(), await world.process()
    token = await _token(a)
    b.feed.deaf = True
    result = await a.svc.invalidate(token=token)
    assert (result.cache_purged, result.propagated) == (True, False)


@pytest.mark.asyncio
async def test_a_process_cut_off_from_revocations_serves_no_l1_hits(world: World) -> None:
    a, b = await world.process(), await world.process()
    token = await _token(a)
    assert (await b.svc.validate(token)).valid  # b holds an L1 copy
    b.feed.subscribed = False  # b can no longer hear revocations
    assert await a.svc.invalidate(token=token) == Revocation(1, True, propagated=True)
    gets = world.cache.calls["get"]
    answer = await b.svc.validate(token)  # from Redis (the tombstone), not from L1
    assert (answer.valid, answer.reason) == (False, Reason.REVOKED)
    assert world.cache.calls["get"] == gets + 1
    assert len(b.local) == 0


@pytest.mark.asyncio
async def test_an_open_breaker_turns_l1_off(world: World) -> None:
    p = await world.process()
    token = await _token(p)
    await p.svc.validate(token)
    p.breaker.trip("test")
    assert (await p.svc.validate(token)).source is Source.DATABASE
    assert len(p.local) == 0


@pytest.mark.asyncio
async def test_a_redis_read_that_raced_a_revocation_does_not_land_in_l1(world: World) -> None:
    """B's Redis read returns the live entry after A's revocation dropped B's L1
    copies: storing it now would serve a revoked session for a whole L1 TTL."""
    a, b = await world.process(), await world.process()
    token = await _token(a)
    await a.svc.validate(token)  # Redis holds the live entry; b's L1 is empty
    held = world.cache.get_gate = asyncio.Event()
    racing = asyncio.create_task(b.svc.validate(token))
    await world.cache.wait_parked_gets(1)  # b read "live" from Redis; the reply is slow
    world.cache.get_gate = None
    assert await a.svc.invalidate(token=token) == Revocation(1, True, propagated=True)
    held.set()
    await racing  # it began before the revocation returned: either answer is allowed
    assert len(b.local) == 0
    answer = await b.svc.validate(token)
    assert (answer.valid, answer.reason) == (False, Reason.REVOKED)
    assert b.breaker.state is BreakerState.CLOSED


@pytest.mark.asyncio
async def test_a_mass_revocation_tells_every_process_to_drop_everything(world: World) -> None:
    """Beyond PUSH_LIMIT hashes the push names none (a 50,000-session logout
    would be a multi-megabyte message): every L1 forgets everything."""
    a, b = await world.process(), await world.process()
    user = f"user-{uuid.uuid4().hex}"
    tokens = [(await a.svc.create(user, None, {}))[0] for _ in range(PUSH_LIMIT + 1)]
    bystander = await _token(a)
    for token in (tokens[0], bystander):
        assert (await b.svc.validate(token)).valid
    assert len(b.local) == 2
    result = await a.svc.invalidate_user(user)
    assert (result.revoked_count, result.propagated) == (PUSH_LIMIT + 1, True)
    assert world.hub.published[-1] is None
    assert len(b.local) == 0
    answer = await b.svc.validate(tokens[0])
    assert (answer.valid, answer.reason) == (False, Reason.REVOKED)
    assert (await b.svc.validate(bystander)).valid  # from Redis again, then L1


# --- the synchronous hit path (validate_local) and the servicer's encoded replies ---------


@pytest.mark.asyncio
async def test_the_synchronous_path_answers_only_from_a_copy_it_can_trust(world: World) -> None:
    p = await world.process()
    token = await _token(p)
    assert p.svc.validate_local(token) is None  # no copy yet: validate asks Redis/Postgres
    await p.svc.validate(token)
    first = p.svc.validate_local(token)
    assert first is not None and (first.valid, first.source) == (True, Source.CACHE)
    assert p.svc.validate_local(token) is first  # the answer made once, with the copy
    assert p.svc.validate_local(token.encode()) is first  # its bytes, as received, alike
    assert await p.svc.validate(token) is first  # validate asks the copy first
    p.feed.subscribed = False  # no longer sure to hear revocations
    assert p.svc.validate_local(token) is None
    assert len(p.local) == 0  # and forgot every copy
    p.feed.subscribed = True
    await p.svc.validate(token)
    p.breaker.trip("test")
    assert p.svc.validate_local(token) is None and len(p.local) == 0


@pytest.mark.asyncio
async def test_the_synchronous_path_gives_up_on_what_validate_refuses(world: World) -> None:
    p = await world.process()
    await p.svc.validate(await _token(p))  # an L1 with a copy in it
    for token in ("", "x" * 10_000, "tökén", "\ud800", "sa_" + "A" * 48, b"\xff\xfe", b""):
        assert p.svc.validate_local(token) is None  # no exception: validate names the field


@pytest.mark.asyncio
async def test_a_copy_past_its_session_expiry_answers_expired(world: World) -> None:
    """The L1 copy outlives its session only if the wall clock jumps (the
    copy's own life is monotonic, bounded by the Redis TTL): the prepared
    live answer is given only before the session's expires_at."""
    p = await world.process()
    token = await _token(p)
    await p.svc.validate(token)
    live = p.svc.validate_local(token)
    assert live is not None and live.session is not None
    world.clock.set_wall(live.session.expires_at)
    answer = p.svc.validate_local(token)
    assert answer is not None and (answer.valid, answer.reason) == (False, Reason.EXPIRED)


@pytest.mark.asyncio
async def test_a_revoked_copy_answers_revoked_from_l1(world: World) -> None:
    p = await world.process()
    token = await _token(p)
    p.local.put(TokenHash.of(token), CachedVerdict(Reason.REVOKED), 1.0, p.local.version)
    answer = p.svc.validate_local(token)
    assert answer is not None and (answer.valid, answer.reason) == (False, Reason.REVOKED)


class _Context:
    """What the servicer asks of grpc's ServicerContext on ValidateSession."""

    def time_remaining(self) -> float | None:
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"

    async def abort(self, code: object, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")


@pytest.mark.asyncio
async def test_the_servicer_encodes_a_copys_answer_once_and_never_past_a_revocation(
    world: World,
) -> None:
    from session_authority.transport.servicer import SessionAuthorityServicer
    from session_authority.v1 import session_authority_pb2 as pb

    a, b = await world.process(), await world.process()
    servicer = SessionAuthorityServicer(b.svc)
    token = await _token(a)
    request = pb.ValidateSessionRequest(token=token)
    context: Any = _Context()
    first = await servicer.ValidateSession(request, context)  # Postgres, then fills
    reply = pb.ValidateSessionResponse.FromString(first)
    assert reply.valid and reply.source == pb.SOURCE_DATABASE
    hit = await servicer.ValidateSession(request, context)
    assert hit is await servicer.ValidateSession(request, context)  # the same bytes: encoded once
    raw = request.SerializeToString()
    assert servicer.validate_cached(raw) is hit  # what the handler tries before decoding
    # Only the one-field encoding is read there; any other goes the decoding way.
    assert servicer.validate_cached(raw + b"\x12\x00") is None  # an unknown field after it
    assert servicer.validate_cached(raw[:-1]) is None  # cut short
    assert servicer.validate_cached(b"") is None
    reply = pb.ValidateSessionResponse.FromString(hit)
    assert reply.valid and reply.source == pb.SOURCE_CACHE and reply.session.user_id
    await a.svc.invalidate(token=token)
    assert servicer.validate_cached(raw) is None  # b's copy was dropped
    reply = pb.ValidateSessionResponse.FromString(await servicer.ValidateSession(request, context))
    assert (reply.valid, reply.reason) == (False, pb.REASON_REVOKED)


@pytest.mark.asyncio
async def test_a_hot_copy_is_renewed_from_redis_before_it_expires(world: World) -> None:
    p = await world.process()
    token = await _token(p)
    await p.svc.validate(token)  # from Postgres; the copy lives L1_TTL
    gets = world.cache.calls["get"]
    world.clock.advance(0.4 * L1_TTL)
    assert p.svc.validate_local(token) is not None
    await asyncio.sleep(0)
    assert world.cache.calls["get"] == gets  # early in its life: nothing to renew
    world.clock.advance(0.4 * L1_TTL)  # the second half
    assert p.svc.validate_local(token) is not None  # answered from the copy at once
    assert p.svc.validate_local(token) is not None  # one renewal, however many hits
    for _ in range(5):
        await asyncio.sleep(0)
    assert world.cache.calls["get"] == gets + 1
    world.clock.advance(0.5 * L1_TTL)  # past the first copy's end: the renewed one answers
    answer = p.svc.validate_local(token)
    assert answer is not None and answer.valid
    assert world.cache.calls["get"] == gets + 1


@pytest.mark.asyncio
async def test_a_renewal_that_raced_a_revocation_does_not_land(world: World) -> None:
    a, b = await world.process(), await world.process()
    token = await _token(a)
    await b.svc.validate(token)
    world.clock.advance(0.8 * L1_TTL)
    held = world.cache.get_gate = asyncio.Event()
    assert b.svc.validate_local(token) is not None  # starts b's renewal, which reads "live"
    await world.cache.wait_parked_gets(1)
    world.cache.get_gate = None
    assert await a.svc.invalidate(token=token) == Revocation(1, True, propagated=True)
    held.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(b.local) == 0  # the read began before the drop: not stored
    answer = await b.svc.validate(token)
    assert (answer.valid, answer.reason) == (False, Reason.REVOKED)


# --- ValidateSessions over L1 -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_batch_of_hot_sessions_is_answered_from_l1_and_never_past_a_revocation(
    world: World,
) -> None:
    a, b = await world.process(), await world.process()
    tokens = [await _token(a) for _ in range(3)]
    first = await b.svc.validate_many(tokens)  # one Redis round trip, one query, fills
    assert [(x.source, x.local) for x in first] == [(Source.DATABASE, False)] * 3
    world.clock.advance(0.25)
    gets = world.cache.calls["get_many"]
    for _ in range(10):
        answers = await b.svc.validate_many(tokens)
        assert [(x.valid, x.source, x.local) for x in answers] == [(True, Source.CACHE, True)] * 3
        assert [x.cache_age for x in answers] == [0.0] * 3  # the age it had when copied
    assert world.cache.calls["get_many"] == gets  # Redis not asked
    await a.svc.invalidate(token=tokens[1])  # b drops its copy before this returns
    answers = await b.svc.validate_many(tokens)
    assert [(x.valid, x.reason) for x in answers] == [
        (True, None),
        (False, Reason.REVOKED),
        (True, None),
    ]


@pytest.mark.asyncio
async def test_the_servicer_frames_each_copys_encoded_answer_in_a_batch_reply(
    world: World,
) -> None:
    from session_authority.transport.servicer import SessionAuthorityServicer
    from session_authority.v1 import session_authority_pb2 as pb

    a, b = await world.process(), await world.process()
    servicer = SessionAuthorityServicer(b.svc)
    token = await _token(a)
    # An answer over 127 bytes: its length in the reply takes two bytes.
    other, _ = await a.svc.create(f"user-{uuid.uuid4().hex}", None, {"note": "x" * 200})
    context: Any = _Context()
    batch = pb.ValidateSessionsRequest(tokens=[token, "not a token", other, token])
    await servicer.ValidateSessions(batch, context)  # Postgres, then fills
    raw = await servicer.ValidateSessions(batch, context)
    single = await servicer.ValidateSession(pb.ValidateSessionRequest(token=token), context)
    reply = pb.ValidateSessionsResponse.FromString(raw)
    assert [(r.valid, r.source, r.from_local_cache) for r in reply.results] == [
        (True, pb.SOURCE_CACHE, True),
        (False, pb.SOURCE_TOKEN_FORMAT, False),
        (True, pb.SOURCE_CACHE, True),
        (True, pb.SOURCE_CACHE, True),
    ]
    assert reply.results[0].SerializeToString() == single  # the same encoded answer
    assert reply.results[0].HasField("cache_age")
    await a.svc.invalidate(token=token)
    reply = pb.ValidateSessionsResponse.FromString(await servicer.ValidateSessions(batch, context))
    assert [(r.valid, r.reason) for r in reply.results] == [
        (False, pb.REASON_REVOKED),
        (False, pb.REASON_UNKNOWN),
        (True, pb.REASON_UNSPECIFIED),
        (False, pb.REASON_REVOKED),
    ]
