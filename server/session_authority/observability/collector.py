"""``StateCollector``: values read at scrape time, without network I/O.

The runbook's series keep its names and meaning:

* ``session_cache_hits`` / ``session_cache_misses`` / ``session_cache_errors``:
  the Health document's ``sessionCache.metrics`` counters (one source, so the
  two never disagree). The runbook's PromQL (``rate(session_cache_hits[5m])``)
  needs a series named exactly that, but prometheus_client names a counter's
  sample ``<name>_total``. So each is exposed twice: untyped under the
  runbook's name, and as a conventional counter ``<name>_total``.
* ``session_cache_hit_rate``: percent since start; NaN before the first
  lookup (so ``< 90`` does not fire on an idle server).
* ``redis_pool_size`` / ``_available`` / ``_pending`` (and ``_min_size``,
  ``_max_size``): live pool numbers. ``redis_connected``: 0/1 from the latest
  health sample. The ``redis_*`` gauges are absent when no ``REDIS_URL`` is
  set, so RedisDown does not fire for a deployment without a cache.

In OpenMetrics a counter family ``session_cache_hits`` (whose sample is
``session_cache_hits_total``) would clash with the runbook's family of the
same name, which makes the whole exposition invalid. ``openmetrics_view``
serves the ``_total`` twins there as ``unknown`` families of their own name:
the same two sample names and values, only the conventional one loses its
counter type in that format. The classic text format is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from session_authority.core.breaker import Breaker, BreakerState
from session_authority.core.health import CacheStats, PoolStats
from session_authority.observability.sampler import HealthSampler

__all__ = [
    "BREAKER_STATE_VALUES",
    "RUNBOOK_COUNTERS",
    "BusCollector",
    "BusCounters",
    "StateCollector",
    "openmetrics_view",
]

#: ``circuit_breaker_state``: 0 closed, 1 half-open, 2 open.
BREAKER_STATE_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
_STATUSES = ("healthy", "degraded", "unhealthy")
#: Exposed twice: untyped under this name and as a counter ``<name>_total``.
RUNBOOK_COUNTERS = ("session_cache_hits", "session_cache_misses", "session_cache_errors")


def _runbook_counter(name: str, doc: str, value: int) -> Iterator[Metric]:
    plain = Metric(name, f"{doc} (the runbook's name; same value as {name}_total).", "unknown")
    plain.add_sample(name, {}, float(value))
    yield plain
    yield CounterMetricFamily(name, f"{doc}.", value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _pool(prefix: str, what: str, stats: PoolStats) -> Iterator[Metric]:
    yield _gauge(f"{prefix}_pool_size", f"{what} connections open.", stats.size)
    yield _gauge(f"{prefix}_pool_available", f"{what} connections open and idle.", stats.available)
    yield _gauge(
        f"{prefix}_pool_pending", f"Callers waiting for a {what} connection.", stats.pending
    )
    yield _gauge(
        f"{prefix}_pool_min_size", f"Configured minimum of {what} connections.", stats.min_size
    )
    yield _gauge(
        f"{prefix}_pool_max_size", f"Configured maximum of {what} connections.", stats.max_size
    )


class StateCollector(Collector):
    def __init__(
        self,
        *,
        stats: Callable[[], CacheStats],
        breakers: Sequence[Breaker],
        postgres_pool: Callable[[], PoolStats],
        redis_pool: Callable[[], PoolStats] | None,
        sampler: HealthSampler,
    ) -> None:
        self._stats = stats
        self._breakers = breakers
        self._postgres_pool = postgres_pool
        self._redis_pool = redis_pool
        self._sampler = sampler

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield from _runbook_counter(
            "session_cache_hits", "Lookups answered by the cache since start", stats.hits
        )
        yield from _runbook_counter(
            "session_cache_misses", "Lookups that found nothing cached since start", stats.misses
        )
        yield from _runbook_counter(
            "session_cache_errors", "Failed cache operations since start", stats.errors
        )
        yield _gauge(
            "session_cache_hit_rate",
            "Percent of lookups answered by the cache since start (NaN before the first).",
            stats.hit_rate if stats.total else math.nan,
        )
        report = self._sampler.latest
        if self._redis_pool is not None:
            yield from _pool("redis", "Redis", self._redis_pool())
            connected = report is not None and report.cache.connected
            yield _gauge(
                "redis_connected", "1 when Redis answered the latest health probe.", connected
            )
            if report is not None and report.cache.connected:
                yield _gauge(
                    "redis_total_keys",
                    "Keys in the Redis database (DBSIZE).",
                    report.cache.total_keys,
                )
        yield from _pool("postgres", "Postgres", self._postgres_pool())
        pg_up = report is not None and report.store.connected
        yield _gauge(
            "postgres_connected", "1 when Postgres answered the latest health probe.", pg_up
        )
        state = GaugeMetricFamily(
            "circuit_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            labels=["breaker"],
        )
        for breaker in self._breakers:
            state.add_metric([breaker.name], BREAKER_STATE_VALUES[breaker.state])
        yield state
        excused = CounterMetricFamily(
            "circuit_breaker_slow_calls_excused",
            "Slow or timed-out calls not counted towards opening: the dependency answered "
            "other calls meanwhile (the process was the bottleneck).",
            labels=["breaker"],
        )
        for breaker in self._breakers:
            excused.add_metric([breaker.name], breaker.slow_excused)
        yield excused
        if report is not None:
            status = GaugeMetricFamily(
                "session_authority_health_status",
                "1 for the status of the latest health sample (healthy, degraded, unhealthy).",
                labels=["status"],
            )
            for name in _STATUSES:
                status.add_metric([name], float(report.status == name))
            yield status


class _OpenMetricsView(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            if metric.type == "counter" and metric.name in RUNBOOK_COUNTERS:
                twin = Metric(f"{metric.name}_total", metric.documentation, "unknown")
                twin.samples = list(metric.samples)
                yield twin
            else:
                yield metric


def openmetrics_view(registry: CollectorRegistry) -> CollectorRegistry:
    """``registry`` as OpenMetrics may show it (see the module docstring). A
    registry of its own, so that ``?name[]=`` filters its samples by name."""
    view = CollectorRegistry(support_collectors_without_names=True)
    view.register(_OpenMetricsView(registry))
    return view


class BusCounters(Protocol):
    """What the revocation bus counts (adapters/redis_bus.py)."""

    @property
    def live(self) -> bool: ...

    restarts: int
    malformed: int
    incomplete: int


class BusCollector(Collector):
    """The revocation bus's counters, read at scrape time:
    ``revocation_bus_live`` (0/1: this process answers from L1),
    ``revocation_bus_restarts_total`` (its listener ended and was started
    again), ``revocation_bus_malformed_messages_total`` (ignored; each dropped
    every L1 copy) and ``revocation_bus_incomplete_total`` (revocations not
    acknowledged in time by every registered process: ``propagated: false``)."""

    def __init__(self, bus: BusCounters) -> None:
        self._bus = bus

    def collect(self) -> Iterator[Metric]:
        bus = self._bus
        yield _gauge(
            "revocation_bus_live",
            "1 while this process's revocation subscription is confirmed, heard from and "
            "registered (only then does it answer from its L1 cache).",
            float(bus.live),
        )
        yield CounterMetricFamily(
            "revocation_bus_restarts",
            "Times the revocation bus's listener ended (error, silence, crash) and restarted.",
            value=bus.restarts,
        )
        yield CounterMetricFamily(
            "revocation_bus_malformed_messages",
            "Malformed messages on the revocation channels, ignored (each dropped every L1 copy).",
            value=bus.malformed,
        )
        yield CounterMetricFamily(
            "revocation_bus_incomplete",
            "Revocations not acknowledged in time by every registered process "
            "(Invalidate answered propagated: false).",
            value=bus.incomplete,
        )
