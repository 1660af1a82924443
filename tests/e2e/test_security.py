"""``serve``'s security contract from the outside: it refuses to start with
mutating RPCs open unless told ``--allow-unauthenticated`` (and then says so),
and ``--tls-cert``/``--tls-key``/``--tls-client-ca`` give an mTLS port that
grpcurl reaches only with a client certificate, mutating only when allowed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2

from session_authority.embedded import find_free_port
from tests.pki import issue_client, issue_server, write_atomically
from tests.third_party import health_stub

from .conftest import READY_TIMEOUT
from .e2e_support import BIN, SERVICE, ServerProcess, ToolRunner, clean_env, stop_process, tool

pytestmark = pytest.mark.e2e

LOGIN = "spiffe://example.org/ns/prod/sa/login"
GATEWAY = "spiffe://example.org/ns/prod/sa/gateway"
_EXIT_PERMISSION_DENIED = 64 + 7  # grpcurl: 64 + the status code
_EXIT_UNAVAILABLE = 64 + 14


def _argv() -> list[str]:
    cli = BIN / "session-authority"
    return [str(cli)] if cli.exists() else [sys.executable, "-m", "session_authority.cli"]


def _dead_database() -> str:
    """A DSN nobody answers: the server starts NOT_SERVING, and every call
    that passes authorisation ends UNAVAILABLE, so its code tells which."""
    return f"postgresql://postgres@127.0.0.1:{find_free_port()}/none"


def test_serve_refuses_to_start_open() -> None:
    done = subprocess.run(
        [*_argv(), "serve", "--port", str(find_free_port())],
        env=clean_env(DATABASE_URL=_dead_database(), ADMIN_PORT="0"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    err = done.stderr.decode()
    assert "refusing to start: no authentication is configured" in err
    assert "--allow-unauthenticated" in err


def test_open_server_says_so(e2e_server: ServerProcess) -> None:
    """The tier's server runs with --allow-unauthenticated."""
    entries = [json.loads(line) for line in e2e_server.log_text().splitlines() if line]
    warnings = [e["message"] for e in entries if e["level"] == "WARNING"]
    assert any("NO AUTHENTICATION" in m and "CreateSession" in m for m in warnings), warnings
    assert any("PLAINTEXT" in m for m in warnings)
    infos = [e["message"] for e in entries if e["level"] == "INFO"]
    assert any("admin HTTP" in m and "loopback only" in m for m in infos), infos


class MtlsServer:
    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.dir = directory
        self.ca_file = directory / "ca.pem"
        write_atomically(self.ca_file, self.ca.cert_pem.bytes())
        self.cert, self.key = issue_server(self.ca, "localhost", "127.0.0.1").write(
            directory, "server"
        )
        self.target = f"127.0.0.1:{find_free_port()}"
        self.log = directory / "server.log"

    def client(self, uri: str) -> list[str]:
        """grpcurl's TLS flags for a client with this SAN URI."""
        cert, key = issue_client(self.ca, uris=(uri,)).write(self.dir, uri.rsplit("/", 1)[1])
        return ["-cacert", str(self.ca_file), "-cert", str(cert), "-key", str(key)]

    def wait_answering(self, process: subprocess.Popen[bytes]) -> None:
        cert, key = issue_client(self.ca, uris=(GATEWAY,)).write(self.dir, "probe")
        credentials = grpc.ssl_channel_credentials(
            self.ca.cert_pem.bytes(), key.read_bytes(), cert.read_bytes()
        )
        deadline = time.monotonic() + READY_TIMEOUT
        options = [("grpc.enable_http_proxy", 0)]
        with grpc.secure_channel(self.target, credentials, options=options) as channel:
            while True:
                assert process.poll() is None, self.log.read_text()
                try:
                    health_stub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    return
                except grpc.RpcError:
                    assert time.monotonic() < deadline, self.log.read_text()
                    time.sleep(0.1)


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MtlsServer]:
    server = MtlsServer(tmp_path_factory.mktemp("mtls"))
    env = clean_env(
        DATABASE_URL=_dead_database(),
        AUTH_ALLOWED_IDENTITIES=LOGIN,
        ADMIN_PORT="0",
        LOG_FORMAT="json",
    )
    host, port = server.target.split(":")
    flags = ["--tls-cert", str(server.cert), "--tls-key", str(server.key)]
    flags += ["--tls-client-ca", str(server.ca_file)]
    with server.log.open("wb") as out:
        process = subprocess.Popen(
            [*_argv(), "serve", "--host", host, "--port", port, *flags],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        server.wait_answering(process)
        yield server
    finally:
        code = stop_process(process)
    assert code == 0, server.log.read_text()


def _grpcurl(run_tool: ToolRunner, *args: str) -> tuple[int, str]:
    done = run_tool(tool("grpcurl"), "-max-time", "10", *args)
    return done.returncode, done.stdout + done.stderr


def test_mtls_serve_with_grpcurl(run_tool: ToolRunner, mtls_server: MtlsServer) -> None:
    server = mtls_server
    login, gateway = server.client(LOGIN), server.client(GATEWAY)
    create = ["-d", '{"user_id": "e2e-mtls"}', server.target, f"{SERVICE}/CreateSession"]

    code, out = _grpcurl(run_tool, *gateway, server.target, "list")
    assert code == 0, out
    assert SERVICE in out.split()  # reflection: any caller the handshake lets in

    code, out = _grpcurl(run_tool, "-cacert", str(server.ca_file), server.target, "list")
    assert code not in (0, _EXIT_PERMISSION_DENIED), out  # no client certificate: no handshake
    code, out = _grpcurl(run_tool, "-plaintext", server.target, "list")
    assert code != 0, out

    code, out = _grpcurl(run_tool, *gateway, server.target, f"{SERVICE}/Health")
    assert code == 0, out  # a read: any authenticated caller
    code, out = _grpcurl(run_tool, *gateway, *create)
    assert code == _EXIT_PERMISSION_DENIED, out
    # Allowed: past authorisation, to the (absent) database.
    code, out = _grpcurl(run_tool, *login, *create)
    assert code == _EXIT_UNAVAILABLE, out

    log = server.log.read_text()
    assert "gRPC port: mTLS" in log
    denied = [line for line in log.splitlines() if "auth denied" in line]
    assert len(denied) == 1
    assert GATEWAY in denied[0]
    assert "CreateSession" in denied[0]
