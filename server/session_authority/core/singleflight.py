"""Per-process single-flight: concurrent callers for one key share one load."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Flight", "SingleFlight"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Flight:
    """Handed to the loader; it calls ``begin()`` right before the read whose
    result it will share, so late joiners can tell they arrived after it."""

    __slots__ = ("begun",)

    def __init__(self) -> None:
        self.begun = False

    def begin(self) -> None:
        self.begun = True


class SingleFlight(Generic[K, V]):
    """``await flight.do(key, load)``: the first caller starts ``load(flight)``
    as a task; callers arriving while it runs await the same task. The task is
    shielded, so a caller that is cancelled (deadline, disconnect) leaves the
    load running for the others; its result or exception goes to every
    waiter. Nothing is kept once the load settles.

    Returns ``(value, late)``: ``late`` is True for a caller that joined after
    the loader's read had begun, whose view may predate the caller's start."""

    def __init__(self) -> None:
        self._inflight: dict[K, tuple[asyncio.Task[V], Flight]] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    async def do(self, key: K, load: Callable[[Flight], Awaitable[V]]) -> tuple[V, bool]:
        current = self._inflight.get(key)
        if current is None:
            flight = Flight()
            task: asyncio.Task[V] = asyncio.ensure_future(self._run(key, flight, load))
            self._inflight[key] = (task, flight)
            task.add_done_callback(_retrieve)
            return await asyncio.shield(task), False
        task, flight = current
        late = flight.begun
        return await asyncio.shield(task), late

    async def _run(self, key: K, flight: Flight, load: Callable[[Flight], Awaitable[V]]) -> V:
        try:
            return await load(flight)
        finally:
            # Leave the table before the result is published, so nobody can
            # join a load that has already settled.
            current = self._inflight.get(key)
            if current is not None and current[1] is flight:
                del self._inflight[key]


def _retrieve(task: asyncio.Task[object]) -> None:
    if not task.cancelled():
        task.exception()  # a load whose waiters all left is not an "unretrieved" error
