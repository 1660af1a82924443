"""XFetch early refresh on the fakes: hot entries are reloaded in the
background shortly before they expire, never far from expiry, and a refresh
can never resurrect a revoked session."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from session_authority.core.assembly import assemble_core
from session_authority.core.breaker import Breaker, BreakerPolicy
from session_authority.core.domain import Reason, Source, TokenHash
from session_authority.core.policy import CorePolicy
from session_authority.core.ports import CachedVerdict

from .fakes import FakeClock, InMemorySessionCache, InMemorySessionStore, until

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(5)]


class World:
    def __init__(self, early_refresh: float, rng: Callable[[], float] | None = None) -> None:
        self.clock = FakeClock()
        self.store = InMemorySessionStore(self.clock.now)
        self.cache = InMemorySessionCache(self.clock.monotonic)
        self.breaker = Breaker(BreakerPolicy(timeout=0.05), clock=self.clock.monotonic)
        self.svc = assemble_core(
            self.store,
            self.cache,
            breaker=self.breaker,
            policy=CorePolicy(cache_ttl=300, ttl_jitter=0, early_refresh=early_refresh),
            clock=self.clock.now,
            rng=rng or random.Random(1).random,
        )

    async def cached_token(self) -> tuple[str, TokenHash]:
        token, session = await self.svc.create(f"user-{uuid.uuid4().hex}", None, {})
        assert (await self.svc.validate(token)).source is Source.DATABASE  # filled now
        return token, session.token_hash


@pytest_asyncio.fixture
async def world() -> AsyncIterator[World]:
    w = World(early_refresh=3.0)
    yield w
    if w.store.gate is not None:
        w.store.gate.set()
    await w.svc.aclose()


async def test_hits_far_from_expiry_never_refresh(world: World) -> None:
    token, _ = await world.cached_token()
    finds = world.store.calls["find"]
    world.clock.advance(240)  # 60 s left of 300: P(refresh) = exp(-20) per hit
    for _ in range(2000):
        assert (await world.svc.validate(token)).source is Source.CACHE
    await asyncio.sleep(0)
    assert world.store.calls["find"] == finds
    assert world.svc.stats.early_refreshes == 0


async def test_a_hit_just_before_expiry_refreshes_in_the_background(world: World) -> None:
    token, token_hash = await world.cached_token()
    finds = world.store.calls["find"]
    world.clock.advance(300 - 0.01)  # 10 ms left: P(refresh) = exp(-0.01 / 3) per hit
    answer = await world.svc.validate(token)
    assert (answer.valid, answer.source) == (True, Source.CACHE)  # answered at once
    await until(lambda: world.store.calls["find"] == finds + 1)
    await until(lambda: (world.cache.remaining_ttl(token_hash) or 0) > 299)
    assert world.svc.stats.early_refreshes == 1


async def test_a_refresh_loses_to_a_revocation_like_any_fill(world: World) -> None:
    token, token_hash = await world.cached_token()
    world.clock.advance(300 - 0.01)
    world.store.gate = asyncio.Event()
    await world.svc.validate(token)  # triggers the refresh; its read is now held
    await world.store.wait_parked(1)
    revocation = await world.svc.invalidate(token=token)
    assert (revocation.revoked_count, revocation.cache_purged) == (1, True)
    world.store.gate.set()
    await until(lambda: not world.svc.validator.loading(token_hash))
    assert world.cache.peek(token_hash) == CachedVerdict(Reason.REVOKED)
    answer = await world.svc.validate(token)
    assert (answer.valid, answer.reason) == (False, Reason.REVOKED)


async def test_zero_disables_early_refresh() -> None:
    w = World(early_refresh=0)
    token, _ = await w.cached_token()
    finds = w.store.calls["find"]
    w.clock.advance(300 - 0.001)
    for _ in range(100):
        await w.svc.validate(token)
    await asyncio.sleep(0)
    assert w.store.calls["find"] == finds
    await w.svc.aclose()
