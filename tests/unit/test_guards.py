"""Every port method declares how it is guarded, and the wrappers built from
those declarations send each ``@guarded`` method through the breaker.

The wrappers (``core/guarded.py``) are generated from the Protocols in
``core/ports.py``; these tests make that a contract that can fail: a method
declared without a guard stops the import, a method declared ``@unguarded``
beyond ``health`` fails here until it is acknowledged, and each declared
method is called through a real ``Breaker``, open and closed, on an adapter
that records what reached it.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any, Protocol

import pytest

from session_authority.core.breaker import Breaker, BreakerPolicy
from session_authority.core.errors import (
    CacheUnavailable,
    CircuitOpen,
    SessionAuthorityError,
    StoreUnavailable,
)
from session_authority.core.guarded import GuardedCache, GuardedStore, guard_cache, guard_store
from session_authority.core.ports import SessionCache, SessionStore, guarded, guards

PORTS = {"SessionStore": SessionStore, "SessionCache": SessionCache}


def declared_methods(port: type) -> set[str]:
    return {name for name, m in vars(port).items() if callable(m) and not name.startswith("_")}


@pytest.mark.parametrize("name", PORTS)
def test_every_port_method_declares_its_guard(name: str) -> None:
    port = PORTS[name]
    declared = guards(port)
    assert set(declared) == declared_methods(port)
    assert len(declared) > 10  # the scan found the Protocol's methods
    # Only health is called past the breaker: another @unguarded method is a
    # decision to write down here, not one to slip in.
    assert {m for m, guard in declared.items() if guard == "unguarded"} == {"health"}


def test_a_port_method_without_a_guard_stops_the_wrapper_being_built() -> None:
    class Port(Protocol):
        @guarded
        async def find(self, key: str) -> str:
            """Declared."""

        async def forgotten(self, key: str) -> str:
            """Declared without a guard."""

    with pytest.raises(TypeError, match=r"Port\.forgotten declares no guard"):
        guards(Port)
    with pytest.raises(TypeError, match=r"Port\.forgotten declares no guard"):

        class Wrapper(GuardedStore, port=Port):
            pass


def test_a_port_with_a_data_member_or_a_plain_function_is_refused() -> None:
    class WithData(Protocol):
        inner: str

    class WithSync(Protocol):
        @guarded
        def find(self, key: str) -> str:
            """Not a coroutine."""

    with pytest.raises(TypeError, match="data members"):
        guards(WithData)
    with pytest.raises(TypeError, match=r"WithSync\.find is not a coroutine"):
        guards(WithSync)


class Recorder:
    """An adapter of any port: each method records its name and arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        async def method(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            return SimpleNamespace(connected=False, name=name)  # health reads ``connected``

        return method


class Observer:
    def __init__(self) -> None:
        self.seen: Counter[tuple[str, bool]] = Counter()

    def operation(self, name: str) -> Callable[[float, bool], None]:
        def observe(seconds: float, ok: bool) -> None:
            self.seen[name, ok] += 1

        return observe


def arguments(port: type, name: str) -> tuple[tuple[object, ...], dict[str, object]]:
    """A distinct object for each parameter of ``port.name``, as it is declared."""
    args: list[object] = []
    kwargs: dict[str, object] = {}
    for param in list(inspect.signature(getattr(port, name)).parameters.values())[1:]:
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            kwargs[param.name] = object()
        else:
            args.append(object())
    return tuple(args), kwargs


Build = Callable[[Recorder, Breaker, Observer], object]
WRAPPERS: dict[str, tuple[type, Build, type[SessionAuthorityError]]] = {
    "SessionStore": (
        SessionStore,
        lambda adapter, breaker, observer: guard_store(
            adapter,  # type: ignore[arg-type]  # any port's adapter
            breaker,
            observer=observer,
        ),
        StoreUnavailable,
    ),
    "SessionCache": (
        SessionCache,
        lambda adapter, breaker, observer: guard_cache(
            adapter,  # type: ignore[arg-type]  # any port's adapter
            breaker,
            observer=observer,
        ),
        CircuitOpen,
    ),
}


@pytest.mark.parametrize("name", WRAPPERS)
@pytest.mark.asyncio
async def test_each_guarded_method_goes_through_the_breaker_and_is_timed(name: str) -> None:
    port, build, refused = WRAPPERS[name]
    error = StoreUnavailable if port is SessionStore else CacheUnavailable
    adapter, observer = Recorder(), Observer()
    breaker = Breaker(BreakerPolicy(timeout=1.0), name=name, error=error)
    wrapper = build(adapter, breaker, observer)
    declared = guards(port)
    for method in declared:
        args, kwargs = arguments(port, method)
        await getattr(wrapper, method)(*args, **kwargs)
        # It reached the adapter once, with the very arguments given.
        assert adapter.calls.pop() == (method, args, kwargs)
        assert adapter.calls == []
    through = {m for m, guard in declared.items() if guard == "guarded"}
    assert observer.seen == Counter({(m, True): 1 for m in through})
    answered = breaker.answered
    assert answered == len(through)  # each one ran inside the breaker

    breaker.trip("test")
    for method in declared:
        args, kwargs = arguments(port, method)
        if method in through:
            with pytest.raises(refused):
                await getattr(wrapper, method)(*args, **kwargs)
            assert adapter.calls == []  # refused without touching the adapter
        else:
            await getattr(wrapper, method)(*args, **kwargs)  # health: past the open breaker
            assert adapter.calls.pop()[0] == method
    assert observer.seen == Counter({(m, True): 1 for m in through})  # refusals are not timed
    assert breaker.answered == answered


def test_the_wrappers_are_the_ports_own_methods() -> None:
    """The generated methods bear the Protocol's names, docstrings and
    signatures (what a reader and ``inspect`` see); the cache's ``health``
    and ``tombstone_anyway`` are the ones written by hand."""
    for wrapper, port in ((GuardedStore, SessionStore), (GuardedCache, SessionCache)):
        for method in guards(port):
            generated = getattr(wrapper, method)
            assert inspect.iscoroutinefunction(generated)
            assert inspect.signature(generated) == inspect.signature(getattr(port, method))
    assert GuardedCache.health.__qualname__ == "GuardedCache.health"
    assert vars(GuardedStore)["find"].__doc__ == SessionStore.find.__doc__
