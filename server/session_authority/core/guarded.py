"""Each port reached through its breaker, both wrapped the same way, once.

``guard_cache`` and ``guard_store`` wrap the port they are given, and are the
only wrappers of either port: everything that happens around a call of a
dependency happens here, in one ``_call``:

* the **breaker**: the call runs through it (per-call timeout, failures
  counted in its window); while it refuses calls they raise at once without
  touching the dependency (``CircuitOpen`` for the cache, ``StoreUnavailable``
  for the store). A wrapper without a breaker (the store with
  ``PG_BREAKER_ENABLED=false``; the cache as its own probe sees it) only times;
* **timing**: the ``PortObserver`` (the edge's histograms) hears how long each
  call took and whether it failed. It times the call itself, inside the
  breaker, so a call cut short by the breaker's timeout is recorded with the
  time it took until then (a slow Redis or Postgres shows even when the
  caller gave up on it), and a call an open breaker refuses is not recorded;
* **error counting** (the cache): a failed call, not a refusal, counts in
  ``CacheStats.errors`` and ``CoreMetrics.cache_error`` and is logged once as
  ``SessionCache <op> Error``.

The composition root stacks nothing else::

    core → guard_cache(cache, breaker, observer) → RedisSessionCache
    core → guard_store(store, breaker, observer) → PostgresSessionStore

**The wrappers are generated from the ports.** Each method the Protocol
declares says how it is reached (``@guarded`` or ``@unguarded``, in
``core/ports.py``); ``_Guard.__init_subclass__`` reads those declarations
(``ports.guards``) once, at import, and writes one method per declaration:
a ``@guarded`` method is ``_call(name, adapter.name(...))``, its operation
named after the method; an ``@unguarded`` one calls the adapter directly. A
method written by hand in the class (the cache's ``health``) is kept. A new
port method needs nothing here, and a port method that declares neither
stops the import. The wrappers' types are the Protocols themselves
(``guard_cache`` answers a ``BreakerCache``, ``guard_store`` a
``SessionStore``): the generated methods take and answer what the adapter's
do, so the Protocol's signature is theirs.

``health`` passes through unguarded and untimed as one call: health reports
the dependency itself, and the cache's probe round trips are observed one by
one under the operation ``health`` (see ``PortObserver``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import update_wrapper
from typing import Any, ClassVar, Protocol, TypeVar, cast

from session_authority.core.breaker import Breaker
from session_authority.core.domain import TokenHash
from session_authority.core.errors import (
    CacheReplaced,
    CacheUnavailable,
    CircuitOpen,
    SessionAuthorityError,
    StoreUnavailable,
)
from session_authority.core.health import CacheHealth, CacheStats
from session_authority.core.ports import Guard, SessionCache, SessionStore, guards
from session_authority.core.telemetry import CoreMetrics

__all__ = ["BreakerCache", "PortObserver", "guard_cache", "guard_store"]

_log = logging.getLogger("session_authority.cache")
T = TypeVar("T")

#: Observes one call of one operation: ``(seconds, ok)``; ``ok`` is False when
#: the call raised, cancellation included.
Observe = Callable[[float, bool], None]


class PortObserver(Protocol):
    """What the edge hears of each call of one port (its histograms)."""

    def operation(self, name: str) -> Observe:
        """The observer of every call of ``name`` (the port method's name, or
        ``health`` for each round trip of a health probe that reached the
        dependency). Asked once per operation, then kept: it is on every
        call's path."""


class BreakerCache(SessionCache, Protocol):
    """A ``SessionCache`` behind the Redis breaker, as the revoker needs it."""

    #: The cache without the breaker (timed all the same), for the breaker's
    #: own probe, which the breaker would refuse.
    inner: SessionCache

    async def tombstone_anyway(self, token_hashes: Sequence[TokenHash], ttl: float) -> None:
        """Tombstone even while the breaker refuses calls, bounded by its
        timeout and not counted; raises ``CacheUnavailable``."""


class _Guard:
    """The one ``_call`` both wrappers share, and the methods each subclass
    gets from its port's declarations (``port=``)."""

    _refused: ClassVar[type[SessionAuthorityError]]
    _error: ClassVar[type[SessionAuthorityError]]

    def __init_subclass__(cls, *, port: type, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, guard in guards(port).items():
            if name not in vars(cls):  # written by hand: kept
                setattr(cls, name, _generated(getattr(port, name), guard))

    def __init__(
        self, adapter: Any, breaker: Breaker | None, observer: PortObserver | None
    ) -> None:
        #: The port's adapter (typed by the subclass's port, which ``guards`` read).
        self._adapter = adapter
        self.breaker = breaker
        self._observer = observer
        self._observers: dict[str, Observe] = {}

    def _observe(self, operation: str) -> Observe:
        observe = self._observers.get(operation)
        if observe is None:
            assert self._observer is not None
            observe = self._observers[operation] = self._observer.operation(operation)
        return observe

    def _timed(self, operation: str, op: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
        """``op``, timed into the observer (or ``op`` itself without one): the
        same number of frames as ``op`` plus one, however it is run."""
        if self._observer is None:
            return op
        observe = self._observe(operation)

        async def timed() -> T:
            started = time.perf_counter()
            try:
                result = await op()
            except BaseException:
                observe(time.perf_counter() - started, False)
                raise
            observe(time.perf_counter() - started, True)
            return result

        return timed

    async def _call(self, operation: str, op: Callable[[], Awaitable[T]]) -> T:
        breaker = self.breaker
        if breaker is None:
            return await self._timed(operation, op)()
        if not breaker.allows():
            raise self._refused(f"{breaker.name} circuit breaker {breaker.state.value}")
        try:
            return await breaker.call(self._timed(operation, op))
        except self._error as exc:
            self._failed(operation, exc)
            raise

    def _failed(self, operation: str, exc: SessionAuthorityError) -> None:
        """A call that failed (not one refused): nothing to count by default."""


def _generated(declared: Callable[..., Any], guard: Guard) -> Callable[..., Awaitable[Any]]:
    """The wrapper's method for the port method ``declared``: through ``_call``
    under the method's name when ``@guarded``, straight to the adapter when
    ``@unguarded``. It bears the declaration's name, docstring and signature."""
    name = declared.__name__
    if guard == "guarded":

        async def method(self: _Guard, *args: Any, **kwargs: Any) -> Any:
            op = getattr(self._adapter, name)
            return await self._call(name, lambda: op(*args, **kwargs))

    else:

        async def method(self: _Guard, *args: Any, **kwargs: Any) -> Any:
            return await getattr(self._adapter, name)(*args, **kwargs)

    return update_wrapper(method, declared)


class GuardedCache(_Guard, port=SessionCache):
    """A ``SessionCache`` behind the Redis breaker (or, with ``breaker=None``,
    only timed: the ``inner`` it gives the breaker's probe). Built by
    ``guard_cache``; every ``SessionCache`` method but ``health`` is generated."""

    _refused = CircuitOpen
    _error = CacheUnavailable
    _adapter: SessionCache

    def __init__(
        self,
        cache: SessionCache,
        breaker: Breaker | None,
        *,
        stats: CacheStats | None = None,
        metrics: CoreMetrics | None = None,
        observer: PortObserver | None = None,
    ) -> None:
        super().__init__(cache, breaker, observer)
        self._stats = stats
        self._metrics = metrics
        self.inner: SessionCache = (
            cache
            if breaker is None or observer is None
            else cast(SessionCache, GuardedCache(cache, None, observer=observer))
        )

    def _failed(self, operation: str, exc: SessionAuthorityError) -> None:
        if self.breaker is None:
            return  # the probe's own calls: the breaker judges the probe
        if self._stats is not None:
            self._stats.errors += 1
        if self._metrics is not None:
            self._metrics.cache_error(operation)
        _log.warning("SessionCache %s Error: %s", operation, exc)
        if isinstance(exc, CacheReplaced):
            # It may have lost tombstones: stop reading it now, and let the
            # probe re-apply revocations at once rather than after the reset.
            self.breaker.trip(f"redis replaced: {exc}", probe_in=0.0)

    async def tombstone_anyway(self, token_hashes: Sequence[TokenHash], ttl: float) -> None:
        """Tombstone even while the breaker refuses calls, bounded by its timeout
        and not counted (``Breaker.attempt``): this process has stopped reading
        Redis, but the other replicas read it, and a revocation must reach it
        if it can. A failure is counted and logged like any other."""
        op = self._timed("tombstone", lambda: self._adapter.tombstone(token_hashes, ttl))
        if self.breaker is None:
            await op()
            return
        try:
            await self.breaker.attempt(op)
        except CacheUnavailable as exc:
            self._failed("tombstone", exc)
            raise

    async def health(self) -> CacheHealth:
        health = await self._adapter.health()
        if health.connected and self._observer is not None:
            observe = self._observe("health")
            for milliseconds in (health.ping_ms, health.set_ms, health.get_ms):
                observe(milliseconds / 1000, True)
        return health


class GuardedStore(_Guard, port=SessionStore):
    """A ``SessionStore`` behind the Postgres breaker (``error=StoreUnavailable``):
    while it is open, calls that need the store fail at once instead of each
    waiting out a dead database's timeouts. With ``breaker=None`` (the
    Postgres breaker disabled) it only times. Built by ``guard_store``; every
    method is generated."""

    _refused = StoreUnavailable
    _error = StoreUnavailable


def guard_cache(
    cache: SessionCache,
    breaker: Breaker | None,
    *,
    stats: CacheStats | None = None,
    metrics: CoreMetrics | None = None,
    observer: PortObserver | None = None,
) -> BreakerCache:
    """``cache`` behind ``breaker`` (``None``: only timed), timed into
    ``observer``; its failures counted in ``stats`` and ``metrics``."""
    guarded = GuardedCache(cache, breaker, stats=stats, metrics=metrics, observer=observer)
    return cast(BreakerCache, guarded)


def guard_store(
    store: SessionStore, breaker: Breaker | None, *, observer: PortObserver | None = None
) -> SessionStore:
    """``store`` behind ``breaker`` (``None``: only timed), timed into ``observer``."""
    return cast(SessionStore, GuardedStore(store, breaker, observer))
