"""State and helpers shared by the parts of the session authority."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any, TypeVar

from session_authority.core.breaker import Breaker
from session_authority.core.domain import TokenHash, Validation, new_token
from session_authority.core.errors import CacheUnavailable, StoreUnavailable
from session_authority.core.health import CacheStats
from session_authority.core.policy import CorePolicy, utcnow
from session_authority.core.ports import SessionCache, SessionStore
from session_authority.core.singleflight import SingleFlight
from session_authority.core.telemetry import CoreMetrics, NoMetrics

__all__ = ["CoreBase"]

_log = logging.getLogger("session_authority.cache")
T = TypeVar("T")


class CoreBase:
    """The ports, policy, clock and counters; the store timing and cache
    failure bookkeeping every part uses."""

    def __init__(
        self,
        store: SessionStore,
        cache: SessionCache | None,
        breaker: Breaker,
        policy: CorePolicy | None = None,
        *,
        metrics: CoreMetrics | None = None,
        clock: Callable[[], datetime] = utcnow,
        token_factory: Callable[[], str] = new_token,
        store_breaker: Breaker | None = None,
    ) -> None:
        self.store = store
        self.cache = cache
        self.breaker = breaker
        #: Optional breaker around Postgres (``error=StoreUnavailable``): while
        #: open, calls that need the store fail at once instead of each waiting
        #: for a dead database's timeouts. Health checks bypass it.
        self.store_breaker = store_breaker
        self.policy = policy or CorePolicy()
        self.stats = CacheStats()
        self._metrics = metrics or NoMetrics()
        self._now = clock
        self._new_token = token_factory
        self._loads: SingleFlight[TokenHash, tuple[Validation, bool, int]] = SingleFlight()
        self._refreshes: set[asyncio.Task[None]] = set()
        breaker.add_listener(
            lambda old, new, _c: self._metrics.breaker_transition(old.value, new.value)
        )
        if store_breaker is not None:
            store_breaker.add_listener(
                lambda old, new, _c: self._metrics.breaker_transition(
                    old.value, new.value, store_breaker.name
                )
            )

    def _cache_failed(self, operation: str, exc: CacheUnavailable) -> None:
        self.stats.errors += 1
        self._metrics.cache_error(operation)
        _log.warning("SessionCache %s Error: %s", operation, exc)

    async def _timed_store(self, operation: str, call: Coroutine[Any, Any, T]) -> T:
        started = time.perf_counter()
        ok = False
        try:
            breaker = self.store_breaker
            if breaker is None:
                result = await call
            elif not breaker.allows():
                call.close()  # never started
                raise StoreUnavailable(f"postgres circuit breaker {breaker.state.value}")
            else:
                result = await breaker.call(lambda: call)
            ok = True
            return result
        finally:
            self._metrics.store_query(operation, time.perf_counter() - started, ok)
