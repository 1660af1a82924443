"""Hedged calls, written here because grpcio's C core does not hedge (grpc/proposal#287: the
service config's ``hedgingPolicy`` is parsed and ignored).

The rules (gRFC A6's, for one unary call):

* Send the first attempt. Each time ``delay`` passes with no answer, send one more, until
  ``max_attempts`` have been sent.
* The first OK answer is the call's answer; every other attempt still in flight is cancelled.
* An attempt that fails with a ``non_fatal`` code (UNAVAILABLE) sends the next attempt at once
  (when one is left) and the call waits on the others; any other failure is the call's answer
  (an INVALID_ARGUMENT will not get better by asking again), and the rest are cancelled.
* Every attempt carries what is left of the call's one deadline: hedging never makes a call
  longer. When the last attempt fails, its error is the call's.

Each attempt is a call of its own on the same channel, so with ``round_robin`` the attempts go
to different replicas. Each attempt may itself be retried by gRPC (the retry policy): the two
compose, a hedge is not sent instead of a retry.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from session_authority.client._config import Hedging

__all__ = ["hedge_async", "hedge_sync"]

T = TypeVar("T")


def _fatal(exc: BaseException, policy: Hedging) -> bool:
    code_of = getattr(exc, "code", None)
    code = code_of() if callable(code_of) else None
    return code not in policy.non_fatal


def hedge_sync(
    start: Callable[[float], grpc.Future[Any]],
    policy: Hedging,
    seconds: float,
) -> Any:
    """The first answer of up to ``policy.max_attempts`` attempts; ``start(remaining)`` sends
    one attempt with ``remaining`` seconds of deadline and returns its future."""
    deadline = time.monotonic() + seconds
    done: queue.SimpleQueue[grpc.Future[Any]] = queue.SimpleQueue()
    in_flight: list[grpc.Future[Any]] = []

    def send() -> None:
        future = start(max(deadline - time.monotonic(), 0.0))
        in_flight.append(future)
        future.add_done_callback(done.put)

    sent = 0
    try:
        send()
        sent = 1
        while True:
            wait = policy.delay if sent < policy.max_attempts else None
            try:
                finished = done.get(timeout=wait)
            except queue.Empty:
                send()
                sent += 1
                continue
            in_flight.remove(finished)
            error = finished.exception()
            if error is None:
                return finished.result()
            if _fatal(error, policy):
                raise error
            if sent < policy.max_attempts:
                send()
                sent += 1
            elif not in_flight:
                raise error
    finally:
        for future in in_flight:
            future.cancel()


async def hedge_async(
    start: Callable[[float], Awaitable[T]],
    policy: Hedging,
    seconds: float,
) -> T:
    """As ``hedge_sync``, on the event loop: ``start(remaining)`` is one attempt's coroutine."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    in_flight: set[asyncio.Future[T]] = set()

    def send() -> None:
        in_flight.add(asyncio.ensure_future(start(max(deadline - loop.time(), 0.0))))

    try:
        send()
        sent = 1
        while True:
            wait = policy.delay if sent < policy.max_attempts else None
            finished, _ = await asyncio.wait(
                in_flight, timeout=wait, return_when=asyncio.FIRST_COMPLETED
            )
            if not finished:
                send()
                sent += 1
                continue
            error: BaseException | None = None
            for attempt in finished:
                in_flight.discard(attempt)
                failure = attempt.exception()
                if failure is None:
                    return attempt.result()
                error = failure
            assert error is not None
            if _fatal(error, policy):
                raise error
            if sent < policy.max_attempts:
                send()
                sent += 1
            elif not in_flight:
                raise error
    finally:
        for attempt in in_flight:
            attempt.cancel()
