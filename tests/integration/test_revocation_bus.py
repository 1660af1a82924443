"""``RedisRevocationBus`` on a real Redis: what counts as a lost subscription,
a lost registration, a crashed listener and a malformed message.

A machine stall freezes the process, and it wakes up to seconds of silence on
a connection that lost nothing: it must not give the subscription up (and with
it every process's L1 at once), only stop trusting it until its ping is
answered. A Redis that really stops answering must still be noticed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from session_authority.adapters.redis_bus import CHANNEL, REGISTRY, RedisRevocationBus
from session_authority.core.domain import TokenHash
from session_authority.embedded import EmbeddedRedis
from session_authority.observability.collector import BusCollector

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

LIVENESS = 1.0
Told = list[list[TokenHash] | None]


class Jumps:
    """A monotonic clock that can jump ahead, as a frozen process's does."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.ahead


async def _until(check: Callable[[], bool], within: float) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < within, "condition never held"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def _live(feed: RedisRevocationBus) -> bool:
    return feed.live


@pytest_asyncio.fixture
async def bus(own_redis: EmbeddedRedis) -> AsyncIterator[tuple[RedisRevocationBus, Told, Jumps]]:
    told: Told = []
    clock = Jumps()
    bus = RedisRevocationBus.from_url(
        own_redis.url,
        timeout=1.0,
        on_revoked=told.append,
        ack_timeout=1.0,
        liveness=LIVENESS,
        clock=clock,
    )
    bus.start()
    await asyncio.wait_for(bus.subscribed_once.wait(), 5)
    try:
        yield bus, told, clock
    finally:
        await bus.aclose()


async def test_a_process_frozen_past_the_liveness_keeps_its_subscription(
    bus: tuple[RedisRevocationBus, Told, Jumps],
) -> None:
    feed, told, clock = bus
    await _until(lambda: feed.live, 2)
    assert (feed.subscriptions, told) == (1, [None])  # the drop on subscribing
    clock.ahead += 5 * LIVENESS  # the process was frozen for 5 s
    assert not feed.live  # not trusted until Redis answers again...
    await _until(lambda: feed.live, LIVENESS)  # ...which it does at the next ping
    await asyncio.sleep(2 * LIVENESS)
    assert _live(feed)  # (a call: mypy would keep the narrowing from above)
    assert (feed.subscriptions, told) == (1, [None])  # nothing given up, nothing dropped


async def test_a_redis_that_stops_answering_is_given_up(
    own_redis: EmbeddedRedis,
    bus: tuple[RedisRevocationBus, Told, Jumps],
) -> None:
    feed, told, _ = bus
    await _until(lambda: feed.live, 2)
    own_redis.pause()
    try:
        await _until(lambda: not feed.live, 2 * LIVENESS)
        # Given up (and the owner told to forget) within the liveness and a
        # quarter of it after the last pong, plus a ping period's slack.
        await _until(lambda: len(told) == 2, 2 * LIVENESS)
        assert told == [None, None]
    finally:
        own_redis.resume()
    await _until(lambda: feed.live and feed.subscriptions == 2, 5)
    assert told == [None, None, None]  # and again on subscribing anew


async def test_an_acknowledgement_to_a_frozen_redis_is_given_up(
    own_redis: EmbeddedRedis,
    bus: tuple[RedisRevocationBus, Told, Jumps],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A revocation heard just before Redis froze: the copies are dropped at
    once, and the acknowledgement is given up after the publisher's own wait
    (``ack_timeout``), not held until Redis answers again. (The message is
    handed to the bus directly: on a live Redis it would be acknowledged
    before the test could freeze it.)"""
    feed, told, _ = bus
    await _until(lambda: feed.live, 2)
    digest = "ab" * 32
    own_redis.pause()
    try:
        feed._handle({"type": "message", "channel": CHANNEL, "data": f"other|req|{digest}"})
        assert told[-1] == [TokenHash(digest)]  # dropped before anything is awaited
        # One task sends every acknowledgement due (batched): without the
        # bound it would wait until Redis resumes.
        took = await _until(lambda: "Revocation ack Error: TimeoutError" in caplog.text, 3.0)
        assert took < 1.0 + 0.5  # ack_timeout, and slack
        assert "Revocation ack Error: TimeoutError" in caplog.text
    finally:
        own_redis.resume()


async def test_a_registration_that_disappears_drops_every_copy(
    own_redis: EmbeddedRedis,
    bus: tuple[RedisRevocationBus, Told, Jumps],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The registry flushed (or this process's entry removed by a publisher
    after it lapsed): some publisher may have published without waiting for
    this process, so it forgets everything before its new registration counts."""
    feed, told, _ = bus
    await _until(lambda: feed.live, 2)
    raw = aioredis.Redis.from_url(own_redis.url)
    try:
        assert await raw.hget(REGISTRY, feed.process_id) is not None  # registered
        await raw.delete(REGISTRY)
        await _until(lambda: len(told) == 2, 2 * LIVENESS)  # at the next heartbeat
        assert told == [None, None]
        assert "Revocation bus registration was lost" in caplog.text
        await _until(lambda: feed.live, 2 * LIVENESS)
        assert feed.subscriptions == 1  # the subscription itself was never given up
    finally:
        await raw.aclose()


async def test_a_crash_of_the_listener_is_restarted_logged_and_shown(
    own_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever ends the listener (here: the owner's callback raising on a
    message), it is logged, counted and started again: the bus is live again."""
    crashes = [RuntimeError("owner blew up")]

    def on_revoked(hashes: list[TokenHash] | None) -> None:
        if hashes is not None and crashes:
            raise crashes.pop()

    feed = RedisRevocationBus.from_url(
        own_redis.url, timeout=1.0, on_revoked=on_revoked, ack_timeout=1.0, liveness=LIVENESS
    )
    feed.start()
    raw = aioredis.Redis.from_url(own_redis.url)
    try:
        await _until(lambda: feed.live, 5)
        await raw.publish(CHANNEL, f"other|req|{'ab' * 32}")
        await _until(lambda: feed.restarts == 1, 5)
        assert "Revocation bus crashed" in caplog.text
        await _until(lambda: feed.live and feed.subscriptions == 2, 5)
        registry = BusCollector(feed)
        samples = {s.name: s.value for m in registry.collect() for s in m.samples}
        assert samples["revocation_bus_restarts_total"] == 1
        assert samples["revocation_bus_live"] == 1
    finally:
        await raw.aclose()
        await feed.aclose()


async def test_malformed_messages_are_counted_in_the_metrics(
    own_redis: EmbeddedRedis, bus: tuple[RedisRevocationBus, Told, Jumps]
) -> None:
    feed, told, _ = bus
    await _until(lambda: feed.live, 2)
    raw = aioredis.Redis.from_url(own_redis.url)
    try:
        for garbage in (b"\xff\xfe", b"|||", b"a|b|c"):
            await raw.publish(CHANNEL, garbage)
        await _until(lambda: feed.malformed == 3, 2)
        samples = {s.name: s.value for m in BusCollector(feed).collect() for s in m.samples}
        assert samples["revocation_bus_malformed_messages_total"] == 3
        assert told == [None] * 4  # the drop on subscribing, then one per message
        assert feed.live and feed.restarts == 0
    finally:
        await raw.aclose()


async def test_a_process_whose_registration_cannot_be_renewed_stops_answering_from_l1(
    own_redis: EmbeddedRedis, bus: tuple[RedisRevocationBus, Told, Jumps]
) -> None:
    """Redis refuses writes for a while (``CLIENT PAUSE … WRITE``): pongs keep
    arriving on the subscription, but the registration cannot be renewed, so
    publishers may soon stop waiting for this process. It must stop answering
    from L1 within half the registration's life (``2 * liveness``) of the
    last renewal it sent, before any publisher can ignore it (``4 * liveness``)."""
    feed, _, _ = bus
    await _until(lambda: feed.live, 2)
    raw = aioredis.Redis.from_url(own_redis.url)
    try:
        await raw.client_pause(int(4 * LIVENESS * 1000), all=False)  # writes only
        # Not live before a publisher could ignore it: the wait below is that bound.
        await _until(lambda: not feed.live, 4 * LIVENESS)
        assert feed.state == "registering"  # heard from all along, not registered
        await raw.client_unpause()
        await _until(lambda: feed.live, 2 * LIVENESS)
        assert feed.subscriptions == 1
    finally:
        await raw.aclose()
