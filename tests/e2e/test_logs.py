"""The server's log (LOG_LEVEL=DEBUG, LOG_FORMAT=json) after the tier: the
runbook's greppable lines are there; tokens and passwords are not.

Ordered after every other e2e module (see conftest.py), and does a
walk-through of its own so that it also holds when run alone."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable

import pytest

from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from .e2e_support import STOP_TIMEOUT, ServerProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def log_after_walk_through(
    e2e_server: ServerProcess,
    stub: pb_grpc.SessionAuthorityStub,
    create: Callable[..., pb.CreateSessionResponse],
) -> str:
    token = create(f"logs-{uuid.uuid4()}").token
    for _ in range(2):  # a MISS, then a HIT
        assert stub.ValidateSession(pb.ValidateSessionRequest(token=token), timeout=10).valid
    assert stub.Invalidate(pb.InvalidateRequest(token=token), timeout=10).revoked
    stub.Health(pb.HealthRequest(), timeout=10)
    # The server writes its log itself; give the last lines a moment to land.
    deadline = time.monotonic() + 5
    text = e2e_server.log_text()
    while "Cache HIT" not in text and time.monotonic() < deadline:
        time.sleep(0.05)
        text = e2e_server.log_text()
    return text


def _entries(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_log_is_one_json_object_per_line(log_after_walk_through: str) -> None:
    bad = []
    for line in log_after_walk_through.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            bad.append(line)
            continue
        if not isinstance(entry, dict) or not {"time", "level", "message"} <= entry.keys():
            bad.append(line)
    assert not bad, bad[:5]


def test_cache_hit_and_miss_lines(log_after_walk_through: str) -> None:
    entries = _entries(log_after_walk_through)
    hits = [e for e in entries if str(e["message"]).startswith("Cache HIT")]
    misses = [e for e in entries if str(e["message"]).startswith("Cache MISS")]
    assert hits, "no Cache HIT line at LOG_LEVEL=DEBUG"
    assert misses, "no Cache MISS line at LOG_LEVEL=DEBUG"
    assert {e["level"] for e in hits + misses} == {"DEBUG"}


def test_no_token_in_log(
    log_after_walk_through: str, e2e_server: ServerProcess, created_tokens: list[str]
) -> None:
    assert created_tokens  # at least this module's own walk-through
    leaked = [t for t in created_tokens if t in log_after_walk_through]
    assert not leaked, f"{len(leaked)} of {len(created_tokens)} created tokens are in the log"
    assert not e2e_server.leaks(log_after_walk_through)


def test_only_hash_prefixes_in_log(log_after_walk_through: str, created_tokens: list[str]) -> None:
    """Logs carry at most an 8-hex-digit prefix of a token's hash, never the hash."""
    hashes = [hashlib.sha256(t.encode()).hexdigest() for t in created_tokens]
    assert not [h for h in hashes if h in log_after_walk_through]
    assert any(h[:8] in log_after_walk_through for h in hashes)


def test_no_password_in_log(log_after_walk_through: str, e2e_server: ServerProcess) -> None:
    password = e2e_server.password
    assert password.startswith("e2e-pw-")
    assert password not in log_after_walk_through
    # The start-up line names the database with the password redacted.
    assert "postgres:***@" in log_after_walk_through


def test_no_error_lines(log_after_walk_through: str) -> None:
    """Bad input, unknown tokens and 1 ms deadlines are normal answers, not errors."""
    errors = [
        entry
        for entry in _entries(log_after_walk_through)
        if entry["level"] in ("ERROR", "CRITICAL")
    ]
    assert not errors, errors[:3]


def test_sigterm_drains_and_exits_zero(e2e_server: ServerProcess) -> None:
    """Last: SIGTERM stops the server (exit 0, within the bound), and the
    complete log, shutdown included, still holds no secret."""
    code = e2e_server.shutdown()
    assert code == 0, f"exit code {code} (None: killed after {STOP_TIMEOUT}s)\n{e2e_server.tail()}"
    text = e2e_server.log_text()
    messages = [entry["message"] for entry in _entries(text)]
    assert "session-authority stopped" in messages
    assert any(str(m).startswith("shutting down") for m in messages)
    assert not e2e_server.leaks(text)
    assert not e2e_server.leaks(e2e_server.migrate_log_path.read_text(errors="replace"))
