"""Certificates made in the test (trustme), and Redis and Postgres servers that require TLS.

The wheels' servers have no TLS; Debian's redis-server and postgresql-NN do (``make
tls-servers`` installs them). Without them these tests fail, saying so: they never skip.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import trustme

from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis
from session_authority.embedded.tls import (
    TlsFiles,
    find_tls_postgres_bin_dir,
    find_tls_redis_server,
)

_MISSING = "run `make tls-servers` (Debian's redis-server and postgresql, built with OpenSSL)"


def write_tls_files(ca: trustme.CA, directory: Path, *, client_cert: bool) -> TlsFiles:
    """The CA, a server certificate for 127.0.0.1 and localhost, and with
    ``client_cert`` a client certificate whose common name is Postgres's user."""
    directory.mkdir(parents=True, exist_ok=True)
    server = ca.issue_cert("127.0.0.1", "localhost")
    files = {
        "ca.pem": ca.cert_pem.bytes(),
        "server.pem": server.cert_chain_pems[0].bytes(),
        "server.key": server.private_key_pem.bytes(),
    }
    if client_cert:
        client = ca.issue_cert("session-authority.test", common_name="postgres")
        files["client.pem"] = client.cert_chain_pems[0].bytes()
        files["client.key"] = client.private_key_pem.bytes()
    for name, data in files.items():
        (directory / name).write_bytes(data)
        (directory / name).chmod(0o600)  # libpq refuses a key others can read
    return TlsFiles(
        ca=directory / "ca.pem",
        cert=directory / "server.pem",
        key=directory / "server.key",
        client_cert=directory / "client.pem" if client_cert else None,
        client_key=directory / "client.key" if client_cert else None,
    )


def tls_redis(base_dir: Path, tls: TlsFiles, args: Sequence[str] = ()) -> EmbeddedRedis:
    binary = find_tls_redis_server()
    if binary is None:
        pytest.fail(f"no redis-server with TLS on PATH: {_MISSING}")
    return EmbeddedRedis(base_dir, binary=binary, tls=tls, args=args)


def tls_postgres(base_dir: Path, tls: TlsFiles, password: str | None = None) -> EmbeddedPostgres:
    bin_dir = find_tls_postgres_bin_dir()
    if bin_dir is None:
        pytest.fail(f"no Postgres built with OpenSSL: {_MISSING}")
    return EmbeddedPostgres(base_dir, bin_dir=bin_dir, tls=tls, password=password)
