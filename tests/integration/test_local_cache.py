"""The in-process (L1) cache with revocations pushed over real Redis pub/sub,
between two server processes' worth of Apps sharing one Redis and Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from session_authority.adapters.redis_cache import cache_key
from session_authority.bootstrap import App
from session_authority.core.domain import TokenHash
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from .support import NO_PROXY, app_settings

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


@pytest_asyncio.fixture
async def replicas(
    own_postgres: EmbeddedPostgres, own_redis: EmbeddedRedis
) -> AsyncIterator[list[tuple[App, pb_grpc.SessionAuthorityAsyncStub]]]:
    apps: list[App] = []
    channels: list[grpc.aio.Channel] = []
    pairs: list[tuple[App, pb_grpc.SessionAuthorityAsyncStub]] = []
    try:
        for _ in range(3):
            app = await App.start(app_settings(own_postgres.url, own_redis.url))
            apps.append(app)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=NO_PROXY)
            channels.append(channel)
            pairs.append((app, pb_grpc.SessionAuthorityStub(channel)))
        yield pairs
    finally:
        for channel in channels:
            await channel.close()
        for app in apps:
            await app.stop(0)


async def _validate(
    stub: pb_grpc.SessionAuthorityAsyncStub, token: str
) -> pb.ValidateSessionResponse:
    return await stub.ValidateSession(pb.ValidateSessionRequest(token=token), timeout=5)


async def test_a_revocation_reaches_every_process_before_invalidate_returns(
    replicas: list[tuple[App, pb_grpc.SessionAuthorityAsyncStub]],
) -> None:
    _, a = replicas[0]
    token = (await a.CreateSession(pb.CreateSessionRequest(user_id="l1"))).token
    for app, stub in replicas:
        for _ in range(3):
            assert (await _validate(stub, token)).valid
        assert app.bus is not None and app.bus.live
    reply = await a.Invalidate(pb.InvalidateRequest(token=token))
    assert (reply.revoked, reply.cache_purged, reply.propagated) == (True, True, True)
    for _, stub in replicas:  # at once, on every process: no L1 copy survived
        answer = await _validate(stub, token)
        assert (answer.valid, answer.reason) == (False, pb.REASON_REVOKED)


async def test_a_process_whose_subscription_is_cut_serves_no_stale_l1_hit(
    replicas: list[tuple[App, pb_grpc.SessionAuthorityAsyncStub]], own_redis: EmbeddedRedis
) -> None:
    (_, a), (b_app, b), _ = replicas
    token = (await a.CreateSession(pb.CreateSessionRequest(user_id="cut"))).token
    for _ in range(3):
        assert (await _validate(b, token)).valid  # b holds an L1 copy
    raw = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        # Every subscription is cut (as a Redis restart or a network blip would),
        # then the session is revoked behind the bus's back: a tombstone straight
        # into Redis, no push. Once b has noticed (it resubscribes at once, and
        # forgets its copies on the way), it must not answer from L1.
        assert b_app.bus is not None
        subscriptions = b_app.bus.subscriptions
        assert await raw.client_kill_filter(_type="pubsub") >= 1
        key = cache_key(TokenHash.of(token))
        await raw.delete(key)
        await raw.hset(key, mapping={"state": "revoked", "h": TokenHash.of(token).hex[:16]})
        deadline = time.monotonic() + 5
        while b_app.bus.subscriptions == subscriptions:
            assert time.monotonic() < deadline, "the cut subscription was never noticed"
            await asyncio.sleep(0.01)
        for _ in range(20):
            answer = await _validate(b, token)
            assert (answer.valid, answer.reason) == (False, pb.REASON_REVOKED)
        assert b_app.bus.live
    finally:
        with contextlib.suppress(Exception):
            await raw.aclose()


def _sample(app: App, name: str, **labels: str) -> float:
    assert app.telemetry is not None
    value = app.telemetry.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_a_hot_copy_is_renewed_from_redis_and_picks_up_what_redis_says(
    own_postgres: EmbeddedPostgres, own_redis: EmbeddedRedis
) -> None:
    """Hit without pause, a session's L1 copy is replaced from Redis before it
    expires: no validation waits for Redis after the first, yet Redis is read
    (the renewals), and a tombstone written straight into Redis (no push: a
    revocation this process did not hear) is picked up within a copy's life."""
    ttl_ms = 1000
    app = await App.start(app_settings(own_postgres.url, own_redis.url, l1_cache_ttl_ms=ttl_ms))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=NO_PROXY)
    raw = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        stub = pb_grpc.SessionAuthorityStub(channel)
        token = (await stub.CreateSession(pb.CreateSessionRequest(user_id="renew"))).token
        assert (await _validate(stub, token)).valid  # the fill: Redis and L1
        lookups = {
            result: _sample(app, "session_cache_lookups_total", result=result)
            for result in ("hit", "miss")
        }
        gets = _sample(app, "redis_latency_count", operation="get")
        until = time.monotonic() + 3 * ttl_ms / 1000  # three copy lives
        calls = 0
        while time.monotonic() < until:
            answer = await _validate(stub, token)
            assert (answer.valid, answer.source) == (True, pb.SOURCE_CACHE)
            calls += 1
            await asyncio.sleep(0.005)
        # Answered from L1 throughout: without renewal each expiry costs a Redis
        # lookup (3 here); one is let pass, for a machine stall longer than half a
        # copy's life (seen on shared CI machines).
        waited = sum(
            _sample(app, "session_cache_lookups_total", result=result) - before
            for result, before in lookups.items()
        )
        assert waited <= 1
        assert _sample(app, "redis_latency_count", operation="get") >= gets + 3  # renewals
        assert calls > 100
        key = cache_key(TokenHash.of(token))
        await raw.delete(key)
        await raw.hset(key, mapping={"state": "revoked", "h": TokenHash.of(token).hex[:16]})
        deadline = time.monotonic() + 2 * ttl_ms / 1000
        while (answer := await _validate(stub, token)).valid:
            assert time.monotonic() < deadline, "the tombstone in Redis was never picked up"
            await asyncio.sleep(0.005)
        assert answer.reason == pb.REASON_REVOKED
    finally:
        with contextlib.suppress(Exception):
            await raw.aclose()
        await channel.close()
        await app.stop(0)
