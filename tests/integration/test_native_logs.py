"""Every line ``serve`` writes is one JSON object, gRPC core's own included,
and failed TLS handshakes are counted: a real ``serve`` on an mTLS port,
reached by clients without a certificate (gRPC core then writes
``Handshake failed ... PEER_DID_NOT_RETURN_A_CERTIFICATE`` on stderr)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2

from session_authority.embedded import find_free_port
from tests.pki import issue_client, issue_server, write_atomically
from tests.third_party import aio_health_stub

from .support import NO_PROXY, metric_total, server_env, stop_serve

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

FAILURES = "session_authority_tls_handshake_failures_total"
ATTEMPTS = 3


def _channel(target: str, ca: trustme.CA, client: tuple[bytes, bytes] | None) -> grpc.aio.Channel:
    key, cert = client if client is not None else (None, None)
    credentials = grpc.ssl_channel_credentials(ca.cert_pem.bytes(), key, cert)
    options: list[tuple[str, str | int]] = [
        *NO_PROXY,
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.ssl_target_name_override", "localhost"),
    ]
    return grpc.aio.secure_channel(target, credentials, options=options)


async def _check(channel: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        await aio_health_stub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)


async def test_grpc_core_lines_are_json_and_handshake_failures_counted(
    tmp_path: Path, pg_dsn: str
) -> None:
    ca = trustme.CA()
    cert, key = issue_server(ca, "localhost").write(tmp_path / "tls", "server")
    client_ca = tmp_path / "tls" / "client-ca.pem"
    write_atomically(client_ca, ca.cert_pem.bytes())
    client = issue_client(ca, uris=("spiffe://example.org/ns/prod/sa/probe",))
    port, admin_port = find_free_port(), find_free_port()
    log = tmp_path / "serve.log"
    argv = [str(Path(sys.executable).parent / "session-authority"), "serve", "--workers", "1"]
    argv += ["--port", str(port), "--tls-cert", str(cert), "--tls-key", str(key)]
    argv += ["--tls-client-ca", str(client_ca)]
    env = server_env(
        HOST="127.0.0.1",
        ADMIN_PORT=str(admin_port),
        DATABASE_URL=pg_dsn,
        LOG_FORMAT="json",
        LOG_LEVEL="DEBUG",
    )
    process = _spawn(argv, env, log)
    target = f"127.0.0.1:{port}"
    try:
        async with _channel(target, ca, (client.key, client.cert)) as good:
            for _ in range(300):
                if await _check(good) == grpc.StatusCode.OK:
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(log.read_text()[-3000:])
        for _ in range(ATTEMPTS):  # each a connection of its own, without a certificate
            async with _channel(target, ca, None) as stranger:
                assert await _check(stranger) == grpc.StatusCode.UNAVAILABLE
        counted = -1.0
        for _ in range(100):  # the lines pass through a thread: a backstop of 10 s
            counted = await asyncio.to_thread(metric_total, admin_port, FAILURES)
            if counted >= ATTEMPTS:
                break
            await asyncio.sleep(0.1)
        assert counted >= ATTEMPTS, log.read_text()[-3000:]
    finally:
        code = stop_serve(process)
    assert code == 0
    lines = log.read_text(encoding="utf-8").splitlines()
    not_json = []
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            not_json.append(line)
            continue
        if isinstance(entry, dict):
            entries.append(entry)
        else:
            not_json.append(line)
    assert not not_json, not_json[:5]
    core = [e for e in entries if e["logger"] == "grpc.core"]
    assert any("Handshake failed" in e["message"] for e in core), core[:5]
    assert any("shutting down" in e["message"] for e in entries)
