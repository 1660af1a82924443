"""Forward-auth over TLS and mTLS (FORWARD_AUTH_TLS_*), behind a real nginx
(Debian's, ``make gateway-tools``) that reaches it with ``proxy_ssl_*``.

Two replicas of ``serve`` on one Postgres and Redis, both with an API key
configured (so a gateway must authenticate): ``tls``, whose forward-auth
speaks TLS and still wants ``x-api-key``; and ``mtls``, whose forward-auth
requires a gateway certificate from its client CA, which stands in for the
key. nginx verifies our certificate against the CA (``proxy_ssl_verify``)
and, towards ``mtls``, presents its client certificate. Every way it can go
wrong is one location: no key, a server certificate nginx does not trust,
plaintext to the TLS port, no client certificate, one from another CA; each
must end in a refusal (the gateway's 500 or our 403), never the upstream.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme
from cryptography import x509
from grpc_health.v1 import health_pb2

from session_authority.core.domain import new_token
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis, find_free_port
from session_authority.transport.auth import hash_api_key
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc
from tests.pki import issue_client, issue_server, write_atomically
from tests.third_party import health_stub

from .e2e_support import BIN, ServerProcess, clean_env, stop_process

pytestmark = pytest.mark.e2e

_READY = 30.0


@dataclass
class Replica:
    server: ServerProcess
    forward_auth_port: int


@dataclass
class Tier:
    tls: Replica
    mtls: Replica
    stub: pb_grpc.SessionAuthorityStub
    api_key: str
    ca: trustme.CA
    files: Path

    def create(self, user_id: str) -> pb.CreateSessionResponse:
        reply: pb.CreateSessionResponse = self.stub.CreateSession(
            pb.CreateSessionRequest(user_id=user_id),
            timeout=10,
            metadata=(("x-api-key", self.api_key),),
        )
        self.tls.server.record(reply.token)
        self.mtls.server.record(reply.token)
        return reply


def _start(workdir: Path, name: str, env: dict[str, str], *, migrate: bool) -> Replica:
    forward_auth_port, port = find_free_port(), find_free_port()
    cli = BIN / "session-authority"
    argv = [str(cli)] if cli.exists() else [sys.executable, "-m", "session_authority.cli"]
    argv += ["serve", "--workers", "1", "--port", str(port), *(["--migrate"] if migrate else [])]
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            argv,
            env={**env, "FORWARD_AUTH_PORT": str(forward_auth_port)},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    server = ServerProcess(
        target=f"127.0.0.1:{port}",
        log_path=log_path,
        migrate_log_path=log_path,
        process=process,
        workdir=workdir,
        created_tokens=[],
        password="",
        resources=contextlib.ExitStack(),
    )
    deadline = time.monotonic() + _READY
    with grpc.insecure_channel(server.target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        while True:
            if process.poll() is not None:
                pytest.fail(f"{name} exited; log:\n{server.tail()}")
            with contextlib.suppress(grpc.RpcError):
                reply = health_stub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return Replica(server, forward_auth_port)
            assert time.monotonic() < deadline, f"{name} not SERVING; log:\n{server.tail()}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tier]:
    workdir = tmp_path_factory.mktemp("forward-auth-tls")
    files = workdir / "pki"
    files.mkdir()
    ca, other_ca = trustme.CA(), trustme.CA()
    write_atomically(files / "ca.pem", ca.cert_pem.bytes())
    write_atomically(files / "other-ca.pem", other_ca.cert_pem.bytes())
    cert, key = issue_server(ca, "localhost", "127.0.0.1").write(files, "forward-auth")
    issue_client(ca, dns=("gateway.test",)).write(files, "gateway")
    issue_client(other_ca, dns=("gateway.test",)).write(files, "rogue")
    api_key = secrets.token_urlsafe(32)
    with contextlib.ExitStack() as stack:
        postgres = stack.enter_context(EmbeddedPostgres(workdir / "postgres"))
        redis = stack.enter_context(EmbeddedRedis(workdir / "redis"))
        env = clean_env(
            DATABASE_URL=postgres.url,
            REDIS_URL=redis.url,
            HOST="127.0.0.1",
            ADMIN_PORT="0",
            AUTH_API_KEYS=f"gw:{hash_api_key(api_key)}",
            AUTH_ALLOWED_IDENTITIES="apikey:gw",
            FORWARD_AUTH_TLS_CERT_FILE=str(cert),
            FORWARD_AUTH_TLS_KEY_FILE=str(key),
        )
        tls = _start(workdir, "tls", env, migrate=True)
        stack.callback(stop_process, tls.server.process)
        mtls_env = {**env, "FORWARD_AUTH_TLS_CLIENT_CA_FILE": str(files / "ca.pem")}
        mtls = _start(workdir, "mtls", mtls_env, migrate=False)
        stack.callback(stop_process, mtls.server.process)
        for replica in (tls, mtls):
            replica.server.presented(api_key)
        channel = stack.enter_context(
            grpc.insecure_channel(tls.server.target, options=[("grpc.enable_http_proxy", 0)])
        )
        yield Tier(tls, mtls, pb_grpc.SessionAuthorityStub(channel), api_key, ca, files)
        for replica in (tls, mtls):
            assert stop_process(replica.server.process) == 0, replica.server.tail()
            leaks = replica.server.leaks(replica.server.log_text())
            assert not leaks, f"secrets in the server log: {leaks}"


# nginx ----------------------------------------------------------------------------

_AUTH_LOCATION = """
        location = /_auth/{name} {{
            internal;
            proxy_pass {scheme}://127.0.0.1:{port}/auth;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            {extra}
        }}
        location /{name} {{
            auth_request /_auth/{name};
            auth_request_set $session_user $upstream_http_x_session_user_id;
            auth_request_set $session_id $upstream_http_x_session_id;
            proxy_set_header X-Session-User-Id $session_user;
            proxy_set_header X-Session-Id $session_id;
            proxy_pass http://127.0.0.1:{upstream};
        }}
"""

_NGINX_CONF = """
user root;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{upstream};
        location / {{
            return 200 "user=$http_x_session_user_id session=$http_x_session_id\\n";
        }}
    }}
    server {{
        listen 127.0.0.1:{front};
{locations}
    }}
}}
"""


def _verify(ca: Path) -> str:
    """nginx checks our certificate (chain and name); every handshake a full one, so no
    location rides on a session another location's handshake set up."""
    return (
        f"proxy_ssl_verify on; proxy_ssl_trusted_certificate {ca}; proxy_ssl_name localhost; "
        "proxy_ssl_session_reuse off;"
    )


def _locations(tier: Tier, upstream: int) -> str:
    files = tier.files
    key = f'proxy_set_header x-api-key "{tier.api_key}";'
    ours = _verify(files / "ca.pem")
    gateway = (
        f"proxy_ssl_certificate {files / 'gateway.crt'}; "
        f"proxy_ssl_certificate_key {files / 'gateway.key'};"
    )
    rogue = (
        f"proxy_ssl_certificate {files / 'rogue.crt'}; "
        f"proxy_ssl_certificate_key {files / 'rogue.key'};"
    )
    tls, mtls = tier.tls.forward_auth_port, tier.mtls.forward_auth_port
    rows = {
        "tls": ("https", tls, f"{ours} {key}"),
        "tls-nokey": ("https", tls, ours),
        "tls-wrongca": ("https", tls, f"{_verify(files / 'other-ca.pem')} {key}"),
        "tls-plain": ("http", tls, key),
        "mtls": ("https", mtls, f"{ours} {gateway}"),
        "mtls-nocert": ("https", mtls, f"{ours} {key}"),
        "mtls-rogue": ("https", mtls, f"{ours} {rogue} {key}"),
    }
    return "".join(
        _AUTH_LOCATION.format(name=name, scheme=scheme, port=port, extra=extra, upstream=upstream)
        for name, (scheme, port, extra) in rows.items()
    )


@dataclass
class Nginx:
    port: int
    error_log: Path


@pytest.fixture(scope="module")
def nginx(tier: Tier, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if binary is None:
        pytest.fail("nginx not found: `make gateway-tools` installs Debian's nginx (as root)")
    tmp = tmp_path_factory.mktemp("nginx-tls")
    front, upstream = find_free_port(), find_free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(
        _NGINX_CONF.format(
            tmp=tmp, front=front, upstream=upstream, locations=_locations(tier, upstream)
        )
    )
    with (tmp / "stderr.log").open("wb") as stderr:
        process = subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(tmp), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 10
        while _get(front, "/tls-nokey", {})[0] == 0:
            assert process.poll() is None, (tmp / "stderr.log").read_text()
            assert time.monotonic() < deadline, "nginx did not answer"
            time.sleep(0.05)
        yield Nginx(front, tmp / "error.log")
    finally:
        stop_process(process)


def _get(port: int, path: str, headers: dict[str, str]) -> tuple[int, str]:
    """Status and body of GET through nginx; (0, "") when nothing listens."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}/app", headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (ConnectionError, urllib.error.URLError):
        return 0, ""


# through nginx ----------------------------------------------------------------------


def test_tls_nginx_verifies_us_and_the_key_passes(tier: Tier, nginx: Nginx) -> None:
    created = tier.create("user-fa-tls")
    expected = f"user=user-fa-tls session={created.session.session_id}\n"
    assert _get(nginx.port, "/tls", {"Cookie": f"session={created.token}"}) == (200, expected)
    unknown = tier.tls.server.presented(new_token())
    assert _get(nginx.port, "/tls", {"Cookie": f"session={unknown}"})[0] == 401
    tier.stub.Invalidate(
        pb.InvalidateRequest(token=created.token),
        timeout=10,
        metadata=(("x-api-key", tier.api_key),),
    )
    assert _get(nginx.port, "/tls", {"Cookie": f"session={created.token}"})[0] == 401


def test_tls_still_wants_the_key(tier: Tier, nginx: Nginx) -> None:
    created = tier.create("user-fa-nokey")
    status, body = _get(nginx.port, "/tls-nokey", {"Cookie": f"session={created.token}"})
    assert status == 403, (status, body)
    assert "user=" not in body


def test_a_certificate_nginx_does_not_trust_is_refused(tier: Tier, nginx: Nginx) -> None:
    created = tier.create("user-fa-wrongca")
    status, body = _get(nginx.port, "/tls-wrongca", {"Cookie": f"session={created.token}"})
    assert status == 500, (status, body)
    assert "user=" not in body
    assert "upstream SSL certificate verify error" in nginx.error_log.read_text()


def test_plaintext_to_the_tls_port_gets_no_answer(tier: Tier, nginx: Nginx) -> None:
    created = tier.create("user-fa-plain")
    status, body = _get(nginx.port, "/tls-plain", {"Cookie": f"session={created.token}"})
    assert status == 500, (status, body)
    assert "user=" not in body


def test_mtls_the_gateway_certificate_stands_in_for_the_key(tier: Tier, nginx: Nginx) -> None:
    created = tier.create("user-fa-mtls")
    expected = f"user=user-fa-mtls session={created.session.session_id}\n"
    assert _get(nginx.port, "/mtls", {"Cookie": f"session={created.token}"}) == (200, expected)
    assert _get(nginx.port, "/mtls", {})[0] == 401


@pytest.mark.parametrize("location", ["mtls-nocert", "mtls-rogue"])
def test_mtls_without_a_certificate_from_our_ca_no_handshake(
    tier: Tier, nginx: Nginx, location: str
) -> None:
    """The key does not help: the handshake fails before any request is read."""
    created = tier.create(f"user-fa-{location}")
    status, body = _get(nginx.port, f"/{location}", {"Cookie": f"session={created.token}"})
    assert status == 500, (status, body)
    assert "user=" not in body


# directly ----------------------------------------------------------------------------


def _raw_request(port: int, token: str, key: str, context: ssl.SSLContext | None) -> bytes:
    """One GET /auth, plain or over ``context`` (no SNI: an address as the name), and what
    came back before the connection closed."""
    request = (
        f"GET /auth HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"x-api-key: {key}\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
        if context is not None:
            sock = stack.enter_context(context.wrap_socket(sock, server_hostname="127.0.0.1"))
        sock.sendall(request)
        received = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(4096):
                received += chunk
        return received


def _client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def test_a_plain_http_client_is_refused_when_tls_is_on(tier: Tier) -> None:
    created = tier.create("user-fa-direct")
    port = tier.tls.forward_auth_port
    plain = _raw_request(port, created.token, tier.api_key, None)
    assert not plain.startswith(b"HTTP/"), plain[:80]
    assert b"user-fa-direct" not in plain
    # The same request over TLS is answered: the refusal was the plaintext.
    secure = _raw_request(port, created.token, tier.api_key, _client_context(tier.ca))
    assert secure.startswith(b"HTTP/1.1 200"), secure[:80]
    assert b"x-session-user-id: user-fa-direct" in secure.lower()


def test_a_rotated_certificate_is_served_to_new_connections(tier: Tier, nginx: Nginx) -> None:
    """New files on disk, no restart: the next handshake (no SNI, as nginx's) gets them."""
    cert_path = tier.files / "forward-auth.crt"
    old = x509.load_pem_x509_certificate(cert_path.read_bytes())
    issue_server(tier.ca, "localhost", "127.0.0.1").write(tier.files, "forward-auth")
    new = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert new.serial_number != old.serial_number
    context = _client_context(tier.ca)
    with (
        socket.create_connection(("127.0.0.1", tier.tls.forward_auth_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        served = sock.getpeercert(binary_form=True)
    assert served is not None
    assert x509.load_der_x509_certificate(served).serial_number == new.serial_number
    created = tier.create("user-fa-rotated")
    assert _get(nginx.port, "/tls", {"Cookie": f"session={created.token}"})[0] == 200
