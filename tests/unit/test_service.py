"""``SessionAuthority`` on the in-memory fakes: cache-aside, revocation, fail-over.

Wired as bootstrap wires it: one ``FakeClock`` drives the service, the store,
the cache TTLs and the breaker, and the breaker's probe replays revocations.
The breaker's real-time per-call timeout is 50 ms; it only elapses in the
tests where the cache hangs.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import timedelta

import pytest
import pytest_asyncio

from session_authority.core.assembly import assemble_core
from session_authority.core.breaker import Breaker, BreakerPolicy, BreakerState
from session_authority.core.domain import (
    Reason,
    Revocation,
    Session,
    Source,
    TokenHash,
    new_token,
)
from session_authority.core.errors import CacheUnavailable, InvalidArgument, StoreUnavailable
from session_authority.core.policy import CorePolicy
from session_authority.core.ports import CachedVerdict
from session_authority.core.service import SessionAuthority

from .fakes import FakeClock, InMemorySessionCache, InMemorySessionStore, until

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(5)]

POLICY = CorePolicy()
BREAKER = BreakerPolicy(timeout=0.05)
TOMBSTONE = CachedVerdict(Reason.REVOKED)


def user() -> str:
    return "user-" + uuid.uuid4().hex


@dataclass
class World:
    clock: FakeClock
    store: InMemorySessionStore
    cache: InMemorySessionCache
    breaker: Breaker
    svc: SessionAuthority

    async def create(self, user_id: str | None = None, ttl: timedelta | None = None) -> str:
        token, _ = await self.svc.create(user_id or user(), ttl, {})
        return token

    def state(self) -> BreakerState:
        """The breaker's state, read afresh (mypy would narrow ``breaker.state``)."""
        return self.breaker.state

    async def leave_half_open(self) -> None:
        await until(lambda: self.state() is not BreakerState.HALF_OPEN)


Build = Callable[..., World]


@pytest_asyncio.fixture
async def build() -> AsyncIterator[Build]:
    worlds: list[World] = []

    def make(
        *,
        with_cache: bool = True,
        token_factory: Callable[[], str] = new_token,
        policy: CorePolicy = POLICY,
    ) -> World:
        clock = FakeClock()
        store = InMemorySessionStore(clock.now)
        cache = InMemorySessionCache(clock.monotonic)
        breaker = Breaker(BREAKER, clock=clock.monotonic)
        svc = assemble_core(
            store,
            cache if with_cache else None,
            breaker=breaker,
            policy=policy,
            clock=clock.now,
            rng=random.Random(7).random,
            token_factory=token_factory,
            monotonic=clock.monotonic,
        )
        world = World(clock, store, cache, breaker, svc)
        worlds.append(world)
        return world

    yield make
    for world in worlds:
        if world.store.gate is not None:
            world.store.gate.set()
        if world.cache.fill_gate is not None:
            world.cache.fill_gate.set()
        await world.svc.aclose()


@pytest_asyncio.fixture
async def w(build: Build) -> World:
    return build()


# --- create and validate -------------------------------------------------------------------


async def test_create_then_validate_answers_from_database_then_from_cache(w: World) -> None:
    uid = user()
    token, session = await w.svc.create(uid, timedelta(hours=1), {"device": "phone"})
    assert session.user_id == uid
    assert session.expires_at == w.clock.now() + timedelta(hours=1)
    assert w.store.peek(session.token_hash) == session

    first = await w.svc.validate(token)
    assert (first.valid, first.source, first.reason) == (True, Source.DATABASE, None)
    assert first.session == session

    second = await w.svc.validate(token)
    assert (second.valid, second.source) == (True, Source.CACHE)
    assert second.session is not None
    assert second.session.session_id == session.session_id
    assert dict(second.session.metadata) == {"device": "phone"}
    assert w.store.calls["find"] == 1


async def test_create_without_ttl_uses_the_default_lifetime(w: World) -> None:
    _, session = await w.svc.create(user(), None, {})
    assert session.expires_at - session.created_at == POLICY.default_session_ttl


@pytest.mark.parametrize(
    ("user_id", "ttl", "metadata", "field"),
    [
        ("", None, {}, "user_id"),
        ("bad\nid", None, {}, "user_id"),
        ("u", timedelta(0), {}, "ttl"),
        ("u", POLICY.max_session_ttl + timedelta(seconds=1), {}, "ttl"),
        ("u", None, {"": "v"}, "metadata"),
    ],
)
async def test_create_rejects_bad_input_before_touching_the_store(
    w: World, user_id: str, ttl: timedelta | None, metadata: dict[str, str], field: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        await w.svc.create(user_id, ttl, metadata)
    assert info.value.field == field
    assert w.store.calls["create"] == 0


async def test_create_with_the_store_down_raises_store_unavailable(w: World) -> None:
    w.store.unavailable = True
    with pytest.raises(StoreUnavailable):
        await w.create()


async def test_a_live_entry_is_never_cached_past_the_session_expiry(w: World) -> None:
    short = await w.create(ttl=timedelta(seconds=30))
    long = await w.create(ttl=timedelta(days=1))
    await w.svc.validate(short)
    await w.svc.validate(long)
    short_ttl = w.cache.remaining_ttl(TokenHash.of(short))
    long_ttl = w.cache.remaining_ttl(TokenHash.of(long))
    assert short_ttl is not None
    assert short_ttl <= 30
    assert long_ttl is not None
    assert POLICY.cache_ttl * (1 - POLICY.ttl_jitter) <= long_ttl <= POLICY.cache_ttl


# --- answers that are not "valid" --------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        "not-a-session-token",
        "sat_" + "A" * 48,  # right shape, wrong checksum
        "x" * 512,
        "Bearer.abc",
    ],
)
async def test_a_token_we_never_issued_answers_unknown_without_asking_any_tier(
    w: World, token: str
) -> None:
    answer = await w.svc.validate(token)
    assert (answer.valid, answer.reason, answer.source) == (
        False,
        Reason.UNKNOWN,
        Source.TOKEN_FORMAT,
    )
    assert sum(w.store.calls.values()) == 0
    assert sum(w.cache.calls.values()) == 0


@pytest.mark.parametrize("token", ["", " sat_x", "tök"])
async def test_malformed_input_is_invalid_argument(w: World, token: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        await w.svc.validate(token)
    assert info.value.field == "token"


async def test_a_well_formed_unknown_token_answers_unknown(w: World) -> None:
    token = new_token()
    first = await w.svc.validate(token)
    second = await w.svc.validate(token)
    assert (first.valid, first.reason, first.source) == (False, Reason.UNKNOWN, Source.DATABASE)
    assert (second.valid, second.reason, second.source) == (False, Reason.UNKNOWN, Source.CACHE)


async def test_an_expired_session_answers_expired(w: World) -> None:
    cached = await w.create(ttl=timedelta(minutes=1))
    uncached = await w.create(ttl=timedelta(minutes=1))
    assert (await w.svc.validate(cached)).valid
    w.clock.advance(60)
    for token in (cached, uncached):
        answer = await w.svc.validate(token)
        assert (answer.valid, answer.reason) == (False, Reason.EXPIRED)


async def test_a_revoked_session_answers_revoked_from_cache(w: World) -> None:
    token = await w.create()
    assert (await w.svc.validate(token)).valid  # fills the cache
    assert await w.svc.invalidate(token=token) == Revocation(revoked_count=1, cache_purged=True)
    answer = await w.svc.validate(token)
    assert (answer.valid, answer.reason, answer.source) == (False, Reason.REVOKED, Source.CACHE)
    assert w.store.calls["find"] == 1


async def test_a_revoked_session_answers_revoked_from_database_when_uncached(
    build: Build,
) -> None:
    w = build(with_cache=False)
    token = await w.create()
    assert await w.svc.invalidate(token=token) == Revocation(1, True)
    answer = await w.svc.validate(token)
    assert (answer.valid, answer.reason, answer.source) == (False, Reason.REVOKED, Source.DATABASE)


# --- invalidate --------------------------------------------------------------------------------


async def test_invalidate_by_token_is_idempotent(w: World) -> None:
    token = await w.create()
    await w.svc.validate(token)
    assert await w.svc.invalidate(token=token) == Revocation(1, True)
    assert await w.svc.invalidate(token=token) == Revocation(0, True)
    assert w.cache.peek(TokenHash.of(token)) == TOMBSTONE
    assert (await w.svc.validate(token)).reason is Reason.REVOKED


async def test_invalidate_by_session_id_is_idempotent(w: World) -> None:
    token, session = await w.svc.create(user(), None, {})
    await w.svc.validate(token)
    assert await w.svc.invalidate(session_id=session.session_id) == Revocation(1, True)
    assert await w.svc.invalidate(session_id=session.session_id.upper()) == Revocation(0, True)
    answer = await w.svc.validate(token)
    assert (answer.valid, answer.reason, answer.source) == (False, Reason.REVOKED, Source.CACHE)


async def test_invalidating_what_does_not_exist_revokes_nothing(w: World) -> None:
    assert await w.svc.invalidate(token=new_token()) == Revocation(0, True)
    assert await w.svc.invalidate(session_id=str(uuid.uuid4())) == Revocation(0, True)
    assert w.cache.calls["tombstone"] == 0


async def test_invalidating_an_expired_session_ends_no_live_one_but_revokes_it(w: World) -> None:
    """The store's clock judges expiry, and revokes regardless: a replica whose
    clock runs behind must not go on caching it as live."""
    token = await w.create(ttl=timedelta(seconds=5))
    w.clock.advance(5)
    assert await w.svc.invalidate(token=token) == Revocation(0, True)
    assert (await w.svc.validate(token)).reason is Reason.REVOKED
    assert w.store.pending() == set()  # the tombstone was confirmed


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({}, "session_id"), ({"session_id": "nope"}, "session_id"), ({"token": ""}, "token")],
)
async def test_invalidate_rejects_bad_targets(w: World, kwargs: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        await w.svc.invalidate(**kwargs)
    assert info.value.field == field
    assert w.store.calls["revoke"] == 0


async def test_invalidate_user_revokes_every_live_session_of_that_user_only(w: World) -> None:
    victim, bystander = user(), user()
    tokens = [await w.create(victim) for _ in range(3)]
    other = await w.create(bystander)
    for token in [*tokens, other]:
        assert (await w.svc.validate(token)).valid  # all cached as live

    assert await w.svc.invalidate_user(victim) == Revocation(3, True)
    assert w.cache.calls["tombstone"] == 1  # one pipelined round trip
    for token in tokens:
        answer = await w.svc.validate(token)
        assert (answer.valid, answer.reason, answer.source) == (
            False,
            Reason.REVOKED,
            Source.CACHE,
        )
    assert (await w.svc.validate(other)).valid
    assert await w.svc.invalidate_user(victim) == Revocation(0, True)


async def test_invalidate_user_rejects_a_bad_user_id(w: World) -> None:
    with pytest.raises(InvalidArgument) as info:
        await w.svc.invalidate_user("\x00")
    assert info.value.field == "user_id"


# --- the race: a miss that read before a revocation and fills after it -----------------------


async def test_a_fill_that_read_before_a_revocation_is_refused_and_answers_revoked(
    w: World,
) -> None:
    token = await w.create()  # never cached: the revocation races the *first* fill
    w.store.gate = asyncio.Event()
    reader = asyncio.create_task(w.svc.validate(token))
    await w.store.wait_parked(1)  # the reader has read "live" from the store
    assert w.store.peek(TokenHash.of(token)) is not None

    assert await w.svc.invalidate(token=token) == Revocation(1, True)
    w.store.gate.set()
    answer = await reader
    assert (answer.valid, answer.reason) == (False, Reason.REVOKED)
    assert w.cache.peek(TokenHash.of(token)) == TOMBSTONE
    after = await w.svc.validate(token)
    assert (after.valid, after.reason, after.source) == (False, Reason.REVOKED, Source.CACHE)


async def test_fills_that_read_before_invalidate_user_are_refused(w: World) -> None:
    uid = user()
    tokens = [await w.create(uid) for _ in range(2)]
    w.store.gate = asyncio.Event()
    readers = [asyncio.create_task(w.svc.validate(t)) for t in tokens]
    await w.store.wait_parked(2)

    assert await w.svc.invalidate_user(uid) == Revocation(2, True)
    w.store.gate.set()
    for answer in await asyncio.gather(*readers):
        assert (answer.valid, answer.reason) == (False, Reason.REVOKED)
    for token in tokens:
        assert (await w.svc.validate(token)).reason is Reason.REVOKED


async def test_without_a_cache_a_caller_that_joins_a_load_after_a_revocation_rereads(
    build: Build,
) -> None:
    w = build(with_cache=False)
    token = await w.create()
    w.store.gate = asyncio.Event()
    before = asyncio.create_task(w.svc.validate(token))
    await w.store.wait_parked(1)
    assert await w.svc.invalidate(token=token) == Revocation(1, True)
    after = asyncio.create_task(w.svc.validate(token))  # joins the load, late
    await until(lambda: w.svc.validator.callers(TokenHash.of(token)) == 2)
    w.store.gate.set()
    assert (await before).valid  # it started before the revocation returned
    answer = await after
    assert (answer.valid, answer.reason) == (False, Reason.REVOKED)
    assert w.store.calls["find"] == 2


async def test_a_caller_that_starts_after_a_failed_purge_never_shares_a_live_answer(
    w: World,
) -> None:
    token = await w.create()
    w.cache.fill_gate = asyncio.Event()
    before = asyncio.create_task(w.svc.validate(token))
    await w.cache.wait_parked_fills(1)  # Redis applied the live fill; its reply is slow
    w.cache.unavailable = True  # and now Redis fails: the tombstone cannot be written
    assert await w.svc.invalidate(token=token) == Revocation(1, False)
    assert w.state() is BreakerState.OPEN

    after = asyncio.create_task(w.svc.validate(token))  # bypasses the cache, joins the load
    await until(lambda: w.svc.validator.callers(TokenHash.of(token)) == 2)
    w.cache.fill_gate.set()
    await before  # started before the revocation returned: either answer is allowed
    answer = await after
    assert (answer.valid, answer.reason) == (False, Reason.REVOKED)


async def test_a_read_older_than_max_fill_lag_answers_but_is_not_cached(w: World) -> None:
    # A tombstone lives tombstone_ttl; a read that took longer than max_fill_lag
    # could outlive a tombstone written meanwhile, so its fill is dropped.
    token = await w.create()
    w.store.gate = asyncio.Event()
    reader = asyncio.create_task(w.svc.validate(token))
    await w.store.wait_parked(1)  # read: live
    w.clock.advance(POLICY.max_fill_lag + 0.001)
    w.store.gate.set()
    answer = await reader
    assert (answer.valid, answer.source) == (True, Source.DATABASE)
    assert w.cache.peek(TokenHash.of(token)) is None
    assert w.cache.calls["fill"] == 0


async def test_a_read_within_max_fill_lag_is_cached(w: World) -> None:
    token = await w.create()
    w.store.gate = asyncio.Event()
    reader = asyncio.create_task(w.svc.validate(token))
    await w.store.wait_parked(1)
    w.clock.advance(POLICY.max_fill_lag - 0.001)
    w.store.gate.set()
    assert (await reader).valid
    assert isinstance(w.cache.peek(TokenHash.of(token)), Session)


async def test_a_slow_unknown_fill_cannot_hide_a_session_created_meanwhile(
    build: Build,
) -> None:
    token = new_token()
    w = build(token_factory=lambda: token)
    w.store.gate = asyncio.Event()
    early = asyncio.create_task(w.svc.validate(token))
    await w.store.wait_parked(1)  # read: no such session
    assert await w.create() == token
    assert w.cache.has_creation_marker(TokenHash.of(token))
    w.store.gate.set()  # the early reader now fills "unknown"
    answer = await early
    assert (answer.valid, answer.reason) == (False, Reason.UNKNOWN)
    assert w.cache.peek(TokenHash.of(token)) is None  # the "unknown" was not written
    # Later, as a real clock would say: the single-flight shares a load that settled
    # at the very instant a miss looked (``since``), and this clock stands still.
    w.clock.advance(0.001)
    assert (await w.svc.validate(token)).valid


# --- fail-over ---------------------------------------------------------------------------------


async def test_cache_down_validation_answers_from_the_store(w: World) -> None:
    token = await w.create()
    w.cache.unavailable = True
    answer = await w.svc.validate(token)
    assert (answer.valid, answer.source) == (True, Source.DATABASE)
    assert w.svc.stats.errors == 1  # the lookup; the rest of the request skips the cache
    assert (w.cache.calls["get"], w.cache.calls["fill"]) == (1, 0)
    assert w.state() is BreakerState.CLOSED


async def test_frozen_cache_validation_answers_from_the_store(w: World) -> None:
    token = await w.create()
    w.cache.hanging = True
    answer = await w.svc.validate(token)
    assert (answer.valid, answer.source) == (True, Source.DATABASE)
    # One validation pays at most one cache timeout: no fill after the lookup timed out.
    assert (w.cache.calls["get"], w.cache.calls["fill"]) == (1, 0)
    assert w.svc.stats.errors == 1


async def test_a_failing_cache_opens_the_breaker_and_is_then_bypassed(w: World) -> None:
    token = await w.create()
    w.cache.unavailable = True
    for _ in range(10):  # each validation fails one get (and skips the fill): 10 failures
        assert (await w.svc.validate(token)).valid
    assert w.state() is BreakerState.OPEN
    calls = sum(w.cache.calls.values())
    answer = await w.svc.validate(token)
    assert (answer.valid, answer.source) == (True, Source.DATABASE)
    assert sum(w.cache.calls.values()) == calls


async def test_store_down_and_cache_miss_raises_never_answers_valid(w: World) -> None:
    token = await w.create()
    w.store.unavailable = True
    with pytest.raises(StoreUnavailable):
        await w.svc.validate(token)
    assert w.cache.peek(TokenHash.of(token)) is None
    assert w.cache.calls["fill"] == 0


async def test_the_facade_store_is_the_guarded_one(build: Build) -> None:
    """Use cases that are one store read go through the facade's ``store``:
    behind the Postgres breaker (refused at once while it is open)."""
    store = InMemorySessionStore()
    postgres = Breaker(BREAKER, name="postgres", error=StoreUnavailable)
    svc = assemble_core(
        store, None, breaker=Breaker(BREAKER), store_breaker=postgres, rng=random.random
    )
    assert await svc.store.find(TokenHash.of(new_token())) is None
    postgres.trip("test")
    with pytest.raises(StoreUnavailable):
        await svc.store.find(TokenHash.of(new_token()))
    assert store.calls["find"] == 1  # the refused call never reached the store
    await svc.aclose()


async def test_store_down_and_cache_hit_still_answers(w: World) -> None:
    live, revoked = await w.create(), await w.create()
    await w.svc.validate(live)
    await w.svc.invalidate(token=revoked)
    w.store.unavailable = True
    answer = await w.svc.validate(live)
    assert (answer.valid, answer.source) == (True, Source.CACHE)
    assert (await w.svc.validate(revoked)).reason is Reason.REVOKED


async def test_revocation_with_the_cache_down_trips_the_breaker_and_is_replayed(
    w: World,
) -> None:
    token = await w.create()
    token_hash = TokenHash.of(token)
    await w.svc.validate(token)  # a live entry is cached
    w.cache.unavailable = True
    assert await w.svc.invalidate(token=token) == Revocation(1, False)
    assert w.state() is BreakerState.OPEN

    w.cache.unavailable = False  # Redis is back, still holding the stale live entry
    assert isinstance(w.cache.peek(token_hash), Session)
    gets = w.cache.calls["get"]
    answer = await w.svc.validate(token)
    assert (answer.valid, answer.reason, answer.source) == (False, Reason.REVOKED, Source.DATABASE)
    assert w.cache.calls["get"] == gets  # bypassed

    w.clock.advance(BREAKER.reset_timeout)
    answer = await w.svc.validate(token)  # starts the probe, still bypasses
    assert (answer.valid, answer.reason) == (False, Reason.REVOKED)
    await w.leave_half_open()
    assert w.state() is BreakerState.CLOSED
    assert w.cache.peek(token_hash) == TOMBSTONE
    answer = await w.svc.validate(token)
    assert (answer.valid, answer.reason, answer.source) == (False, Reason.REVOKED, Source.CACHE)


async def test_revocation_while_the_breaker_is_open_still_reaches_a_cache_that_answers(
    w: World,
) -> None:
    """The breaker opened for this process alone (its own loop starved, say):
    the other replicas still read that Redis, so the tombstone is written
    anyway; this process keeps reading Postgres until its probe replays."""
    token = await w.create()
    w.breaker.trip("this process's calls were slow")
    assert await w.svc.invalidate(token=token) == Revocation(1, True)
    assert w.cache.calls["tombstone"] == 1
    assert w.state() is BreakerState.OPEN
    assert await w.store.pending_purges(10) == []  # confirmed: nothing left to drain


async def test_revocation_while_the_breaker_is_open_and_the_cache_is_down(w: World) -> None:
    token = await w.create()
    w.breaker.trip("redis down")
    w.cache.unavailable = True
    assert await w.svc.invalidate(token=token) == Revocation(1, False)
    assert w.state() is BreakerState.OPEN
    assert len(await w.store.pending_purges(10)) == 1  # left for the drain and the probe


async def test_a_probe_that_cannot_replay_keeps_the_breaker_open(w: World) -> None:
    token = await w.create()
    w.cache.unavailable = True
    assert await w.svc.invalidate(token=token) == Revocation(1, False)
    w.clock.advance(BREAKER.reset_timeout)
    assert (await w.svc.validate(token)).reason is Reason.REVOKED
    await w.leave_half_open()
    assert w.state() is BreakerState.OPEN
    assert w.breaker.opened_count == 2


async def test_the_probe_does_not_close_the_breaker_while_the_cache_is_down(w: World) -> None:
    # Nothing to replay: the probe must still prove that Redis answers.
    token = await w.create()
    w.cache.unavailable = True
    for _ in range(10):
        await w.svc.validate(token)
    assert w.state() is BreakerState.OPEN
    w.clock.advance(BREAKER.reset_timeout)
    await w.svc.validate(token)  # starts the probe
    await w.leave_half_open()
    assert w.state() is BreakerState.OPEN


async def test_replay_tombstones_the_revocations_of_the_window_expired_or_not(w: World) -> None:
    now = w.clock.now()
    window = timedelta(seconds=POLICY.cache_ttl + POLICY.max_fill_lag + POLICY.revocation_skew)

    def seeded(revoked_ago: timedelta | None, expires_in: timedelta) -> TokenHash:
        live = Session(
            session_id=str(uuid.uuid4()),
            user_id=user(),
            token_hash=TokenHash.of(new_token()),
            created_at=now - timedelta(days=1),
            expires_at=now + expires_in,
        )
        revoked_at = None if revoked_ago is None else now - revoked_ago
        w.store.put(replace(live, revoked_at=revoked_at))
        w.cache.put(live.token_hash, live, POLICY.cache_ttl)  # cached before the revocation
        return live.token_hash

    recent = seeded(timedelta(seconds=1), timedelta(hours=1))
    edge = seeded(window, timedelta(hours=1))
    old = seeded(window + timedelta(seconds=1), timedelta(hours=1))
    expired = seeded(timedelta(seconds=1), timedelta(seconds=-1))
    live = seeded(None, timedelta(hours=1))

    await w.svc.replay_revocations()
    assert w.cache.calls["seal"] == 1  # one round trip, which also raises the watermark
    for replayed in (recent, edge, expired):
        assert w.cache.peek(replayed) == TOMBSTONE
    for untouched in (old, live):
        assert isinstance(w.cache.peek(untouched), Session)


async def test_replay_with_the_store_down_fails_as_cache_unavailable(w: World) -> None:
    w.store.unavailable = True
    with pytest.raises(CacheUnavailable):
        await w.svc.replay_revocations()


# --- single-flight and negative caching --------------------------------------------------------


async def test_concurrent_validations_of_one_uncached_token_read_the_store_once(
    w: World,
) -> None:
    token = await w.create()
    w.store.gate = asyncio.Event()
    callers = [asyncio.create_task(w.svc.validate(token)) for _ in range(100)]
    await w.store.wait_parked(1)
    assert w.cache.calls["get"] == 100  # every caller missed before the load finished
    w.store.gate.set()
    answers = await asyncio.gather(*callers)
    assert all(a.valid for a in answers)
    assert w.store.calls["find"] == 1
    assert w.cache.calls["fill"] == 1


async def test_an_unknown_token_is_negatively_cached_for_negative_ttl(w: World) -> None:
    token = new_token()
    for _ in range(5):
        assert (await w.svc.validate(token)).reason is Reason.UNKNOWN
    assert w.store.calls["find"] == 1
    w.clock.advance(POLICY.negative_ttl)
    assert (await w.svc.validate(token)).reason is Reason.UNKNOWN
    assert w.store.calls["find"] == 2


async def test_a_session_created_for_a_negatively_cached_token_is_valid(build: Build) -> None:
    token = new_token()
    w = build(token_factory=lambda: token)
    assert (await w.svc.validate(token)).reason is Reason.UNKNOWN
    assert w.cache.peek(TokenHash.of(token)) == CachedVerdict(Reason.UNKNOWN)
    assert await w.create() == token
    w.clock.advance(0.001)  # later (see the slow-unknown-fill test: this clock stands still)
    answer = await w.svc.validate(token)
    assert (answer.valid, answer.source) == (True, Source.DATABASE)


# --- stats and health ----------------------------------------------------------------------------


async def test_cache_stats_after_known_traffic(w: World) -> None:
    token = await w.create()
    for _ in range(3):
        await w.svc.validate(token)  # miss, hit, hit
    unknown = new_token()
    await w.svc.validate(unknown)  # miss
    await w.svc.validate(unknown)  # hit (negative)
    await w.svc.validate("garbage")  # answered by the token format: not a lookup
    stats = w.svc.stats
    assert (stats.hits, stats.misses, stats.errors) == (3, 2, 0)
    assert stats.hit_rate == 60.0

    w.cache.unavailable = True
    await w.svc.validate(new_token())  # a failed get; the fill is skipped
    assert (stats.hits, stats.misses, stats.errors) == (3, 2, 1)
    assert stats.hit_rate == 60.0


async def test_health_is_healthy_when_both_tiers_answer(w: World) -> None:
    report = await w.svc.health()
    assert report.status == "healthy"
    assert (report.cache_enabled, report.cache_healthy) == (True, True)
    assert report.errors == ()
    assert report.breaker.state == "closed"
    assert report.cache_ttl_seconds == int(POLICY.cache_ttl)


@pytest.mark.parametrize("cause", ["cache-down", "breaker-open"])
async def test_health_is_degraded_when_the_cache_is_down_or_bypassed(w: World, cause: str) -> None:
    if cause == "cache-down":
        w.cache.unavailable = True
    else:
        w.breaker.trip("test")
    report = await w.svc.health()
    assert report.status == "degraded"
    assert report.cache_healthy is False
    assert report.errors
    if cause == "breaker-open":
        assert report.breaker.state == "open"
        assert report.breaker.seconds_until_half_open == BREAKER.reset_timeout


async def test_health_is_unhealthy_when_the_store_is_down(w: World) -> None:
    w.store.unavailable = True
    report = await w.svc.health()
    assert report.status == "unhealthy"
    assert any(e.startswith("postgres") for e in report.errors)


async def test_health_without_a_cache_is_healthy(build: Build) -> None:
    report = await build(with_cache=False).svc.health()
    assert (report.status, report.cache_enabled, report.cache_healthy) == (
        "healthy",
        False,
        False,
    )
