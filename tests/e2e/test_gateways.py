"""Gateways on a real ``serve``: Envoy's ext_authz ``Check`` (a client built
from xds-protos' stubs), and forward-auth behind a real nginx (Debian's,
``make gateway-tools``) with ``auth_request``.

The module starts its own server (its own Postgres and Redis, forward-auth
on), because its last tests stop Postgres: "cannot know" must be a gRPC
error (ext_authz) or a 5xx (forward-auth), never OK and never a denial.
"""

from __future__ import annotations

import contextlib
import shutil
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
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as authz_pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2

from session_authority.core.domain import new_token
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis, find_free_port
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc
from tests.third_party import health_stub

from .e2e_support import BIN, ServerProcess, clean_env, stop_process, tool

pytestmark = pytest.mark.e2e

_AUTHZ = "envoy.service.auth.v3.Authorization"
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_READY = 30.0
#: Plaintext and open on loopback, as the tier's shared server.
_OPEN = ("--allow-unauthenticated",)


@dataclass
class Gateway:
    server: ServerProcess
    postgres: EmbeddedPostgres
    authz: authz_grpc.AuthorizationStub
    stub: pb_grpc.SessionAuthorityStub
    forward_auth_port: int
    nginx_port: int = 0

    def create(self, user_id: str) -> pb.CreateSessionResponse:
        reply: pb.CreateSessionResponse = self.stub.CreateSession(
            pb.CreateSessionRequest(user_id=user_id), timeout=10
        )
        self.server.record(reply.token)
        return reply

    def check(self, headers: dict[str, str]) -> authz_pb.CheckRequest:
        request = authz_pb.CheckRequest()
        request.attributes.request.http.headers.update(headers)
        request.attributes.request.http.path = "/app"
        return self.authz.Check(request, timeout=10)


def _wait_serving(server: ServerProcess) -> None:
    deadline = time.monotonic() + _READY
    with grpc.insecure_channel(server.target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        health = health_stub(channel)
        while True:
            assert server.process.poll() is None, f"serve exited; log:\n{server.tail()}"
            with contextlib.suppress(grpc.RpcError):
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            assert time.monotonic() < deadline, f"not SERVING; log:\n{server.tail()}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("gateways")
    with contextlib.ExitStack() as stack:
        postgres = stack.enter_context(EmbeddedPostgres(workdir / "postgres"))
        redis = stack.enter_context(EmbeddedRedis(workdir / "redis"))
        forward_auth_port = find_free_port()
        env = clean_env(
            DATABASE_URL=postgres.url,
            REDIS_URL=redis.url,
            HOST="127.0.0.1",
            LOG_LEVEL="DEBUG",
            ADMIN_PORT="0",
            FORWARD_AUTH_PORT=str(forward_auth_port),
            # Postgres down must be seen at once, not after the pool's own waits.
            PG_POOL_TIMEOUT_MS="500",
            PG_COMMAND_TIMEOUT_MS="1000",
        )
        cli = BIN / "session-authority"
        argv = [str(cli)] if cli.exists() else [sys.executable, "-m", "session_authority.cli"]
        port = find_free_port()
        log_path = workdir / "server.log"
        with log_path.open("wb") as out:
            process = subprocess.Popen(
                [*argv, "serve", "--migrate", "--workers", "1", "--port", str(port), *_OPEN],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        stack.callback(stop_process, process)
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
        _wait_serving(server)
        channel = stack.enter_context(
            grpc.insecure_channel(server.target, options=[("grpc.enable_http_proxy", 0)])
        )
        yield Gateway(
            server,
            postgres,
            authz_grpc.AuthorizationStub(channel),
            pb_grpc.SessionAuthorityStub(channel),
            forward_auth_port,
        )
        assert stop_process(process) == 0, server.tail()
        leaks = server.leaks(server.log_text())
        assert not leaks, f"tokens in the server log: {leaks}"


def _identity(reply: authz_pb.CheckResponse) -> dict[str, str]:
    assert reply.status.code == code_pb2.OK, reply
    assert reply.WhichOneof("http_response") == "ok_response"
    for option in reply.ok_response.headers:
        assert option.append_action == _OVERWRITE, option
    return {o.header.key: o.header.value for o in reply.ok_response.headers}


def _assert_denied(reply: authz_pb.CheckResponse, *secret: str) -> None:
    assert reply.status.code == code_pb2.PERMISSION_DENIED, reply
    assert reply.WhichOneof("http_response") == "denied_response"
    assert reply.denied_response.status.code == 401
    for value in secret:
        assert value not in str(reply)


# ext_authz ------------------------------------------------------------------


def test_cookie_is_ok_with_identity(gateway: Gateway) -> None:
    created = gateway.create("user-cookie")
    cookie = f'theme=dark; other="x,y"; session={created.token}; session=second'
    reply = gateway.check({"cookie": cookie, ":path": "/app"})
    assert _identity(reply) == {
        "x-session-user-id": "user-cookie",
        "x-session-id": created.session.session_id,
    }


def test_bearer_is_ok_with_identity(gateway: Gateway) -> None:
    created = gateway.create("user-bearer")
    reply = gateway.check({"authorization": f"Bearer {created.token}"})
    assert _identity(reply)["x-session-user-id"] == "user-bearer"


def test_forged_identity_header_is_overwritten(gateway: Gateway) -> None:
    created = gateway.create("user-real")
    reply = gateway.check(
        {
            "authorization": f"Bearer {created.token}",
            "x-session-user-id": "admin",
            "x-session-id": "00000000-0000-0000-0000-000000000000",
        }
    )
    identity = _identity(reply)  # every header OVERWRITE_IF_EXISTS_OR_ADD
    assert identity["x-session-user-id"] == "user-real"
    assert identity["x-session-id"] == created.session.session_id


def test_no_token_unknown_and_malformed_are_denied(gateway: Gateway) -> None:
    unknown = gateway.server.presented(new_token())
    malformed = gateway.server.presented("sat_" + "\u00e9" * 10)
    _assert_denied(gateway.check({}))
    _assert_denied(gateway.check({"cookie": "theme=dark"}))
    _assert_denied(gateway.check({"authorization": f"Bearer {unknown}"}), unknown)
    _assert_denied(gateway.check({"cookie": f"session={unknown}"}), unknown)
    _assert_denied(gateway.check({"cookie": f"session={malformed}"}), malformed)
    # A Basic credential is not ours: ignored, and then there is no token.
    _assert_denied(gateway.check({"authorization": "Basic dXNlcjpwYXNz"}))


def test_revoked_is_denied_once_invalidate_returns(gateway: Gateway) -> None:
    created = gateway.create("user-revoked")
    headers = {"cookie": f"session={created.token}"}
    _identity(gateway.check(headers))  # valid, and now cached (L1 and Redis)
    gateway.stub.Invalidate(pb.InvalidateRequest(token=created.token), timeout=10)
    _assert_denied(gateway.check(headers), created.token)


def test_garbage_request_is_invalid_argument(gateway: Gateway) -> None:
    with grpc.insecure_channel(gateway.server.target) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{_AUTHZ}/Check")
        with pytest.raises(grpc.RpcError) as raised:
            call(b"\xff\xff\xff", timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# reflection -----------------------------------------------------------------


def _grpcurl(gateway: Gateway, *args: str) -> str:
    done = subprocess.run(
        [tool("grpcurl"), "-plaintext", "-max-time", "10", gateway.server.target, *args],
        env=clean_env(HOME=str(gateway.server.workdir)),
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.decode()


def test_reflection_lists_and_describes_ext_authz(gateway: Gateway) -> None:
    assert _AUTHZ in _grpcurl(gateway, "list").split()
    assert "rpc Check ( .envoy.service.auth.v3.CheckRequest )" in _grpcurl(
        gateway, "describe", _AUTHZ
    )
    described = _grpcurl(gateway, "describe", "envoy.service.auth.v3.OkHttpResponse")
    assert "repeated .envoy.config.core.v3.HeaderValueOption headers" in described
    assert "message AttributeContext" in _grpcurl(
        gateway, "describe", "envoy.service.auth.v3.AttributeContext"
    )


# forward-auth behind nginx ----------------------------------------------------


def _nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None
    )
    if found is None:
        pytest.fail("nginx not found: `make gateway-tools` installs Debian's nginx (as root)")
    return found


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
        location = /_session_auth {{
            internal;
            proxy_pass http://127.0.0.1:{forward_auth}/auth;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
        }}
        location / {{
            auth_request /_session_auth;
            auth_request_set $session_user $upstream_http_x_session_user_id;
            auth_request_set $session_id $upstream_http_x_session_id;
            proxy_set_header X-Session-User-Id $session_user;
            proxy_set_header X-Session-Id $session_id;
            proxy_pass http://127.0.0.1:{upstream};
        }}
    }}
}}
"""


@pytest.fixture(scope="module")
def nginx(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    binary = _nginx_binary()
    tmp = tmp_path_factory.mktemp("nginx")
    front, upstream = find_free_port(), find_free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(
        _NGINX_CONF.format(
            tmp=tmp, front=front, upstream=upstream, forward_auth=gateway.forward_auth_port
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
        while _get(front, {})[0] == 0:
            assert process.poll() is None, (tmp / "stderr.log").read_text()
            assert time.monotonic() < deadline, "nginx did not answer"
            time.sleep(0.05)
        yield front
    finally:
        stop_process(process)


def _get(port: int, headers: dict[str, str]) -> tuple[int, str]:
    """Status and body of GET / through nginx; (0, "") when nothing listens."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/app", headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (ConnectionError, urllib.error.URLError):
        return 0, ""


def test_nginx_cookie_and_bearer_reach_upstream_with_identity(gateway: Gateway, nginx: int) -> None:
    created = gateway.create("user-nginx")
    session = created.session.session_id
    assert _get(nginx, {"Cookie": f"a=b; session={created.token}"}) == (
        200,
        f"user=user-nginx session={session}\n",
    )
    assert _get(nginx, {"Authorization": f"Bearer {created.token}"}) == (
        200,
        f"user=user-nginx session={session}\n",
    )


def test_nginx_forged_identity_header_is_replaced(gateway: Gateway, nginx: int) -> None:
    created = gateway.create("user-nginx-real")
    headers = {"Cookie": f"session={created.token}", "X-Session-User-Id": "admin"}
    assert _get(nginx, headers) == (
        200,
        f"user=user-nginx-real session={created.session.session_id}\n",
    )


def test_nginx_denies_invalid_revoked_and_missing(gateway: Gateway, nginx: int) -> None:
    unknown = gateway.server.presented(new_token())
    created = gateway.create("user-nginx-revoked")
    assert _get(nginx, {"Cookie": f"session={created.token}"})[0] == 200
    gateway.stub.Invalidate(pb.InvalidateRequest(token=created.token), timeout=10)
    for headers in (
        {},
        {"Cookie": f"session={unknown}"},
        {"Authorization": f"Bearer {unknown}"},
        {"Cookie": f"session={created.token}"},
    ):
        status, body = _get(nginx, headers)
        assert status == 401, (headers, status, body)
        assert "user=" not in body


# Postgres down: last, the module's server keeps it down --------------------------


def test_postgres_down_nothing_cached_is_unavailable_not_denied(
    gateway: Gateway, nginx: int
) -> None:
    cached = gateway.create("user-cached")
    _identity(gateway.check({"cookie": f"session={cached.token}"}))
    gateway.postgres.stop()
    never_seen = gateway.server.presented(new_token())
    for _ in range(3):  # through the Postgres breaker's states: always an error
        with pytest.raises(grpc.RpcError) as raised:
            gateway.check({"cookie": f"session={never_seen}"})
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert never_seen not in (raised.value.details() or "")
    # forward-auth: 503 from us, which nginx turns into 500: closed, not open.
    status, body = _get(nginx, {"Cookie": f"session={never_seen}"})
    assert status == 500, (status, body)
    assert "user=" not in body
    # What is cached stays answerable (the same answer ValidateSession gives).
    assert _identity(gateway.check({"cookie": f"session={cached.token}"}))["x-session-user-id"] == (
        "user-cached"
    )


def test_forward_auth_direct_statuses(gateway: Gateway) -> None:
    """Postgres down: /auth itself says 503 (cannot know), 401 with no token."""
    gateway.postgres.stop()  # down already after the test above; a no-op then
    url = f"http://127.0.0.1:{gateway.forward_auth_port}/auth"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    token = gateway.server.presented(new_token())
    for headers, expected in (({}, 401), ({"Authorization": f"Bearer {token}"}, 503)):
        with pytest.raises(urllib.error.HTTPError) as raised:
            opener.open(urllib.request.Request(url, headers=headers), timeout=10)
        assert raised.value.code == expected, headers
        assert token not in raised.value.read().decode(errors="replace")
