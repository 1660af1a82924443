"""The per-caller limit on unknown tokens reaching Postgres (``MissLimiter``), alone and
in the core on fakes: distinct well-formed unknown tokens (which neither the checksum nor
the negative cache stop) cost at most the burst plus the rate, per caller."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from session_authority.core.assembly import assemble_core
from session_authority.core.breaker import Breaker, BreakerPolicy
from session_authority.core.domain import Reason, Session, Source, TokenHash, new_token
from session_authority.core.errors import RateLimited
from session_authority.core.miss_limit import MissLimiter
from session_authority.core.policy import CorePolicy
from session_authority.core.service import SessionAuthority

from .fakes import FakeClock, InMemorySessionCache, InMemorySessionStore


def test_a_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    clock = FakeClock()
    limiter = MissLimiter(rate=2, burst=3, clock=clock.monotonic)
    assert [limiter.take("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.take("b")  # callers are counted apart
    clock.advance(0.5)
    assert limiter.take("a") and not limiter.take("a")
    clock.advance(100)
    assert [limiter.take("a") for _ in range(4)] == [True, True, True, False]


def test_a_refund_gives_the_credit_back() -> None:
    limiter = MissLimiter(rate=1, burst=1, clock=FakeClock().monotonic)
    assert limiter.take("a")
    limiter.refund("a")
    assert limiter.take("a") and limiter.limited("a")


def test_idle_callers_are_forgotten_so_memory_stays_bounded() -> None:
    clock = FakeClock()
    limiter = MissLimiter(rate=1, burst=5, clock=clock.monotonic, max_callers=100)
    for i in range(1000):
        limiter.take(f"caller-{i}")
        clock.advance(0.001)
    assert len(limiter._buckets) <= 100


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 5), (1, 0)])
def test_nonsense_knobs_are_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="rate"):
        MissLimiter(rate, burst)


class Counted(InMemorySessionStore):
    finds = 0

    async def find(self, token_hash: TokenHash) -> Session | None:
        self.finds += 1
        return await super().find(token_hash)


@pytest_asyncio.fixture
async def world() -> AsyncIterator[tuple[SessionAuthority, Counted, FakeClock]]:
    clock = FakeClock()
    store = Counted(clock.now)
    core = assemble_core(
        store,
        InMemorySessionCache(clock.monotonic),
        breaker=Breaker(BreakerPolicy(timeout=0.05), clock=clock.monotonic),
        policy=CorePolicy(unknown_token_rate=10, unknown_token_burst=20),
        clock=clock.now,
        rng=random.Random(7).random,
        monotonic=clock.monotonic,
    )
    yield core, store, clock
    await core.aclose()


@pytest.mark.asyncio
async def test_a_flood_of_new_unknown_tokens_costs_at_most_the_burst_and_the_rate(
    world: tuple[SessionAuthority, Counted, FakeClock],
) -> None:
    core, store, clock = world
    refusals: list[str] = []
    for _ in range(500):
        try:
            answer = await core.validate(new_token(), caller="mallory")
            assert (answer.valid, answer.reason) == (False, Reason.UNKNOWN)
        except RateLimited as exc:
            refusals.append(str(exc))
    assert (store.finds, len(refusals)) == (20, 480)
    assert not [r for r in refusals if "sat_" in r]  # never echoes the token
    clock.advance(1.0)  # 10 more per second
    for _ in range(50):
        with contextlib.suppress(RateLimited):
            await core.validate(new_token(), caller="mallory")
    assert store.finds == 30
    # Another caller is not affected, and neither are mallory's cache hits.
    token, _ = await core.create("alice", None, {})
    assert (await core.validate(token, caller="alice")).valid
    assert (await core.validate(token, caller="mallory")).source is Source.CACHE


@pytest.mark.asyncio
async def test_known_tokens_never_use_up_the_limit(
    world: tuple[SessionAuthority, Counted, FakeClock],
) -> None:
    core, store, clock = world
    tokens = [(await core.create("bob", None, {}))[0] for _ in range(100)]
    await core.invalidate_user("bob")  # revoked sessions are known too
    clock.advance(10_000)  # every cache entry (tombstones included) expired: all miss
    for token in tokens:
        answer = await core.validate(token, caller="gateway")
        assert answer.reason is Reason.REVOKED
    assert store.finds == 100  # 100 lookups through a burst of 20: all refunded


@pytest.mark.asyncio
async def test_callers_joining_a_load_in_flight_are_not_charged(
    world: tuple[SessionAuthority, Counted, FakeClock],
) -> None:
    core, store, clock = world
    token, _ = await core.create("carol", None, {})
    clock.advance(10_000)  # the creation marker is gone: the next reads miss
    store.finds = 0
    answers = await asyncio.gather(*(core.validate(token, caller="gw") for _ in range(500)))
    assert all(a.valid for a in answers)  # 500 callers, one read, a burst of only 20
    assert store.finds == 1
