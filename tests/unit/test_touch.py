"""``TouchSession``'s core (``core/touch.py``) on the in-memory fakes, one
``FakeClock`` driving the service, the store and the cache: when the store is
asked, and when the cache answers instead."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import pytest_asyncio

from session_authority.core.assembly import assemble_core
from session_authority.core.breaker import Breaker, BreakerPolicy
from session_authority.core.domain import TokenHash, new_token
from session_authority.core.errors import InvalidArgument, SessionNotFound, SessionNotLive
from session_authority.core.policy import CorePolicy
from session_authority.core.service import SessionAuthority

from .fakes import FakeClock, InMemorySessionCache, InMemorySessionStore, RecordingMetrics, until

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(5)]

POLICY = CorePolicy(touch_interval=60.0, session_max_lifetime=timedelta(days=2))


class World:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.store = InMemorySessionStore(self.clock.now)
        self.cache = InMemorySessionCache(self.clock.monotonic)
        self.metrics = RecordingMetrics()
        self.svc: SessionAuthority = assemble_core(
            self.store,
            self.cache,
            breaker=Breaker(BreakerPolicy(timeout=0.05), clock=self.clock.monotonic),
            policy=POLICY,
            clock=self.clock.now,
            rng=random.Random(7).random,
            monotonic=self.clock.monotonic,
            metrics=self.metrics,
        )

    async def create(self) -> str:
        token, _ = await self.svc.create("user-" + uuid.uuid4().hex, None, {})
        return token


@pytest_asyncio.fixture
async def w() -> AsyncIterator[World]:
    world = World()
    yield world
    await world.svc.aclose()


async def test_touches_within_the_interval_are_answered_by_the_cache(w: World) -> None:
    token = await w.create()
    first = await w.svc.touch(token=token, extend_by=timedelta(hours=30))
    assert first.written
    for _ in range(50):
        again = await w.svc.touch(token=token, extend_by=timedelta(hours=30))
        assert not again.written and again.session.expires_at == first.session.expires_at
    assert w.store.calls["touch"] == 1
    # The cache holds the new expiry (the fill), not the creation-time one.
    hit = await w.cache.get(TokenHash.of(token))
    assert hit is not None and getattr(hit.entry, "expires_at", None) == first.session.expires_at
    w.clock.advance(61)  # the interval is over: answered at once, written behind the answer
    later = await w.svc.touch(token=token, extend_by=timedelta(hours=30))
    assert not later.written and later.session.expires_at == first.session.expires_at
    await until(lambda: w.store.calls["touch"] == 2)
    stored = w.store.peek(TokenHash.of(token))
    assert stored is not None and stored.expires_at > first.session.expires_at
    await until(lambda: not w.svc.toucher._behind)
    seen = await w.svc.touch(token=token)  # the cache holds the new expiry
    assert seen.session.expires_at == stored.expires_at
    assert w.store.calls["touch"] == 2


async def test_a_tombstone_in_the_cache_sends_the_touch_to_the_store(w: World) -> None:
    token = await w.create()
    assert (await w.svc.touch(token=token)).written
    assert (await w.svc.invalidate(token=token)).revoked_count == 1
    with pytest.raises(SessionNotLive, match="revoked"):
        await w.svc.touch(token=token)
    assert w.store.calls["touch"] == 2  # within the interval, yet asked: the cache said revoked


async def test_the_expiry_is_capped_and_the_default_extension_is_the_default_ttl(
    w: World,
) -> None:
    token = await w.create()  # the default TTL: a day
    capped = await w.svc.touch(token=token, extend_by=timedelta(days=29))
    created = capped.session.created_at
    assert capped.session.expires_at == created + POLICY.session_max_lifetime
    other = await w.create()
    w.clock.advance(3600)
    slid = await w.svc.touch(token=other)  # no extend_by: the default session TTL
    assert slid.session.expires_at == w.clock.now() + POLICY.default_session_ttl


async def test_bad_input_is_refused_before_any_io(w: World) -> None:
    fresh = new_token()
    for kwargs, field in (
        ({"session_id": "nope"}, "session_id"),
        ({"token": ""}, "token"),
        ({"token": fresh, "extend_by": timedelta(0)}, "extend_by"),
        ({"token": fresh, "extend_by": timedelta(days=31)}, "extend_by"),
    ):
        with pytest.raises(InvalidArgument) as refused:
            await w.svc.touch(**kwargs)
        assert refused.value.field == field
    with pytest.raises(SessionNotFound):  # not a token we issue: no statement for it
        await w.svc.touch(token="sat_" + "A" * 48)
    assert w.store.calls["touch"] == 0
    with pytest.raises(SessionNotFound):
        await w.svc.touch(session_id=str(uuid.uuid4()))
    assert w.store.calls["touch"] == 1


async def test_a_cached_session_is_answered_at_once_and_written_behind(w: World) -> None:
    token = await w.create()
    assert (await w.svc.validate(token)).valid  # now cached
    created = w.store.peek(TokenHash.of(token))
    assert created is not None
    answer = await w.svc.touch(token=token, extend_by=timedelta(hours=30))
    assert not answer.written and answer.session.expires_at == created.expires_at
    await until(lambda: w.store.calls["touch"] == 1 and not w.svc.toucher._behind)
    stored = w.store.peek(TokenHash.of(token))
    assert stored is not None and stored.expires_at > created.expires_at
    later = await w.svc.touch(token=token, extend_by=timedelta(hours=30))
    assert not later.written and later.session.expires_at == stored.expires_at
    assert w.store.calls["touch"] == 1  # within the interval: the cache answers


async def test_write_through_answers_after_the_write_with_the_new_expiry(w: World) -> None:
    token = await w.create()
    assert (await w.svc.validate(token)).valid  # cached: would be answered from it
    created = w.store.peek(TokenHash.of(token))
    assert created is not None
    answer = await w.svc.touch(token=token, extend_by=timedelta(hours=30), write_through=True)
    assert answer.written and answer.session.expires_at > created.expires_at
    assert w.store.calls["touch"] == 1
    # Within the interval no write is due: answered from the cache, written or not.
    again = await w.svc.touch(token=token, extend_by=timedelta(hours=30), write_through=True)
    assert not again.written and again.session.expires_at == answer.session.expires_at
    assert w.store.calls["touch"] == 1


# --- metrics: each touch by where its answer came from, each statement by outcome ----------


async def test_a_miss_then_quiet_touches_count_one_store_answer_and_cache_answers(
    w: World,
) -> None:
    token = await w.create()  # not cached yet: the first touch waits for the statement
    assert (await w.svc.touch(token=token)).written
    for _ in range(5):
        await w.svc.touch(token=token)
    assert w.metrics.touches == {"store": 1, "cache": 5}
    assert w.metrics.touch_writes == {"written": 1}


async def test_a_cached_sessions_first_touch_counts_behind_and_its_write(w: World) -> None:
    token = await w.create()
    assert (await w.svc.validate(token)).valid  # now cached
    assert not (await w.svc.touch(token=token)).written
    await until(lambda: not w.svc.toucher._behind)
    assert w.metrics.touches == {"behind": 1}
    assert w.metrics.touch_writes == {"written": 1}
    await w.svc.touch(token=token)  # within the interval now
    assert w.metrics.touches == {"behind": 1, "cache": 1}
    assert w.metrics.touch_writes == {"written": 1}


async def test_writes_behind_that_fail_are_counted_and_the_touch_still_answered(
    w: World,
) -> None:
    token = await w.create()
    assert (await w.svc.validate(token)).valid
    w.store.unavailable = True  # Postgres down: the cache still answers
    for _ in range(3):
        assert not (await w.svc.touch(token=token)).written
        await until(lambda: not w.svc.toucher._behind)
    assert w.metrics.touches == {"behind": 3}
    assert w.metrics.touch_writes == {"failed": 3}  # the quiet period never began
    w.store.unavailable = False
    await w.svc.touch(token=token)
    await until(lambda: not w.svc.toucher._behind)
    await w.svc.touch(token=token)
    assert w.metrics.touches == {"behind": 4, "cache": 1}
    assert w.metrics.touch_writes == {"failed": 3, "written": 1}


async def test_a_coalesced_statement_is_counted_coalesced(w: World) -> None:
    token = await w.create()
    assert (await w.svc.touch(token=token)).written
    w.svc.toucher._quiet.clear()  # as if another replica wrote it: this one does not know
    w.cache.flush()  # nor does the cache vouch: the store answers
    assert not (await w.svc.touch(token=token)).written
    assert w.metrics.touches == {"store": 2}
    assert w.metrics.touch_writes == {"written": 1, "coalesced": 1}


async def test_revoked_and_unknown_sessions_are_counted_refused(w: World) -> None:
    token = await w.create()
    assert (await w.svc.touch(token=token)).written
    assert (await w.svc.invalidate(token=token)).revoked_count == 1
    with pytest.raises(SessionNotLive):
        await w.svc.touch(token=token)
    with pytest.raises(SessionNotFound):
        await w.svc.touch(session_id=str(uuid.uuid4()))
    with pytest.raises(SessionNotFound):  # not one of our tokens: no statement, not counted
        await w.svc.touch(token="sat_" + "A" * 48)
    assert w.metrics.touches == {"store": 3}
    assert w.metrics.touch_writes == {"written": 1, "refused": 2}
