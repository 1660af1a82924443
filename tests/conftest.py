"""Shared fixtures. Unit tests need none of these; integration and e2e tests
get private, real Postgres and Redis processes started here (never the
machine's own servers), so fault tests may kill them."""

from __future__ import annotations

import logging
import os
import re

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


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """A test that runs a CLI verb in process (``configure_logging``) points the
    root logger at that test's captured stderr, closed once the test ends: put
    the root's handlers and level back, so a later test in the same process
    (pytest-xdist runs them in any order) does not log into a closed file."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


#: A token as CreateSession issues them (see core/domain.py): never in a log.
_TOKEN = re.compile(r"sat_[A-Za-z0-9_-]{48}")


class _LeakWatch(logging.Handler):
    """Checks every log record of the whole run, DEBUG included, for tokens."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.leaks: list[str] = []
        self.records = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += repr(record.exc_info[1])
        if _TOKEN.search(text):
            self.leaks.append(f"{record.name}: {_TOKEN.sub('sat_<redacted>', text)[:200]}")


@pytest.fixture(scope="session", autouse=True)
def no_token_in_any_log() -> Iterator[None]:
    """Every in-process log line of the run is scanned for token-shaped strings
    (the e2e tier scans its server process's log file the same way)."""
    watch = _LeakWatch()
    logger = logging.getLogger("session_authority")
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(watch)
    yield
    logger.removeHandler(watch)
    logger.setLevel(previous)
    assert watch.leaks == [], watch.leaks[:5]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``make test`` runs on two processes (pytest-xdist, ``--dist loadgroup``): each test
    file is one unit of work, so its module-scoped servers start once, except that every test
    using the e2e tier's one server (``e2e_server``) goes to one process together, in
    collection order: ``tests/e2e/test_logs.py`` runs after the rest of them and stops that
    server (``tests/e2e/conftest.py``). Tests running beside another test process must not
    count what beats a short deadline: they assert counts and order."""
    for item in items:
        if "e2e_server" in getattr(item, "fixturenames", ()):
            group = "e2e-server"
        else:
            group = item.path.name
        item.add_marker(pytest.mark.xdist_group(group))
