"""TLS, mTLS and authorisation on a real server (``App.start`` on a private
Postgres), with certificates made here (tests/pki.py): who gets in, who may
mutate, what is refused with which code, and certificate rotation under a
running server."""

from __future__ import annotations

import datetime
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from session_authority.bootstrap import App
from session_authority.transport.auth import hash_api_key
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc
from tests.pki import KeyPair, issue_client, issue_server, write_atomically
from tests.third_party import aio_health_stub

from .support import NO_PROXY, app_settings

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

LOGIN = "spiffe://example.org/ns/prod/sa/login"
GATEWAY = "spiffe://example.org/ns/prod/sa/gateway"
ADMIN_DNS = "admin.internal"
LOGIN_KEY = "login-" + secrets.token_urlsafe(24)
GATEWAY_KEY = "gateway-" + secrets.token_urlsafe(24)
DENIED = "session_authority_auth_denied_total"
SVC = "session_authority.v1.SessionAuthority"
Code = grpc.StatusCode


@dataclass
class Pki:
    ca: trustme.CA
    other_ca: trustme.CA
    cert: Path
    key: Path
    client_ca: Path

    def client(self, *, uris: tuple[str, ...] = (), dns: tuple[str, ...] = ()) -> KeyPair:
        return issue_client(self.ca, uris=uris, dns=dns)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, other = trustme.CA(), trustme.CA()
    cert, key = issue_server(ca, "localhost").write(tmp_path / "tls", "server")
    client_ca = tmp_path / "tls" / "client-ca.pem"
    write_atomically(client_ca, ca.cert_pem.bytes())
    return Pki(ca, other, cert, key, client_ca)


def _channel(app: App, ca: trustme.CA | None, client: KeyPair | None = None) -> grpc.aio.Channel:
    """A channel of its own (no shared subchannel: each one is a new
    connection); ``ca`` None: plaintext."""
    options: list[tuple[str, str | int]] = [*NO_PROXY, ("grpc.use_local_subchannel_pool", 1)]
    target = f"127.0.0.1:{app.port}"
    if ca is None:
        return grpc.aio.insecure_channel(target, options=options)
    credentials = grpc.ssl_channel_credentials(
        ca.cert_pem.bytes(),
        None if client is None else client.key,
        None if client is None else client.cert,
    )
    options.append(("grpc.ssl_target_name_override", "localhost"))
    return grpc.aio.secure_channel(target, credentials, options=options)


@asynccontextmanager
async def _serving(pg_dsn: str, **settings: object) -> AsyncIterator[App]:
    app = await App.start(app_settings(pg_dsn, None, **settings))
    try:
        yield app
    finally:
        await app.stop(0)


async def _code(call: Callable[[], object]) -> Code:
    """The status of one call (OK when it returns)."""
    try:
        await call()  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return Code.OK


def _denied(app: App, method: str, reason: str) -> float:
    assert app.telemetry is not None
    labels = {"grpc_service": SVC, "grpc_method": method, "reason": reason}
    return app.telemetry.registry.get_sample_value(DENIED, labels) or 0.0


async def _list_services(channel: grpc.aio.Channel, version: str = "v1alpha") -> list[str]:
    """Reflection's list of services; v1 and v1alpha are the same messages."""
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    replies = call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names: list[str] = []
    async for reply in replies:
        names += [s.name for s in reply.list_services_response.service]
    return names


async def _probe(channel: grpc.aio.Channel) -> Code:
    """grpc.health.v1 Check's status code (OK: it answered, SERVING or not yet)."""
    check = aio_health_stub(channel).Check
    return await _code(lambda: check(health_pb2.HealthCheckRequest(), timeout=5))


# --- TLS -----------------------------------------------------------------------------------


async def test_tls_port_serves_tls_and_refuses_plaintext(pg_dsn: str, pki: Pki) -> None:
    async with _serving(pg_dsn, tls_cert_file=pki.cert, tls_key_file=pki.key) as app:
        async with _channel(app, pki.ca) as channel:
            stub = pb_grpc.SessionAuthorityStub(channel)
            created = await stub.CreateSession(pb.CreateSessionRequest(user_id="tls"), timeout=5)
            reply = await stub.ValidateSession(pb.ValidateSessionRequest(token=created.token))
            assert reply.valid
        async with _channel(app, None) as plain:
            stub = pb_grpc.SessionAuthorityStub(plain)
            call = stub.ValidateSession(pb.ValidateSessionRequest(token=created.token), timeout=5)
            assert await _code(lambda: call) == Code.UNAVAILABLE
        async with _channel(app, pki.other_ca) as untrusting:  # the client checks the server too
            assert await _probe(untrusting) == Code.UNAVAILABLE


async def test_unusable_certificate_files_stop_start_up(pg_dsn: str, pki: Pki) -> None:
    other_key = issue_server(pki.other_ca).write(pki.cert.parent, "other")[1]
    for cert, key in ((pki.cert, other_key), (pki.cert, pki.cert.parent / "missing.key")):
        with pytest.raises(OSError, match="TLS: cannot use"):
            await App.start(app_settings(pg_dsn, None, tls_cert_file=cert, tls_key_file=key))


# --- mTLS ----------------------------------------------------------------------------------


def _mtls(pki: Pki) -> dict[str, object]:
    return {
        "tls_cert_file": pki.cert,
        "tls_key_file": pki.key,
        "tls_client_ca_file": pki.client_ca,
        "auth_allowed_identities": f"{LOGIN},{ADMIN_DNS}",
    }


async def test_mtls_needs_a_certificate_from_the_ca(pg_dsn: str, pki: Pki) -> None:
    async with _serving(pg_dsn, **_mtls(pki)) as app:
        strangers = [None, issue_client(pki.other_ca, uris=(LOGIN,))]
        for client in strangers:
            async with _channel(app, pki.ca, client) as channel:
                # Refused in the handshake: even the health probe needs a certificate.
                assert await _probe(channel) == Code.UNAVAILABLE
        async with _channel(app, pki.ca, pki.client(uris=(GATEWAY,))) as channel:
            assert await _probe(channel) == Code.OK


async def test_mtls_allowed_identities_may_mutate(pg_dsn: str, pki: Pki) -> None:
    async with _serving(pg_dsn, **_mtls(pki)) as app:
        async with _channel(app, pki.ca, pki.client(uris=(LOGIN,))) as channel:
            stub = pb_grpc.SessionAuthorityStub(channel)
            created = await stub.CreateSession(pb.CreateSessionRequest(user_id="m1"), timeout=5)
            await stub.Invalidate(pb.InvalidateRequest(token=created.token), timeout=5)
            await stub.InvalidateUser(pb.InvalidateUserRequest(user_id="m1"), timeout=5)
        async with _channel(app, pki.ca, pki.client(dns=(ADMIN_DNS,))) as channel:
            stub = pb_grpc.SessionAuthorityStub(channel)
            await stub.CreateSession(pb.CreateSessionRequest(user_id="m2"), timeout=5)


async def test_mtls_other_identities_may_only_read(
    pg_dsn: str, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with _serving(pg_dsn, **_mtls(pki)) as app:
        async with _channel(app, pki.ca, pki.client(uris=(LOGIN,))) as channel:
            writer = pb_grpc.SessionAuthorityStub(channel)
            created = await writer.CreateSession(pb.CreateSessionRequest(user_id="r"), timeout=5)
        async with _channel(app, pki.ca, pki.client(uris=(GATEWAY,))) as channel:
            stub = pb_grpc.SessionAuthorityStub(channel)
            create = stub.CreateSession(pb.CreateSessionRequest(user_id="r"), timeout=5)
            assert await _code(lambda: create) == Code.PERMISSION_DENIED
            revoke = stub.InvalidateUser(pb.InvalidateUserRequest(user_id="r"), timeout=5)
            assert await _code(lambda: revoke) == Code.PERMISSION_DENIED
            reply = await stub.ValidateSession(pb.ValidateSessionRequest(token=created.token))
            assert reply.valid  # neither refusal revoked anything
            assert (await stub.Health(pb.HealthRequest(), timeout=5)).status
    assert _denied(app, "CreateSession", "not_allowed") == 1
    assert _denied(app, "InvalidateUser", "not_allowed") == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "session_authority.auth"]
    assert len(lines) == 2
    assert all(GATEWAY in line and "PERMISSION_DENIED" in line for line in lines)
    assert "CreateSession" in lines[0]


async def test_client_ca_rotation_reaches_new_connections(pg_dsn: str, pki: Pki) -> None:
    async with _serving(pg_dsn, **_mtls(pki)) as app:
        newcomer = issue_client(pki.other_ca, uris=(LOGIN,))
        async with _channel(app, pki.ca, newcomer) as channel:
            assert await _probe(channel) == Code.UNAVAILABLE
        # Overlap: both CAs in the bundle while clients move over.
        write_atomically(pki.client_ca, pki.ca.cert_pem.bytes() + pki.other_ca.cert_pem.bytes())
        async with _channel(app, pki.ca, newcomer) as channel:
            stub = pb_grpc.SessionAuthorityStub(channel)
            await stub.CreateSession(pb.CreateSessionRequest(user_id="new-ca"), timeout=5)
        async with _channel(app, pki.ca, pki.client(uris=(LOGIN,))) as channel:
            assert await _probe(channel) == Code.OK


async def test_a_certificate_cannot_pose_as_an_api_key(pg_dsn: str, pki: Pki) -> None:
    """Certificate identities and API keys are two namespaces: a client
    certificate whose SAN URI reads ``apikey:login`` gets a certificate's
    rights (reads), never the ``login`` key's (mutations)."""
    settings = _mtls(pki) | {
        "auth_api_keys": f"login:{hash_api_key(LOGIN_KEY)}",
        "auth_allowed_identities": "apikey:login",
    }
    async with _serving(pg_dsn, **settings) as app:
        posing = pki.client(uris=("apikey:login",))
        async with _channel(app, pki.ca, posing) as channel:
            stub = pb_grpc.SessionAuthorityStub(channel)
            create = stub.CreateSession(pb.CreateSessionRequest(user_id="pose"), timeout=5)
            assert await _code(lambda: create) == Code.PERMISSION_DENIED
            assert (await stub.Health(pb.HealthRequest(), timeout=5)).status  # a reader
            # The same connection with the key itself: allowed.
            key = (("x-api-key", LOGIN_KEY),)
            await stub.CreateSession(pb.CreateSessionRequest(user_id="pose"), metadata=key)
    assert _denied(app, "CreateSession", "not_allowed") == 1


# --- API keys ------------------------------------------------------------------------------


def _keys(pki: Pki) -> dict[str, object]:
    return {
        "tls_cert_file": pki.cert,
        "tls_key_file": pki.key,
        "auth_api_keys": f"login:{hash_api_key(LOGIN_KEY)},gateway:{hash_api_key(GATEWAY_KEY)}",
        "auth_allowed_identities": "apikey:login",
    }


async def test_api_keys(pg_dsn: str, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    async with _serving(pg_dsn, **_keys(pki)) as app, _channel(app, pki.ca) as channel:
        stub = pb_grpc.SessionAuthorityStub(channel)
        bearer = (("authorization", f"Bearer {LOGIN_KEY}"),)
        created = await stub.CreateSession(
            pb.CreateSessionRequest(user_id="k"), metadata=bearer, timeout=5
        )
        validate = pb.ValidateSessionRequest(token=created.token)
        create = pb.CreateSessionRequest(user_id="k")
        wrong = (("x-api-key", LOGIN_KEY + "x"),)
        basic = (("authorization", "Basic dXNlcjpwdw=="),)
        gateway = (("x-api-key", GATEWAY_KEY),)

        assert await _code(lambda: stub.ValidateSession(validate)) == Code.UNAUTHENTICATED
        assert await _code(lambda: stub.CreateSession(create)) == Code.UNAUTHENTICATED
        for bad in (wrong, basic):
            assert await _code(lambda: stub.ValidateSession(validate, metadata=bad)) == (  # noqa: B023
                Code.UNAUTHENTICATED
            )
            assert await _code(lambda: stub.CreateSession(create, metadata=bad)) == (  # noqa: B023
                Code.UNAUTHENTICATED
            )
        assert (await stub.ValidateSession(validate, metadata=gateway)).valid
        assert (await stub.Health(pb.HealthRequest(), metadata=gateway)).status
        assert await _code(lambda: stub.CreateSession(create, metadata=gateway)) == (
            Code.PERMISSION_DENIED
        )
        revoke = pb.InvalidateRequest(token=created.token)
        await stub.Invalidate(revoke, metadata=(("x-api-key", LOGIN_KEY),), timeout=5)
        assert not (await stub.ValidateSession(validate, metadata=gateway)).valid

    assert _denied(app, "ValidateSession", "no_credentials") == 1
    assert _denied(app, "CreateSession", "no_credentials") == 1
    assert _denied(app, "ValidateSession", "invalid_credentials") == 2
    assert _denied(app, "CreateSession", "invalid_credentials") == 2
    assert _denied(app, "CreateSession", "not_allowed") == 1
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert "caller apikey:gateway" in log
    for secret in (LOGIN_KEY, GATEWAY_KEY, "dXNlcjpwdw=="):
        assert secret not in log


async def test_probes_and_reflection_need_no_credentials(pg_dsn: str, pki: Pki) -> None:
    async with _serving(pg_dsn, **_keys(pki)) as app, _channel(app, pki.ca) as channel:
        assert await _probe(channel) == Code.OK
        assert SVC in await _list_services(channel)
        assert SVC in await _list_services(channel, "v1")


async def test_reflection_can_be_turned_off(pg_dsn: str, pki: Pki) -> None:
    async with (
        _serving(pg_dsn, **_keys(pki), grpc_reflection=False) as app,
        _channel(app, pki.ca) as channel,
    ):
        assert await _code(lambda: _list_services(channel)) == Code.UNIMPLEMENTED
        assert await _code(lambda: _list_services(channel, "v1")) == Code.UNIMPLEMENTED
        assert await _probe(channel) == Code.OK


# --- rotation ------------------------------------------------------------------------------


async def test_rotated_certificate_reaches_new_connections(
    pg_dsn: str, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        _serving(pg_dsn, tls_cert_file=pki.cert, tls_key_file=pki.key) as app,
        _channel(app, pki.ca) as before,
    ):
        assert await _probe(before) == Code.OK
        issue_server(pki.other_ca, "localhost").write(pki.cert.parent, "server")

        async with _channel(app, pki.other_ca) as after:
            assert await _probe(after) == Code.OK
        async with _channel(app, pki.ca) as stale:
            assert await _probe(stale) == Code.UNAVAILABLE
        # The connection made before the rotation keeps working: no downtime.
        assert await _probe(before) == Code.OK
    assert any("TLS: reloaded" in r.getMessage() for r in caplog.records)


async def test_half_written_rotation_keeps_the_old_certificate(
    pg_dsn: str, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with _serving(pg_dsn, tls_cert_file=pki.cert, tls_key_file=pki.key) as app:
        rotated = issue_server(pki.other_ca, "localhost")
        write_atomically(pki.cert, rotated.cert)  # the key still the old one
        for _ in range(2):  # logged once, however many handshakes see it
            async with _channel(app, pki.ca) as channel:
                assert await _probe(channel) == Code.OK
        warnings = [r for r in caplog.records if "cannot reload" in r.getMessage()]
        assert len(warnings) == 1
        write_atomically(pki.key, rotated.key)
        async with _channel(app, pki.other_ca) as channel:
            assert await _probe(channel) == Code.OK


async def test_an_expired_certificate_is_refused_on_rotation(
    pg_dsn: str, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A rotation to a certificate that matches its key but is no longer valid
    is refused: the server keeps serving the one in use, says so once, and
    counts it; a valid one written next is taken up."""
    async with _serving(pg_dsn, tls_cert_file=pki.cert, tls_key_file=pki.key) as app:
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
        leaf = pki.other_ca.issue_cert(
            "localhost", not_before=past - datetime.timedelta(days=30), not_after=past
        )
        expired = KeyPair(
            b"".join(p.bytes() for p in leaf.cert_chain_pems), leaf.private_key_pem.bytes()
        )
        expired.write(pki.cert.parent, "server")
        for _ in range(3):  # each new connection: the old certificate, still valid
            async with _channel(app, pki.ca) as channel:
                assert await _probe(channel) == Code.OK
        assert app.telemetry is not None
        rejected = "session_authority_tls_reload_rejected_total"
        assert app.telemetry.registry.get_sample_value(rejected) == 1
        warnings = [r.getMessage() for r in caplog.records if "cannot reload" in r.getMessage()]
        assert len(warnings) == 1
        assert "expired" in warnings[0]

        issue_server(pki.other_ca, "localhost").write(pki.cert.parent, "server")
        async with _channel(app, pki.other_ca) as channel:
            assert await _probe(channel) == Code.OK
