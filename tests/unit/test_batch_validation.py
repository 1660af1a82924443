"""``validate_many`` (ValidateSessions) on the in-memory fakes: the races and
limits of ``validate`` repeated for a batch, each driven by gates (the fakes'
only yield points), and the provenance of every answer.

Mirrors, one for one: the paused-miss race of test_service.py (Invalidate and
InvalidateUser), the late joiners of test_service.py and
test_durable_revocation.py, the single-flight and negative cache, the
unknown-token limit. Each batch also carries a token that is not raced, so a
batch that lost order or mixed answers up fails too.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta

import pytest
import pytest_asyncio

from session_authority.core.assembly import assemble_core
from session_authority.core.breaker import Breaker, BreakerPolicy, BreakerState
from session_authority.core.domain import (
    MAX_BATCH_TOKENS,
    Reason,
    Revocation,
    Source,
    TokenHash,
    Validation,
    new_token,
)
from session_authority.core.errors import InvalidArgument, RateLimited, StoreUnavailable
from session_authority.core.miss_limit import MissLimiter
from session_authority.core.policy import CorePolicy
from session_authority.core.ports import CachedVerdict
from session_authority.core.service import SessionAuthority

from .fakes import FakeClock, InMemorySessionCache, InMemorySessionStore, until

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(5)]

TOMBSTONE = CachedVerdict(Reason.REVOKED)


@dataclass
class World:
    clock: FakeClock
    store: InMemorySessionStore
    cache: InMemorySessionCache
    breaker: Breaker
    svc: SessionAuthority

    async def create(self, user_id: str | None = None) -> str:
        token, _ = await self.svc.create(user_id or f"user-{uuid.uuid4().hex}", None, {})
        return token

    def state(self) -> BreakerState:
        return self.breaker.state

    def finds(self) -> int:
        """Store reads of either kind."""
        return self.store.calls["find"] + self.store.calls["find_many"]


Build = Callable[..., World]


@pytest_asyncio.fixture
async def build() -> AsyncIterator[Build]:
    worlds: list[World] = []

    def make(*, with_cache: bool = True, limiter: MissLimiter | None = None) -> World:
        clock = FakeClock()
        store = InMemorySessionStore(clock.now)
        cache = InMemorySessionCache(clock.monotonic)
        breaker = Breaker(BreakerPolicy(timeout=5.0), clock=clock.monotonic)
        svc = assemble_core(
            store,
            cache if with_cache else None,
            breaker=breaker,
            policy=CorePolicy(),
            clock=clock.now,
            rng=random.Random(7).random,
            monotonic=clock.monotonic,
            miss_limit=limiter,
        )
        world = World(clock, store, cache, breaker, svc)
        worlds.append(world)
        return world

    yield make
    for world in worlds:
        for gate in (world.store.gate, world.cache.fill_gate, world.cache.get_gate):
            if gate is not None:
                gate.set()
        await world.svc.aclose()


@pytest_asyncio.fixture
async def w(build: Build) -> World:
    world = build()
    await world.svc.replay_revocations()  # adopt the cache, as App.start does
    return world


def _verdicts(answers: list[Validation]) -> list[tuple[bool, Reason | None]]:
    return [(a.valid, a.reason) for a in answers]


# --- the races of ValidateSession, for a batch -------------------------------------------------


@pytest.mark.parametrize("revoke_all", [False, True], ids=["Invalidate", "InvalidateUser"])
async def test_a_batch_miss_paused_between_read_and_fill_loses_to_revocation(
    w: World, revoke_all: bool
) -> None:
    uid = f"user-{uuid.uuid4().hex}"
    token, bystander = await w.create(uid), await w.create()
    w.store.gate = asyncio.Event()
    reader = asyncio.create_task(w.svc.validate_many([token, bystander]))
    await w.store.wait_parked(1)  # one query read both "live"; no fill yet
    if revoke_all:
        assert await w.svc.invalidate_user(uid) == Revocation(1, True)
    else:
        assert await w.svc.invalidate(token=token) == Revocation(1, True)
    w.store.gate.set()
    assert _verdicts(await reader) == [(False, Reason.REVOKED), (True, None)]
    assert w.cache.peek(TokenHash.of(token)) == TOMBSTONE  # nothing stale left behind
    after = await w.svc.validate_many([token, bystander])
    assert [(a.valid, a.reason, a.source) for a in after] == [
        (False, Reason.REVOKED, Source.CACHE),
        (True, None, Source.CACHE),
    ]
    assert w.store.calls["find_many"] == 1  # both misses in one query


async def test_without_a_cache_a_batch_that_joins_a_load_after_a_revocation_rereads(
    build: Build,
) -> None:
    w = build(with_cache=False)
    token = await w.create()
    w.store.gate = asyncio.Event()
    before = asyncio.create_task(w.svc.validate(token))
    await w.store.wait_parked(1)
    assert await w.svc.invalidate(token=token) == Revocation(1, True)
    after = asyncio.create_task(w.svc.validate_many([token]))  # joins the load, late
    await until(lambda: w.svc.validator.callers(TokenHash.of(token)) == 2)
    w.store.gate.set()
    assert (await before).valid  # it started before the revocation returned
    assert _verdicts(await after) == [(False, Reason.REVOKED)]
    assert w.finds() == 2  # the batch read for itself


async def test_a_batch_that_starts_after_a_failed_purge_never_shares_a_live_answer(
    w: World,
) -> None:
    token = await w.create()
    w.cache.fill_gate = asyncio.Event()
    before = asyncio.create_task(w.svc.validate(token))
    await w.cache.wait_parked_fills(1)  # Redis applied the live fill; its reply is slow
    w.cache.unavailable = True  # and now Redis fails: the tombstone cannot be written
    assert await w.svc.invalidate(token=token) == Revocation(1, False)
    assert w.state() is BreakerState.OPEN
    after = asyncio.create_task(w.svc.validate_many([token]))  # bypasses the cache, joins
    await until(lambda: w.svc.validator.callers(TokenHash.of(token)) == 2)
    w.cache.fill_gate.set()
    await before  # started before the revocation returned: either answer is allowed
    [answer] = await after
    assert (answer.valid, answer.reason, answer.degraded) == (False, Reason.REVOKED, True)


async def test_a_batch_whose_lookup_failed_does_not_share_a_load_begun_before_it(
    w: World,
) -> None:
    token = await w.create()
    w.cache.fill_gate = asyncio.Event()
    first = asyncio.create_task(w.svc.validate(token))  # clean miss, read, fill applied
    await w.cache.wait_parked_fills(1)
    assert await w.svc.invalidate(token=token) == Revocation(1, True)  # tombstone lands
    w.cache.unavailable = True  # the batch's lookup fails...
    late = asyncio.create_task(w.svc.validate_many([token]))  # ...and it joins the load
    await until(lambda: w.svc.validator.callers(TokenHash.of(token)) == 2)
    w.cache.unavailable = False
    w.cache.fill_gate.set()
    await first
    assert _verdicts(await late) == [(False, Reason.REVOKED)]


async def test_a_shared_answer_is_judged_at_the_batchs_own_time(w: World) -> None:
    token, _ = await w.svc.create(f"user-{uuid.uuid4().hex}", timedelta(seconds=10), {})
    w.store.gate = asyncio.Event()
    w.cache.fill_gate = asyncio.Event()
    first = asyncio.create_task(w.svc.validate(token))
    await w.store.wait_parked(1)
    second = asyncio.create_task(w.svc.validate_many([token]))  # a clean miss: joins
    await until(lambda: w.svc.validator.callers(TokenHash.of(token)) == 2)
    w.store.gate.set()
    await w.cache.wait_parked_fills(1)  # the load judged "valid" at its own time
    w.clock.advance(10)  # the session expires before the answer reaches the callers
    w.cache.fill_gate.set()
    assert ((await first).valid, (await first).reason) == (False, Reason.EXPIRED)
    assert _verdicts(await second) == [(False, Reason.EXPIRED)]


# --- single-flight, negative cache, unknown-token limit -----------------------------------------


async def test_batches_and_single_validations_of_one_uncached_token_share_one_read(
    w: World,
) -> None:
    tokens = [await w.create() for _ in range(3)]
    w.store.gate = asyncio.Event()
    singles = [asyncio.create_task(w.svc.validate(tokens[0])) for _ in range(5)]
    await w.store.wait_parked(1)
    batches = [asyncio.create_task(w.svc.validate_many(tokens)) for _ in range(5)]
    await until(lambda: w.svc.validator.callers(TokenHash.of(tokens[2])) == 5)
    w.store.gate.set()
    assert all(a.valid for a in await asyncio.gather(*singles))
    for batch in await asyncio.gather(*batches):
        assert _verdicts(batch) == [(True, None)] * 3
    # tokens[0]: the singles' find; tokens[1:]: one find_many for all five batches.
    assert (w.store.calls["find"], w.store.calls["find_many"]) == (1, 1)


async def test_unknown_tokens_in_batches_are_negatively_cached(w: World) -> None:
    forged = [new_token() for _ in range(20)]
    for _ in range(10):
        assert _verdicts(await w.svc.validate_many(forged)) == [(False, Reason.UNKNOWN)] * 20
    assert w.finds() == 1  # one query for the 20, then the negative entries answer


async def test_a_batch_over_the_unknown_token_limit_is_refused_whole(build: Build) -> None:
    clock = FakeClock()
    w = build(limiter=MissLimiter(rate=1e-9, burst=5, clock=clock.monotonic))
    known = await w.create()
    # Known tokens are refunded: many batches of them never exhaust the budget.
    for _ in range(10):
        w.cache.flush()  # every batch misses: Postgres is asked each time
        assert (await w.svc.validate_many([known]))[0].valid
    assert (
        _verdicts(await w.svc.validate_many([new_token() for _ in range(5)]))
        == [(False, Reason.UNKNOWN)] * 5
    )
    reads = w.finds()
    with pytest.raises(RateLimited):
        await w.svc.validate_many([known, new_token()])
    assert w.finds() == reads  # refused before any query
    w.cache.flush()
    with pytest.raises(RateLimited):  # nothing left, even for a known token's miss
        await w.svc.validate_many([known])


# --- input, outages, order ------------------------------------------------------------------


async def test_a_malformed_token_fails_its_own_entry_in_request_order(w: World) -> None:
    good = await w.create()
    tokens = [
        "",
        " sat_x",
        "tök",
        "\ud800",
        "x" * 600,
        f"sat_{uuid.uuid4().hex}{uuid.uuid4().hex[:16]}",
    ]
    answers = await w.svc.validate_many([good, *tokens, good])
    assert [(a.valid, a.reason, a.source) for a in answers[1:-1]] == [
        (False, Reason.UNKNOWN, Source.TOKEN_FORMAT)
    ] * len(tokens)
    assert answers[0].valid and answers[-1].valid
    assert answers[0].session is not None
    assert answers[0].session.token_hash == TokenHash.of(good)
    assert w.finds() == 1  # the good one (twice in the batch) read once


async def test_an_empty_batch_answers_nothing_and_an_over_long_one_is_refused(w: World) -> None:
    assert await w.svc.validate_many([]) == []
    with pytest.raises(InvalidArgument) as refused:
        await w.svc.validate_many([new_token()] * (MAX_BATCH_TOKENS + 1))
    assert refused.value.field == "tokens"
    assert len(await w.svc.validate_many([new_token()] * MAX_BATCH_TOKENS)) == MAX_BATCH_TOKENS
    assert w.finds() == 1


async def test_with_redis_down_a_batch_is_answered_by_postgres_degraded(w: World) -> None:
    live, revoked = await w.create(), await w.create()
    await w.svc.validate_many([live, revoked])  # cached
    await w.svc.invalidate(token=revoked)
    w.cache.unavailable = True
    answers = await w.svc.validate_many([live, revoked, new_token()])
    assert [(a.valid, a.reason, a.source, a.degraded) for a in answers] == [
        (True, None, Source.DATABASE, True),
        (False, Reason.REVOKED, Source.DATABASE, True),
        (False, Reason.UNKNOWN, Source.DATABASE, True),
    ]
    assert w.cache.calls["get_many"] == 2  # one round trip per batch


async def test_with_the_store_down_a_batch_with_a_miss_fails_never_guesses(w: World) -> None:
    cached, uncached = await w.create(), await w.create()
    await w.svc.validate_many([cached])
    w.store.unavailable = True
    assert _verdicts(await w.svc.validate_many([cached])) == [(True, None)]
    with pytest.raises(StoreUnavailable):
        await w.svc.validate_many([cached, uncached])


# --- provenance -----------------------------------------------------------------------------


async def test_every_answer_says_where_it_came_from_and_how_old_it_is(w: World) -> None:
    token = await w.create()
    first = await w.svc.validate(token)
    assert (first.source, first.cache_age, first.degraded, first.local) == (
        Source.DATABASE,
        None,
        False,
        False,
    )
    w.clock.advance(7)
    for again in (await w.svc.validate(token), *await w.svc.validate_many([token])):
        assert (again.source, again.cache_age, again.degraded) == (Source.CACHE, 7.0, False)
    w.breaker.trip("test")
    bypassed = await w.svc.validate(token)
    assert (bypassed.source, bypassed.cache_age, bypassed.degraded) == (
        Source.DATABASE,
        None,
        True,
    )
