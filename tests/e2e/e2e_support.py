"""Helpers shared by the e2e modules (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from session_authority.config import Settings

SERVICE = "session_authority.v1.SessionAuthority"
HEALTH_SERVICE = "grpc.health.v1.Health"

STOP_TIMEOUT = 15.0  # seconds for SIGTERM to drain and exit (the grace is 10 s)
BIN = Path(sys.executable).parent
_PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy", "no_proxy")


def tool(name: str) -> str:
    """A command-line tool from the virtualenv (grpcurl, buf), else from PATH."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the dev extras (pip install -e '.[dev]')")
    return found


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: no proxies (loopback only), no
    stray PG* (asyncpg honours them) or OTEL_* variables, and none of the
    server's own settings from the developer's shell, so every run is alike."""
    settings = {name.upper() for name in Settings.model_fields}
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _PROXY_VARS and not k.startswith(("PG", "OTEL_")) and k.upper() not in settings
    }
    env.update(extra)
    return env


def stop_process(process: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM, then wait; SIGKILL (and None) when it does not exit in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


@dataclass
class ServerProcess:
    """What the tests get: where the server listens and what it wrote."""

    target: str  # host:port, for grpcurl and grpc channels
    log_path: Path
    migrate_log_path: Path
    process: subprocess.Popen[bytes]
    workdir: Path
    created_tokens: list[str]
    password: str  # in DATABASE_URL; must never be logged
    # Stops the server, then Redis and Postgres (the fixture's ExitStack).
    resources: contextlib.ExitStack = field(repr=False)
    # Every token-like string a test presented (valid or not): never logged either.
    secrets: list[str] = field(default_factory=list)
    # The server's environment (DATABASE_URL, REDIS_URL, ...), for a second replica.
    env: dict[str, str] = field(default_factory=dict, repr=False)
    exit_code: int | None = None
    stopped: bool = False

    def shutdown(self) -> int | None:
        """SIGTERM the server (once), wait for it to drain and exit, then stop
        Redis and Postgres. Returns the exit code (None: it had to be killed)."""
        if not self.stopped:
            self.stopped = True
            self.exit_code = stop_process(self.process)
            self.resources.close()
        return self.exit_code

    @property
    def url(self) -> str:
        return f"http://{self.target}"

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_text().splitlines()[-lines:])
        return "<no log>"

    def record(self, token: str) -> str:
        """Remember a token that CreateSession returned; returns it."""
        assert token, "CreateSession returned an empty token"
        self.created_tokens.append(token)
        return token

    def presented(self, secret: str) -> str:
        """Remember a token-like string a test sent (never to be logged)."""
        self.secrets.append(secret)
        return secret

    def leaks(self, text: str) -> list[str]:
        """Which recorded tokens or secrets occur in ``text`` (shown redacted)."""
        candidates = (self.password, *self.created_tokens, *self.secrets)
        found = [s for s in candidates if s and s in text]
        return [f"{s[:4]}…({len(s)} chars)" for s in found]


@dataclass(frozen=True)
class ToolResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        assert self.returncode == 0, (
            f"{' '.join(self.argv)}\nexit {self.returncode}\n{self.stderr}{self.stdout}"
        )
        try:
            return json.loads(self.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"not JSON ({exc}): {self.stdout!r}") from None


ToolRunner = Callable[..., ToolResult]


def jq(document: Any, path: str) -> Any:
    """Resolve a jq-style path such as ``.session_cache.metrics.hit_rate``;
    None when a step is missing or null (what jq would print as null)."""
    node = document
    for key in path.strip(".").split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


# The runbook's jq paths into the health document (proto field names), plus
# .postgres.connected and .breaker.state.
RUNBOOK_PATHS = (
    ".status",
    ".timestamp",
    ".redis.connected",
    ".redis.version",
    ".redis.uptime",
    ".redis.used_memory",
    ".redis.total_keys",
    ".session_cache.enabled",
    ".session_cache.healthy",
    ".session_cache.metrics.hits",
    ".session_cache.metrics.misses",
    ".session_cache.metrics.errors",
    ".session_cache.metrics.total",
    ".session_cache.metrics.hit_rate",
    ".session_cache.metrics.ttl",
    ".session_cache.pool.size",
    ".session_cache.pool.available",
    ".session_cache.pool.pending",
    ".performance.ping",
    ".performance.set",
    ".performance.get",
    ".errors",
    ".postgres.connected",
    ".breaker.state",
)


def snake(path: str) -> str:
    return path


def camel(path: str) -> str:
    """``.session_cache.metrics.hit_rate`` -> ``.sessionCache.metrics.hitRate``
    (proto3 JSON's lowerCamelCase names)."""

    def one(name: str) -> str:
        head, *rest = name.split("_")
        return head + "".join(part.title() for part in rest)

    return "." + ".".join(one(p) for p in path.strip(".").split("."))


def check_health_document(doc: dict[str, Any], naming: Callable[[str], str]) -> None:
    """Every runbook path answers (present, not null) under ``naming``, with
    the proto3 JSON types and a healthy server's values."""
    missing = [naming(p) for p in RUNBOOK_PATHS if jq(doc, naming(p)) is None]
    assert not missing, f"runbook paths answering null: {missing}\n{json.dumps(doc, indent=2)}"

    def at(path: str) -> Any:
        return jq(doc, naming(path))

    assert at(".status") == "healthy", doc
    assert isinstance(at(".timestamp"), str)
    assert at(".timestamp").endswith("Z")
    assert at(".redis.connected") is True
    assert isinstance(at(".redis.version"), str)
    assert at(".redis.version")
    assert isinstance(at(".redis.uptime"), int)
    assert isinstance(at(".redis.used_memory"), str)
    assert at(".redis.used_memory")
    assert isinstance(at(".redis.total_keys"), int)
    assert at(".session_cache.enabled") is True
    assert at(".session_cache.healthy") is True
    # uint64 counters are decimal strings in proto3 JSON.
    counters = {
        name: at(f".session_cache.metrics.{name}") for name in ("hits", "misses", "errors", "total")
    }
    for name, value in counters.items():
        assert isinstance(value, str), (name, value)
        assert value.isdigit(), (name, value)
    assert int(counters["total"]) == int(counters["hits"]) + int(counters["misses"])
    hit_rate = at(".session_cache.metrics.hit_rate")
    assert isinstance(hit_rate, int | float)
    assert 0 <= hit_rate <= 100
    assert at(".session_cache.metrics.ttl") == 300
    for name in ("size", "available", "pending"):
        assert isinstance(at(f".session_cache.pool.{name}"), int), name
    for name in ("ping", "set", "get"):
        value = at(f".performance.{name}")
        assert isinstance(value, int | float), name
        assert value >= 0, name
    assert at(".errors") == []
    assert at(".postgres.connected") is True
    assert at(".breaker.state") == "closed"
