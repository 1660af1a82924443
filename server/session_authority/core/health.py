"""Health facts as domain values; the transport renders them."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "BreakerReport",
    "CacheHealth",
    "CacheStats",
    "HealthReport",
    "LocalCacheReport",
    "PoolStats",
    "StoreHealth",
]


@dataclass(frozen=True, slots=True)
class PoolStats:
    size: int = 0
    available: int = 0
    pending: int = 0
    min_size: int = 0
    max_size: int = 0


@dataclass(frozen=True, slots=True)
class CacheHealth:
    connected: bool
    version: str = ""
    uptime_seconds: int = 0
    used_memory: str = ""
    total_keys: int = 0
    pool: PoolStats = field(default_factory=PoolStats)
    ping_ms: float = 0.0
    set_ms: float = 0.0
    get_ms: float = 0.0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class StoreHealth:
    connected: bool
    version: str = ""
    pool: PoolStats = field(default_factory=PoolStats)
    ping_ms: float = 0.0
    error: str | None = None


@dataclass(slots=True)
class CacheStats:
    """Counters kept by the core since start."""

    hits: int = 0
    misses: int = 0
    errors: int = 0
    early_refreshes: int = 0

    @property
    def total(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        """Percent of lookups answered by the cache, two decimals."""
        return round(100.0 * self.hits / self.total, 2) if self.total else 0.0


@dataclass(frozen=True, slots=True)
class BreakerReport:
    state: str
    timeout_ms: int
    error_threshold_percentage: float
    reset_timeout_ms: int
    seconds_until_half_open: float
    opened_count: int
    volume_threshold: int = 0
    rolling_window_ms: int = 0
    consecutive_failures: int = 0
    slow_call_ms: int = 0


@dataclass(frozen=True, slots=True)
class LocalCacheReport:
    enabled: bool
    live: bool
    entries: int
    ttl_ms: int
    bus: str = ""
    bus_restarts: int = 0
    malformed_messages: int = 0


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The runbook's health document, as domain values."""

    status: str  # healthy | degraded | unhealthy
    cache_enabled: bool
    cache_healthy: bool
    cache: CacheHealth
    stats: CacheStats
    cache_ttl_seconds: int
    store: StoreHealth
    breaker: BreakerReport
    errors: tuple[str, ...]
    store_breaker: BreakerReport | None = None
    local_cache: LocalCacheReport | None = None
