"""The observability pieces on fakes, without I/O: exposition of the runbook's
counters, the CoreMetrics adapter and its span events, the timing cache proxy,
the health document's JSON, log correlation and the telemetry settings."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer, format_span_id, format_trace_id
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import ValidationError

from session_authority.config import Settings
from session_authority.core.breaker import Breaker, BreakerPolicy
from session_authority.core.domain import Session, TokenHash, new_token
from session_authority.core.errors import CacheUnavailable
from session_authority.core.health import (
    BreakerReport,
    CacheHealth,
    CacheStats,
    HealthReport,
    PoolStats,
    StoreHealth,
)
from session_authority.core.ports import SessionCache
from session_authority.core.telemetry import CoreMetrics
from session_authority.logs import JsonFormatter
from session_authority.observability.admin import health_document, health_http_status
from session_authority.observability.collector import StateCollector
from session_authority.observability.instrumented import InstrumentedSessionCache
from session_authority.observability.metrics import Instruments, PrometheusMetrics
from session_authority.observability.sampler import HealthSampler
from session_authority.observability.tracing import breaker_event

from .fakes import InMemorySessionCache

_OTEL_VARS = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "ADMIN_HOST",
    "ADMIN_PORT",
    "HOST",
    "LOG_LEVEL",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _OTEL_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def spans() -> Iterator[tuple[Tracer, InMemorySpanExporter]]:
    """A private provider: spans made with its tracer are current for the API."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


def _lines(registry: CollectorRegistry) -> list[str]:
    return generate_latest(registry).decode().splitlines()


def _report(status: str = "healthy", hits: int = 3, misses: int = 1) -> HealthReport:
    pool = PoolStats(size=5, available=3, pending=0, min_size=2, max_size=10)
    return HealthReport(
        status=status,
        cache_enabled=True,
        cache_healthy=status == "healthy",
        cache=CacheHealth(connected=True, version="6.2.5", total_keys=7, pool=pool, ping_ms=0.5),
        stats=CacheStats(hits=hits, misses=misses, errors=2),
        cache_ttl_seconds=300,
        store=StoreHealth(connected=status != "unhealthy", version="16.2", pool=pool),
        breaker=BreakerReport("closed", 1000, 70.0, 15000, 0.0, opened_count=4),
        errors=() if status == "healthy" else ("postgres: down",),
    )


# --- exposition ------------------------------------------------------------------


def _collector(
    stats: CacheStats, breaker: Breaker, redis: bool = True, report: HealthReport | None = None
) -> CollectorRegistry:
    async def probe() -> HealthReport:
        raise AssertionError("a scrape must not probe")

    sampler = HealthSampler(probe)
    sampler.latest = report
    registry = CollectorRegistry()
    registry.register(
        StateCollector(
            stats=lambda: stats,
            breakers=[breaker],
            postgres_pool=lambda: PoolStats(size=1, max_size=10),
            redis_pool=(lambda: PoolStats(size=5, available=3, pending=2)) if redis else None,
            sampler=sampler,
        )
    )
    return registry


def test_runbook_counters_keep_their_names() -> None:
    lines = _lines(_collector(CacheStats(hits=3, misses=1, errors=2), Breaker(BreakerPolicy())))
    for name, value in (("hits", 3), ("misses", 1), ("errors", 2)):
        assert f"# TYPE session_cache_{name} untyped" in lines
        assert f"session_cache_{name} {value}.0" in lines
        assert f"# TYPE session_cache_{name}_total counter" in lines
        assert f"session_cache_{name}_total {value}.0" in lines
    assert "session_cache_hit_rate 75.0" in lines
    assert "redis_pool_size 5.0" in lines
    assert "redis_pool_available 3.0" in lines
    assert "redis_pool_pending 2.0" in lines
    assert "redis_connected 0.0" in lines  # no health sample yet: not known to be up
    assert 'circuit_breaker_state{breaker="redis"} 0.0' in lines


def test_gauges_from_the_latest_health_sample() -> None:
    breaker = Breaker(BreakerPolicy())
    breaker.trip("test")
    lines = _lines(_collector(CacheStats(), breaker, report=_report("degraded")))
    assert "redis_connected 1.0" in lines
    assert "redis_total_keys 7.0" in lines
    assert "postgres_connected 1.0" in lines
    assert 'session_authority_health_status{status="degraded"} 1.0' in lines
    assert 'session_authority_health_status{status="healthy"} 0.0' in lines
    assert 'circuit_breaker_state{breaker="redis"} 2.0' in lines
    assert "session_cache_hit_rate NaN" in lines  # no lookup yet


def test_no_redis_gauges_without_a_cache() -> None:
    text = "\n".join(_lines(_collector(CacheStats(), Breaker(BreakerPolicy()), redis=False)))
    assert "redis_" not in text
    assert "session_cache_hits 0.0" in text
    assert "postgres_pool_size 1.0" in text


# --- CoreMetrics --------------------------------------------------------------------


def test_core_metrics_counts_and_span_events(
    spans: tuple[Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = spans
    registry = CollectorRegistry()
    metrics: CoreMetrics = PrometheusMetrics(Instruments(registry))
    with tracer.start_as_current_span("rpc"):
        metrics.cache_lookup("hit")
        metrics.cache_lookup("bypassed")
        metrics.cache_error("fill")
        metrics.revoked(3, cache_purged=False)
        metrics.store_query("find", 0.002, ok=True)
        metrics.breaker_transition("closed", "open")
    lines = _lines(registry)
    assert 'session_cache_lookups_total{result="hit"} 1.0' in lines
    assert 'session_cache_lookups_total{result="bypassed"} 1.0' in lines
    assert 'session_cache_lookups_total{result="miss"} 0.0' in lines
    assert 'session_cache_operation_errors_total{operation="fill"} 1.0' in lines
    assert 'session_revocations_total{cache_purged="false"} 3.0' in lines
    assert (
        'postgres_query_duration_seconds_bucket{le="0.0025",operation="find",outcome="ok"} 1.0'
        in lines
    )
    transition = (
        'circuit_breaker_transitions_total{breaker="redis",from_state="closed",to_state="open"}'
    )
    assert f"{transition} 1.0" in lines
    (span,) = exporter.get_finished_spans()
    assert [(e.name, dict(e.attributes or {})) for e in span.events] == [
        ("session_cache.fallback", {"session_authority.cache.result": "bypassed"}),
        ("session_cache.error", {"session_authority.cache.operation": "fill"}),
    ]


def test_breaker_transitions_are_span_events(spans: tuple[Tracer, InMemorySpanExporter]) -> None:
    tracer, exporter = spans
    now = [0.0]
    breaker = Breaker(BreakerPolicy(reset_timeout=15), clock=lambda: now[0])
    breaker.add_listener(breaker_event)
    breaker.trip("outside any span")  # no span: nothing to record, nothing raised
    now[0] = 15.0
    with tracer.start_as_current_span("rpc"):
        assert breaker.allows()  # open → half-open, this caller probes
    (span,) = exporter.get_finished_spans()
    assert [(e.name, dict(e.attributes or {})) for e in span.events] == [
        (
            "circuit_breaker.transition",
            {
                "session_authority.breaker.name": "redis",
                "session_authority.breaker.from": "open",
                "session_authority.breaker.to": "half_open",
                "session_authority.breaker.cause": "reset timeout elapsed",
            },
        )
    ]


# --- the timing proxy ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_instrumented_cache_times_every_call_and_changes_nothing() -> None:
    registry = CollectorRegistry()
    inner = InMemorySessionCache()
    cache: SessionCache = InstrumentedSessionCache(inner, Instruments(registry).redis_latency)
    token_hash = TokenHash.of(new_token())
    now = datetime.now(UTC)
    session = Session("s", "u", token_hash, now, now + timedelta(hours=1))
    await cache.ping()
    await cache.mark_created(token_hash, 5)
    assert await cache.get(token_hash) is None
    assert await cache.fill(token_hash, session, 60) is True
    hit = await cache.get(token_hash)
    assert hit is not None
    assert hit.entry == session
    await cache.tombstone([token_hash], 600)
    inner.unavailable = True
    with pytest.raises(CacheUnavailable):
        await cache.get(token_hash)
    assert (await cache.health()).connected is False
    lines = _lines(registry)
    expected = {"ping": 1, "get": 3, "fill": 1, "mark_created": 1, "tombstone": 1}
    for operation, count in expected.items():
        assert f'redis_latency_count{{operation="{operation}"}} {count}.0' in lines
    assert "health" not in "\n".join(line for line in lines if line.startswith("redis_latency"))
    assert inner.calls == {**expected, "health": 1}  # every call reached the real port


# --- the health document ------------------------------------------------------------


def test_health_document_is_camel_case_with_numbers() -> None:
    doc = health_document(_report())
    assert doc["sessionCache"]["metrics"] == {
        "hits": 3,
        "misses": 1,
        "errors": 2,
        "total": 4,
        "hitRate": 75.0,
        "ttl": 300,
    }
    assert doc["sessionCache"]["pool"] == {
        "size": 5,
        "available": 3,
        "pending": 0,
        "minSize": 2,
        "maxSize": 10,
    }
    assert doc["breaker"]["openedCount"] == 4
    assert doc["redis"]["totalKeys"] == 7
    assert doc["errors"] == []
    assert doc["status"] == "healthy"
    assert doc["timestamp"].endswith("Z")


def test_health_http_status() -> None:
    assert health_http_status(_report("healthy")) == 200
    assert health_http_status(_report("degraded")) == 200
    assert health_http_status(_report("unhealthy")) == 503


# --- logs --------------------------------------------------------------------------------


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord(
        "session_authority.cache", logging.DEBUG, __file__, 1, message, (), None
    )


def test_json_log_lines_carry_the_active_span(spans: tuple[Tracer, InMemorySpanExporter]) -> None:
    tracer, _ = spans
    formatter = JsonFormatter()
    outside = json.loads(formatter.format(_record("Cache MISS abcd1234")))
    assert "trace_id" not in outside and "span_id" not in outside
    with tracer.start_as_current_span("rpc") as span:
        inside = json.loads(formatter.format(_record("Cache HIT abcd1234 (hit)")))
        context = span.get_span_context()
    assert inside["trace_id"] == format_trace_id(context.trace_id)
    assert inside["span_id"] == format_span_id(context.span_id)
    assert inside["message"] == "Cache HIT abcd1234 (hit)"
    assert inside["level"] == "DEBUG"


# --- settings -------------------------------------------------------------------------


def test_trace_exporter_choice() -> None:
    assert Settings().traces_exporters() == frozenset()
    endpoint = Settings(otel_exporter_otlp_endpoint="http://collector:4317")
    assert endpoint.traces_exporters() == {"otlp"}
    assert Settings(otel_traces_exporter="console").traces_exporters() == {"console"}
    assert Settings(otel_traces_exporter="otlp, console").traces_exporters() == {"otlp", "console"}
    none = Settings(otel_traces_exporter="none", otel_exporter_otlp_endpoint="http://c:4317")
    assert none.traces_exporters() == frozenset()
    with pytest.raises(ValidationError):
        Settings(otel_traces_exporter="zipkin")


def test_admin_and_log_settings() -> None:
    assert (Settings().admin_port, Settings().admin_bind_host) == (9464, "127.0.0.1")
    assert Settings(host="0.0.0.0").admin_bind_host == "127.0.0.1"  # not the gRPC host
    assert Settings(admin_host="0.0.0.0").admin_bind_host == "0.0.0.0"
    assert Settings(log_level="debug").log_level == "DEBUG"
    with pytest.raises(ValidationError):
        Settings(log_level="chatty")
    with pytest.raises(ValidationError):
        Settings(admin_port=70000)
    shown = Settings(otel_exporter_otlp_endpoint="https://u:secret@collector:4318").describe()
    assert "secret" not in str(shown)
