"""``session-authority health`` (the container HEALTHCHECK and operators' probe)
against real ``serve`` processes: an mTLS + API-key port with a real Postgres
(SERVING), a port whose database is dead (NOT_SERVING), the same port once
stopped (no answer), and bad usage. The exit code is the contract:
0 healthy, 1 unhealthy, 2 usage, 3 unavailable."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from session_authority.embedded import EmbeddedPostgres, find_free_port
from session_authority.transport.auth import hash_api_key
from tests.pki import issue_client, issue_server, write_atomically

from .conftest import READY_TIMEOUT
from .e2e_support import BIN, clean_env, stop_process

pytestmark = pytest.mark.e2e

SERVER_NAME = "session-authority.internal"  # not the target's host: --server-name is needed
API_KEY = "health-cli-key-0123456789abcdef0123456789"
CALLER = "spiffe://example.org/ns/prod/sa/probe"
ROOT = Path(__file__).resolve().parents[2]


def _argv() -> list[str]:
    cli = BIN / "session-authority"
    return [str(cli)] if cli.exists() else [sys.executable, "-m", "session_authority.cli"]


@dataclass
class Probe:
    code: int
    out: str
    err: str

    def json(self) -> dict[str, Any]:
        document = json.loads(self.out)
        assert isinstance(document, dict)
        return document


#: ``python -m session_authority.probe``: the same verb without loading the server's
#: modules (what the container HEALTHCHECK runs; quicker on a busy machine).
MODULE = [sys.executable, "-m", "session_authority.probe"]


def health(*flags: str, via: list[str] = MODULE, **env: str) -> Probe:
    done = subprocess.run(
        [*via, "--timeout", "5", *flags],
        env=clean_env(**env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    return Probe(done.returncode, done.stdout.decode(), done.stderr.decode())


def _wait_for(code: int, flags: list[str], process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll until ``health`` exits ``code`` (a generous backstop, not a bound)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        assert process.poll() is None, log.read_text()
        probe = health(*flags)
        if probe.code == code:
            return
        assert time.monotonic() < deadline, f"{probe}\n{log.read_text()}"
        time.sleep(0.2)


def _serve(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [*_argv(), "serve", "--workers", "1", *argv],
            env=clean_env(ADMIN_PORT="0", LOG_FORMAT="json", **env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@dataclass
class TlsServer:
    target: str
    dir: Path
    ca_file: Path
    tls: list[str]  # the health verb's flags for a trusted client with a certificate


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """mTLS and API keys on the port, a real Postgres behind it."""
    workdir = tmp_path_factory.mktemp("health-cli")
    ca = trustme.CA()
    ca_file = workdir / "ca.pem"
    write_atomically(ca_file, ca.cert_pem.bytes())
    cert, key = issue_server(ca, SERVER_NAME).write(workdir, "server")
    client_cert, client_key = issue_client(ca, uris=(CALLER,)).write(workdir, "client")
    port = find_free_port()
    log = workdir / "server.log"
    with EmbeddedPostgres(workdir / "postgres") as postgres:
        flags = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(ca_file)]
        process = _serve(
            ["--host", "127.0.0.1", "--port", str(port), "--migrate", *flags],
            {"DATABASE_URL": postgres.url, "AUTH_API_KEYS": f"probe:{hash_api_key(API_KEY)}"},
            log,
        )
        tls = ["--ca-file", str(ca_file), "--cert-file", str(client_cert)]
        tls += ["--key-file", str(client_key), "--server-name", SERVER_NAME]
        server = TlsServer(f"127.0.0.1:{port}", workdir, ca_file, tls)
        try:
            _wait_for(0, ["--target", server.target, *tls], process, log)
            yield server
        finally:
            code = stop_process(process)
        assert code == 0, log.read_text()
        assert API_KEY not in log.read_text()


def test_healthy_over_mtls(tls_server: TlsServer) -> None:
    for via in ([*_argv(), "health"], MODULE):
        probe = health("--target", tls_server.target, *tls_server.tls, via=via)
        assert probe.code == 0, probe
        assert probe.out.strip() == f"{tls_server.target}: SERVING"


def test_json_carries_the_health_document_when_authorised(tls_server: TlsServer) -> None:
    key_file = tls_server.dir / "api-key"
    key_file.write_text(API_KEY + "\n")  # the newline an editor leaves
    probe = health("--target", tls_server.target, *tls_server.tls, "--json",
                   "--api-key-file", str(key_file))  # fmt: skip
    assert probe.code == 0, probe
    verdict = probe.json()
    assert verdict["healthy"] is True
    assert verdict["status"] == "SERVING"
    document = verdict["document"]
    assert isinstance(document, dict)
    # Proto field names, as the runbook's jq paths spell them (no Redis configured).
    assert document["status"] == "healthy", document
    assert document["postgres"]["connected"] is True
    assert document["session_cache"]["enabled"] is False
    assert API_KEY not in probe.out + probe.err


def test_a_refused_document_is_reported_and_the_verdict_stands(tls_server: TlsServer) -> None:
    """A wrong key (from the environment) is sent and refused: the document is
    missing and says why; grpc.health.v1's verdict decides the exit code."""
    wrong = "not-the-key-" + "x" * 30
    probe = health("--target", tls_server.target, *tls_server.tls, "--json",
                   SESSION_AUTHORITY_API_KEY=wrong)  # fmt: skip
    assert probe.code == 0, probe
    verdict = probe.json()
    assert "document" not in verdict
    assert str(verdict["document_error"]).startswith("UNAUTHENTICATED"), verdict
    assert wrong not in probe.out + probe.err


def test_flags_come_from_the_environment(tls_server: TlsServer) -> None:
    """What the container HEALTHCHECK relies on: ``session-authority health`` alone."""
    flags = dict(zip(tls_server.tls[::2], tls_server.tls[1::2], strict=True))
    probe = health(
        SESSION_AUTHORITY_TARGET=tls_server.target,
        SESSION_AUTHORITY_CA_FILE=flags["--ca-file"],
        SESSION_AUTHORITY_CERT_FILE=flags["--cert-file"],
        SESSION_AUTHORITY_KEY_FILE=flags["--key-file"],
        SESSION_AUTHORITY_SERVER_NAME=SERVER_NAME,
    )
    assert probe.code == 0, probe


def test_no_handshake_is_unavailable(tls_server: TlsServer) -> None:
    target = ["--target", tls_server.target]
    no_client_cert = ["--ca-file", str(tls_server.ca_file), "--server-name", SERVER_NAME]
    other_ca = tls_server.dir / "other-ca.pem"
    write_atomically(other_ca, trustme.CA().cert_pem.bytes())
    untrusted = ["--ca-file", str(other_ca), *tls_server.tls[2:]]
    wrong_name = [*tls_server.tls[:-1], "elsewhere.internal"]
    for flags in ([], no_client_cert, untrusted, wrong_name):
        probe = health(*target, *flags)
        assert probe.code == 3, (flags, probe)
        assert "SERVING" not in probe.out


def test_not_serving_is_unhealthy_then_stopped_is_unavailable(tmp_path: Path) -> None:
    """A database nobody answers: the server runs NOT_SERVING (exit 1); once it
    has stopped, nothing answers (exit 3)."""
    port = find_free_port()
    dead = f"postgresql://postgres@127.0.0.1:{find_free_port()}/none"
    log = tmp_path / "server.log"
    process = _serve(
        ["--host", "127.0.0.1", "--port", str(port)],
        {"DATABASE_URL": dead, "AUTH_API_KEYS": f"probe:{hash_api_key(API_KEY)}"},
        log,
    )
    target = ["--target", f"127.0.0.1:{port}"]
    try:
        _wait_for(1, target, process, log)
        probe = health(*target, "--json", SESSION_AUTHORITY_API_KEY=API_KEY)
        assert probe.code == 1, probe
        verdict = probe.json()
        assert verdict["healthy"] is False
        assert verdict["status"] == "NOT_SERVING"
        document = verdict["document"]
        assert isinstance(document, dict)
        assert document["status"] == "unhealthy"
    finally:
        assert stop_process(process) == 0, log.read_text()
    probe = health(*target, via=[*_argv(), "health"])
    assert probe.code == 3, probe
    assert "UNAVAILABLE" in probe.out
    probe = health(*target, "--json")
    assert probe.code == 3, probe
    assert probe.json() == {
        "detail": probe.json()["detail"],
        "healthy": False,
        "status": "UNAVAILABLE",
        "target": f"127.0.0.1:{port}",
    }


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--target", "no-port"], "--target must be host:port"),
        (["--cert-file", "/dev/null"], "--cert-file and --key-file go together"),
        (["--ca-file", "/nonexistent/ca.pem"], "cannot read /nonexistent/ca.pem"),
        (["--server-name", "x"], "--server-name needs TLS"),
        (["--timeout", "0"], "--timeout must be positive"),
        (["--timeout", "soon"], "invalid float value"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_usage_errors_exit_2(flags: list[str], says: str) -> None:
    probe = health("--target", f"127.0.0.1:{find_free_port()}", *flags)
    assert probe.code == 2, probe
    assert says in probe.err, probe


def test_usage_error_through_the_cli_exits_2() -> None:
    probe = health("--target", "no-port", via=[*_argv(), "health"])
    assert probe.code == 2, probe
    assert "--target must be host:port" in probe.err, probe


def _healthcheck_argv() -> list[str]:
    """The Dockerfile's HEALTHCHECK command, with this checkout's interpreter."""
    text = (ROOT / "deploy" / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith("HEALTHCHECK")]
    argv: list[str] = json.loads(line.partition(" CMD ")[2])
    assert argv[0] == "python", argv
    return [sys.executable, *argv[1:]]


def test_compose_tls_and_api_key_wiring_on_a_real_serve(tmp_path: Path) -> None:
    """deploy/compose.yaml's TLS and API key, as compose/make-secrets.sh makes them, on a real
    ``serve``; the image's HEALTHCHECK command with the service's environment gets through
    the handshake (an answer: NOT_SERVING, the database here is dead), and the API key the
    script made is one AUTH_API_KEYS accepts (--json carries the document)."""
    deploy = tmp_path / "deploy"
    (deploy / "compose").mkdir(parents=True)
    shutil.copy(ROOT / "deploy" / "compose" / "make-secrets.sh", deploy / "compose")
    made = subprocess.run(
        ["sh", str(deploy / "compose" / "make-secrets.sh")],
        capture_output=True,
        timeout=60,
        check=True,
    )
    (auth_line,) = made.stdout.decode().splitlines()
    secrets = deploy / "secrets"
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    service = compose["services"]["session-authority"]
    files = {name: secrets / Path(s["file"]).name for name, s in compose["secrets"].items()}
    mounted = {f"/run/secrets/{s['target']}": str(files[s["source"]]) for s in service["secrets"]}
    env = {k: mounted.get(str(v), str(v)) for k, v in service["environment"].items()}
    port = find_free_port()
    serve_env = {
        "TLS_CERT_FILE": env["TLS_CERT_FILE"],
        "TLS_KEY_FILE": env["TLS_KEY_FILE"],
        "AUTH_API_KEYS": auth_line.partition("=")[2],
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{find_free_port()}/none",
    }
    log = tmp_path / "server.log"
    process = _serve(["--host", "127.0.0.1", "--port", str(port)], serve_env, log)
    probe_env = {
        name: value for name, value in env.items() if name.startswith("SESSION_AUTHORITY_")
    }
    probe_env |= {"PORT": str(port)}  # the HEALTHCHECK's default target: 127.0.0.1:$PORT
    try:
        flags = ["--ca-file", probe_env["SESSION_AUTHORITY_CA_FILE"]]
        flags += ["--server-name", probe_env["SESSION_AUTHORITY_SERVER_NAME"]]
        _wait_for(1, ["--target", f"127.0.0.1:{port}", *flags], process, log)
        probe = health(via=_healthcheck_argv(), **probe_env)
        assert probe.code == 1, probe
        assert "NOT_SERVING" in probe.out
        key = (secrets / "api-key").read_text()
        probe_env["SESSION_AUTHORITY_API_KEY"] = key
        probe = health("--json", via=_healthcheck_argv(), **probe_env)
        assert probe.code == 1, probe
        assert probe.json()["document"]["status"] == "unhealthy"
        # Without the TLS settings compose gives the probe: no handshake.
        plain = {"PORT": str(port)}
        assert health(via=_healthcheck_argv(), **plain).code == 3
    finally:
        assert stop_process(process) == 0, log.read_text()
