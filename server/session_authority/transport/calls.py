"""How every call of ours ends: within the caller's deadline, and with the
status of the one table (``status.py``).

``run_call`` runs a unary RPC's work; ``abort_for`` is the one mapping from
an exception to the call's end, shared by ``run_call`` and the stream
(``WatchRevocations``), so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import grpc

from session_authority.core.errors import SessionAuthorityError
from session_authority.transport.status import status_for

__all__ = ["abort_for", "run_call"]

_log = logging.getLogger("session_authority.rpc")
T = TypeVar("T")

#: Seconds before the caller's deadline at which the work is given up (at most
#: a tenth of the time left, so a short deadline keeps most of it).
_DEADLINE_MARGIN_MAX = 0.005


async def run_call(
    context: grpc.aio.ServicerContext[object, object], work: Callable[[], Awaitable[T]]
) -> T:
    """Bound ``work`` by the caller's deadline and map core errors to statuses.

    The deadline cancels the work, so no Redis or Postgres call outlives it
    (a cancelled asyncpg query is cancelled on the server too)."""
    remaining: float | None = context.time_remaining()  # None: no deadline (the stubs omit it)
    try:
        if remaining is None:  # no deadline: no timer to arm and cancel on every call
            return await work()
        # Answer a little before the caller's deadline: a reply racing the
        # caller's own cancellation makes grpc log an ExecuteBatchError.
        margin = min(_DEADLINE_MARGIN_MAX, remaining / 10)
        async with asyncio.timeout(remaining - margin):
            return await work()
    except TimeoutError:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
    except Exception as exc:  # not asyncio.CancelledError: that goes on
        await abort_for(context, exc)
    raise AssertionError("unreachable: context.abort raises")


async def abort_for(context: grpc.aio.ServicerContext[object, object], exc: Exception) -> NoReturn:
    """End the call for ``exc``: a core error with its status from the one
    table and its own message (which never carries a token); an abort already
    under way goes on as it is; anything else is a bug: logged once, with its
    traceback, and answered INTERNAL without a word of it."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if isinstance(exc, SessionAuthorityError):
        await context.abort(status_for(exc), str(exc))
    _log.error("unexpected error", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")
