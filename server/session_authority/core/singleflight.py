"""Per-process single-flight: concurrent callers for one key share one load."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from typing import Generic, TypeVar

__all__ = ["Flight", "SingleFlight"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Flight:
    """Handed to the loader; it calls ``begin()`` right before the read whose
    result it will share, so late joiners can tell they arrived after it."""

    __slots__ = ("begun", "callers")

    def __init__(self) -> None:
        self.begun = False
        #: Callers awaiting this load right now (the starter and its joiners).
        self.callers = 0

    def begin(self) -> None:
        self.begun = True


class SingleFlight(Generic[K, V]):
    """``await flight.do(key, load)``: the first caller starts ``load(flight)``
    as a task; callers arriving while it runs await the same task. The task is
    shielded, so a caller that is cancelled (deadline, disconnect) leaves the
    load running for the others; its result or exception goes to every
    waiter. Nothing is kept once the load settles.

    Returns ``(value, late)``: ``late`` is True for a caller that joined after
    the loader's read had begun, whose view may predate the caller's start.

    A caller may pass ``since``: the (monotonic) time it began looking. A load
    for the key that *finished* after that moment is also shared (as late):
    the caller was concurrent with it even if its coroutine got round to
    asking only after the load had settled. Results are kept for
    ``retention`` seconds for this purpose only; failures are never kept."""

    def __init__(self, retention: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._inflight: dict[K, tuple[asyncio.Task[V], Flight]] = {}
        self._recent: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._retention = retention
        self._clock = clock

    def __len__(self) -> int:
        return len(self._inflight)

    def __contains__(self, key: object) -> bool:
        """Whether a load for ``key`` is in flight."""
        return key in self._inflight

    def callers(self, key: K) -> int:
        """How many callers are awaiting the load in flight for ``key`` (0: none)."""
        current = self._inflight.get(key)
        return 0 if current is None else current[1].callers

    async def do(
        self, key: K, load: Callable[[Flight], Awaitable[V]], since: float | None = None
    ) -> tuple[V, bool]:
        current = self._inflight.get(key)
        if current is None and since is not None:
            recent = self._recent_result(key, since)
            if recent is not None:
                return recent[1], True
        if current is None:
            flight = Flight()
            task: asyncio.Task[V] = asyncio.ensure_future(self._run(key, flight, load))
            self._inflight[key] = (task, flight)
            task.add_done_callback(_retrieve)
            return await self._wait(task, flight), False
        task, flight = current
        late = flight.begun
        return await self._wait(task, flight), late

    async def do_many(
        self,
        keys: Sequence[K],
        load: Callable[[Mapping[K, Flight]], Awaitable[Mapping[K, V]]],
        since: float | None = None,
    ) -> dict[K, tuple[V, bool]]:
        """``do`` for each of ``keys`` (distinct) at once: a key with a load in
        flight (or, with ``since``, one that finished since) shares it, as
        ``do`` would; the others share *one* new ``load(flights)``, which gets a
        ``Flight`` per key (to ``begin`` before its read) and answers a value
        for each. Each key of that load is a flight of its own for later
        callers, joined and settled exactly as one ``do`` starts. Raises what
        any load raised."""
        shared: dict[K, tuple[V, bool]] = {}
        waits: dict[K, tuple[asyncio.Task[V], Flight, bool]] = {}
        fresh: dict[K, Flight] = {}
        for key in keys:
            current = self._inflight.get(key)
            if current is None and since is not None:
                recent = self._recent_result(key, since)
                if recent is not None:
                    shared[key] = (recent[1], True)
                    continue
            if current is None:
                fresh[key] = Flight()
            else:
                waits[key] = (current[0], current[1], current[1].begun)
        if fresh:
            batch: asyncio.Task[Mapping[K, V]] = asyncio.ensure_future(load(fresh))
            batch.add_done_callback(_retrieve)
            for key, flight in fresh.items():
                task: asyncio.Task[V] = asyncio.ensure_future(
                    self._run(key, flight, _part_of(batch, key))
                )
                self._inflight[key] = (task, flight)
                task.add_done_callback(_retrieve)
                waits[key] = (task, flight, False)
        if waits:
            settled = await asyncio.gather(
                *(self._wait(task, flight) for task, flight, _ in waits.values())
            )
            for (key, (_, _, late)), value in zip(waits.items(), settled, strict=True):
                shared[key] = (value, late)
        return shared

    @staticmethod
    async def _wait(task: asyncio.Task[V], flight: Flight) -> V:
        flight.callers += 1
        try:
            return await asyncio.shield(task)
        finally:
            flight.callers -= 1

    def _prune(self) -> None:
        horizon = self._clock() - self._retention
        while self._recent:
            oldest_key, (finished, _) = next(iter(self._recent.items()))
            if finished >= horizon:
                break
            del self._recent[oldest_key]

    def _recent_result(self, key: K, since: float) -> tuple[float, V] | None:
        self._prune()
        found = self._recent.get(key)
        return found if found is not None and found[0] >= since else None

    async def _run(self, key: K, flight: Flight, load: Callable[[Flight], Awaitable[V]]) -> V:
        try:
            result = await load(flight)
            self._recent.pop(key, None)
            self._recent[key] = (self._clock(), result)
            self._prune()  # also here: callers that pass no ``since`` never prune
            return result
        finally:
            # Leave the table before the result is published, so nobody can
            # join a load that has already settled.
            current = self._inflight.get(key)
            if current is not None and current[1] is flight:
                del self._inflight[key]


def _part_of(batch: asyncio.Task[Mapping[K, V]], key: K) -> Callable[[Flight], Awaitable[V]]:
    """The load of ``key``'s own flight: its value from the shared batch load
    (shielded: one key's waiters leaving must not cancel the others')."""

    async def part(_: Flight) -> V:
        return (await asyncio.shield(batch))[key]

    return part


def _retrieve(task: asyncio.Task[object]) -> None:
    if not task.cancelled():
        task.exception()  # a load whose waiters all left is not an "unretrieved" error
