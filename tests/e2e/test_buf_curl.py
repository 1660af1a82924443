"""``buf curl`` (server reflection) sees the runbook's health document in camelCase."""

from __future__ import annotations

import json

import pytest

from .e2e_support import (
    RUNBOOK_PATHS,
    SERVICE,
    ServerProcess,
    ToolResult,
    ToolRunner,
    camel,
    check_health_document,
    jq,
    tool,
)

pytestmark = pytest.mark.e2e


def _buf_curl(run_tool: ToolRunner, server: ServerProcess, method: str, *flags: str) -> ToolResult:
    return run_tool(
        tool("buf"),
        "curl",
        *flags,
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "--timeout",
        "10s",
        f"{server.url}/{SERVICE}/{method}",
    )


def test_camel_case_runbook_paths(run_tool: ToolRunner, e2e_server: ServerProcess) -> None:
    assert camel(".session_cache.metrics.hit_rate") == ".sessionCache.metrics.hitRate"
    doc = _buf_curl(run_tool, e2e_server, "Health", "--emit-defaults").json()
    check_health_document(doc, camel)
    for path in (".sessionCache.metrics.hitRate", ".redis.usedMemory", ".redis.totalKeys"):
        assert jq(doc, path) is not None, path
    # protojson's names only: no snake_case twin of any runbook path.
    snake_only = [p for p in RUNBOOK_PATHS if p != camel(p) and jq(doc, p) is not None]
    assert not snake_only, snake_only
    assert "session_cache" not in doc


def test_without_emit_defaults_only_errors_is_omitted(
    run_tool: ToolRunner, e2e_server: ServerProcess
) -> None:
    """Explicit presence: zero scalars are printed without --emit-defaults;
    only the empty ``errors`` list disappears."""
    doc = _buf_curl(run_tool, e2e_server, "Health").json()
    missing = [camel(p) for p in RUNBOOK_PATHS if jq(doc, camel(p)) is None]
    assert missing == [".errors"], json.dumps(doc, indent=2)


def test_buf_curl_create_and_validate(run_tool: ToolRunner, e2e_server: ServerProcess) -> None:
    created = _buf_curl(
        run_tool, e2e_server, "CreateSession", "--data", json.dumps({"userId": "erin"})
    ).json()
    token = e2e_server.record(created["token"])
    assert created["session"]["userId"] == "erin"
    answer = _buf_curl(
        run_tool, e2e_server, "ValidateSession", "--emit-defaults", "--data",
        json.dumps({"token": token}),
    ).json()  # fmt: skip
    assert answer["valid"] is True
    assert answer["source"] in ("SOURCE_DATABASE", "SOURCE_CACHE")


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
def test_reflection_protocols(
    run_tool: ToolRunner, e2e_server: ServerProcess, protocol: str
) -> None:
    """buf curl asks reflection v1 first; each version alone lists every method
    and resolves a call's schema."""
    common = ["curl", "--reflect-protocol", protocol, "--protocol", "grpc"]
    common.append("--http2-prior-knowledge")
    listed = run_tool(tool("buf"), *common, "--list-methods", e2e_server.url)
    assert listed.returncode == 0, listed.stderr
    assert f"{SERVICE}/ValidateSession" in listed.stdout.split()
    assert "grpc.health.v1.Health/Check" in listed.stdout.split()
    reply = _buf_curl(run_tool, e2e_server, "Health", "--reflect-protocol", protocol).json()
    assert "sessionCache" in reply
