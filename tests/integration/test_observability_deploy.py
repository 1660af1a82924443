"""deploy/observability/ against a real server: every metric the Grafana
dashboard and the Prometheus rules read is one that /metrics exports (or a
recording rule defines), and the runbook's alerts and queries are there."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from session_authority.bootstrap import App
from session_authority.config import Settings
from session_authority.core.domain import new_token
from session_authority.embedded import EmbeddedRedis, find_free_port
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

#: PromQL words that are not metric names (functions are recognised by "(").
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_KEYWORDS |= {"and", "or", "unless", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        if expr[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group(0).lower() not in _KEYWORDS:
            names.add(match.group(0))
    return names


@pytest.fixture(scope="module")
def rules(repo_root: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(
        (repo_root / "deploy/observability/prometheus-rules.yml").read_text()
    )
    return loaded


@pytest.fixture(scope="module")
def dashboard(repo_root: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        (repo_root / "deploy/observability/grafana-dashboard.json").read_text()
    )
    return loaded


def _rules(rules: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in rules["groups"] for rule in group["rules"]]


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_metric_name_extraction() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(redis_latency_bucket{op="a b"}[5m])))'
    ) == {"redis_latency_bucket"}
    assert metric_names("rate(a[5m]) / (rate(a[5m]) + rate(b_total[5m])) * 100") == {
        "a",
        "b_total",
    }
    assert metric_names("redis_connected == 0 and on (instance) up") == {"redis_connected", "up"}


def test_runbook_alerts(rules: dict[str, Any]) -> None:
    alerts = {r["alert"]: r for r in _rules(rules) if "alert" in r}
    # The runbook's expressions, at the head of each (HighLatency adds "while Redis answers").
    expected = {
        "RedisDown": ("redis_connected == 0", "1m", "critical"),
        "LowCacheHitRate": ("session_cache_hit_rate < 90", "10m", "warning"),
        "HighLatency": ("redis_latency_p99 > 10", "5m", "warning"),
    }
    for name, (expr, duration, severity) in expected.items():
        rule = alerts[name]
        head = rule["expr"].removesuffix(" and on (job, instance) redis_connected == 1")
        assert (head, rule["for"], rule["labels"]["severity"]) == (expr, duration, severity)
    # "Add monitoring alert for total keys > threshold" (Memory Leak in Redis).
    assert "redis_total_keys) > " in alerts["HighTotalKeys"]["expr"]
    assert {"BreakerOpen", "BreakerFlapping", "PostgresDown"} <= alerts.keys()
    recorded = {r["record"]: r["expr"] for r in _rules(rules) if "record" in r}
    assert metric_names(recorded["redis_latency_p99"]) == {"redis_latency_bucket"}
    assert recorded["redis_latency_p99"].startswith("histogram_quantile(0.99,")


def test_runbook_dashboard_queries(dashboard: dict[str, Any]) -> None:
    exprs = _dashboard_exprs(dashboard)
    assert (
        "rate(session_cache_hits[5m]) / (rate(session_cache_hits[5m]) + "
        "rate(session_cache_misses[5m])) * 100"
    ) in exprs
    assert "histogram_quantile(0.99, rate(redis_latency_bucket[5m]))" in exprs
    used = set().union(*(metric_names(e) for e in exprs))
    runbook = {
        "session_cache_hit_rate",
        "session_cache_hits",
        "session_cache_misses",
        "session_cache_errors",
        "redis_pool_size",
        "redis_latency_bucket",
        "circuit_breaker_state",
    }
    assert runbook <= used


@pytest_asyncio.fixture
async def exported(
    pg_dsn: str, redis_server: EmbeddedRedis, redis_client: aioredis.Redis
) -> AsyncIterator[set[str]]:
    """Every sample name on /metrics of a server after a little of everything."""
    settings = Settings(
        database_url=pg_dsn,
        redis_url=redis_server.url,
        host="127.0.0.1",
        port=find_free_port(),
        admin_port=find_free_port(),
    )
    app = await App.start(settings)
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{app.port}", options=[("grpc.enable_http_proxy", 0)]
        ) as channel:
            stub = pb_grpc.SessionAuthorityStub(channel)
            token = (await stub.CreateSession(pb.CreateSessionRequest(user_id="deploy"))).token
            for t in (token, token, new_token()):
                await stub.ValidateSession(pb.ValidateSessionRequest(token=t))
            await stub.Invalidate(pb.InvalidateRequest(token=token))
        names: set[str] = set()
        async with aiohttp.ClientSession() as http:
            for _ in range(200):  # until the first health sample has landed
                async with http.get(f"http://127.0.0.1:{app.admin_port}/metrics") as response:
                    text = await response.text()
                families = list(text_string_to_metric_families(text))
                names = {s.name for f in families for s in f.samples}
                if "redis_total_keys" in names:
                    break
                await asyncio.sleep(0.025)
        yield names
    finally:
        await app.stop(0)


@pytest.mark.asyncio
async def test_every_metric_used_is_exported(
    exported: set[str], rules: dict[str, Any], dashboard: dict[str, Any]
) -> None:
    recorded = {r["record"] for r in _rules(rules) if "record" in r}
    exprs = [r["expr"] for r in _rules(rules)] + _dashboard_exprs(dashboard)
    used = set().union(*(metric_names(e) for e in exprs))
    assert len(used) >= 20
    missing = sorted(used - exported - recorded)
    assert not missing, f"used in deploy/observability but not exported: {missing}"
