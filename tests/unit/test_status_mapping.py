"""Every core error has a gRPC status, through the transport's one table, and
every call ends through it (``transport/calls.py``)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import NoReturn

import grpc
import pytest

from session_authority.core import errors
from session_authority.core.errors import (
    CacheReplaced,
    CacheUnavailable,
    CircuitOpen,
    InvalidArgument,
    SessionAuthorityError,
    StoreUnavailable,
    Unavailable,
)
from session_authority.transport.calls import abort_for, run_call
from session_authority.transport.status import STATUS_FOR, status_for


def core_errors() -> list[type[SessionAuthorityError]]:
    """Every SessionAuthorityError class defined in core/errors.py, found by walking it."""
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, SessionAuthorityError) and cls.__module__ == errors.__name__
    ]


def instance(cls: type[SessionAuthorityError]) -> SessionAuthorityError:
    if issubclass(cls, InvalidArgument):
        return cls("field", "problem")
    return cls("message")


def test_the_walk_finds_the_whole_error_tree() -> None:
    found = set(core_errors())
    assert {SessionAuthorityError, InvalidArgument, Unavailable, StoreUnavailable} <= found
    assert {CacheUnavailable, CircuitOpen, CacheReplaced} <= found
    assert {cls.__name__ for cls in found} == set(errors.__all__)


@pytest.mark.parametrize("cls", core_errors(), ids=lambda c: c.__name__)
def test_every_core_error_has_its_own_entry_in_the_table(cls: type[SessionAuthorityError]) -> None:
    assert cls in STATUS_FOR
    assert STATUS_FOR[cls] is not grpc.StatusCode.OK
    assert status_for(instance(cls)) is STATUS_FOR[cls]


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
        (Unavailable, grpc.StatusCode.UNAVAILABLE),
        (CacheUnavailable, grpc.StatusCode.UNAVAILABLE),
        (CircuitOpen, grpc.StatusCode.UNAVAILABLE),
        (CacheReplaced, grpc.StatusCode.UNAVAILABLE),
        (SessionAuthorityError, grpc.StatusCode.INTERNAL),
    ],
    ids=lambda v: getattr(v, "__name__", None) or getattr(v, "name", str(v)),
)
def test_expected_codes(cls: type[SessionAuthorityError], code: grpc.StatusCode) -> None:
    assert status_for(instance(cls)) is code


def test_an_unlisted_subclass_takes_its_nearest_ancestors_code() -> None:
    class PoolExhausted(StoreUnavailable):
        pass

    class Refused(CircuitOpen):
        pass

    assert status_for(PoolExhausted("pool")) is grpc.StatusCode.UNAVAILABLE
    assert status_for(Refused("open")) is grpc.StatusCode.UNAVAILABLE


# --- how a call ends: run_call and abort_for (transport/calls.py) ---------------------------


class Context:
    """What ``run_call`` and ``abort_for`` use of a grpc.aio context."""

    def __init__(self) -> None:
        self.aborted: list[tuple[grpc.StatusCode, str]] = []

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        self.aborted.append((code, details))
        raise grpc.aio.AbortError()


async def ended(work: Callable[[], Awaitable[object]]) -> tuple[Context, BaseException]:
    context = Context()
    try:
        await run_call(context, work)  # type: ignore[arg-type]  # the part it uses
    except BaseException as exc:  # what ended the call, whatever it is
        return context, exc
    raise AssertionError("the call did not end")


def failing(exc: BaseException) -> Callable[[], Awaitable[object]]:
    async def work() -> object:
        raise exc

    return work


@pytest.mark.asyncio
async def test_a_core_error_ends_the_call_with_its_status_and_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    context, raised = await ended(failing(InvalidArgument("user_id", "must not be empty")))
    assert isinstance(raised, grpc.aio.AbortError)
    assert context.aborted == [(grpc.StatusCode.INVALID_ARGUMENT, "user_id: must not be empty")]
    context, _ = await ended(failing(StoreUnavailable("postgres circuit breaker open")))
    assert context.aborted == [(grpc.StatusCode.UNAVAILABLE, "postgres circuit breaker open")]
    assert caplog.records == []  # expected failures are not logged here


@pytest.mark.asyncio
async def test_a_bug_is_internal_logged_once_and_never_quoted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    context, raised = await ended(failing(KeyError("sa1_secret-looking")))
    assert isinstance(raised, grpc.aio.AbortError)
    assert context.aborted == [(grpc.StatusCode.INTERNAL, "internal error")]
    (record,) = caplog.records
    assert (record.name, record.levelname, record.getMessage()) == (
        "session_authority.rpc",
        "ERROR",
        "unexpected error",
    )
    assert record.exc_info is not None and isinstance(record.exc_info[1], KeyError)


@pytest.mark.asyncio
async def test_a_timeout_is_the_deadline_and_an_abort_or_a_cancellation_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    context, _ = await ended(failing(TimeoutError()))
    assert context.aborted == [(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")]
    abort = grpc.aio.AbortError()
    context, raised = await ended(failing(abort))
    assert (raised, context.aborted) == (abort, [])  # the status already set stands
    context, raised = await ended(failing(asyncio.CancelledError()))
    assert isinstance(raised, asyncio.CancelledError)
    assert context.aborted == []
    assert caplog.records == []


@pytest.mark.asyncio
async def test_the_stream_ends_the_same_way() -> None:
    """``abort_for`` is what WatchRevocations ends with: the same table."""
    for exc, expected in (
        (
            Unavailable("WatchRevocations is not offered by this server"),
            grpc.StatusCode.UNAVAILABLE,
        ),
        (ValueError("bug"), grpc.StatusCode.INTERNAL),
    ):
        context = Context()
        with pytest.raises(grpc.aio.AbortError):
            await abort_for(context, exc)  # type: ignore[arg-type]  # the part it uses
        assert [code for code, _ in context.aborted] == [expected]
