"""The observability pieces on fakes, without I/O: exposition of the runbook's
counters (classic text and OpenMetrics), the CoreMetrics adapter and its span
events, the breaker listener, the timing wrappers of both ports, the health
document's JSON (against the gRPC reply's), the import contracts, log
correlation and the telemetry settings."""

from __future__ import annotations

import ast
import json
import logging
import math
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    DEFAULT_OFF,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Tracer, format_span_id, format_trace_id
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import ValidationError

import session_authority.observability
from session_authority.config import Settings
from session_authority.core.breaker import Breaker, BreakerPolicy
from session_authority.core.domain import Session, TokenHash, new_token
from session_authority.core.errors import CacheUnavailable, CircuitOpen, StoreUnavailable
from session_authority.core.guarded import guard_cache, guard_store
from session_authority.core.health import (
    BreakerReport,
    CacheHealth,
    CacheStats,
    HealthReport,
    LocalCacheReport,
    PoolStats,
    StoreHealth,
)
from session_authority.core.ports import SessionCache, SessionStore
from session_authority.core.telemetry import CoreMetrics
from session_authority.logs import JsonFormatter
from session_authority.observability import Telemetry
from session_authority.observability.collector import StateCollector, openmetrics_view
from session_authority.observability.health_json import (
    health_document,
    health_http_status,
    rfc3339,
)
from session_authority.observability.interceptor import RpcMetricsInterceptor
from session_authority.observability.metrics import Instruments, PrometheusMetrics
from session_authority.observability.sampler import HealthSampler
from session_authority.observability.server_spans import ServerSpans, pure_sampler
from session_authority.observability.timings import CacheTimings, StoreTimings
from session_authority.observability.tracing import breaker_event
from session_authority.transport.mapping import health_to_pb
from tests.third_party import generate_openmetrics, parse_openmetrics

from .fakes import InMemorySessionCache, InMemorySessionStore

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


def test_slow_calls_excused_by_the_breaker_are_counted() -> None:
    breaker = Breaker(BreakerPolicy())
    breaker.slow_excused = 4
    lines = _lines(_collector(CacheStats(), breaker))
    assert "# TYPE circuit_breaker_slow_calls_excused_total counter" in lines
    assert 'circuit_breaker_slow_calls_excused_total{breaker="redis"} 4.0' in lines


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


def test_openmetrics_is_valid_and_keeps_every_runbook_sample() -> None:
    """OpenMetrics forbids two families of one name, so a counter family
    ``session_cache_hits`` next to the runbook's untyped one would make the
    whole scrape unparseable: the view serves the ``_total`` twin as an
    ``unknown`` family of its own name, with the same samples."""
    registry = _collector(CacheStats(hits=3, misses=1, errors=2), Breaker(BreakerPolicy()))
    Instruments(registry)
    with pytest.raises(ValueError, match="metadata after samples"):  # what the view is for
        list(parse_openmetrics(generate_openmetrics(registry).decode()))
    text = generate_openmetrics(openmetrics_view(registry)).decode()
    families = {f.name: f for f in parse_openmetrics(text)}  # strict parser
    for name, value in (("hits", 3), ("misses", 1), ("errors", 2)):
        for family in (f"session_cache_{name}", f"session_cache_{name}_total"):
            assert families[family].type == "unknown"
            assert [(s.name, s.value) for s in families[family].samples] == [(family, value)]
    assert families["session_cache_lookups"].type == "counter"  # other counters untouched
    assert families["redis_latency"].type == "histogram"
    assert families["session_cache_hit_rate"].samples[0].value == 75.0
    # The classic text format is what it was: untyped twin plus a real counter.
    assert "# TYPE session_cache_hits_total counter" in _lines(registry)


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
    lines = _lines(registry)
    assert 'session_cache_lookups_total{result="hit"} 1.0' in lines
    assert 'session_cache_lookups_total{result="bypassed"} 1.0' in lines
    assert 'session_cache_lookups_total{result="miss"} 0.0' in lines
    assert 'session_cache_operation_errors_total{operation="fill"} 1.0' in lines
    assert 'session_revocations_total{cache_purged="false"} 3.0' in lines
    (span,) = exporter.get_finished_spans()
    assert [(e.name, dict(e.attributes or {})) for e in span.events] == [
        ("session_cache.fallback", {"session_authority.cache.result": "bypassed"}),
        ("session_cache.error", {"session_authority.cache.operation": "fill"}),
    ]


def test_an_l1_hit_counts_a_local_lookup_and_a_cache_validation(
    spans: tuple[Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = spans
    for traced in (True, False):
        registry = CollectorRegistry()
        metrics: CoreMetrics = PrometheusMetrics(Instruments(registry), traced=traced)
        with tracer.start_as_current_span("rpc"):
            metrics.local_hit(True, "none")
            metrics.local_hit(True, "none")
            metrics.local_hit(False, "revoked")
        lines = _lines(registry)
        assert 'session_cache_lookups_total{result="local"} 3.0' in lines
        assert 'session_validations_total{reason="none",source="cache",valid="true"} 2.0' in lines
        assert (
            'session_validations_total{reason="revoked",source="cache",valid="false"} 1.0' in lines
        )
    traced_span, untraced_span = exporter.get_finished_spans()
    assert dict(traced_span.attributes or {})["session_authority.validation.reason"] == "revoked"
    assert not untraced_span.attributes  # traced=False: no span is looked for


def test_touches_and_their_writes_are_counted_from_zero() -> None:
    registry = CollectorRegistry()
    metrics: CoreMetrics = PrometheusMetrics(Instruments(registry), traced=False)
    before = _lines(registry)
    assert 'session_touches_total{answer="behind"} 0.0' in before  # every series from zero
    assert 'session_touch_writes_total{outcome="failed"} 0.0' in before
    for answer in ("cache", "cache", "behind", "store"):
        metrics.touched(answer)
    for outcome in ("written", "failed", "failed", "refused"):
        metrics.touch_write(outcome)
    lines = _lines(registry)
    assert 'session_touches_total{answer="cache"} 2.0' in lines
    assert 'session_touches_total{answer="behind"} 1.0' in lines
    assert 'session_touches_total{answer="store"} 1.0' in lines
    assert 'session_touch_writes_total{outcome="written"} 1.0' in lines
    assert 'session_touch_writes_total{outcome="coalesced"} 0.0' in lines
    assert 'session_touch_writes_total{outcome="refused"} 1.0' in lines
    assert 'session_touch_writes_total{outcome="failed"} 2.0' in lines


def test_validated_counts_and_annotates_the_current_span(
    spans: tuple[Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = spans
    registry = CollectorRegistry()
    metrics: CoreMetrics = PrometheusMetrics(Instruments(registry))
    metrics.validated(False, "token_format", "unknown")  # no span: counted only
    with tracer.start_as_current_span("rpc"):
        metrics.validated(True, "cache", "none")
    with tracer.start_as_current_span("rpc"):
        metrics.validated(False, "database", "revoked")
    lines = _lines(registry)
    for labels in (
        'reason="none",source="cache",valid="true"',
        'reason="revoked",source="database",valid="false"',
        'reason="unknown",source="token_format",valid="false"',
    ):
        assert f"session_validations_total{{{labels}}} 1.0" in lines
    assert [dict(s.attributes or {}) for s in exporter.get_finished_spans()] == [
        {
            "session_authority.validation.valid": True,
            "session_authority.validation.source": "cache",
            "session_authority.validation.reason": "none",
        },
        {
            "session_authority.validation.valid": False,
            "session_authority.validation.source": "database",
            "session_authority.validation.reason": "revoked",
        },
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


def test_watch_breaker_counts_and_records_each_transition_once(
    spans: tuple[Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = spans
    telemetry = Telemetry(Settings())
    now = [0.0]
    redis = Breaker(BreakerPolicy(reset_timeout=15), clock=lambda: now[0])
    postgres = Breaker(BreakerPolicy(), name="postgres", error=StoreUnavailable)
    for breaker in (redis, postgres, redis):  # watching twice adds nothing
        telemetry.watch_breaker(breaker)
    with tracer.start_as_current_span("rpc"):
        redis.trip("test")
        postgres.trip("test")
    now[0] = 15.0
    assert redis.allows()  # outside any span: counted, no event
    lines = _lines(telemetry.registry)
    step = 'circuit_breaker_transitions_total{{breaker="{}",from_state="{}",to_state="{}"}} {}'
    assert step.format("redis", "closed", "open", "1.0") in lines
    assert step.format("postgres", "closed", "open", "1.0") in lines
    assert step.format("redis", "open", "half_open", "1.0") in lines
    assert step.format("postgres", "open", "half_open", "0.0") in lines
    (span,) = exporter.get_finished_spans()
    assert [dict(e.attributes or {})["session_authority.breaker.name"] for e in span.events] == [
        "redis",
        "postgres",
    ]


# --- the port guards' timing ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_cache_guard_times_every_call_and_changes_nothing() -> None:
    registry = CollectorRegistry()
    inner = InMemorySessionCache()
    cache: SessionCache = guard_cache(
        inner, None, observer=CacheTimings(Instruments(registry).redis_latency)
    )
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
    assert (await cache.health()).connected is False  # a failed probe adds no sample
    lines = _lines(registry)
    expected = {"ping": 1, "get": 3, "fill": 1, "mark_created": 1, "tombstone": 1}
    for operation, count in expected.items():
        assert f'redis_latency_count{{operation="{operation}"}} {count}.0' in lines
    assert "health" not in "\n".join(line for line in lines if line.startswith("redis_latency"))
    assert inner.calls == {**expected, "health": 1}  # every call reached the real port


@pytest.mark.asyncio
async def test_the_cache_guard_observes_the_health_probes_round_trips() -> None:
    class Probed(InMemorySessionCache):
        async def health(self) -> CacheHealth:
            await super().health()
            return CacheHealth(connected=True, ping_ms=0.4, set_ms=0.6, get_ms=12.0)

    registry = CollectorRegistry()
    cache = guard_cache(Probed(), None, observer=CacheTimings(Instruments(registry).redis_latency))
    await cache.health()
    lines = _lines(registry)
    # PING, SET and GET: three samples; the slow GET lands above the 10 ms bucket.
    assert 'redis_latency_count{operation="health"} 3.0' in lines
    assert 'redis_latency_bucket{le="10.0",operation="health"} 2.0' in lines
    assert 'redis_latency_sum{operation="health"} 13.0' in lines


@pytest.mark.asyncio
async def test_the_store_guard_times_every_call_and_changes_nothing() -> None:
    registry = CollectorRegistry()
    inner = InMemorySessionStore()
    store: SessionStore = guard_store(
        inner, None, observer=StoreTimings(Instruments(registry).store_query)
    )
    token_hash = TokenHash.of(new_token())
    now = datetime.now(UTC)
    sid = str(uuid.uuid4())
    session = Session(sid, "u", token_hash, now, now + timedelta(hours=1))
    await store.create(session)
    assert await store.find(token_hash) == session
    assert await store.find(TokenHash.of(new_token())) is None
    revoked = await store.revoke(session_id=sid)
    assert revoked is not None and revoked.revoked_now
    assert await store.revoke_user("u") == []
    assert await store.revoked_since(60) == [token_hash]
    assert await store.pending_purges(10) == [token_hash]
    await store.confirm_purged([token_hash])
    with pytest.raises(StoreUnavailable):
        await store.create(session)  # duplicate: the fake raises like the adapter
    inner.unavailable = True
    with pytest.raises(StoreUnavailable):
        await store.find(token_hash)
    assert (await store.health()).connected is False
    lines = _lines(registry)
    ok = {
        "create": 1,
        "find": 2,
        "revoke": 1,
        "revoke_user": 1,
        "revoked_since": 1,
        "pending_purges": 1,
        "confirm_purged": 1,
    }
    for operation, count in ok.items():
        sample = f'postgres_query_duration_seconds_count{{operation="{operation}",outcome="ok"}}'
        assert f"{sample} {count}.0" in lines
    for operation in ("create", "find"):
        sample = f'postgres_query_duration_seconds_count{{operation="{operation}",outcome="error"}}'
        assert f"{sample} 1.0" in lines
    assert "health" not in "\n".join(line for line in lines if line.startswith("postgres_query"))
    assert inner.calls == {
        "create": 2,
        "find": 3,
        "revoke": 1,
        "revoke_user": 1,
        "revoked_since": 1,
        "pending_purges": 1,
        "confirm_purged": 1,
        "health": 1,
    }  # every call reached the real port


@pytest.mark.asyncio
async def test_behind_open_breakers_both_guards_time_only_what_reached_the_port() -> None:
    """The same guard for both ports: calls through the breaker are timed; a
    call the open breaker refuses is neither timed nor sent; the cache probe's
    ``inner`` is timed without the breaker."""
    registry = CollectorRegistry()
    instruments = Instruments(registry)
    cache_port, store_port = InMemorySessionCache(), InMemorySessionStore()
    redis = Breaker(BreakerPolicy(timeout=1.0), name="redis")
    postgres = Breaker(BreakerPolicy(timeout=1.0), name="postgres", error=StoreUnavailable)
    cache = guard_cache(cache_port, redis, observer=CacheTimings(instruments.redis_latency))
    store = guard_store(store_port, postgres, observer=StoreTimings(instruments.store_query))
    token_hash = TokenHash.of(new_token())
    assert await cache.get(token_hash) is None
    assert await store.find(token_hash) is None
    redis.trip("test")
    postgres.trip("test")
    with pytest.raises(CircuitOpen):
        await cache.get(token_hash)
    with pytest.raises(StoreUnavailable):
        await store.find(token_hash)
    await cache.inner.ping()  # the probe's way: past the open breaker, still timed
    lines = _lines(registry)
    assert 'redis_latency_count{operation="get"} 1.0' in lines
    assert 'redis_latency_count{operation="ping"} 1.0' in lines
    sample = 'postgres_query_duration_seconds_count{operation="find",outcome="ok"} 1.0'
    assert sample in lines
    assert (cache_port.calls["get"], store_port.calls["find"]) == (1, 1)


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
    assert "postgresBreaker" not in doc


_INT64 = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def _unquote_int64(descriptor: Descriptor, doc: dict[str, Any]) -> None:
    for field in descriptor.fields:
        value = doc.get(field.json_name)
        if field.type in _INT64 and isinstance(value, str):
            doc[field.json_name] = int(value)
        elif field.message_type is not None and isinstance(value, dict):
            _unquote_int64(field.message_type, value)


def _grpc_rendering(report: HealthReport) -> dict[str, Any]:
    """What the gRPC Health reply says, as proto3 JSON with 64-bit integers
    unquoted: the document /health served before it stopped using protobuf."""
    reply = health_to_pb(report)
    doc = MessageToDict(reply, always_print_fields_with_no_presence=True)
    _unquote_int64(reply.DESCRIPTOR, doc)
    return doc


def _breaker_report(state: str = "closed", opened: int = 0) -> BreakerReport:
    return BreakerReport(state, 1000, 50.0, 30000, 0.0, opened_count=opened)


_ZERO = HealthReport(
    status="unhealthy",
    cache_enabled=False,
    cache_healthy=False,
    cache=CacheHealth(connected=False),
    stats=CacheStats(),
    cache_ttl_seconds=0,
    store=StoreHealth(connected=False),
    breaker=BreakerReport("closed", 0, 0.0, 0, 0.0, opened_count=0),
    errors=(),
)
_PG_POOL = PoolStats(size=10, available=9, pending=0, min_size=2, max_size=10)

HEALTH_REPORTS = {
    "healthy": _report(),
    "degraded": HealthReport(
        status="degraded",
        cache_enabled=True,
        cache_healthy=False,
        cache=CacheHealth(connected=False, error="redis: Connection refused"),
        stats=CacheStats(hits=9823, misses=177, errors=12, early_refreshes=3),
        cache_ttl_seconds=300,
        store=StoreHealth(connected=True, version="16.2", pool=_PG_POOL, ping_ms=0.731),
        breaker=BreakerReport("open", 1000, 50.0, 30000, 12.5, opened_count=2**40),
        errors=("redis: Connection refused", "circuit breaker open"),
        store_breaker=_breaker_report(),
    ),
    "unhealthy with both breakers": HealthReport(
        status="unhealthy",
        cache_enabled=True,
        cache_healthy=True,
        cache=CacheHealth(
            connected=True,
            version="7.2.4",
            uptime_seconds=86_400,
            used_memory="2.5M",
            total_keys=12_345,
            pool=PoolStats(size=3, available=1, pending=4, min_size=1, max_size=10),
            ping_ms=0.1234,
            set_ms=0.2,
            get_ms=1 / 3,
        ),
        stats=CacheStats(hits=1, misses=2),
        cache_ttl_seconds=3600,
        store=StoreHealth(connected=False, error="postgres: timeout"),
        breaker=_breaker_report("half_open", 7),
        errors=("postgres: timeout",),
        store_breaker=_breaker_report("open", 1),
        local_cache=LocalCacheReport(enabled=True, live=True, entries=42, ttl_ms=1000),
    ),
    "zeros and falses": _ZERO,
    "local cache off": replace(
        _ZERO, local_cache=LocalCacheReport(enabled=False, live=False, entries=0, ttl_ms=0)
    ),
    "nan and infinities": HealthReport(
        status="healthy",
        cache_enabled=True,
        cache_healthy=True,
        cache=CacheHealth(connected=True, ping_ms=math.inf, set_ms=-math.inf, get_ms=math.nan),
        stats=CacheStats(),
        cache_ttl_seconds=300,
        store=StoreHealth(connected=True),
        breaker=BreakerReport("closed", 1000, 50, 30000, 0, opened_count=0),  # ints for doubles
        errors=(),
    ),
}


@pytest.mark.parametrize("report", HEALTH_REPORTS.values(), ids=HEALTH_REPORTS.keys())
def test_health_document_matches_the_grpc_reply(report: HealthReport) -> None:
    """gRPC Health and HTTP /health render one report; they must not drift."""
    ours, theirs = health_document(report), _grpc_rendering(report)
    assert ours.pop("timestamp").endswith("Z")
    theirs.pop("timestamp")
    assert json.loads(json.dumps(ours)) == theirs
    # Same types too (equality alone lets 50 == 50.0 and True == 1 through).
    assert json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True)


@pytest.mark.parametrize(
    "at",
    [
        datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC),
        datetime(2024, 1, 1, 0, 0, 0, 120_000, tzinfo=UTC),
        datetime(2024, 1, 1, 0, 0, 0, 123_456, tzinfo=UTC),
        datetime(2024, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(2024, 6, 1, 2, 0, 0, 500, tzinfo=timezone(timedelta(hours=-3))),
        datetime.now(UTC),
    ],
)
def test_timestamp_as_proto3_json_prints_it(at: datetime) -> None:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    assert rfc3339(at) == stamp.ToJsonString()


def test_health_http_status() -> None:
    assert health_http_status(_report("healthy")) == 200
    assert health_http_status(_report("degraded")) == 200
    assert health_http_status(_report("unhealthy")) == 503


# --- wiring ------------------------------------------------------------------------------

OBSERVABILITY = Path(session_authority.observability.__file__).parent

#: module (file in observability/) -> imports it must not have, even lazily.
FORBIDDEN_IMPORTS = {
    "telemetry.py": ("session_authority.adapters", "session_authority.core.service"),
    "admin.py": ("session_authority.transport", "google.protobuf"),
    "health_json.py": ("session_authority.transport", "google.protobuf"),
    "interceptor.py": ("google.protobuf", "session_authority.transport"),
    "*": ("session_authority.adapters", "session_authority.v1", "session_authority.bootstrap"),
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("module", sorted(p.name for p in OBSERVABILITY.glob("*.py")))
def test_observability_knows_no_concrete_class_and_no_protobuf(module: str) -> None:
    """Only the composition root knows every concrete class; the admin server
    renders the core's report, not the gRPC reply; the interceptor reads no
    message. (Relative imports would dodge this: the package uses none.)"""
    forbidden = FORBIDDEN_IMPORTS.get(module, ()) + FORBIDDEN_IMPORTS["*"]
    names = _imports(OBSERVABILITY / module)
    assert not [n for n in names if n.startswith(".")]
    assert not sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden))


def test_forbidden_import_check_can_fail(tmp_path: Path) -> None:
    planted = tmp_path / "admin.py"
    planted.write_text("def f():\n    from google.protobuf import json_format\n")
    assert "google.protobuf" in _imports(planted)


def test_telemetry_installs_no_tracer_provider() -> None:
    """The constructor has no process-wide side effect on tracing; without a
    provider handed in, no tracing interceptor is put in front of the RPCs."""
    before = trace.get_tracer_provider()
    telemetry = Telemetry(Settings(otel_traces_exporter="console"))
    assert trace.get_tracer_provider() is before
    assert [type(i) for i in telemetry.interceptors()] == [RpcMetricsInterceptor]
    traced = Telemetry(Settings(), tracer_provider=TracerProvider())
    assert [type(i) for i in traced.interceptors()] == [ServerSpans, RpcMetricsInterceptor]


class _OwnSampler(Sampler):
    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        return SamplingResult(Decision.DROP)

    def get_description(self) -> str:
        return "AlwaysOffSampler"  # a built-in's name, but not a built-in


def test_only_the_sdks_own_samplers_are_asked_directly() -> None:
    """``pure_sampler``: the built-ins (what OTEL_TRACES_SAMPLER names) are;
    a sampler of one's own, or a built-in around one, is not; nor is a
    provider that is not the SDK's."""
    for sampler in (
        ALWAYS_ON,
        DEFAULT_OFF,
        TraceIdRatioBased(0.01),
        ParentBased(TraceIdRatioBased(0.25)),
        TracerProvider().sampler,  # the SDK's default (parentbased_always_on)
    ):
        assert pure_sampler(TracerProvider(sampler=sampler)) is sampler
        assert ServerSpans(TracerProvider(sampler=sampler)).samples_itself
    assert pure_sampler(TracerProvider(sampler=_OwnSampler())) is None
    assert not ServerSpans(TracerProvider(sampler=_OwnSampler())).samples_itself
    # Two on one provider (two Apps in a process) share its tracer, wrapped once.
    provider = TracerProvider(sampler=DEFAULT_OFF)
    first, second = ServerSpans(provider), ServerSpans(provider)
    assert first.samples_itself and second.samples_itself
    tracer = provider.get_tracer("session_authority.grpc")
    assert isinstance(tracer, SdkTracer)
    assert isinstance(tracer.id_generator.inner, RandomIdGenerator)  # type: ignore[attr-defined]
    assert pure_sampler(TracerProvider(sampler=ParentBased(_OwnSampler()))) is None
    assert pure_sampler(trace.NoOpTracerProvider()) is None


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


def test_the_loop_histogram_is_exposed_exactly_as_a_prometheus_histogram() -> None:
    """``LoopHistogram`` (no lock per observation) must read like prometheus_client's
    ``Histogram`` to every scraper and to the fleet's merge: same series, same
    ``le`` labels, same cumulative counts and sum (only ``_created`` is not kept)."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from session_authority.observability.metrics import SECONDS_BUCKETS, LoopHistogram

    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("t_seconds", "doc", ["m"], buckets=SECONDS_BUCKETS, registry=theirs)
    loop = LoopHistogram("t_seconds", "doc", ["m"], ours, buckets=SECONDS_BUCKETS)
    # On a bound, between bounds, below the first, beyond the last.
    for value in (0.0005, 0.0007, 0.0001, 0.001, 0.01, 3.0, 20.0, 0.0):
        reference.labels("a").observe(value)
        loop.labels("a").observe(value)
    loop.labels("b")
    reference.labels("b")

    def lines(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        return [line for line in text.splitlines() if "_created" not in line]

    assert lines(ours) == lines(theirs)
