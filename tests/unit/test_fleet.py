"""``serve --workers``: the admin port's merged expositions and combined health
documents (observability/fleet.py), on prometheus_client's own output and the
real health rendering, and the default worker count (no I/O)."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from session_authority.core.health import (
    BreakerReport,
    CacheHealth,
    CacheStats,
    HealthReport,
    LocalCacheReport,
    PoolStats,
    StoreHealth,
)
from session_authority.observability.collector import StateCollector, openmetrics_view
from session_authority.observability.fleet import combine_health, merge_expositions
from session_authority.observability.health_json import health_document
from session_authority.observability.sampler import HealthSampler
from session_authority.workers import usable_cores
from tests.third_party import generate_openmetrics, parse_openmetrics


def _registry(calls: int, hits: int) -> CollectorRegistry:
    registry = CollectorRegistry()
    handled = Counter("rpc_handled", "RPCs.", ["code"], registry=registry)
    handled.labels("OK").inc(calls)
    latency = Histogram("latency_ms", "Latency.", buckets=(1, 5), registry=registry)
    for _ in range(calls):
        latency.observe(2)

    async def probe() -> HealthReport:
        raise AssertionError("a scrape must not probe")

    registry.register(
        StateCollector(
            stats=lambda: CacheStats(hits=hits),
            breakers=[],
            postgres_pool=lambda: PoolStats(size=1, max_size=10),
            redis_pool=lambda: PoolStats(size=3),
            sampler=HealthSampler(probe),
        )
    )
    return registry


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_classic_expositions_merge_with_a_worker_label() -> None:
    parts = [
        (0, generate_latest(_registry(3, 10)).decode()),
        (1, generate_latest(_registry(5, 20)).decode()),
    ]
    merged = merge_expositions(parts)
    samples = _samples(merged)
    assert samples[("rpc_handled_total", (("code", "OK"), ("worker", "0")))] == 3
    assert samples[("rpc_handled_total", (("code", "OK"), ("worker", "1")))] == 5
    assert samples[("latency_ms_bucket", (("le", "5.0"), ("worker", "1")))] == 5
    # The runbook's untyped twin and its counter stay two families, each once.
    assert samples[("session_cache_hits", (("worker", "0"),))] == 10
    assert samples[("session_cache_hits_total", (("worker", "1"),))] == 20
    for name in ("rpc_handled_total", "session_cache_hits", "session_cache_hits_total"):
        assert merged.count(f"# TYPE {name} ") == 1, name
    # Every worker's samples of a family sit together, after its metadata.
    lines = merged.splitlines()
    at = lines.index("# TYPE redis_pool_size gauge")
    assert lines[at + 1 : at + 3] == [
        'redis_pool_size{worker="0"} 3.0',
        'redis_pool_size{worker="1"} 3.0',
    ]


def test_openmetrics_expositions_merge_into_one_valid_document() -> None:
    parts = [
        (i, generate_openmetrics(openmetrics_view(_registry(calls, 1))).decode())
        for i, calls in enumerate((2, 7))
    ]
    merged = merge_expositions(parts, openmetrics=True)
    assert merged.endswith("# EOF\n")
    assert merged.count("# EOF") == 1
    families = {f.name: f for f in parse_openmetrics(merged)}  # raises on an invalid document
    handled = {
        s.labels["worker"]: s.value
        for s in families["rpc_handled"].samples
        if s.name == "rpc_handled_total"
    }
    assert handled == {"0": 2, "1": 7}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("up 1.0", 'up{worker="3"} 1.0'),
        ('x{a="b c"} 2', 'x{worker="3",a="b c"} 2'),
        ("x{} 2", 'x{worker="3"} 2'),
    ],
)
def test_worker_label_goes_first(line: str, expected: str) -> None:
    assert merge_expositions([(3, line)]).splitlines() == [expected]


def _report(
    status: str = "healthy",
    *,
    hits: int = 3,
    misses: int = 1,
    breaker: str = "closed",
    redis: bool = True,
    errors: tuple[str, ...] = (),
    l1_entries: int = 3,
    l1_live: bool = True,
) -> dict[str, Any]:
    pool = PoolStats(size=5, available=3, pending=1, min_size=2, max_size=10)
    report = HealthReport(
        status=status,
        cache_enabled=True,
        cache_healthy=status == "healthy",
        cache=CacheHealth(connected=redis, version="6.2.5", total_keys=7, pool=pool, ping_ms=0.5),
        stats=CacheStats(hits=hits, misses=misses, errors=2),
        cache_ttl_seconds=300,
        store=StoreHealth(connected=status != "unhealthy", version="16.2", pool=pool, ping_ms=2.0),
        breaker=BreakerReport(breaker, 1000, 70.0, 15000, 0.0, opened_count=1),
        store_breaker=BreakerReport("closed", 7000, 50.0, 5000, 0.0, opened_count=0),
        errors=errors,
        local_cache=LocalCacheReport(
            enabled=True,
            live=l1_live,
            entries=l1_entries,
            ttl_ms=500,
            bus="live" if l1_live else "silent",
            bus_restarts=1,
            malformed_messages=2,
        ),
    )
    return health_document(report)


def test_health_of_healthy_workers_sums_counters_and_pools() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    doc = combine_health([_report(hits=3, misses=1), _report(hits=5, misses=3)], [11, 12], now)
    assert doc["status"] == "healthy"
    assert doc["timestamp"] == "2026-01-02T03:04:05Z"
    metrics = doc["sessionCache"]["metrics"]
    assert (metrics["hits"], metrics["misses"], metrics["total"], metrics["errors"]) == (
        8,
        4,
        12,
        4,
    )
    assert metrics["hitRate"] == 66.67
    assert doc["sessionCache"]["pool"] == {
        "size": 10,
        "available": 6,
        "pending": 2,
        "minSize": 4,
        "maxSize": 20,
    }
    assert doc["postgres"]["pool"]["maxSize"] == 20
    assert doc["localCache"] == {
        "enabled": True,
        "live": True,
        "entries": 6,
        "ttlMs": 500,
        "bus": "live",
        "busRestarts": 2,
        "malformedMessages": 4,
    }
    assert doc["redis"]["connected"] is True
    assert doc["errors"] == []
    assert doc["workers"] == [
        {
            "worker": 0,
            "pid": 11,
            "status": "healthy",
            "breaker": "closed",
            "postgresBreaker": "closed",
        },
        {
            "worker": 1,
            "pid": 12,
            "status": "healthy",
            "breaker": "closed",
            "postgresBreaker": "closed",
        },
    ]
    # Every key of a worker's document is there (plus `workers`).
    assert set(doc) == set(_report()) | {"workers"}


def test_health_shows_the_worst_worker() -> None:
    degraded = _report(
        "degraded",
        breaker="open",
        redis=False,
        errors=("redis: Connection refused",),
        l1_live=False,
    )
    doc = combine_health([_report(), degraded], [11, 12])
    assert doc["status"] == "degraded"
    assert doc["breaker"]["state"] == "open"
    assert doc["redis"]["connected"] is False
    assert doc["redis"]["version"] == "6.2.5"  # from the worker that reached it
    assert doc["sessionCache"]["healthy"] is False
    assert doc["errors"] == ["redis: Connection refused"]
    assert doc["localCache"]["live"] is False
    assert doc["localCache"]["bus"] == "silent"  # the worker whose bus is not live


def test_a_silent_worker_makes_the_replica_unhealthy() -> None:
    doc = combine_health([_report(), None], [11, 12])
    assert doc["status"] == "unhealthy"
    assert doc["postgres"]["connected"] is False
    assert doc["errors"] == ["worker 1 (pid 12) did not answer"]
    assert doc["workers"][1] == {"worker": 1, "pid": 12, "status": "unhealthy"}
    nobody = combine_health([None, None], [11, 12])
    assert nobody["status"] == "unhealthy"
    assert len(nobody["errors"]) == 2


def test_usable_cores_honours_a_cgroup_quota(tmp_path: Path) -> None:
    limit = tmp_path / "cpu.max"
    limit.write_text("150000 100000\n")  # 1.5 CPUs: 2 workers
    assert usable_cores(limit) == min(2, len(os.sched_getaffinity(0)))
    limit.write_text("max 100000\n")
    assert usable_cores(limit) == len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path / "absent") == len(os.sched_getaffinity(0))
