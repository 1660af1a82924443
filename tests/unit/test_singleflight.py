"""Per-process single-flight: one load per key, shared by every concurrent caller."""

from __future__ import annotations

import asyncio
import gc
import logging
import uuid

import pytest

from session_authority.core.singleflight import Flight, SingleFlight

from .fakes import FakeClock, until

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(5)]


class Loader:
    """A load that counts its runs, optionally begins its read, and waits for a gate."""

    def __init__(self, value: object = "v", error: Exception | None = None) -> None:
        self.value = value
        self.error = error
        self.gate = asyncio.Event()
        self.runs = 0
        self.finished = 0
        self.cancelled = 0

    async def __call__(self, flight: Flight) -> object:
        self.runs += 1
        flight.begin()
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        if self.error is not None:
            raise self.error
        return self.value


def key() -> str:
    return uuid.uuid4().hex


async def test_concurrent_callers_share_one_load() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    load = Loader(value=object())
    k = key()
    callers = [asyncio.create_task(flights.do(k, load)) for _ in range(50)]
    await until(lambda: load.runs == 1)
    assert len(flights) == 1
    load.gate.set()
    results = await asyncio.gather(*callers)
    assert load.runs == 1
    assert all(value is load.value for value, _ in results)


async def test_different_keys_do_not_share() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    load = Loader()
    load.gate.set()
    await asyncio.gather(flights.do(key(), load), flights.do(key(), load))
    assert load.runs == 2


async def test_cancelling_a_waiter_cancels_neither_the_load_nor_the_others() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    load = Loader()
    k = key()
    first = asyncio.create_task(flights.do(k, load))  # the caller that started the load
    await until(lambda: load.runs == 1)
    others = [asyncio.create_task(flights.do(k, load)) for _ in range(3)]
    await asyncio.sleep(0)
    first.cancel()
    others[0].cancel()
    await asyncio.sleep(0)
    load.gate.set()
    assert [value for value, _ in await asyncio.gather(*others[1:])] == ["v", "v"]
    with pytest.raises(asyncio.CancelledError):
        await first
    with pytest.raises(asyncio.CancelledError):
        await others[0]
    assert (load.runs, load.finished, load.cancelled) == (1, 1, 0)


async def test_an_exception_reaches_every_waiter_and_the_key_is_freed() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    error = ConnectionError("store down")
    load = Loader(error=error)
    k = key()
    callers = [asyncio.create_task(flights.do(k, load)) for _ in range(5)]
    await until(lambda: load.runs == 1)
    load.gate.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert results == [error] * 5
    assert len(flights) == 0

    retry = Loader(value="second")
    retry.gate.set()
    assert await flights.do(k, retry, since=0.0) == ("second", False)  # failures are not kept
    assert retry.runs == 1


async def test_the_key_is_free_again_once_the_load_settles() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    k = key()
    first, second = Loader("a"), Loader("b")
    first.gate.set()
    second.gate.set()
    assert await flights.do(k, first) == ("a", False)
    assert len(flights) == 0
    assert await flights.do(k, second) == ("b", False)
    assert (first.runs, second.runs) == (1, 1)


async def test_a_failed_load_whose_waiters_all_left_logs_no_unretrieved_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    gate = asyncio.Event()
    runs: list[str] = []

    async def load(flight: Flight) -> object:
        runs.append("started")
        await gate.wait()
        runs.append("failed")
        raise ConnectionError("nobody listens")

    async def abandon() -> None:
        """Start the load and cancel its only waiter, keeping no reference to either."""
        caller = asyncio.create_task(flights.do(key(), load))
        await until(lambda: runs == ["started"])
        caller.cancel()
        await asyncio.wait([caller])

    await abandon()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        gate.set()
        await until(lambda: runs == ["started", "failed"])
        await until(lambda: len(flights) == 0)  # the load task has settled and left
        gc.collect()  # a task whose exception nobody retrieved complains when collected
    assert "never retrieved" not in caplog.text
    assert len(flights) == 0


# --- late --------------------------------------------------------------------------------


async def test_late_is_false_for_the_starter_and_for_joiners_before_the_read() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    load = Loader()
    k = key()
    starter = asyncio.create_task(flights.do(k, load))
    early = asyncio.create_task(flights.do(k, load))
    await asyncio.sleep(0)  # both are waiting; the load task has not run yet
    assert load.runs == 0
    await until(lambda: load.runs == 1)  # now the read has begun
    late = asyncio.create_task(flights.do(k, load))
    await asyncio.sleep(0)
    load.gate.set()
    assert [await starter, await early, await late] == [("v", False), ("v", False), ("v", True)]


async def test_a_loader_that_never_begins_makes_nobody_late() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    gate = asyncio.Event()

    async def load(flight: Flight) -> object:
        await gate.wait()
        return "v"

    k = key()
    starter = asyncio.create_task(flights.do(k, load))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    joiner = asyncio.create_task(flights.do(k, load))
    await asyncio.sleep(0)
    gate.set()
    assert [await starter, await joiner] == [("v", False), ("v", False)]


# --- since: sharing a result that settled after the caller began looking ---------------------


async def test_since_shares_a_result_that_settled_after_it_as_late() -> None:
    clock = FakeClock()
    flights: SingleFlight[str, object] = SingleFlight(retention=1.0, clock=clock.monotonic)
    k = key()
    first, second = Loader("first"), Loader("second")
    first.gate.set()
    second.gate.set()
    looked_at = clock.monotonic()
    assert await flights.do(k, first) == ("first", False)
    clock.advance(0.5)
    assert await flights.do(k, second, since=looked_at) == ("first", True)
    assert second.runs == 0


async def test_since_after_the_result_settled_starts_a_new_load() -> None:
    clock = FakeClock()
    flights: SingleFlight[str, object] = SingleFlight(retention=1.0, clock=clock.monotonic)
    k = key()
    first, second = Loader("first"), Loader("second")
    first.gate.set()
    second.gate.set()
    assert await flights.do(k, first) == ("first", False)
    clock.advance(0.1)
    assert await flights.do(k, second, since=clock.monotonic()) == ("second", False)
    assert second.runs == 1


async def test_results_are_kept_only_for_the_retention() -> None:
    clock = FakeClock()
    flights: SingleFlight[str, object] = SingleFlight(retention=1.0, clock=clock.monotonic)
    k = key()
    first, second = Loader("first"), Loader("second")
    first.gate.set()
    second.gate.set()
    looked_at = clock.monotonic()
    await flights.do(k, first)
    clock.advance(1.5)
    assert await flights.do(k, second, since=looked_at) == ("second", False)


async def test_without_since_a_settled_result_is_never_reused() -> None:
    flights: SingleFlight[str, object] = SingleFlight()
    k = key()
    first, second = Loader("first"), Loader("second")
    first.gate.set()
    second.gate.set()
    await flights.do(k, first)
    assert await flights.do(k, second) == ("second", False)


async def test_settled_results_are_forgotten_after_the_retention_even_without_since() -> None:
    now = [0.0]
    flight: SingleFlight[str, int] = SingleFlight(retention=1.0, clock=lambda: now[0])

    async def load(_: object) -> int:
        return 1

    for i in range(100):  # e.g. every lookup bypassing an open breaker: no ``since``
        now[0] = i * 0.5
        await flight.do(f"key-{i}", load)
    assert len(flight._recent) <= 3
