"""The Redis breaker with the runbook's default knobs, under steady 16-way load
through a real gRPC server: Redis killed or frozen after seconds of healthy
traffic (a window full of successes), and callers whose deadlines are shorter
than the breaker's timeout.

What they catch is a breaker that never opens (the window rule alone, measured
in issue 10: never within a 6-8 s outage), one that lets many failing Redis
calls through before it opens or after, or a validation that pays two or three
Redis timeouts (3 s measured before). Opening is judged by counts (Redis
failures counted by the server before and after it opened) and order, not by
how many seconds a busy machine took; the one time bound left is the
per-validation backstop of one timeout plus room."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from uuid import uuid4

import grpc
import pytest
import pytest_asyncio

from session_authority.bootstrap import App
from session_authority.core.breaker import BreakerPolicy, BreakerState
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from .support import NO_PROXY, app_settings

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.asyncio]

BREAKER = BreakerPolicy()  # every knob at its default (the runbook's)
TIMEOUT = BREAKER.timeout
CONCURRENCY = 16


@dataclass
class Call:
    started: float
    seconds: float
    code: str
    valid: bool | None = None


@dataclass
class World:
    app: App
    redis: EmbeddedRedis
    stub: pb_grpc.SessionAuthorityAsyncStub
    live: list[str]
    opened_at: list[float] = field(default_factory=list)
    #: The server's count of failed Redis calls (``CacheStats.errors``) when the
    #: breaker opened, and when the fault was injected.
    errors_at_open: list[int] = field(default_factory=list)
    #: Redis calls still running through the breaker when it opened.
    in_flight_at_open: list[int] = field(default_factory=list)
    errors_at_fault: list[int] = field(default_factory=list)


@contextlib.asynccontextmanager
async def _world(
    postgres: EmbeddedPostgres, redis: EmbeddedRedis, **overrides: object
) -> AsyncIterator[World]:
    # Every breaker knob at its default: timeout 1 s, 70 %, volume 10, window
    # 10 s, reset 15 s, 5 failures in a row, slow call 100 ms.
    app = await App.start(app_settings(postgres.url, redis.url, **overrides))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=NO_PROXY)
    stub = pb_grpc.SessionAuthorityStub(channel)
    user = f"user-{uuid4().hex[:8]}"
    live = [
        (await stub.CreateSession(pb.CreateSessionRequest(user_id=user))).token for _ in range(32)
    ]
    w = World(app, redis, stub, live)

    def opened(_old: BreakerState, new: BreakerState, _cause: str) -> None:
        if new is BreakerState.OPEN:
            w.opened_at.append(time.monotonic())
            w.errors_at_open.append(app.core.stats.errors)
            w.in_flight_at_open.append(app.core.breaker.calls_in_flight)

    app.core.breaker.add_listener(opened)
    try:
        yield w
    finally:
        await channel.close()
        with contextlib.suppress(RuntimeError):  # killed: nothing to resume
            redis.resume()
        await app.stop(0)


@pytest_asyncio.fixture
async def world(own_postgres: EmbeddedPostgres, own_redis: EmbeddedRedis) -> AsyncIterator[World]:
    async with _world(own_postgres, own_redis) as w:
        yield w


@pytest_asyncio.fixture
async def world_without_l1(
    own_postgres: EmbeddedPostgres, own_redis: EmbeddedRedis
) -> AsyncIterator[World]:
    """As ``world``, but every validation asks Redis (no L1 cache): Redis calls
    are in flight whenever the process stalls."""
    async with _world(own_postgres, own_redis, l1_cache_ttl_ms=0) as w:
        yield w


async def drive(
    w: World, seconds: float, *, deadline: float = 5.0, at: Callable[[], object] | None = None
) -> tuple[list[Call], float]:
    """Validate live tokens from 16 callers for ``seconds``; ``at`` (a fault)
    runs once a third of the way in. Returns the calls and when the fault hit."""
    calls: list[Call] = []
    stop_at = time.monotonic() + seconds
    fault_at = [0.0]

    async def caller(offset: int) -> None:
        i = offset
        while time.monotonic() < stop_at:
            token = w.live[i % len(w.live)]
            i += 1
            started = time.monotonic()
            try:
                reply = await w.stub.ValidateSession(
                    pb.ValidateSessionRequest(token=token), timeout=deadline
                )
            except grpc.aio.AioRpcError as exc:
                calls.append(Call(started, time.monotonic() - started, exc.code().name))
                continue
            calls.append(Call(started, time.monotonic() - started, "OK", reply.valid))

    async def fault() -> None:
        await asyncio.sleep(seconds / 3)
        fault_at[0] = time.monotonic()
        w.errors_at_fault.append(w.app.core.stats.errors)
        if at is not None:
            await asyncio.to_thread(at)

    await asyncio.gather(fault(), *(caller(n) for n in range(CONCURRENCY)))
    return calls, fault_at[0]


def _check_shielded(w: World, calls: list[Call], fault_at: float) -> None:
    codes = Counter(c.code for c in calls)
    assert codes == {"OK": len(calls)}, codes  # zero failed calls
    assert all(c.valid for c in calls)  # zero wrong answers
    assert w.opened_at, "the breaker never opened"
    assert w.opened_at[0] >= fault_at, "the breaker opened under healthy load, before the fault"
    # It opened on the run of failures: at most the calls in flight when Redis
    # went (one per caller) and the run itself failed before it did.
    failed_before = w.errors_at_open[0] - w.errors_at_fault[0]
    assert 1 <= failed_before <= CONCURRENCY + BREAKER.consecutive_failures, failed_before
    # Once open, no call reaches Redis: the only failures counted since are the
    # calls that were in flight when it opened (and the call that opened it,
    # counted just after), never a call that started later.
    failed_after = w.app.core.stats.errors - w.errors_at_open[0]
    assert failed_after <= w.in_flight_at_open[0] + 1, (failed_after, w.in_flight_at_open)
    slowest = max(c.seconds for c in calls)
    assert slowest < TIMEOUT + 0.75, f"a validation took {slowest:.2f}s: more than one timeout"
    once_open = [c for c in calls if c.started > w.opened_at[0]]
    assert len(once_open) > 100


async def test_redis_killed_after_a_healthy_window_opens_the_breaker_within_two_seconds(
    world: World,
) -> None:
    calls, fault_at = await drive(world, 6.0, at=world.redis.kill)
    _check_shielded(world, calls, fault_at)
    assert world.app.core.breaker.state is not BreakerState.CLOSED  # Redis is still dead


async def test_redis_frozen_after_a_healthy_window_opens_the_breaker_within_two_seconds(
    world: World,
) -> None:
    calls, fault_at = await drive(world, 6.0, at=world.redis.pause)
    _check_shielded(world, calls, fault_at)


async def test_callers_with_short_deadlines_are_served_once_a_freeze_is_detected(
    world: World,
) -> None:
    """300 ms deadlines, shorter than the 1 s Redis timeout: each Redis call is
    cancelled by the caller's deadline, and counts as a slow call. The breaker
    must still open, and once it has, no call waits on Redis again: judged by
    the server's count of failed Redis calls and by which codes callers got
    after it opened, not by how many beat 300 ms on a busy machine (a loaded
    machine misses such deadlines whatever the server does)."""
    calls, fault_at = await drive(world, 7.0, deadline=0.3, at=world.redis.pause)
    assert world.opened_at, "the breaker never opened"
    opened = world.opened_at[0]
    assert opened >= fault_at, "the breaker opened under healthy load, before the fault"
    # Once open, no call reaches Redis: the only Redis failures counted since
    # are the calls in flight when it opened (and the one that opened it).
    failed_after = world.app.core.stats.errors - world.errors_at_open[0]
    assert failed_after <= world.in_flight_at_open[0] + 1, (failed_after, world.in_flight_at_open)
    once_open = [c for c in calls if c.started > opened]
    assert len(once_open) > 100
    codes = Counter(c.code for c in once_open)
    # Served from Postgres (or L1): nothing but answers and, on a busy machine,
    # a missed 300 ms deadline; and most callers are answered (with the frozen
    # Redis still in the path, none of them would be).
    assert set(codes) <= {"OK", "DEADLINE_EXCEEDED"}, codes
    assert codes["OK"] > len(once_open) / 2, codes
    assert all(c.valid for c in calls if c.code == "OK")


async def test_a_stalled_process_does_not_open_the_breaker_of_a_healthy_redis(
    world_without_l1: World,
) -> None:
    """The whole machine stops for twice the Redis timeout with 16 Redis calls in
    flight (what every full `make bench` saw: all processes stalled at once),
    and our process runs again a moment before Redis does. Its timers are
    long overdue and fire before Redis answers; Redis was never at fault, so
    the breaker must stay closed, and every caller is answered."""
    w = world_without_l1
    loop = asyncio.get_running_loop()

    def stall() -> None:
        w.redis.pause()
        loop.call_soon_threadsafe(time.sleep, TIMEOUT * 2)  # blocks the event loop itself
        time.sleep(TIMEOUT * 2 + 0.05)
        w.redis.resume()

    calls, _ = await drive(w, 6.0, at=stall)
    assert w.opened_at == [], "a healthy Redis's breaker opened on the process's own stall"
    codes = Counter(c.code for c in calls)
    assert codes == {"OK": len(calls)}, codes
    assert all(c.valid for c in calls)
    assert max(c.seconds for c in calls) >= TIMEOUT * 2  # the stall did happen mid-call
