"""Health reporting: the runbook's health document as domain values."""

from __future__ import annotations

import asyncio

from session_authority.core.breaker import Breaker, BreakerState
from session_authority.core.health import (
    BreakerReport,
    CacheHealth,
    CacheStats,
    HealthReport,
    LocalCacheReport,
    StoreHealth,
)
from session_authority.core.local import LocalCache, RevocationFeed
from session_authority.core.policy import CorePolicy
from session_authority.core.ports import SessionCache, SessionStore

__all__ = ["HealthReporter", "breaker_report"]


class HealthReporter:
    """Asks both tiers directly (never through their breakers: health reports
    the dependency, and the breakers' states beside it)."""

    def __init__(
        self,
        store: SessionStore,
        cache: SessionCache | None,
        breaker: Breaker,
        store_breaker: Breaker | None,
        policy: CorePolicy,
        stats: CacheStats,
        *,
        local: LocalCache | None = None,
        feed: RevocationFeed | None = None,
    ) -> None:
        self._local = local
        self._feed = feed
        self._store = store
        self._cache = cache
        self._breaker = breaker
        self._store_breaker = store_breaker
        self._policy = policy
        self._stats = stats

    async def health(self) -> HealthReport:
        """Healthy: both tiers answer and the breakers are closed. Degraded:
        Redis is down or bypassed, Postgres answers. Unhealthy: Postgres is
        down, or its breaker is refusing calls."""
        store, cache = await asyncio.gather(self._store.health(), self._cache_health())
        breaker, store_breaker = self._breaker, self._store_breaker
        errors = []
        if not store.connected:
            errors.append(f"postgres: {store.error or 'unreachable'}")
        if self._cache is not None and not cache.connected:
            errors.append(f"redis: {cache.error or 'unreachable'}")
        if breaker.state is not BreakerState.CLOSED:
            errors.append(f"circuit breaker {breaker.state.value}: cache bypassed")
        store_refusing = store_breaker is not None and store_breaker.state is BreakerState.OPEN
        if store_refusing:
            errors.append("postgres circuit breaker open: calls needing the database refused")
        cache_healthy = cache.connected and breaker.state is BreakerState.CLOSED
        if not store.connected or store_refusing:
            status = "unhealthy"
        elif self._cache is not None and not cache_healthy:
            status = "degraded"
        else:
            status = "healthy"
        return HealthReport(
            status=status,
            cache_enabled=self._cache is not None,
            cache_healthy=cache_healthy,
            cache=cache,
            stats=self._stats,
            cache_ttl_seconds=int(self._policy.cache_ttl),
            store=store,
            breaker=breaker_report(breaker),
            errors=tuple(errors),
            store_breaker=None if store_breaker is None else breaker_report(store_breaker),
            local_cache=self._local_report(),
        )

    def _local_report(self) -> LocalCacheReport | None:
        if self._feed is None:
            return None
        local = self._local
        return LocalCacheReport(
            enabled=local is not None,
            live=self._feed.live,
            entries=0 if local is None else len(local),
            ttl_ms=0 if local is None else int(local.ttl * 1000),
            bus=self._feed.state,
            bus_restarts=self._feed.restarts,
            malformed_messages=self._feed.malformed,
        )

    async def _cache_health(self) -> CacheHealth:
        if self._cache is None:
            return CacheHealth(connected=False, error="cache disabled (no REDIS_URL)")
        return await self._cache.health()

    async def store_health(self) -> StoreHealth:
        return await self._store.health()


def breaker_report(breaker: Breaker) -> BreakerReport:
    policy = breaker.policy
    return BreakerReport(
        state=breaker.state.value,
        timeout_ms=int(policy.timeout * 1000),
        error_threshold_percentage=policy.error_threshold_percentage,
        reset_timeout_ms=int(policy.reset_timeout * 1000),
        seconds_until_half_open=round(breaker.seconds_until_half_open(), 3),
        opened_count=breaker.opened_count,
        volume_threshold=policy.volume_threshold,
        rolling_window_ms=int(policy.rolling_window * 1000),
        consecutive_failures=policy.consecutive_failures,
        slow_call_ms=int(policy.slow_call * 1000),
    )
