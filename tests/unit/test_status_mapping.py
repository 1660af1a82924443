"""Every core error has a gRPC status, through the transport's one table."""

from __future__ import annotations

import inspect

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
