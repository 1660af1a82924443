"""The unknown-token limit shared by ``serve``'s workers (``SharedMissLimiter``): the
same buckets as ``MissLimiter``, in shared memory, so that processes forked after it
was made draw on one budget per caller; a slot collision only ever makes two callers
share a bucket (stricter), never gives one of them more."""

from __future__ import annotations

import multiprocessing
import random
from collections.abc import Callable

import pytest

from session_authority.core.assembly import assemble_core
from session_authority.core.breaker import Breaker, BreakerPolicy
from session_authority.core.domain import Session, TokenHash, new_token
from session_authority.core.errors import RateLimited
from session_authority.core.miss_limit import MissLimit, MissLimiter
from session_authority.core.policy import CorePolicy
from session_authority.shared_limit import SharedMissLimiter

from .fakes import FakeClock, InMemorySessionCache, InMemorySessionStore

Make = Callable[..., MissLimit]
BOTH = pytest.mark.parametrize("make", [MissLimiter, SharedMissLimiter])


def _apart(limiter: MissLimit, caller: str) -> str:
    """A caller whose bucket is not ``caller``'s (the shared table's slots are
    picked by a keyed hash: two names meet once in 65,536)."""
    if not isinstance(limiter, SharedMissLimiter):
        return "b"
    taken = limiter._where(caller)[1]
    return next(f"b{i}" for i in range(100) if limiter._where(f"b{i}")[1] != taken)


@BOTH
def test_a_bucket_refills_at_its_rate_up_to_its_burst(make: Make) -> None:
    clock = FakeClock()
    limiter = make(rate=2, burst=3, clock=clock.monotonic)
    assert [limiter.take("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.take(_apart(limiter, "a"))  # callers are counted apart
    clock.advance(0.5)
    assert limiter.take("a") and not limiter.take("a")
    clock.advance(100)
    assert [limiter.take("a") for _ in range(4)] == [True, True, True, False]


@BOTH
def test_a_refund_gives_the_credit_back(make: Make) -> None:
    limiter = make(rate=1, burst=1, clock=FakeClock().monotonic)
    assert not limiter.limited("a")
    assert limiter.take("a")
    limiter.refund("a")
    assert limiter.take("a") and limiter.limited("a")
    limiter.refund("a")
    limiter.refund("a")  # never more than the burst
    assert limiter.take("a") and not limiter.take("a")


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 5), (1, 0)])
def test_nonsense_knobs_are_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="rate"):
        SharedMissLimiter(rate, burst)


def test_callers_that_share_a_slot_share_one_budget_never_more() -> None:
    clock = FakeClock()
    limiter = SharedMissLimiter(rate=1, burst=3, clock=clock.monotonic, slots=1, stripes=1)
    granted = [limiter.take(f"caller-{i}") for i in range(10)]
    assert granted == [True] * 3 + [False] * 7  # ten callers, one bucket: stricter
    clock.advance(1.0)
    assert [limiter.take("caller-9"), limiter.take("caller-0")] == [True, False]


def _drain(limiter: SharedMissLimiter, tries: int, start: object, out: object) -> None:
    start.wait()  # type: ignore[attr-defined]
    out.put(sum(limiter.take("mallory") for _ in range(tries)))  # type: ignore[attr-defined]


def test_processes_forked_after_it_was_made_share_one_budget() -> None:
    # The clock barely moves during the test: 0.01 credit per second.
    limiter = SharedMissLimiter(rate=0.01, burst=50)
    fork = multiprocessing.get_context("fork")
    start, out = fork.Event(), fork.Queue()
    children = [fork.Process(target=_drain, args=(limiter, 500, start, out)) for _ in range(2)]
    for child in children:
        child.start()
    start.set()
    granted = [out.get(timeout=30) for _ in children]
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    assert sum(granted) == 50, granted  # not 2 x 50: one bucket for both processes
    assert not limiter.take("mallory")  # and the parent sees it drained too


class Counted(InMemorySessionStore):
    finds = 0

    async def find(self, token_hash: TokenHash) -> Session | None:
        Counted.finds += 1
        return await super().find(token_hash)


@pytest.mark.asyncio
async def test_two_cores_on_one_shared_limit_give_a_caller_one_burst() -> None:
    """Two workers' cores over one shared table (the ``miss_limit`` that
    ``assemble_core`` takes): a flood split over both costs Postgres one burst."""
    clock = FakeClock()
    shared = SharedMissLimiter(rate=10, burst=20, clock=clock.monotonic)
    Counted.finds = 0
    cores = [
        assemble_core(
            Counted(clock.now),
            InMemorySessionCache(clock.monotonic),
            breaker=Breaker(BreakerPolicy(timeout=0.05), clock=clock.monotonic),
            policy=CorePolicy(unknown_token_rate=10, unknown_token_burst=20),
            clock=clock.now,
            rng=random.Random(7).random,
            monotonic=clock.monotonic,
            miss_limit=shared,
        )
        for _ in range(2)
    ]
    refused = 0
    for i in range(200):
        try:
            await cores[i % 2].validate(new_token(), caller="mallory")
        except RateLimited:
            refused += 1
    for core in cores:
        await core.aclose()
    assert (Counted.finds, refused) == (20, 180)  # not 40: one budget for both
