"""``health_document``: the runbook's health document as JSON-ready values,
rendered straight from the core's ``HealthReport`` (no protobuf here).

The same report answers the gRPC ``Health`` RPC (``transport.mapping``), and
the two must agree field for field: this renders what proto3 JSON prints for
that reply (camelCase keys; every field, zero values included, since the
proto marks them ``optional``; ``errors: []`` when there are none;
``postgresBreaker`` only when the Postgres breaker is enabled; doubles as
floats, ``NaN``/``Infinity`` as strings; ``timestamp`` in RFC 3339 with 0, 3
or 6 fractional digits), except that 64-bit counters are JSON numbers here
(strings in proto3 JSON): ``"hits": 9823``, and they stay far below 2**53.
tests/unit/test_observability.py compares the two renderings, so a field
added to one and not the other fails there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from session_authority.core.health import BreakerReport, HealthReport, PoolStats

__all__ = ["health_document", "health_http_status", "rfc3339"]


def health_http_status(report: HealthReport) -> int:
    """503 only when unhealthy (Postgres down): degraded still answers."""
    return 503 if report.status == "unhealthy" else 200


def health_document(
    report: HealthReport, now: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> dict[str, Any]:
    cache, stats, store = report.cache, report.stats, report.store
    doc: dict[str, Any] = {
        "status": report.status,
        "timestamp": rfc3339(now()),
        "redis": {
            "connected": cache.connected,
            "version": cache.version,
            "uptime": cache.uptime_seconds,
            "usedMemory": cache.used_memory,
            "totalKeys": cache.total_keys,
        },
        "sessionCache": {
            "enabled": report.cache_enabled,
            "healthy": report.cache_healthy,
            "metrics": {
                "hits": stats.hits,
                "misses": stats.misses,
                "errors": stats.errors,
                "total": stats.total,
                "hitRate": _double(stats.hit_rate),
                "ttl": report.cache_ttl_seconds,
            },
            "pool": _pool(cache.pool),
        },
        "performance": {
            "ping": _double(cache.ping_ms),
            "set": _double(cache.set_ms),
            "get": _double(cache.get_ms),
        },
        "errors": list(report.errors),
        "postgres": {
            "connected": store.connected,
            "version": store.version,
            "pool": _pool(store.pool),
            "ping": _double(store.ping_ms),
        },
        "breaker": _breaker(report.breaker),
    }
    if report.store_breaker is not None:
        doc["postgresBreaker"] = _breaker(report.store_breaker)
    local = report.local_cache
    if local is not None:
        doc["localCache"] = {
            "enabled": local.enabled,
            "live": local.live,
            "entries": local.entries,
            "ttlMs": local.ttl_ms,
            "bus": local.bus,
            "busRestarts": local.bus_restarts,
            "malformedMessages": local.malformed_messages,
        }
    return doc


def rfc3339(at: datetime) -> str:
    """UTC, ``Z``-suffixed, with 0, 3 or 6 fractional digits: what proto3 JSON
    prints for a ``google.protobuf.Timestamp`` taken from a ``datetime``."""
    utc = at.astimezone(UTC).replace(tzinfo=None)
    whole = utc.replace(microsecond=0).isoformat()
    micros = utc.microsecond
    if micros == 0:
        return f"{whole}Z"
    if micros % 1000 == 0:
        return f"{whole}.{micros // 1000:03d}Z"
    return f"{whole}.{micros:06d}Z"


def _double(value: float) -> float | str:
    """A proto ``double`` in proto3 JSON: non-finite values are strings."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _pool(stats: PoolStats) -> dict[str, int]:
    return {
        "size": stats.size,
        "available": stats.available,
        "pending": stats.pending,
        "minSize": stats.min_size,
        "maxSize": stats.max_size,
    }


def _breaker(report: BreakerReport) -> dict[str, Any]:
    return {
        "state": report.state,
        "timeoutMs": report.timeout_ms,
        "errorThresholdPercentage": _double(report.error_threshold_percentage),
        "resetTimeoutMs": report.reset_timeout_ms,
        "secondsUntilHalfOpen": _double(report.seconds_until_half_open),
        "openedCount": report.opened_count,
        "volumeThreshold": report.volume_threshold,
        "rollingWindowMs": report.rolling_window_ms,
        "consecutiveFailures": report.consecutive_failures,
        "slowCallMs": report.slow_call_ms,
    }
