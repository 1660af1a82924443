"""Shared fixtures. Unit tests need none of these; integration and e2e tests
get private, real Postgres and Redis processes started here (never the
machine's own servers), so fault tests may kill them."""

from __future__ import annotations

import os

# The tests fork helper processes (initdb, postgres, redis-server) while gRPC
# servers and channels run in this process; gRPC's fork handlers then run in
# the child before exec and can crash it. Nothing here needs gRPC after a fork.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
from collections.abc import Iterator
from pathlib import Path

import pytest

from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg"))
    with server:
        yield server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    with server:
        yield server


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # gRPC honours http_proxy for plain-text targets; tests only talk to loopback.
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy"):
        if name in os.environ:
            monkeypatch.delenv(name)
