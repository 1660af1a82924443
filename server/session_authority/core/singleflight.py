"""Per-process single-flight: concurrent callers for one key share one load."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
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


def _retrieve(task: asyncio.Task[object]) -> None:
    if not task.cancelled():
        task.exception()  # a load whose waiters all left is not an "unretrieved" error
