"""Observability of a real server (``App.start`` on private Redis and Postgres):
the span tree of each validation path, a caller's trace continued, no token in
any span; exact runbook counters on /metrics; the health document on the admin
port. Counts and shapes are asserted, never timings."""

from __future__ import annotations

import asyncio
import math
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from session_authority.adapters.migrate import apply_migrations
from session_authority.bootstrap import App
from session_authority.config import Settings
from session_authority.core.domain import TokenHash, new_token
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis, find_free_port
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc
from tests.third_party import parse_openmetrics

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

VALIDATE = "/session_authority.v1.SessionAuthority/ValidateSession"
RESULT = "session_authority.cache.result"
#: Every path the runbook's jq examples read (plus the rest of the document).
RUNBOOK_PATHS = [
    "status",
    "timestamp",
    "redis.connected",
    "redis.version",
    "redis.uptime",
    "redis.usedMemory",
    "redis.totalKeys",
    "sessionCache.enabled",
    "sessionCache.healthy",
    "sessionCache.metrics.hits",
    "sessionCache.metrics.misses",
    "sessionCache.metrics.errors",
    "sessionCache.metrics.total",
    "sessionCache.metrics.hitRate",
    "sessionCache.metrics.ttl",
    "sessionCache.pool.size",
    "sessionCache.pool.available",
    "sessionCache.pool.pending",
    "performance.ping",
    "performance.set",
    "performance.get",
    "errors",
]


@dataclass
class Server:
    app: App
    stub: pb_grpc.SessionAuthorityAsyncStub
    http: aiohttp.ClientSession
    tokens: list[str]

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.app.admin_port}"

    async def create(self) -> str:
        reply = await self.stub.CreateSession(
            pb.CreateSessionRequest(user_id=f"obs-{secrets.token_hex(4)}")
        )
        self.tokens.append(reply.token)
        return reply.token

    async def validate(
        self, token: str, metadata: Sequence[tuple[str, str]] = ()
    ) -> pb.ValidateSessionResponse:
        reply: pb.ValidateSessionResponse = await self.stub.ValidateSession(
            pb.ValidateSessionRequest(token=token), metadata=tuple(metadata)
        )
        return reply

    async def get(self, path: str) -> tuple[int, str]:
        async with self.http.get(self.admin + path) as response:
            return response.status, await response.text()

    async def samples(self) -> dict[str, float]:
        """``name{label="v",...}`` → value, for every sample on /metrics."""
        status, text = await self.get("/metrics")
        assert status == 200
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out


@asynccontextmanager
async def running(database_url: str, redis_url: str) -> AsyncIterator[Server]:
    settings = Settings(
        database_url=database_url,
        redis_url=redis_url,
        host="127.0.0.1",
        port=find_free_port(),
        admin_port=find_free_port(),
        # These tests read Redis's own spans and counters; the in-process cache
        # in front of it has its own tests (test_local_cache.py).
        l1_cache_ttl_ms=0,
    )
    app = await App.start(settings)
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{app.port}", options=[("grpc.enable_http_proxy", 0)]
    )
    http = aiohttp.ClientSession()
    try:
        yield Server(app, pb_grpc.SessionAuthorityStub(channel), http, [])
    finally:
        await http.close()
        await channel.close()
        await app.stop(0)


@pytest_asyncio.fixture
async def server(
    pg_dsn: str, redis_server: EmbeddedRedis, redis_client: aioredis.Redis
) -> AsyncIterator[Server]:
    async with running(pg_dsn, redis_server.url) as s:  # redis_client: an empty cache
        yield s


async def _eventually(check: Callable[[], object], rounds: int = 200) -> None:
    for _ in range(rounds):
        if check():
            return
        await asyncio.sleep(0.025)
    raise AssertionError("condition never held")


# --- traces ------------------------------------------------------------------------


async def _trace_of(spans: InMemorySpanExporter, before: int) -> list[ReadableSpan]:
    """The spans of the one ValidateSession trace finished since ``before``."""
    await _eventually(lambda: any(s.name == VALIDATE for s in spans.get_finished_spans()[before:]))
    new = list(spans.get_finished_spans()[before:])
    root = next(s for s in new if s.name == VALIDATE)
    assert root.context is not None
    return [s for s in new if s.context is not None and s.context.trace_id == root.context.trace_id]


def _tree(spans: list[ReadableSpan]) -> tuple[str, list[tuple[str, str | None]]]:
    """(root name, [(child name, its cache result)]) with every child's parent
    checked to be the server span."""
    roots = [s for s in spans if s.kind is trace.SpanKind.SERVER]
    assert len(roots) == 1, [s.name for s in spans]
    root = roots[0]
    assert root.context is not None
    children = [s for s in spans if s is not root]
    for child in children:
        assert child.parent is not None and child.parent.span_id == root.context.span_id
    ordered = sorted(children, key=lambda s: s.start_time or 0)
    return root.name, [(s.name, _result(s)) for s in ordered]


def _result(span: ReadableSpan) -> str | None:
    value = (span.attributes or {}).get(RESULT)
    return None if value is None else str(value)


async def test_miss_then_hit_span_trees(server: Server, spans: InMemorySpanExporter) -> None:
    token = await server.create()
    before = len(spans.get_finished_spans())
    assert (await server.validate(token)).source == pb.SOURCE_DATABASE
    assert _tree(await _trace_of(spans, before)) == (
        VALIDATE,
        [
            ("session_cache.lookup", "miss"),
            ("session_store.find", None),
            ("session_cache.fill", None),
        ],
    )
    before = len(spans.get_finished_spans())
    assert (await server.validate(token)).source == pb.SOURCE_CACHE
    trace_spans = await _trace_of(spans, before)
    assert _tree(trace_spans) == (VALIDATE, [("session_cache.lookup", "hit")])
    root = next(s for s in trace_spans if s.name == VALIDATE)
    assert root.attributes is not None
    assert root.attributes["session_authority.validation.valid"] is True
    assert root.attributes["session_authority.validation.source"] == "cache"


async def test_revoked_token_answers_from_the_tombstone(
    server: Server, spans: InMemorySpanExporter
) -> None:
    token = await server.create()
    await server.validate(token)
    assert (await server.stub.Invalidate(pb.InvalidateRequest(token=token))).cache_purged
    before = len(spans.get_finished_spans())
    reply = await server.validate(token)
    assert (reply.valid, reply.reason) == (False, pb.REASON_REVOKED)
    assert _tree(await _trace_of(spans, before)) == (
        VALIDATE,
        [("session_cache.lookup", "tombstone")],
    )


async def test_open_breaker_bypasses_the_cache(server: Server, spans: InMemorySpanExporter) -> None:
    token = await server.create()
    server.app.core.breaker.trip("test")
    before = len(spans.get_finished_spans())
    assert (await server.validate(token)).valid
    trace_spans = await _trace_of(spans, before)
    assert _tree(trace_spans) == (
        VALIDATE,
        [("session_cache.lookup", "bypassed"), ("session_store.find", None)],
    )
    root = next(s for s in trace_spans if s.name == VALIDATE)
    assert [(e.name, dict(e.attributes or {})) for e in root.events] == [
        ("session_cache.fallback", {RESULT: "bypassed"})
    ]
    samples = await server.samples()
    assert samples['circuit_breaker_state{breaker="redis"}'] == 2
    key = 'circuit_breaker_transitions_total{breaker="redis",from_state="closed",to_state="open"}'
    assert samples[key] == 1


async def test_callers_traceparent_is_continued(
    server: Server, spans: InMemorySpanExporter
) -> None:
    token = await server.create()
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    before = len(spans.get_finished_spans())
    await server.validate(token, [("traceparent", f"00-{trace_id}-{parent_id}-01")])
    trace_spans = await _trace_of(spans, before)
    root = next(s for s in trace_spans if s.name == VALIDATE)
    assert root.context is not None and root.parent is not None
    assert trace.format_trace_id(root.context.trace_id) == trace_id
    assert trace.format_span_id(root.parent.span_id) == parent_id
    assert root.parent.is_remote
    assert len(trace_spans) == 4  # the miss path: lookup, find, fill, all in that trace


async def test_no_token_in_any_span(server: Server, spans: InMemorySpanExporter) -> None:
    token = await server.create()
    for _ in range(2):
        await server.validate(token)
    await server.validate(new_token())
    await server.stub.Invalidate(pb.InvalidateRequest(token=token))
    await server.validate(token)
    with pytest.raises(grpc.aio.AioRpcError):
        await server.validate("not a token")  # INVALID_ARGUMENT: recorded on the span
    secrets_seen = [*server.tokens, *(TokenHash.of(t).hex for t in server.tokens)]
    texts = []
    for span in spans.get_finished_spans():
        texts.append(span.name)
        texts.extend(str(v) for v in (span.attributes or {}).values())
        texts.append(str(span.status.description))
        for event in span.events:
            texts.append(event.name)
            texts.extend(str(v) for v in (event.attributes or {}).values())
    assert len(texts) > 20
    leaked = [s for s in secrets_seen if any(s in text for text in texts)]
    assert not leaked


# --- metrics -------------------------------------------------------------------------


async def test_runbook_counters_after_known_traffic(server: Server) -> None:
    token = await server.create()
    for _ in range(3):  # 1 miss, then 2 hits
        assert (await server.validate(token)).valid
    assert not (await server.validate(new_token())).valid  # well-formed, unknown: a miss
    assert not (await server.validate("sat_not-even-close")).valid  # rejected by shape
    m = await server.samples()
    assert (m["session_cache_hits"], m["session_cache_misses"], m["session_cache_errors"]) == (
        2,
        2,
        0,
    )
    assert (m["session_cache_hits_total"], m["session_cache_misses_total"]) == (2, 2)
    assert m["session_cache_hit_rate"] == 50
    assert m['session_cache_lookups_total{result="hit"}'] == 2
    assert m['session_cache_lookups_total{result="miss"}'] == 2
    assert m['session_cache_lookups_total{result="malformed"}'] == 1
    assert m['session_validations_total{reason="none",source="cache",valid="true"}'] == 2
    assert m['session_validations_total{reason="none",source="database",valid="true"}'] == 1
    assert m['session_validations_total{reason="unknown",source="database",valid="false"}'] == 1
    assert m['session_validations_total{reason="unknown",source="token_format",valid="false"}'] == 1
    rpc = 'grpc_method="{}",grpc_service="session_authority.v1.SessionAuthority"'
    assert m[f'grpc_server_handled_total{{grpc_code="OK",{rpc.format("ValidateSession")}}}'] == 5
    assert m[f'grpc_server_handled_total{{grpc_code="OK",{rpc.format("CreateSession")}}}'] == 1
    assert m[f"grpc_server_handling_seconds_count{{{rpc.format('ValidateSession')}}}"] == 5
    # Redis calls through the instrumented port: 4 lookups, 2 fills, 1 creation marker.
    assert m['redis_latency_count{operation="get"}'] == 4
    assert m['redis_latency_count{operation="fill"}'] == 2
    assert m['redis_latency_count{operation="mark_created"}'] == 1
    assert m['redis_latency_bucket{le="+Inf",operation="get"}'] == 4
    assert m['postgres_query_duration_seconds_count{operation="find",outcome="ok"}'] == 2
    assert m['postgres_query_duration_seconds_count{operation="create",outcome="ok"}'] == 1
    assert m['circuit_breaker_state{breaker="redis"}'] == 0
    assert m["redis_pool_max_size"] == 10 and m["redis_pool_pending"] == 0
    assert m["postgres_pool_max_size"] == 10


async def test_metrics_content_negotiation(server: Server) -> None:
    """prometheus_client's own handler: the classic text format by default,
    OpenMetrics when asked for (valid to its strict parser, runbook series
    included), gzip when accepted."""
    await server.validate(await server.create())
    url = server.admin + "/metrics"
    async with server.http.get(url, headers={"Accept-Encoding": "identity"}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert "Content-Encoding" not in response.headers
        classic = await response.text()
    assert "# TYPE session_cache_hits untyped" in classic.splitlines()
    assert "# TYPE session_cache_hits_total counter" in classic.splitlines()
    accept = "application/openmetrics-text; version=1.0.0, text/plain;q=0.5"
    async with server.http.get(url, headers={"Accept": accept}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        openmetrics = await response.text()
    assert openmetrics.endswith("# EOF\n")
    families = {f.name: f for f in parse_openmetrics(openmetrics)}
    assert families["session_cache_misses"].type == "unknown"
    assert [s.value for s in families["session_cache_misses"].samples] == [1]
    assert [s.value for s in families["session_cache_misses_total"].samples] == [1]
    assert families["session_validations"].type == "counter"
    assert families["redis_latency"].type == "histogram"
    async with server.http.get(url, headers={"Accept-Encoding": "gzip"}) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert "session_cache_hits 0.0" in await response.text()  # decompressed by aiohttp


async def test_status_codes_revocations_and_touches_are_counted(server: Server) -> None:
    token = await server.create()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.validate("")
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    touched = await server.stub.TouchSession(pb.TouchSessionRequest(token=token))
    assert touched.written  # not cached: answered after its statement
    await server.stub.Invalidate(pb.InvalidateRequest(token=token))
    await server.stub.Invalidate(pb.InvalidateRequest(token=token))  # repeat: 0 revoked
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.TouchSession(pb.TouchSessionRequest(token=token))
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    m = await server.samples()
    labels = 'grpc_code="INVALID_ARGUMENT",grpc_method="ValidateSession"'
    rpc = 'grpc_service="session_authority.v1.SessionAuthority"'
    assert m[f"grpc_server_handled_total{{{labels},{rpc}}}"] == 1
    assert m['session_revocations_total{cache_purged="true"}'] == 1
    assert m['session_revocations_total{cache_purged="false"}'] == 0
    touches = {k: v for k, v in m.items() if k.startswith("session_touch")}
    assert touches == {
        'session_touches_total{answer="cache"}': 0,
        'session_touches_total{answer="behind"}': 0,
        'session_touches_total{answer="store"}': 2,
        'session_touch_writes_total{outcome="written"}': 1,
        'session_touch_writes_total{outcome="coalesced"}': 0,
        'session_touch_writes_total{outcome="refused"}': 1,
        'session_touch_writes_total{outcome="failed"}': 0,
    }


async def test_hit_rate_is_nan_before_the_first_lookup(server: Server) -> None:
    m = await server.samples()
    assert math.isnan(m["session_cache_hit_rate"])
    assert m["session_cache_hits"] == 0


async def test_redis_connected_gauge(server: Server) -> None:
    async def connected() -> float | None:
        return (await server.samples()).get("redis_connected")

    for _ in range(200):
        if await connected() == 1:
            break
        await asyncio.sleep(0.025)
    assert await connected() == 1
    assert (await server.samples())["postgres_connected"] == 1


# --- health ----------------------------------------------------------------------------


def _path(doc: object, path: str) -> object:
    for part in path.split("."):
        assert isinstance(doc, dict) and part in doc, path
        doc = doc[part]
    return doc


async def test_health_document_on_both_paths(server: Server) -> None:
    token = await server.create()
    for _ in range(3):
        await server.validate(token)
    for path in ("/health", "/api/health/redis"):
        async with server.http.get(server.admin + path) as response:
            assert response.status == 200
            assert response.content_type == "application/json"
            doc = await response.json()
        for jq in RUNBOOK_PATHS:
            _path(doc, jq)
        assert doc["status"] == "healthy"
        assert doc["errors"] == []
        assert doc["redis"]["connected"] is True
        metrics = doc["sessionCache"]["metrics"]
        assert (metrics["hits"], metrics["misses"], metrics["errors"], metrics["total"]) == (
            2,
            1,
            0,
            3,
        )
        assert metrics["hitRate"] == 66.67
        assert metrics["ttl"] == 300
        assert doc["breaker"]["openedCount"] == 0  # a 64-bit counter, as a number too
        assert doc["postgres"]["connected"] is True


async def test_livez_and_readyz(server: Server) -> None:
    assert (await server.get("/livez"))[0] == 200

    async def ready() -> int:
        return (await server.get("/readyz"))[0]

    for _ in range(200):
        if await ready() == 200:
            break
        await asyncio.sleep(0.025)
    assert await ready() == 200
    assert (await server.get("/nope"))[0] == 404


async def test_health_is_503_when_postgres_is_down(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    postgres = EmbeddedPostgres(tmp_path / "pg")
    with postgres:
        conn = await asyncpg.connect(postgres.url)
        await apply_migrations(conn)
        await conn.close()
        async with running(postgres.url, redis_server.url) as s:
            token = await s.create()
            await s.validate(token)
            assert (await s.get("/health"))[0] == 200
            postgres.stop()
            async with s.http.get(s.admin + "/api/health/redis") as response:
                assert response.status == 503
                doc = await response.json()
            assert doc["status"] == "unhealthy"
            assert doc["postgres"]["connected"] is False
            assert any(e.startswith("postgres:") for e in doc["errors"])
            for jq in RUNBOOK_PATHS:
                _path(doc, jq)
            for _ in range(400):  # the watch loop notices within its interval
                if (await s.get("/readyz"))[0] == 503:
                    break
                await asyncio.sleep(0.025)
            assert (await s.get("/readyz"))[0] == 503
            assert (await s.get("/livez"))[0] == 200


# --- the admin port ----------------------------------------------------------------------


async def test_an_admin_port_that_was_set_must_bind(
    pg_dsn: str, redis_server: EmbeddedRedis
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        grpc_port = find_free_port()
        settings = Settings(
            database_url=pg_dsn,
            redis_url=redis_server.url,
            host="127.0.0.1",
            port=grpc_port,
            admin_port=busy,
        )
        with pytest.raises(OSError, match=f"cannot bind admin port 127.0.0.1:{busy}"):
            await App.start(settings)
    # Nothing was left running: a corrected start on the same gRPC port works.
    app = await App.start(settings.model_copy(update={"admin_port": 0}))
    try:
        assert (app.port, app.admin_port) == (grpc_port, None)  # 0: no admin server
    finally:
        await app.stop(0)


async def test_the_default_admin_port_being_taken_is_not_fatal(
    pg_dsn: str, redis_server: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    default = Settings.model_fields["admin_port"].default
    with socket.socket() as taken:
        try:
            taken.bind(("127.0.0.1", default))
            taken.listen()
        except OSError:
            pass  # taken already, by something else: the same case
        settings = Settings(
            database_url=pg_dsn, redis_url=redis_server.url, host="127.0.0.1", port=find_free_port()
        )
        assert "admin_port" not in settings.model_fields_set
        app = await App.start(settings)
        try:
            assert app.admin_port is None
            assert f"admin port 127.0.0.1:{default} unavailable" in caplog.text
        finally:
            await app.stop(0)
