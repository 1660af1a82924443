"""``watch_revocations``' answers: a live WatchRevocations stream as an iterator of typed
events (``RevocationWatch`` for the sync client, ``AsyncRevocationWatch`` for asyncio).

The stream is never retried by gRPC (``_config.NOT_RETRIED``): when it ends with an error, the
watcher resumes itself, with ``after=watch.cursor`` (the last cursor it received, START's
included), on any replica. The START event is read before ``watch_revocations`` returns, under
the ``Deadlines.watch_start`` deadline, so that a refused or unreachable watch fails at once;
after it the stream has no deadline (it runs until closed, and the channel's keepalive pings
notice a dead connection). ``close()`` cancels the call; the iteration then simply ends.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Any

import grpc

from session_authority.client import _results
from session_authority.client._errors import DeadlineExceeded, ServerError, mapped
from session_authority.client._results import RevocationEvent
from session_authority.v1 import session_authority_pb2 as pb

__all__ = ["AsyncRevocationWatch", "RevocationWatch"]


def _deadline_exceeded(seconds: float) -> DeadlineExceeded:
    return DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED, f"no START event within {seconds}s")


def _no_start() -> ServerError:
    return ServerError(grpc.StatusCode.UNKNOWN, "the watch ended before its START event")


class RevocationWatch:
    """An open WatchRevocations stream (sync): iterate it for ``RevocationEvent``s, the START
    event first. Iteration raises a ``SessionAuthorityError`` when the stream ends with an
    error (UNAVAILABLE: a draining server; FAILED_PRECONDITION, a ``ServerError``: the cursor
    is too old, start again from now) and ends quietly after ``close()``. Not for use from
    several threads at once."""

    def __init__(self, call: Any, start_timeout: float) -> None:
        self._call = call
        self._closed = False
        self.cursor = ""
        """The last cursor received: resume with ``after=watch.cursor``."""
        fired = threading.Event()

        def expire() -> None:
            fired.set()
            call.cancel()

        timer = threading.Timer(start_timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            first = self._read()
        except StopIteration:
            raise _no_start() from None
        except grpc.RpcError as exc:
            if fired.is_set():
                raise _deadline_exceeded(start_timeout) from None
            raise mapped(exc) from None
        finally:
            timer.cancel()
        self._pending: RevocationEvent | None = first

    def _read(self) -> RevocationEvent:
        message: pb.RevocationEvent = next(self._call)
        event = _results.revocation_event(message)
        self.cursor = event.cursor or self.cursor
        return event

    def __iter__(self) -> Iterator[RevocationEvent]:
        return self

    def __next__(self) -> RevocationEvent:
        if self._pending is not None:
            event, self._pending = self._pending, None
            return event
        if self._closed:
            raise StopIteration
        try:
            return self._read()
        except grpc.RpcError as exc:
            if self._closed:
                raise StopIteration from None
            raise mapped(exc) from None

    def close(self) -> None:
        """Cancel the stream; an iteration in progress (another thread's) ends."""
        self._closed = True
        self._pending = None
        self._call.cancel()

    def __enter__(self) -> RevocationWatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncRevocationWatch:
    """The asyncio twin of ``RevocationWatch``: ``async for event in watch``; ``close()``
    (not a coroutine) cancels the stream. Built by ``AsyncSessionAuthorityClient``'s
    ``watch_revocations`` (a coroutine: it waits for START)."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._closed = False
        self._pending: RevocationEvent | None = None
        self.cursor = ""
        """The last cursor received: resume with ``after=watch.cursor``."""

    async def _start(self, start_timeout: float) -> None:
        try:
            self._pending = await asyncio.wait_for(self._read(), start_timeout)
        except TimeoutError:
            self._call.cancel()
            raise _deadline_exceeded(start_timeout) from None
        except StopAsyncIteration:
            raise _no_start() from None
        except grpc.RpcError as exc:
            raise mapped(exc) from None

    async def _read(self) -> RevocationEvent:
        message = await self._call.read()
        if message is grpc.aio.EOF:
            raise StopAsyncIteration
        event = _results.revocation_event(message)
        self.cursor = event.cursor or self.cursor
        return event

    def __aiter__(self) -> AsyncIterator[RevocationEvent]:
        return self

    async def __anext__(self) -> RevocationEvent:
        if self._pending is not None:
            event, self._pending = self._pending, None
            return event
        if self._closed:
            raise StopAsyncIteration
        try:
            return await self._read()
        except grpc.RpcError as exc:
            if self.closed:
                raise StopAsyncIteration from None
            raise mapped(exc) from None
        except asyncio.CancelledError:
            # close() (from another task) cancels the call under a pending read: the end.
            if self.closed and not _current_task_cancelling():
                raise StopAsyncIteration from None
            raise

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Cancel the stream; an iteration in progress ends."""
        self._closed = True
        self._pending = None
        self._call.cancel()

    async def __aenter__(self) -> AsyncRevocationWatch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _current_task_cancelling() -> bool:
    """Whether this task itself is being cancelled (not merely its call, by ``close()``)."""
    task = asyncio.current_task()
    return bool(task and task.cancelling())
