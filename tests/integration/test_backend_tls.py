"""TLS to Redis (``rediss://``) and Postgres (``sslmode=verify-full``), on real servers that
accept nothing else, with certificates made here (trustme).

Both servers listen for TLS only and require a client certificate: a session lifecycle
that works proves the service speaks TLS to both, with the CA and client files named in
``REDIS_URL`` (``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``) and ``DATABASE_URL``
(``sslrootcert``, ``sslcert``, ``sslkey``). A server whose certificate the service cannot
verify is a failed dependency, reported without credentials.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import trustme

from session_authority.adapters.migrate import apply_migrations
from session_authority.bootstrap import App
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis
from session_authority.embedded.tls import TlsFiles
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from .support import NO_PROXY, app_settings
from .tls_support import tls_postgres, tls_redis, write_tls_files

pytestmark = [pytest.mark.integration, pytest.mark.asyncio, pytest.mark.timeout(120)]

PASSWORD = "tls-pw-Zq9"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return write_tls_files(trustme.CA(), tmp_path_factory.mktemp("certs"), client_cert=True)


@pytest.fixture(scope="module")
def redis_tls(tmp_path_factory: pytest.TempPathFactory, tls: TlsFiles) -> Iterator[EmbeddedRedis]:
    with tls_redis(tmp_path_factory.mktemp("redis-tls"), tls) as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def postgres_tls(
    tmp_path_factory: pytest.TempPathFactory, tls: TlsFiles
) -> AsyncIterator[EmbeddedPostgres]:
    with tls_postgres(tmp_path_factory.mktemp("pg-tls"), tls, PASSWORD) as server:
        conn = await asyncpg.connect(server.url)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        yield server


def _with_query(url: str, **changes: str | None) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    for name, value in changes.items():
        if value is None:
            query.pop(name, None)
        else:
            query[name] = value
    return urlunsplit(parts._replace(query=urlencode(query)))


@pytest.mark.asyncio(loop_scope="module")
async def test_servers_refuse_plaintext_and_unknown_clients(
    redis_tls: EmbeddedRedis, postgres_tls: EmbeddedPostgres
) -> None:
    plain = aioredis.Redis.from_url(f"redis://{redis_tls.host}:{redis_tls.port}/0")
    with pytest.raises((OSError, aioredis.ConnectionError)):
        await plain.ping()
    await plain.aclose()
    no_cert = aioredis.Redis.from_url(
        _with_query(redis_tls.url, ssl_certfile=None, ssl_keyfile=None)
    )
    with pytest.raises((OSError, aioredis.ConnectionError)):
        await no_cert.ping()
    await no_cert.aclose()
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(_with_query(postgres_tls.url, sslmode="disable"))
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="certificate"):
        await asyncpg.connect(_with_query(postgres_tls.url, sslcert=None, sslkey=None))


@pytest.mark.asyncio(loop_scope="module")
async def test_session_lifecycle_over_tls(
    redis_tls: EmbeddedRedis, postgres_tls: EmbeddedPostgres
) -> None:
    app = await App.start(app_settings(postgres_tls.url, redis_tls.url))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=NO_PROXY) as ch:
            stub = pb_grpc.SessionAuthorityStub(ch)
            created = await stub.CreateSession(pb.CreateSessionRequest(user_id="tls-user"))
            first = await stub.ValidateSession(pb.ValidateSessionRequest(token=created.token))
            again = await stub.ValidateSession(pb.ValidateSessionRequest(token=created.token))
            assert (first.valid, again.valid) == (True, True)
            assert again.source == pb.SOURCE_CACHE  # filled into Redis over TLS
            revoked = await stub.Invalidate(pb.InvalidateRequest(token=created.token))
            assert (revoked.revoked, revoked.cache_purged) == (True, True)
            await stub.CreateSession(pb.CreateSessionRequest(user_id="tls-user"))
            user = await stub.InvalidateUser(pb.InvalidateUserRequest(user_id="tls-user"))
            assert (user.revoked_count, user.cache_purged) == (1, True)
            health = await stub.Health(pb.HealthRequest(), timeout=5)
            assert health.status == "healthy", list(health.errors)
            assert (health.redis.connected, health.postgres.connected) == (True, True)
        # The service's own Postgres connections are encrypted (Redis has no plaintext port).
        conn = await asyncpg.connect(postgres_tls.url)
        try:
            rows = await conn.fetch(
                "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                "WHERE a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()"
            )
        finally:
            await conn.close()
        assert rows and all(row["ssl"] for row in rows)
    finally:
        await app.stop(0)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_server_signed_by_another_ca_is_not_trusted(
    redis_tls: EmbeddedRedis, postgres_tls: EmbeddedPostgres, tmp_path: Path
) -> None:
    stranger = write_tls_files(trustme.CA(), tmp_path / "other-ca", client_cert=False)
    redis_url = _with_query(redis_tls.url, ssl_ca_certs=str(stranger.ca))
    database_url = _with_query(postgres_tls.url, sslrootcert=str(stranger.ca))
    app = await App.start(app_settings(database_url, redis_url, breaker_timeout_ms=500))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=NO_PROXY) as ch:
            health = await pb_grpc.SessionAuthorityStub(ch).Health(pb.HealthRequest(), timeout=10)
        assert health.status == "unhealthy"
        assert (health.redis.connected, health.postgres.connected) == (False, False)
        errors = "\n".join(health.errors)
        assert "certificate" in errors.lower()
        assert PASSWORD not in errors
    finally:
        await app.stop(0)
