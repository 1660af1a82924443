"""What an operator does with grpcurl: server reflection only, never a proto file."""

from __future__ import annotations

import json
import secrets
import uuid
from typing import Any

import pytest

from .e2e_support import (
    HEALTH_SERVICE,
    SERVICE,
    ServerProcess,
    ToolResult,
    ToolRunner,
    check_health_document,
    snake,
    tool,
)

pytestmark = pytest.mark.e2e

# grpcurl exits with 64 + the gRPC status code when a call fails.
_EXIT_INVALID_ARGUMENT = 64 + 3


class Grpcurl:
    def __init__(self, run_tool: ToolRunner, server: ServerProcess) -> None:
        self._run_tool = run_tool
        self._binary = tool("grpcurl")
        self.server = server

    def run(self, *args: str) -> ToolResult:
        return self._run_tool(self._binary, "-plaintext", "-max-time", "10", *args)

    def call(self, method: str, data: dict[str, Any] | None = None, *flags: str) -> Any:
        """Invoke ``SessionAuthority/<method>`` with ``-d <json>``; the parsed output."""
        body = ["-d", json.dumps(data, ensure_ascii=False)] if data is not None else []
        return self.run(*flags, *body, self.server.target, f"{SERVICE}/{method}").json()

    def create(self, data: dict[str, Any]) -> Any:
        reply = self.call("CreateSession", data)
        self.server.record(reply["token"])
        return reply


@pytest.fixture(scope="module")
def grpcurl(run_tool: ToolRunner, e2e_server: ServerProcess) -> Grpcurl:
    return Grpcurl(run_tool, e2e_server)


def test_list_shows_services(grpcurl: Grpcurl, e2e_server: ServerProcess) -> None:
    result = grpcurl.run(e2e_server.target, "list")
    assert result.returncode == 0, result.stderr
    services = result.stdout.split()
    assert SERVICE in services
    assert HEALTH_SERVICE in services


def test_describe_service(grpcurl: Grpcurl, e2e_server: ServerProcess) -> None:
    result = grpcurl.run(e2e_server.target, "describe", SERVICE)
    assert result.returncode == 0, result.stderr
    assert f"{SERVICE} is a service" in result.stdout
    methods = ("CreateSession", "ValidateSession", "Invalidate", "InvalidateUser", "Health")
    for method in (*methods, "ListUserSessions", "TouchSession", "ValidateSessions"):
        assert f"rpc {method} (" in result.stdout, method


def test_describe_request_message(grpcurl: Grpcurl, e2e_server: ServerProcess) -> None:
    result = grpcurl.run(e2e_server.target, "describe", "session_authority.v1.InvalidateRequest")
    assert result.returncode == 0, result.stderr
    assert "oneof target" in result.stdout
    assert "session_id" in result.stdout


def test_readme_walk_through(grpcurl: Grpcurl) -> None:
    """The README's grpcurl walk-through, step by step (JSON in, JSON out)."""
    user = f"alice-{uuid.uuid4()}"
    created = grpcurl.create({"user_id": user, "ttl": "3600s", "metadata": {"device": "laptop"}})
    token = created["token"]
    assert created["session"]["user_id"] == user
    assert created["session"]["metadata"] == {"device": "laptop"}
    uuid.UUID(created["session"]["session_id"])

    # -emit-defaults so that false / zero answers are printed, not omitted.
    def validate() -> Any:
        return grpcurl.call("ValidateSession", {"token": token}, "-emit-defaults")

    first = validate()
    assert first["valid"] is True
    assert first["source"] == "SOURCE_DATABASE"
    assert first["session"]["session_id"] == created["session"]["session_id"]

    second = validate()
    assert second["valid"] is True
    assert second["source"] == "SOURCE_CACHE"
    assert second["session"] == first["session"]

    revoked = grpcurl.call("Invalidate", {"token": token}, "-emit-defaults")
    assert revoked == {"revoked": True, "cache_purged": True, "propagated": True}

    after = validate()
    assert after["valid"] is False
    assert after["reason"] == "REASON_REVOKED"

    again = grpcurl.call("Invalidate", {"token": token}, "-emit-defaults")
    assert again["revoked"] is False

    # Without -emit-defaults (as in the README), false fields are simply absent.
    plain = grpcurl.call("ValidateSession", {"token": token})
    assert "valid" not in plain
    assert plain["reason"] == "REASON_REVOKED"


def test_invalidate_by_session_id_and_user(grpcurl: Grpcurl) -> None:
    user = f"bob-{uuid.uuid4()}"
    sessions = [grpcurl.create({"user_id": user}) for _ in range(3)]

    by_id = grpcurl.call(
        "Invalidate", {"session_id": sessions[0]["session"]["session_id"]}, "-emit-defaults"
    )
    assert by_id == {"revoked": True, "cache_purged": True, "propagated": True}
    gone = grpcurl.call("ValidateSession", {"token": sessions[0]["token"]}, "-emit-defaults")
    assert gone["valid"] is False
    assert gone["reason"] == "REASON_REVOKED"

    by_user = grpcurl.call("InvalidateUser", {"user_id": user}, "-emit-defaults")
    assert by_user == {"revoked_count": 2, "cache_purged": True, "propagated": True}
    for created in sessions:
        answer = grpcurl.call("ValidateSession", {"token": created["token"]}, "-emit-defaults")
        assert answer["valid"] is False
        assert answer["reason"] == "REASON_REVOKED"


def test_list_user_sessions_and_log_out_everywhere_else(grpcurl: Grpcurl) -> None:
    """ListUserSessions page by page, then InvalidateUser with except_session_id."""
    user = f"frank-{uuid.uuid4()}"
    made = [grpcurl.create({"user_id": user, "metadata": {"n": str(i)}}) for i in range(3)]
    ids = [m["session"]["session_id"] for m in made]

    first = grpcurl.call("ListUserSessions", {"user_id": user, "page_size": 2})
    assert [s["session_id"] for s in first["sessions"]] == ids[:2]
    assert set(first["sessions"][0]) == {
        "session_id",
        "user_id",
        "created_at",
        "expires_at",
        "metadata",
    }
    token = first["next_page_token"]
    rest = grpcurl.call("ListUserSessions", {"user_id": user, "page_size": 2, "page_token": token})
    assert [s["session_id"] for s in rest["sessions"]] == ids[2:]
    assert "next_page_token" not in rest  # empty: the last page

    kept = made[1]
    reply = grpcurl.call(
        "InvalidateUser", {"user_id": user, "except_session_id": ids[1]}, "-emit-defaults"
    )
    assert reply == {"revoked_count": 2, "cache_purged": True, "propagated": True}
    for created in made:
        answer = grpcurl.call("ValidateSession", {"token": created["token"]}, "-emit-defaults")
        assert answer["valid"] is (created is kept)
    history = grpcurl.call("ListUserSessions", {"user_id": user, "include_revoked": True})
    assert ["revoked_at" in s for s in history["sessions"]] == [True, False, True]


def test_unknown_token(grpcurl: Grpcurl, e2e_server: ServerProcess) -> None:
    token = e2e_server.presented(secrets.token_urlsafe(32))
    answer = grpcurl.call("ValidateSession", {"token": token}, "-emit-defaults")
    assert answer["valid"] is False
    assert answer["reason"] == "REASON_UNKNOWN"


@pytest.mark.parametrize(
    ("method", "data", "field"),
    [
        ("ValidateSession", {"token": ""}, "token"),
        ("ValidateSession", {"token": f"tökén-{secrets.token_hex(8)}…"}, "token"),
        ("CreateSession", {"user_id": ""}, "user_id"),
        ("CreateSession", {"user_id": "carol", "ttl": "0s"}, "ttl"),
        ("Invalidate", {}, "session_id"),
        ("Invalidate", {"session_id": "not-a-uuid"}, "session_id"),
        ("ListUserSessions", {"user_id": "erin", "page_token": "forged"}, "page_token"),
        ("ListUserSessions", {"user_id": "erin", "page_size": -1}, "page_size"),
        ("InvalidateUser", {"user_id": "erin", "except_session_id": "x"}, "except_session_id"),
    ],
    ids=[
        "empty-token",
        "non-ascii-token",
        "empty-user",
        "zero-ttl",
        "no-target",
        "bad-uuid",
        "forged-page-token",
        "negative-page-size",
        "bad-except-session-id",
    ],
)
def test_invalid_argument(
    grpcurl: Grpcurl, e2e_server: ServerProcess, method: str, data: dict[str, str], field: str
) -> None:
    token = data.get("token", "")
    if token:
        e2e_server.presented(token)
    body = json.dumps(data, ensure_ascii=False)
    result = grpcurl.run("-format-error", "-d", body, e2e_server.target, f"{SERVICE}/{method}")
    assert result.returncode == _EXIT_INVALID_ARGUMENT, (result.stdout, result.stderr)
    error = json.loads(result.stderr)  # -format-error prints the status as JSON on stderr
    assert error["code"] == 3  # INVALID_ARGUMENT
    assert field in error["message"]
    if token:
        assert token not in result.stdout + result.stderr


def test_health_document_runbook_paths(grpcurl: Grpcurl, e2e_server: ServerProcess) -> None:
    # Make sure the counters have moved, so that the document is not all zeros.
    token = grpcurl.create({"user_id": f"dave-{uuid.uuid4()}"})["token"]
    for _ in range(2):
        grpcurl.call("ValidateSession", {"token": token})
    doc = grpcurl.call("Health", None, "-emit-defaults")
    check_health_document(doc, snake)
    assert int(doc["session_cache"]["metrics"]["hits"]) >= 1
    assert int(doc["session_cache"]["metrics"]["misses"]) >= 1
    # grpcurl prints proto field names, never the camelCase JSON names.
    assert "sessionCache" not in doc
    assert "usedMemory" not in doc["redis"]


def test_health_without_emit_defaults_keeps_scalars(grpcurl: Grpcurl) -> None:
    """The scalars have explicit presence, so they print even when zero;
    only the empty ``errors`` list needs -emit-defaults."""
    doc = grpcurl.call("Health")
    assert doc["session_cache"]["metrics"]["errors"] == "0"
    assert doc["session_cache"]["pool"]["pending"] == 0
    assert doc["breaker"]["state"] == "closed"


def test_health_names_the_process_that_answered(
    grpcurl: Grpcurl, e2e_server: ServerProcess
) -> None:
    doc = grpcurl.call("Health")
    assert doc["worker"] == {"index": 0, "count": 1, "pid": e2e_server.process.pid}


def test_standard_health_check(grpcurl: Grpcurl, e2e_server: ServerProcess) -> None:
    result = grpcurl.run(e2e_server.target, f"{HEALTH_SERVICE}/Check")
    assert result.json() == {"status": "SERVING"}
    body = json.dumps({"service": SERVICE})
    named = grpcurl.run("-d", body, e2e_server.target, f"{HEALTH_SERVICE}/Check")
    assert named.json() == {"status": "SERVING"}


# Every grpcurl form an operator types, for every service the server lists:
# ours, the standard health service, and both versions of reflection itself.
_REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
_REFLECTION_V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
_METHODS = {
    SERVICE: ("CreateSession", "ValidateSession", "Invalidate", "InvalidateUser", "Health"),
    HEALTH_SERVICE: ("Check", "Watch"),
    _REFLECTION_V1: ("ServerReflectionInfo",),
    _REFLECTION_V1ALPHA: ("ServerReflectionInfo",),
}
_MESSAGES = {
    SERVICE: "session_authority.v1.ValidateSessionRequest",
    HEALTH_SERVICE: "grpc.health.v1.HealthCheckRequest",
    _REFLECTION_V1: "grpc.reflection.v1.ServerReflectionRequest",
    _REFLECTION_V1ALPHA: "grpc.reflection.v1alpha.ServerReflectionRequest",
}


def test_list_shows_both_reflection_versions(grpcurl: Grpcurl, e2e_server: ServerProcess) -> None:
    result = grpcurl.run(e2e_server.target, "list")
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) >= set(_METHODS)


@pytest.mark.parametrize("service", list(_METHODS))
def test_list_service_methods(grpcurl: Grpcurl, e2e_server: ServerProcess, service: str) -> None:
    result = grpcurl.run(e2e_server.target, "list", service)
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) >= {f"{service}.{m}" for m in _METHODS[service]}


@pytest.mark.parametrize("service", list(_METHODS))
def test_describe_each_service(grpcurl: Grpcurl, e2e_server: ServerProcess, service: str) -> None:
    result = grpcurl.run(e2e_server.target, "describe", service)
    assert result.returncode == 0, result.stderr
    assert f"{service} is a service" in result.stdout
    for method in _METHODS[service]:
        assert f"rpc {method} (" in result.stdout, method


@pytest.mark.parametrize(
    "method", [f"{service}.{m}" for service, methods in _METHODS.items() for m in methods]
)
def test_describe_method(grpcurl: Grpcurl, e2e_server: ServerProcess, method: str) -> None:
    result = grpcurl.run(e2e_server.target, "describe", method)
    assert result.returncode == 0, result.stderr
    assert f"{method} is a method" in result.stdout
    assert f"rpc {method.rsplit('.', 1)[1]} (" in result.stdout


@pytest.mark.parametrize("message", list(_MESSAGES.values()))
def test_describe_each_message(grpcurl: Grpcurl, e2e_server: ServerProcess, message: str) -> None:
    result = grpcurl.run(e2e_server.target, "describe", message)
    assert result.returncode == 0, result.stderr
    assert f"{message} is a message" in result.stdout


@pytest.mark.parametrize(
    ("symbol", "kind"),
    [
        ("session_authority.v1.Source", "an enum"),
        ("session_authority.v1.ValidateSessionRequest.token", "a field"),
    ],
)
def test_describe_enum_and_field(
    grpcurl: Grpcurl, e2e_server: ServerProcess, symbol: str, kind: str
) -> None:
    result = grpcurl.run(e2e_server.target, "describe", symbol)
    assert result.returncode == 0, result.stderr
    assert f"{symbol} is {kind}" in result.stdout


def test_describe_shows_proto_comments(grpcurl: Grpcurl, e2e_server: ServerProcess) -> None:
    """The proto's comments reach grpcurl: reflection serves our file with its source info."""
    method = grpcurl.run(e2e_server.target, "describe", f"{SERVICE}.ValidateSession")
    assert method.returncode == 0, method.stderr
    assert "// ValidateSession answers whether a token names a live session." in method.stdout
    service = grpcurl.run(e2e_server.target, "describe", SERVICE)
    assert "// SessionAuthority creates, validates and revokes sessions." in service.stdout
    enum = grpcurl.run(e2e_server.target, "describe", "session_authority.v1.Source")
    assert "// Source says which tier answered a validation." in enum.stdout


@pytest.mark.parametrize("service", [_REFLECTION_V1, _REFLECTION_V1ALPHA])
def test_invoke_reflection_itself(
    grpcurl: Grpcurl, e2e_server: ServerProcess, service: str
) -> None:
    """Each reflection version answers a call, its schema also found by reflection."""
    body = json.dumps({"list_services": ""})
    reply = grpcurl.run("-d", body, e2e_server.target, f"{service}/ServerReflectionInfo").json()
    listed = {s["name"] for s in reply["list_services_response"]["service"]}
    assert listed >= set(_METHODS)
    symbol = json.dumps({"file_containing_symbol": f"{SERVICE}.ValidateSession"})
    found = grpcurl.run("-d", symbol, e2e_server.target, f"{service}/ServerReflectionInfo").json()
    assert "file_descriptor_response" in found, found


def test_touch_session(grpcurl: Grpcurl, e2e_server: ServerProcess) -> None:
    """TouchSession by token, then by id (coalesced: written within TOUCH_INTERVAL),
    then refused for an unknown and for a revoked session."""
    created = grpcurl.create({"user_id": f"erin-{uuid.uuid4()}", "ttl": "600s"})
    token, session_id = created["token"], created["session"]["session_id"]
    touched = grpcurl.call("TouchSession", {"token": token, "extend_by": "3600s"})
    assert touched["written"] is True
    assert touched["session"]["session_id"] == session_id
    assert touched["session"]["expires_at"] > created["session"]["expires_at"]
    assert "last_seen_at" in touched["session"]
    again = grpcurl.call("TouchSession", {"session_id": session_id}, "-emit-defaults")
    assert again["written"] is False
    assert again["session"]["expires_at"] == touched["session"]["expires_at"]
    grpcurl.call("Invalidate", {"token": token})
    for data, code in (({"session_id": str(uuid.uuid4())}, 5), ({"token": token}, 9)):
        body = json.dumps(data)
        result = grpcurl.run(
            "-format-error", "-d", body, e2e_server.target, f"{SERVICE}/TouchSession"
        )
        assert result.returncode == 64 + code, (result.stdout, result.stderr)
        assert json.loads(result.stderr)["code"] == code  # NOT_FOUND, FAILED_PRECONDITION
        assert token not in result.stdout + result.stderr


def _set(session: dict[str, Any]) -> dict[str, Any]:
    """A Session as printed without -emit-defaults: -emit-defaults prints its unset
    timestamps (last_seen_at, revoked_at) as null."""
    return {k: v for k, v in session.items() if v is not None}


def test_validate_sessions_walk_through(grpcurl: Grpcurl, e2e_server: ServerProcess) -> None:
    """ValidateSessions: answers in request order, a bad token failing its own
    entry only, provenance on each, a revocation seen at once, and the limit."""
    user = f"erin-{uuid.uuid4()}"
    # Metadata long enough that one answer needs a two-byte length in the reply.
    one = grpcurl.create({"user_id": user, "metadata": {"note": "x" * 200}})
    two = grpcurl.create({"user_id": user})
    bad = e2e_server.presented(f"sat_{secrets.token_hex(24)}")  # no checksum: never looked up
    tokens = [one["token"], bad, two["token"], one["token"]]

    def validate(batch: list[str]) -> list[Any]:
        reply = grpcurl.call("ValidateSessions", {"tokens": batch}, "-emit-defaults")
        results: list[Any] = reply["results"]
        return results

    first = validate(tokens)
    assert [(r["valid"], r["source"]) for r in first] == [
        (True, "SOURCE_DATABASE"),
        (False, "SOURCE_TOKEN_FORMAT"),
        (True, "SOURCE_DATABASE"),
        (True, "SOURCE_DATABASE"),
    ]
    assert first[1]["reason"] == "REASON_UNKNOWN"
    assert _set(first[0]["session"]) == one["session"]
    assert first[2]["session"]["session_id"] == two["session"]["session_id"]
    assert {r["degraded"] for r in first} == {False}
    assert first[0].get("cache_age") is None  # Postgres answered: no cached copy
    second = validate(tokens)
    assert [(r["valid"], r["source"]) for r in second] == [
        (True, "SOURCE_CACHE"),
        (False, "SOURCE_TOKEN_FORMAT"),
        (True, "SOURCE_CACHE"),
        (True, "SOURCE_CACHE"),
    ]
    # From this process's L1 copy, or from Redis once the copy's 1 s is over.
    assert second[1]["from_local_cache"] is False
    assert second[0]["cache_age"].endswith("s")  # a google.protobuf.Duration
    assert _set(second[0]["session"]) == one["session"]

    assert grpcurl.call("Invalidate", {"token": two["token"]})["revoked"] is True
    after = validate(tokens)
    assert [(r["valid"], r["reason"]) for r in after] == [
        (True, "REASON_UNSPECIFIED"),
        (False, "REASON_UNKNOWN"),
        (False, "REASON_REVOKED"),
        (True, "REASON_UNSPECIFIED"),
    ]
    assert validate([]) == []

    body = json.dumps({"tokens": [one["token"]] * 101})
    result = grpcurl.run(
        "-format-error", "-d", body, e2e_server.target, f"{SERVICE}/ValidateSessions"
    )
    assert result.returncode == _EXIT_INVALID_ARGUMENT, (result.stdout, result.stderr)
    error = json.loads(result.stderr)
    assert error["code"] == 3
    assert error["message"] == "tokens: must hold at most 100 tokens"
    assert one["token"] not in result.stdout + result.stderr
