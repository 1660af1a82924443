"""The TypeScript client (clients/node) against live servers: this module starts
them and runs ``npm test`` there, which must pass.

Two servers: the tier's plaintext ``serve`` (``e2e_server``; the Node tests
freeze it with SIGSTOP for the deadline tests, and this module thaws it
whatever happens), and a second replica on the same Postgres and Redis with
mTLS and an API key (``AUTH_ALLOWED_IDENTITIES=apikey:node``). Every token the
Node tests create is written to a file and recorded here, so that the tier's
log scan (test_logs.py) proves none reached a log.

The Node dependencies come from ``make node-client`` (``npm ci`` from the lock),
a prerequisite of ``make test`` and ``make e2e``; without them this test fails.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2

from session_authority.embedded import find_free_port
from session_authority.transport.auth import hash_api_key
from tests.pki import issue_client, issue_server, write_atomically
from tests.third_party import health_stub

from .conftest import READY_TIMEOUT
from .e2e_support import BIN, ServerProcess, stop_process

pytestmark = pytest.mark.e2e

NODE_CLIENT = Path(__file__).resolve().parents[2] / "clients" / "node"
NPM_TIMEOUT = 180.0  # seconds for tsc and the Node tests


@dataclass(frozen=True)
class TlsServer:
    target: str
    ca: Path
    cert: Path
    key: Path
    api_key: str


def _wait_serving(
    target: str, ca: trustme.CA, cert: Path, key: Path, process: subprocess.Popen[bytes], log: Path
) -> None:
    credentials = grpc.ssl_channel_credentials(
        ca.cert_pem.bytes(), key.read_bytes(), cert.read_bytes()
    )
    deadline = time.monotonic() + READY_TIMEOUT
    with grpc.secure_channel(
        target, credentials, options=[("grpc.enable_http_proxy", 0)]
    ) as channel:
        while True:
            assert process.poll() is None, log.read_text()
            with contextlib.suppress(grpc.RpcError):
                reply = health_stub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)


@pytest.fixture(scope="module")
def tls_server(
    e2e_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsServer]:
    """A second replica of the tier's server: mTLS, and one API key on the allow-list."""
    directory = tmp_path_factory.mktemp("node-tls")
    ca = trustme.CA()
    ca_file = directory / "ca.pem"
    write_atomically(ca_file, ca.cert_pem.bytes())
    server_cert, server_key = issue_server(ca, "localhost", "127.0.0.1").write(directory, "server")
    cert, key = issue_client(ca, uris=("spiffe://example.org/ns/test/sa/node",)).write(
        directory, "client"
    )
    api_key = secrets.token_urlsafe(32)
    e2e_server.presented(api_key)  # the tier's log scan: never logged
    port = find_free_port()
    env = {
        **e2e_server.env,
        "ADMIN_PORT": "0",
        "AUTH_API_KEYS": f"node:{hash_api_key(api_key)}",
        "AUTH_ALLOWED_IDENTITIES": "apikey:node",
    }
    log = directory / "server.log"
    argv = [str(BIN / "session-authority"), "serve", "--workers", "1", "--port", str(port)]
    argv += [
        "--tls-cert",
        str(server_cert),
        "--tls-key",
        str(server_key),
        "--tls-client-ca",
        str(ca_file),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    target = f"127.0.0.1:{port}"
    try:
        _wait_serving(target, ca, cert, key, process, log)
        yield TlsServer(target, ca_file, cert, key, api_key)
    finally:
        code = stop_process(process)
    assert code == 0, log.read_text()
    leaks = e2e_server.leaks(log.read_text(errors="replace"))
    assert not leaks, f"secrets in the TLS replica's log: {leaks}"


def test_node_client(e2e_server: ServerProcess, tls_server: TlsServer, tmp_path: Path) -> None:
    npm = shutil.which("npm")
    assert npm is not None, "npm not found: the TypeScript client's tests need Node 20+ and npm"
    assert (NODE_CLIENT / "node_modules" / ".installed").exists(), (
        "clients/node has no dependencies installed: run `make node-client` (npm ci)"
    )
    tokens = tmp_path / "tokens.txt"
    tokens.touch()
    env = {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in ("http_proxy", "https_proxy", "grpc_proxy", "no_proxy")
    }
    env.update(
        SA_TARGET=e2e_server.target,
        SA_SERVER_PID=str(e2e_server.process.pid),
        SA_TLS_TARGET=tls_server.target,
        SA_TLS_CA=str(tls_server.ca),
        SA_TLS_CERT=str(tls_server.cert),
        SA_TLS_KEY=str(tls_server.key),
        SA_API_KEY=tls_server.api_key,
        SA_TOKEN_LOG=str(tokens),
        NO_COLOR="1",
    )
    try:
        done = subprocess.run(
            [npm, "test", "--silent"],
            cwd=NODE_CLIENT,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=NPM_TIMEOUT,
            check=False,
        )
    finally:
        # The Node tests freeze the tier's server and thaw it; thaw it here too
        # in case they died in between.
        os.kill(e2e_server.process.pid, signal.SIGCONT)
        for token in tokens.read_text().split():
            e2e_server.record(token)
    output = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    assert done.returncode == 0, output
    assert "# fail 0" in output, output
    passed = [line for line in output.splitlines() if line.startswith("# pass ")]
    assert passed and int(passed[0].split()[-1]) >= 44, output
    assert len(tokens.read_text().split()) >= 10
