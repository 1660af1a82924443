"""The revocation invariant on real Redis and Postgres: once Invalidate or
InvalidateUser has returned, no validation that starts afterwards answers valid."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypedDict, Unpack, cast
from uuid import uuid4

import pytest
import pytest_asyncio

from session_authority.adapters.postgres_store import PostgresSessionStore
from session_authority.adapters.redis_cache import RedisSessionCache
from session_authority.bootstrap import assemble_core
from session_authority.core.breaker import Breaker, BreakerPolicy, BreakerState
from session_authority.core.domain import (
    Reason,
    Session,
    Source,
    TokenHash,
    Validation,
    new_token,
)
from session_authority.core.errors import RateLimited
from session_authority.core.policy import CorePolicy
from session_authority.core.ports import SessionStore
from session_authority.core.service import SessionAuthority
from session_authority.embedded import EmbeddedRedis

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


class PausableStore(PostgresSessionStore):
    """The real store, with a gate between a lookup's read and its return: the
    point where plain cache-aside loses a race against revocation."""

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn, min_size=1, max_size=10, command_timeout=5, acquire_timeout=5)
        self.read_done = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()

    async def find(self, token_hash: TokenHash) -> Session | None:
        found = await super().find(token_hash)
        self.read_done.set()
        await self.gate.wait()
        return found

    async def find_many(self, token_hashes: Sequence[TokenHash]) -> dict[TokenHash, Session]:
        found = await super().find_many(token_hashes)
        self.read_done.set()
        await self.gate.wait()
        return found


class CountingStore:
    """A ``SessionStore`` that counts the calls reaching Postgres."""

    def __init__(self, inner: SessionStore) -> None:
        self.inner = inner
        self.queries: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        self.queries[name] += 1
        return method


_CREATED: list[SessionAuthority] = []
_CACHES: list[RedisSessionCache] = []


@pytest_asyncio.fixture(autouse=True)
async def _close_cores() -> AsyncIterator[None]:
    """Cancel the background work (breaker wake-ups and probes, early refreshes)
    of every core a test made, inside the test's own event loop."""
    yield
    while _CREATED:
        core = _CREATED.pop()
        await core.aclose()
    while _CACHES:
        await _CACHES.pop().aclose()


class _BreakerKnobs(TypedDict, total=False):
    """The ``BreakerPolicy`` fields these tests tune."""

    timeout: float
    reset_timeout: float


def _core(
    store: PostgresSessionStore,
    cache: RedisSessionCache | None,
    token_factory: Callable[[], str] = new_token,
    policy: CorePolicy | None = None,
    **breaker: Unpack[_BreakerKnobs],
) -> tuple[SessionAuthority, CountingStore]:
    counting = CountingStore(store)
    core = assemble_core(
        cast(SessionStore, counting),
        cache,
        breaker=Breaker(BreakerPolicy(**breaker)),
        token_factory=token_factory,
        policy=policy,
    )
    _CREATED.append(core)
    return core, counting


async def _validated(core: SessionAuthority, token: str, bystander: str | None) -> Validation:
    """ValidateSession of ``token``, or with a ``bystander`` ValidateSessions of
    both (whose answer for the bystander must stay live)."""
    if bystander is None:
        return await core.validate(token)
    answer, other = await core.validate_many([token, bystander])
    assert other.valid, other
    return answer


@pytest.mark.parametrize("batch", [False, True], ids=["ValidateSession", "ValidateSessions"])
@pytest.mark.parametrize("revoke_all", [False, True], ids=["Invalidate", "InvalidateUser"])
async def test_a_miss_paused_between_read_and_fill_loses_to_revocation(
    pg_dsn: str, cache: RedisSessionCache, revoke_all: bool, batch: bool
) -> None:
    store = PausableStore(pg_dsn)
    core, counting = _core(store, cache)
    user = f"user-{uuid4().hex[:8]}"
    token, _ = await core.create(user, None, {})
    bystander = (await core.create(f"user-{uuid4().hex[:8]}", None, {}))[0] if batch else None
    store.gate.clear()
    miss = asyncio.create_task(_validated(core, token, bystander))
    await store.read_done.wait()  # Postgres said "valid"; the fill has not happened yet
    if revoke_all:
        assert (await core.invalidate_user(user)).revoked_count == 1
    else:
        assert (await core.invalidate(token=token)).revoked_count == 1
    store.gate.set()
    answer = await miss
    assert answer.valid is False
    assert answer.reason is Reason.REVOKED
    # ...and nothing stale was left behind for the next caller.
    again = await _validated(core, token, bystander)
    assert (again.valid, again.reason, again.source) == (False, Reason.REVOKED, Source.CACHE)
    assert counting.queries["find_many" if batch else "find"] == 1
    await store.aclose()


async def test_concurrent_validations_of_one_uncached_token_make_one_query(
    store: PostgresSessionStore, redis_server: EmbeddedRedis
) -> None:
    # 1,000 lookups queue for 10 connections: on a loaded machine that once took
    # over the 1 s pool and call timeouts, and the fill timed out with them; an
    # unconfirmed load is (rightly) not shared, so every caller read Postgres.
    # Timeouts are not what this test is about: generous ones.
    cache = RedisSessionCache.from_url(
        redis_server.url, min_connections=2, max_connections=10, timeout=10, pool_timeout=10
    )
    core, metrics = _core(store, cache, timeout=10.0)
    _CACHES.append(cache)
    token, _ = await core.create(f"user-{uuid4().hex[:8]}", None, {})
    answers = await asyncio.gather(*(core.validate(token) for _ in range(1000)))
    assert all(a.valid for a in answers)
    assert metrics.queries["find"] == 1


async def test_concurrent_batches_of_uncached_tokens_make_one_query(
    store: PostgresSessionStore, redis_server: EmbeddedRedis
) -> None:
    # As above: generous timeouts, 50 batches of 40 queue for 10 connections.
    cache = RedisSessionCache.from_url(
        redis_server.url, min_connections=2, max_connections=10, timeout=10, pool_timeout=10
    )
    core, metrics = _core(store, cache, timeout=10.0)
    _CACHES.append(cache)
    tokens = [(await core.create(f"user-{uuid4().hex[:8]}", None, {}))[0] for _ in range(20)]
    forged = [new_token() for _ in range(20)]
    batches = await asyncio.gather(*(core.validate_many(tokens + forged) for _ in range(50)))
    for answers in batches:
        assert [a.valid for a in answers] == [True] * 20 + [False] * 20
    assert (metrics.queries["find_many"], metrics.queries["find"]) == (1, 0)
    # The forged ones are negatively cached: repeats cost no query.
    for _ in range(5):
        answers = await core.validate_many(forged)
        assert {(a.reason, a.source) for a in answers} == {(Reason.UNKNOWN, Source.CACHE)}
    assert metrics.queries["find_many"] == 1


async def test_a_flood_of_random_tokens_costs_bounded_queries(
    store: PostgresSessionStore, cache: RedisSessionCache
) -> None:
    # A negative TTL longer than the test, however slow the machine: each forged
    # token's repeats must be answered by its negative entry.
    core, metrics = _core(store, cache, policy=CorePolicy(negative_ttl=120, tombstone_ttl=600))
    # Random strings never pass the token checksum: no query at all.
    garbage = [f"sat_{uuid4().hex}{uuid4().hex[:16]}" for _ in range(5000)]
    # Well-formed but unknown tokens (a forger who knows the format): one
    # query each, then the negative cache answers repeats.
    forged = [new_token() for _ in range(50)]
    for token in garbage:
        assert (await core.validate(token)).reason is Reason.UNKNOWN
    for _ in range(100):
        for token in forged:
            assert (await core.validate(token)).reason is Reason.UNKNOWN
    assert metrics.queries["find"] == len(forged)


async def test_a_flood_of_new_forged_tokens_is_bounded_per_caller(
    store: PostgresSessionStore, cache: RedisSessionCache
) -> None:
    # Each new well-formed token would be a query: the per-caller limit (default burst
    # 200, 20/s) bounds them; another caller is not affected.
    core, metrics = _core(store, cache)
    started = time.monotonic()
    refused = 0
    for _ in range(2000):
        try:
            assert (await core.validate(new_token(), caller="mallory")).reason is Reason.UNKNOWN
        except RateLimited:
            refused += 1
    elapsed = time.monotonic() - started
    assert metrics.queries["find"] <= 200 + 20 * elapsed + 1
    assert refused >= 2000 - metrics.queries["find"]
    answer = await core.validate(new_token(), caller="alice")
    assert (answer.reason, answer.source) == (Reason.UNKNOWN, Source.DATABASE)


async def test_a_new_session_is_never_hidden_by_a_negative_entry(
    store: PostgresSessionStore, cache: RedisSessionCache
) -> None:
    token = new_token()
    core, _ = _core(store, cache, token_factory=lambda: token)  # the token a negative entry is for
    assert (await core.validate(token)).reason is Reason.UNKNOWN
    await core.create(f"user-{uuid4().hex[:8]}", None, {})
    answer = await core.validate(token)
    assert answer.valid, answer


async def test_invalidate_user_of_many_sessions_is_one_pipeline(
    store: PostgresSessionStore, cache: RedisSessionCache
) -> None:
    core, _ = _core(store, cache)
    user = f"user-{uuid4().hex[:8]}"
    tokens = [(await core.create(user, timedelta(hours=1), {}))[0] for _ in range(200)]
    for token in tokens[::2]:
        await core.validate(token)  # half of them cached
    result = await core.invalidate_user(user)
    assert (result.revoked_count, result.cache_purged) == (200, True)
    answers = await asyncio.gather(*(core.validate(t) for t in tokens))
    assert {(a.valid, a.reason) for a in answers} == {(False, Reason.REVOKED)}


async def test_revocation_while_redis_is_down_is_replayed_before_redis_is_read(
    pg_dsn: str, tmp_path: Path
) -> None:
    redis = EmbeddedRedis(tmp_path)
    redis.start()
    store = PostgresSessionStore(
        pg_dsn, min_size=1, max_size=5, command_timeout=5, acquire_timeout=5
    )
    cache = RedisSessionCache.from_url(
        redis.url, min_connections=1, max_connections=5, timeout=0.3, pool_timeout=0.3
    )
    core, _ = _core(store, cache, timeout=0.3, reset_timeout=0.2)
    try:
        token, _ = await core.create(f"user-{uuid4().hex[:8]}", None, {})
        await core.validate(token)
        assert (await core.validate(token)).source is Source.CACHE  # cached as live

        redis.pause()  # frozen: calls time out rather than fail fast
        result = await core.invalidate(token=token)
        assert (result.revoked_count, result.cache_purged) == (1, False)
        # Asserted on a snapshot: on the property itself, mypy would take
        # core.breaker.state to be OPEN for the rest of the test.
        opened = core.breaker.state
        assert opened is BreakerState.OPEN
        answer = await core.validate(token)  # bypasses the (stale) cache
        assert (answer.valid, answer.reason, answer.source) == (
            False,
            Reason.REVOKED,
            Source.DATABASE,
        )
        redis.resume()

        # Keep validating until the breaker has probed and closed: never valid.
        for _ in range(200):
            answer = await core.validate(token)
            assert answer.valid is False
            if core.breaker.state is BreakerState.CLOSED and answer.source is Source.CACHE:
                break
            await asyncio.sleep(0.02)
        assert core.breaker.state is BreakerState.CLOSED
        assert (answer.reason, answer.source) == (Reason.REVOKED, Source.CACHE)
    finally:
        redis.resume()
        await cache.aclose()
        await store.aclose()
        redis.stop()


async def test_a_drain_heals_a_partial_outage_seen_only_by_the_revoking_replica(
    store: PostgresSessionStore, cache: RedisSessionCache
) -> None:
    from session_authority.embedded import find_free_port

    reader, _ = _core(store, cache)
    cut_off = RedisSessionCache.from_url(  # the revoking replica cannot reach Redis
        f"redis://127.0.0.1:{find_free_port()}/0",
        min_connections=0,
        max_connections=2,
        timeout=0.2,
        pool_timeout=0.2,
    )
    revoker, _ = _core(store, cut_off)
    await reader.replay_revocations()  # trust this Redis, as App.start does
    try:
        token, _ = await reader.create(f"user-{uuid4().hex[:8]}", None, {})
        await reader.validate(token)
        assert (await reader.validate(token)).source is Source.CACHE
        result = await revoker.invalidate(token=token)
        assert (result.revoked_count, result.cache_purged) == (1, False)
        # The documented gap: until a drain, the other replica's cache is stale.
        assert (await reader.validate(token)).valid is True
        # The revocation is pending in Postgres, not in the revoker's memory:
        # any replica's drain finishes it.
        assert await reader.drain_revocations() == 1
        assert await reader.drain_revocations() == 0
        answer = await reader.validate(token)
        assert (answer.valid, answer.reason, answer.source) == (False, Reason.REVOKED, Source.CACHE)
    finally:
        await cut_off.aclose()


async def test_a_revoker_whose_breaker_is_open_still_tombstones_a_healthy_redis(
    store: PostgresSessionStore, cache: RedisSessionCache
) -> None:
    """Replica A's breaker opened for A alone (its own loop starved, say), while
    replica B keeps reading the same, healthy Redis. A revocation on A must
    reach Redis before A answers, or B would serve the cached session until
    its next drain."""
    a, _ = _core(store, cache)
    b, _ = _core(store, cache)
    token, _ = await a.create(f"user-{uuid4().hex[:8]}", None, {})
    await b.validate(token)
    assert (await b.validate(token)).source is Source.CACHE  # B reads it from Redis
    a.breaker.trip("this replica's calls were slow")
    result = await a.invalidate(token=token)
    assert (result.revoked_count, result.cache_purged) == (1, True)
    assert a.breaker.state is BreakerState.OPEN  # A keeps off Redis until its probe
    answer = await b.validate(token)
    assert (answer.valid, answer.reason, answer.source) == (False, Reason.REVOKED, Source.CACHE)


async def test_redis_killed_mid_batch_postgres_answers_degraded_and_fails_closed(
    store: PostgresSessionStore, own_redis: EmbeddedRedis
) -> None:
    cache = RedisSessionCache.from_url(
        own_redis.url, min_connections=1, max_connections=5, timeout=0.5, pool_timeout=0.5
    )
    _CACHES.append(cache)
    core, _ = _core(store, cache, timeout=0.5, reset_timeout=60.0)
    await core.replay_revocations()  # trust this Redis, as App.start does
    user = f"user-{uuid4().hex[:8]}"
    tokens = [(await core.create(user, None, {}))[0] for _ in range(3)]
    await core.validate_many(tokens)
    assert {a.source for a in await core.validate_many(tokens)} == {Source.CACHE}
    assert (await core.invalidate(token=tokens[1])).cache_purged is True
    batch = [*tokens, new_token()]
    own_redis.pause()  # the batch's lookup goes out to a frozen Redis...
    answering = asyncio.create_task(core.validate_many(batch))
    await asyncio.sleep(0.1)  # (only to let it go out; nothing is timed)
    own_redis.kill()  # ...which dies under it: the lookup fails, Postgres answers
    answers = await answering
    expected = [
        (True, None, Source.DATABASE, True),
        (False, Reason.REVOKED, Source.DATABASE, True),
        (True, None, Source.DATABASE, True),
        (False, Reason.UNKNOWN, Source.DATABASE, True),
    ]
    assert [(a.valid, a.reason, a.source, a.degraded) for a in answers] == expected
    # With Redis gone, revocations still hold: Postgres first, the breaker opens.
    assert (await core.invalidate(token=tokens[2])).cache_purged is False
    assert core.breaker.state is BreakerState.OPEN
    answers = await core.validate_many(batch)
    expected[2] = (False, Reason.REVOKED, Source.DATABASE, True)
    assert [(a.valid, a.reason, a.source, a.degraded) for a in answers] == expected
