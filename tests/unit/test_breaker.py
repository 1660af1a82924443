"""The Redis circuit breaker: the runbook's (opossum's) semantics on an injected clock.

Every test drives time by hand through ``FakeClock.monotonic``; the only real
time that passes is the per-call timeout in the timeout test (a few ms).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import aiobreaker.circuitbreaker
import pytest
import pytest_asyncio

from session_authority.core.breaker import Breaker, BreakerPolicy, BreakerState
from session_authority.core.errors import (
    CacheBusy,
    CacheUnavailable,
    SessionAuthorityError,
    StoreBusy,
    StoreTimeout,
    StoreUnavailable,
)

from .fakes import FakeClock, until

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
pytestmark = pytest.mark.timeout(5)

POLICY = BreakerPolicy()  # timeout 1 s, 70 %, volume 10, reset 15 s, window 10 s / 10 buckets
#: The runbook's window rule alone (no run-of-failures rule), to test it in isolation.
WINDOW_ONLY = BreakerPolicy(consecutive_failures=0)


class Op:
    """A guarded operation that counts its calls; optionally fails or waits."""

    def __init__(
        self,
        result: object = "ok",
        error: BaseException | None = None,
        gate: asyncio.Event | None = None,
    ) -> None:
        self.result = result
        self.error = error
        self.gate = gate
        self.calls = 0
        self.finished = 0

    async def __call__(self) -> object:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        self.finished += 1
        if self.error is not None:
            raise self.error
        return self.result


class Transitions:
    def __init__(self, breaker: Breaker) -> None:
        self.seen: list[tuple[BreakerState, BreakerState, str]] = []
        breaker.add_listener(lambda old, new, cause: self.seen.append((old, new, cause)))

    @property
    def states(self) -> list[BreakerState]:
        return [new for _, new, _ in self.seen]


async def fail(breaker: Breaker, times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(CacheUnavailable):
            await breaker.call(Op(error=CacheUnavailable("boom")))


async def succeed(breaker: Breaker, times: int = 1, result: object = "ok") -> None:
    for _ in range(times):
        assert await breaker.call(Op(result)) == result


Make = Callable[..., tuple[Breaker, FakeClock]]


@pytest_asyncio.fixture
async def make() -> AsyncIterator[Make]:
    """Builds breakers on fresh fake clocks; closes them (probe and wake-up tasks) after."""
    made: list[Breaker] = []

    def factory(
        policy: BreakerPolicy = POLICY,
        probe: Callable[[], Awaitable[None]] | None = None,
        error: type[SessionAuthorityError] = CacheUnavailable,
    ) -> tuple[Breaker, FakeClock]:
        clock = FakeClock()
        made.append(Breaker(policy, clock=clock.monotonic, probe=probe, error=error))
        return made[-1], clock

    yield factory
    for breaker in made:
        await breaker.aclose()


# --- policy ------------------------------------------------------------------------------


def test_policy_defaults_are_the_runbook_knobs() -> None:
    assert (POLICY.timeout, POLICY.error_threshold_percentage, POLICY.reset_timeout) == (
        1.0,
        70.0,
        15.0,
    )
    assert (POLICY.rolling_window, POLICY.buckets, POLICY.volume_threshold) == (10.0, 10, 10)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout": 0},
        {"reset_timeout": -1},
        {"rolling_window": 0},
        {"error_threshold_percentage": 0},
        {"error_threshold_percentage": 100.1},
        {"buckets": 0},
        {"volume_threshold": 0},
        {"consecutive_failures": -1},
        {"slow_call": 0},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must"):
        BreakerPolicy(**kwargs)  # type: ignore[arg-type]


# --- closed: the rolling window ------------------------------------------------------------


@pytest.mark.asyncio
async def test_stays_closed_below_the_volume_threshold_even_at_100_percent_errors(
    make: Make,
) -> None:
    breaker, _ = make(WINDOW_ONLY)
    await fail(breaker, POLICY.volume_threshold - 1)
    assert breaker.state is CLOSED
    op = Op(error=CacheUnavailable("boom"))
    with pytest.raises(CacheUnavailable):
        await breaker.call(op)
    assert op.calls == 1  # the tenth call was still attempted ...
    assert breaker.state is OPEN  # ... and it opened the breaker


@pytest.mark.asyncio
async def test_opens_exactly_at_the_threshold_percentage(make: Make) -> None:
    breaker, _ = make(WINDOW_ONLY)
    await succeed(breaker, 3)
    await fail(breaker, 6)  # 6/9: volume not reached
    assert breaker.state is CLOSED
    await fail(breaker)  # 7/10 = 70 %
    assert breaker.state is OPEN
    assert breaker.opened_count == 1


@pytest.mark.asyncio
async def test_stays_closed_under_the_threshold_percentage_with_volume(make: Make) -> None:
    breaker, _ = make(WINDOW_ONLY)
    await succeed(breaker, 4)
    await fail(breaker, 6)  # 60 %
    await fail(breaker)  # 7/11 = 64 %
    assert breaker.state is CLOSED
    assert breaker.opened_count == 0


@pytest.mark.asyncio
async def test_failures_need_not_be_consecutive(make: Make) -> None:
    # aiobreaker counts consecutive failures; the runbook counts a percentage.
    breaker, _ = make()
    for failed in [True, True, False, True, True, True, False, True, True]:
        if failed:
            await fail(breaker)
        else:
            await succeed(breaker)
    assert breaker.state is CLOSED
    await fail(breaker)  # 8/10
    assert breaker.state is OPEN


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("later", "expected"),
    [(9.5, OPEN), (10.0, CLOSED), (25.0, CLOSED)],
    ids=["same-window", "first-bucket-rolled-out", "long-after"],
)
async def test_old_buckets_roll_out_of_the_window(
    make: Make, later: float, expected: BreakerState
) -> None:
    breaker, clock = make(WINDOW_ONLY)
    await fail(breaker, 9)
    clock.advance(later)
    await fail(breaker)
    assert breaker.state is expected


# --- closed: a run of failures ------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_run_of_failures_opens_it_whatever_the_window_holds(make: Make) -> None:
    breaker, _ = make()
    await succeed(breaker, 1000)  # seconds of healthy traffic fill the window
    await fail(breaker, POLICY.consecutive_failures - 1)
    assert breaker.state is CLOSED  # 4/1004 failed: the window rule alone never opens
    await fail(breaker)
    assert breaker.state is OPEN


@pytest.mark.asyncio
async def test_a_success_ends_the_run(make: Make) -> None:
    breaker, _ = make()
    for _ in range(50):
        await fail(breaker, POLICY.consecutive_failures - 1)
        await succeed(breaker, 4)  # never 70 % of the window: at most 8 of 12
    assert breaker.state is CLOSED


@pytest.mark.asyncio
async def test_zero_disables_the_run_rule(make: Make) -> None:
    breaker, _ = make(WINDOW_ONLY)
    await succeed(breaker, 1000)
    await fail(breaker, 50)
    assert breaker.state is CLOSED


@pytest.mark.asyncio
async def test_a_call_cancelled_by_its_caller_after_a_slow_start_is_a_failure(
    make: Make,
) -> None:
    """A caller's deadline shorter than ``timeout`` cancels the call before the
    breaker's own timeout fires: without this rule nothing would ever trip."""
    breaker, clock = make()
    for _ in range(POLICY.consecutive_failures):
        gate = asyncio.Event()
        call = asyncio.create_task(breaker.call(Op(gate=gate)))
        await until(lambda: breaker.calls_in_flight == 1)
        clock.advance(POLICY.slow_call)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    assert breaker.state is OPEN


@pytest.mark.asyncio
async def test_a_call_cancelled_quickly_is_not_counted(make: Make) -> None:
    breaker, clock = make()
    for _ in range(POLICY.consecutive_failures * 3):
        gate = asyncio.Event()
        call = asyncio.create_task(breaker.call(Op(gate=gate)))
        await until(lambda: breaker.calls_in_flight == 1)
        clock.advance(POLICY.slow_call / 2)  # the caller went away; the dependency is fine
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    assert breaker.state is CLOSED


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["cancelled", "timeout"])
async def test_a_slow_call_is_excused_while_other_calls_are_answered(make: Make, how: str) -> None:
    """The process, not the dependency, made it wait (both cores saturated, h2load
    hanging up on its in-flight calls): other calls were answered meanwhile, so
    it fails for its caller but does not count. Before this rule, the 64 calls
    in flight when a load run ended opened a healthy Redis's breaker."""
    policy = BreakerPolicy(timeout=0.05)
    breaker, clock = make(policy)
    for _ in range(policy.consecutive_failures * 3):
        gate = asyncio.Event()
        call = asyncio.create_task(breaker.call(Op(gate=gate)))
        await until(lambda: breaker.calls_in_flight == 1)
        await succeed(breaker)  # answered while the slow one waits
        if how == "cancelled":
            clock.advance(policy.slow_call)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        else:
            with pytest.raises(CacheUnavailable, match="timed out"):
                await call
    assert breaker.state is CLOSED
    assert breaker.slow_excused == policy.consecutive_failures * 3
    # Nothing answered meanwhile: the same slow calls count again.
    for _ in range(policy.consecutive_failures):
        call = asyncio.create_task(breaker.call(Op(gate=asyncio.Event())))
        await until(lambda: breaker.calls_in_flight == 1)
        clock.advance(policy.slow_call)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    assert breaker.state is OPEN


class _Stalled:
    """An operation during which the whole process stops for ``pause`` seconds
    of the fake clock (a stalled machine): it never answers in time."""

    def __init__(self, clock: FakeClock, pause: float) -> None:
        self.clock, self.pause = clock, pause

    async def __call__(self) -> object:
        self.clock.advance(self.pause)
        await asyncio.Event().wait()
        return None


@pytest.mark.asyncio
async def test_a_timeout_that_fired_late_is_excused(make: Make) -> None:
    """Every process on the machine stopped for a second or two at once (seen in
    make bench): the timers fire late, nothing was the dependency's fault."""
    policy = BreakerPolicy(timeout=0.02)
    breaker, clock = make(policy)
    for _ in range(policy.consecutive_failures * 2):
        with pytest.raises(CacheUnavailable, match="timed out"):
            await breaker.call(_Stalled(clock, policy.timeout * 2))
    assert breaker.state is CLOSED
    assert breaker.slow_excused == policy.consecutive_failures * 2
    for _ in range(policy.consecutive_failures):  # on time: a frozen dependency
        with pytest.raises(CacheUnavailable, match="timed out"):
            await breaker.call(_Stalled(clock, policy.timeout))
    assert breaker.state is OPEN


class _WokenLate:
    """Answers a little after its timeout; with ``stall``, the process was
    frozen meanwhile (the breaker's clock jumped), as after a machine stall."""

    def __init__(self, clock: FakeClock, stall: float) -> None:
        self.clock, self.stall = clock, stall

    async def __call__(self) -> object:
        self.clock.advance(self.stall)
        await asyncio.sleep(POLICY_LATE.timeout * 1.1)
        return "answered"


#: Long enough that the answer (at 1.1 timeouts) lands 80 ms after the timeout
#: and 120 ms before the grace ends: margins a loaded machine keeps.
POLICY_LATE = BreakerPolicy(timeout=0.8)


@pytest.mark.asyncio
async def test_a_call_whose_timeout_fired_late_gets_a_grace_to_finish(make: Make) -> None:
    """After a stall the answer is usually already in the socket: the call gets
    a quarter of its timeout more (here 0.2 s; it answers 0.08 s after the
    timeout). On time, the timeout is the timeout."""
    breaker, clock = make(POLICY_LATE)
    stalled = _WokenLate(clock, stall=POLICY_LATE.timeout * 2)
    assert await breaker.call(stalled) == "answered"
    assert await breaker.attempt(stalled) == "answered"
    with pytest.raises(CacheUnavailable, match="timed out"):
        await breaker.call(_WokenLate(clock, stall=0))
    with pytest.raises(CacheUnavailable, match="timed out"):
        await breaker.attempt(_WokenLate(clock, stall=0))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("busy_error", "breaker_error"),
    [
        (CacheBusy, CacheUnavailable),
        (StoreBusy, StoreUnavailable),
        (StoreTimeout, StoreUnavailable),
    ],
    ids=["redis-pool", "postgres-pool", "postgres-statement"],
)
async def test_waiting_out_the_pool_is_judged_as_slowness(
    make: Make, busy_error: type[SessionAuthorityError], breaker_error: type[SessionAuthorityError]
) -> None:
    """No pooled connection came free (``CacheBusy``, ``StoreBusy``): our
    queue, not the dependency; and one Postgres statement past its own
    timeout (``StoreTimeout``): a slow call, not a failure."""
    breaker, _ = make(error=breaker_error)
    for _ in range(POLICY.consecutive_failures * 2):
        gate = asyncio.Event()
        queued = asyncio.create_task(
            breaker.call(Op(gate=gate, error=busy_error("No connection available.")))
        )
        await until(lambda: breaker.calls_in_flight == 1)
        await succeed(breaker)  # answered while it queued
        gate.set()
        with pytest.raises(busy_error):
            await queued
    assert breaker.state is CLOSED
    busy = Op(error=busy_error("No connection available."))
    for _ in range(POLICY.consecutive_failures):  # nothing answered: it counts
        with pytest.raises(busy_error):
            await breaker.call(busy)
    assert breaker.state is OPEN


@pytest.mark.asyncio
async def test_an_answer_that_is_a_bad_request_also_excuses(make: Make) -> None:
    """Any answer but the dependency's own error shows it is answering."""
    breaker, clock = make()
    for _ in range(POLICY.consecutive_failures):
        call = asyncio.create_task(breaker.call(Op(gate=asyncio.Event())))
        await until(lambda: breaker.calls_in_flight == 1)
        with pytest.raises(KeyError):
            await breaker.call(Op(error=KeyError("bad request")))
        clock.advance(POLICY.slow_call)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    assert breaker.state is CLOSED


@pytest.mark.asyncio
async def test_errors_count_even_while_other_calls_are_answered(make: Make) -> None:
    """Only slowness is excused: the dependency's own errors always count."""
    breaker, _ = make(WINDOW_ONLY)
    for _ in range(3):
        await succeed(breaker)
        await fail(breaker, 3)
    await fail(breaker)  # 10 failures of 13 calls: 77 %
    assert breaker.state is OPEN


@pytest.mark.asyncio
async def test_a_cache_miss_is_a_success(make: Make) -> None:
    breaker, _ = make(WINDOW_ONLY)
    miss = Op(result=None)
    for _ in range(4):
        assert await breaker.call(miss) is None
    await fail(breaker, 6)  # 6/10 = 60 %: would be 100 % if a miss counted as a failure
    assert miss.calls == 4
    assert breaker.state is CLOSED


@pytest.mark.asyncio
async def test_a_slow_call_times_out_counts_as_a_failure_and_raises_cache_unavailable(
    make: Make,
) -> None:
    breaker, _ = make(BreakerPolicy(timeout=0.005, volume_threshold=2))
    hung = Op(gate=asyncio.Event())  # never set
    with pytest.raises(CacheUnavailable, match="timed out") as info:
        await breaker.call(hung)
    assert isinstance(info.value.__cause__, TimeoutError)
    assert breaker.state is CLOSED
    await fail(breaker)  # the second failure in a window of two: the timeout counted
    assert breaker.state is OPEN
    assert hung.calls == 1


@pytest.mark.asyncio
async def test_other_exceptions_pass_through_and_are_not_counted(make: Make) -> None:
    breaker, _ = make(BreakerPolicy(volume_threshold=1))
    with pytest.raises(KeyError):
        await breaker.call(Op(error=KeyError("bug")))
    assert breaker.state is CLOSED


# --- open ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_open_refuses_without_calling_op_until_the_reset_timeout(make: Make) -> None:
    breaker, clock = make()
    breaker.trip("test")
    op = Op()
    clock.advance(POLICY.reset_timeout - 0.001)
    assert breaker.seconds_until_half_open() == pytest.approx(0.001)
    with pytest.raises(CacheUnavailable, match="open"):
        await breaker.call(op)
    assert not breaker.allows()
    assert op.calls == 0
    assert breaker.state is OPEN


@pytest.mark.asyncio
async def test_trip_opens_immediately_whatever_the_window_says(make: Make) -> None:
    breaker, _ = make()
    await succeed(breaker, 50)
    seen = Transitions(breaker)
    breaker.trip("revocation could not be written")
    assert breaker.state is OPEN
    assert seen.seen == [(CLOSED, OPEN, "revocation could not be written")]
    assert breaker.seconds_until_half_open() == POLICY.reset_timeout
    breaker.trip("again")  # already open: no second transition
    assert seen.states == [OPEN]
    assert breaker.opened_count == 1


# --- half-open: exactly one probe -----------------------------------------------------------


@pytest.mark.asyncio
async def test_without_probe_callback_one_caller_is_the_probe_and_the_rest_are_refused(
    make: Make,
) -> None:
    breaker, clock = make()
    breaker.trip("test")
    clock.advance(POLICY.reset_timeout)
    gate = asyncio.Event()
    probe_op = Op(gate=gate)
    probe_call = asyncio.create_task(breaker.call(probe_op))
    await until(lambda: probe_op.calls == 1)
    assert breaker.state is HALF_OPEN

    others = [Op() for _ in range(20)]
    results = await asyncio.gather(*(breaker.call(o) for o in others), return_exceptions=True)
    assert all(isinstance(r, CacheUnavailable) for r in results)
    assert sum(o.calls for o in others) == 0

    gate.set()
    assert await probe_call == "ok"
    assert probe_op.calls == 1
    assert breaker.state is CLOSED
    await succeed(breaker)


@pytest.mark.asyncio
async def test_with_probe_callback_it_runs_once_and_every_caller_is_refused(make: Make) -> None:
    gate = asyncio.Event()
    probe = Op(result=None, gate=gate)
    breaker, clock = make(probe=probe)
    breaker.trip("test")
    clock.advance(POLICY.reset_timeout)

    ops = [Op() for _ in range(20)]
    results = await asyncio.gather(*(breaker.call(o) for o in ops), return_exceptions=True)
    await until(lambda: probe.calls == 1)
    assert all(isinstance(r, CacheUnavailable) for r in results)
    assert sum(o.calls for o in ops) == 0
    assert breaker.state is HALF_OPEN
    assert not breaker.allows()
    await asyncio.sleep(0)
    assert probe.calls == 1

    gate.set()
    await until(lambda: breaker.state is CLOSED)
    assert probe.calls == 1
    await succeed(breaker)


@pytest.mark.asyncio
@pytest.mark.parametrize("with_callback", [True, False], ids=["probe-callback", "caller-probe"])
async def test_probe_failure_reopens_for_another_reset_timeout(
    make: Make, with_callback: bool
) -> None:
    error = CacheUnavailable("still down")
    probe = Op(result=None, error=error) if with_callback else None
    breaker, clock = make(probe=probe)
    seen = Transitions(breaker)
    breaker.trip("test")
    clock.advance(POLICY.reset_timeout)
    op = Op(error=error)
    with pytest.raises(CacheUnavailable):
        await breaker.call(op)
    await until(lambda: breaker.state is OPEN)
    assert seen.states == [OPEN, HALF_OPEN, OPEN]
    assert "still down" in seen.seen[-1][2]
    assert breaker.opened_count == 2
    assert breaker.seconds_until_half_open() == POLICY.reset_timeout
    assert op.calls == (0 if with_callback else 1)


@pytest.mark.asyncio
async def test_a_crashing_probe_reopens_instead_of_wedging_half_open(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    breaker, clock = make(probe=Op(error=RuntimeError("bug in probe")))
    breaker.trip("test")
    clock.advance(POLICY.reset_timeout)
    with caplog.at_level(logging.ERROR, logger="session_authority.breaker"):
        assert not breaker.allows()
        await until(lambda: breaker.state is OPEN)
    assert "probe crashed" in caplog.text
    clock.advance(POLICY.reset_timeout)
    assert not breaker.allows()  # a fresh probe was started
    assert breaker.state is HALF_OPEN


@pytest.mark.asyncio
async def test_trip_during_a_caller_probe_keeps_the_breaker_open(make: Make) -> None:
    breaker, clock = make()
    breaker.trip("test")
    clock.advance(POLICY.reset_timeout)
    gate = asyncio.Event()
    probe_op = Op(gate=gate)
    probe_call = asyncio.create_task(breaker.call(probe_op))
    await until(lambda: probe_op.calls == 1)
    breaker.trip("revocation could not be written")
    gate.set()
    assert await probe_call == "ok"
    assert breaker.state is OPEN
    assert breaker.seconds_until_half_open() == POLICY.reset_timeout


@pytest.mark.asyncio
async def test_trip_during_a_background_probe_keeps_the_breaker_open(make: Make) -> None:
    gate = asyncio.Event()
    probe = Op(result=None, gate=gate)
    breaker, clock = make(probe=probe)
    breaker.trip("test")
    clock.advance(POLICY.reset_timeout)
    assert not breaker.allows()
    await until(lambda: probe.calls == 1)
    breaker.trip("revocation could not be written")
    gate.set()
    await until(lambda: probe.finished == 1)
    assert breaker.state is OPEN
    assert breaker.seconds_until_half_open() == POLICY.reset_timeout


@pytest.mark.asyncio
async def test_a_stale_probe_cannot_close_the_breaker_after_a_trip(make: Make) -> None:
    gates = [asyncio.Event(), asyncio.Event()]
    started: list[int] = []
    finished: list[int] = []

    async def probe() -> None:
        n = len(started)
        started.append(n)
        await gates[n].wait()
        finished.append(n)

    # A 2 s Redis timeout bounds a probe at 20 s: longer than the 15 s reset.
    breaker, clock = make(BreakerPolicy(timeout=2.0), probe=probe)
    breaker.trip("redis down")
    clock.advance(15)
    assert not breaker.allows()  # probe 0 starts (it will replay revocations ...)
    await until(lambda: started == [0])
    breaker.trip("revocation could not be written")  # ... that this one postdates
    clock.advance(15)
    assert not breaker.allows()  # probe 1 starts
    await until(lambda: started == [0, 1])
    gates[0].set()  # the stale probe succeeds first
    await until(lambda: finished == [0])
    assert breaker.state is HALF_OPEN  # probe 1, which saw the trip, decides


# --- transitions: listeners and logs --------------------------------------------------------


@pytest.mark.asyncio
async def test_transitions_reach_listeners_and_are_logged(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    breaker, clock = make(BreakerPolicy(volume_threshold=2))
    seen = Transitions(breaker)
    with caplog.at_level(logging.WARNING, logger="session_authority.breaker"):
        await fail(breaker, 2)
        clock.advance(15)
        await succeed(breaker)
    assert [(old, new) for old, new, _ in seen.seen] == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]
    assert "2/2 calls failed (100%)" in seen.seen[0][2]
    messages = [r.getMessage() for r in caplog.records if r.name == "session_authority.breaker"]
    assert len(messages) == 3
    assert messages[0].startswith("Circuit breaker OPEN (redis): 2/2 calls failed")
    assert messages[1].startswith("Circuit breaker HALF_OPEN (redis): reset timeout elapsed")
    assert messages[2].startswith("Circuit breaker CLOSED (redis): probe succeeded")
    assert all(r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.asyncio
async def test_closing_starts_a_fresh_window(make: Make) -> None:
    breaker, clock = make(BreakerPolicy(volume_threshold=4))
    await succeed(breaker, 3)
    breaker.trip("test")
    clock.advance(15)
    await succeed(breaker)  # the probe closes it
    await fail(breaker, 3)  # 3/3, under the volume: the pre-trip successes are gone
    assert breaker.state is CLOSED
    await fail(breaker)
    assert breaker.state is OPEN


def test_a_listener_sees_the_new_state() -> None:
    breaker = Breaker(POLICY, clock=FakeClock().monotonic)
    observed: list[BreakerState] = []
    breaker.add_listener(lambda old, new, cause: observed.append(breaker.state))
    breaker.trip("test")
    assert observed == [OPEN]


# --- aiobreaker's defects are not inherited --------------------------------------------------


class _SkewedDatetime(datetime):
    """A wall clock that is wildly wrong and mixes naive and aware values."""

    @classmethod
    def now(cls, tz: object = None) -> _SkewedDatetime:
        return cls(1999, 1, 1, tzinfo=UTC)

    @classmethod
    def utcnow(cls) -> _SkewedDatetime:
        return cls(2100, 1, 1)


@pytest.mark.asyncio
async def test_timing_uses_only_the_injected_clock(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aiobreaker.circuitbreaker, "datetime", _SkewedDatetime)
    breaker, clock = make()
    breaker.trip("test")
    assert breaker.seconds_until_half_open() == POLICY.reset_timeout
    clock.advance(POLICY.reset_timeout - 1)
    assert not breaker.allows()
    assert breaker.seconds_until_half_open() == pytest.approx(1.0)
    clock.advance(1)
    assert breaker.allows()  # no probe callback: this caller is the probe
    assert breaker.state is HALF_OPEN
    assert breaker.seconds_until_half_open() == 0.0


@pytest.mark.asyncio
async def test_closed_follows_every_transition(make: Make) -> None:
    """``closed`` is what the hot path reads instead of ``state``: it must never lag."""
    breaker, clock = make()
    seen = []
    breaker.add_listener(lambda old, new, cause: seen.append(breaker.closed is (new is CLOSED)))
    assert _closed(breaker)
    await fail(breaker, POLICY.consecutive_failures)
    assert not _closed(breaker) and breaker.state is OPEN
    clock.advance(POLICY.reset_timeout)
    assert breaker.allows()  # half-open; this caller is the probe
    assert not _closed(breaker) and breaker.state is HALF_OPEN
    await succeed(breaker)
    assert _closed(breaker) and breaker.state is CLOSED
    breaker.trip("test")
    assert not _closed(breaker)
    assert seen == [True] * 4


def _closed(breaker: Breaker) -> bool:
    return breaker.closed  # a call: mypy would narrow the attribute between asserts


@pytest.mark.asyncio
async def test_a_failed_probe_logs_its_cause_with_type_and_origin(make: Make) -> None:
    """Issue 20 (9): "probe failed: " was logged with nothing after it when
    the probe timed out (``str(TimeoutError())`` is empty)."""
    error = CacheUnavailable("cannot replay revocations")
    error.__cause__ = ConnectionResetError("reset by peer")
    breaker, clock = make(probe=Op(result=None, error=error))
    seen = Transitions(breaker)
    breaker.trip("test")
    clock.advance(POLICY.reset_timeout)
    assert not breaker.allows()
    await until(lambda: breaker.state is OPEN)
    assert seen.seen[-1][2] == (
        "probe failed: CacheUnavailable: cannot replay revocations "
        "(from ConnectionResetError: reset by peer)"
    )


@pytest.mark.asyncio
async def test_a_probe_past_its_time_logs_a_timeout_naming_the_limit(make: Make) -> None:
    async def endless() -> None:
        await asyncio.Event().wait()

    policy = BreakerPolicy(timeout=0.005)  # the probe's limit: ten timeouts, 50 ms
    breaker, clock = make(policy=policy, probe=endless)
    seen = Transitions(breaker)
    breaker.trip("test")
    clock.advance(policy.reset_timeout)
    assert not breaker.allows()
    for _ in range(500):  # a backstop of 5 s for a 50 ms limit
        if breaker.state is OPEN:
            break
        await asyncio.sleep(0.01)
    assert seen.seen[-1][2] == "probe failed: TimeoutError: not done within 0.05s"
