"""The service through PgBouncer in transaction mode (``DATABASE_POOLER=pgbouncer``).

Debian's pgbouncer (``make pgbouncer``; 1.18: no protocol-level prepared statements) in front
of the session's private Postgres, with two server connections (``default_pool_size=2``)
shared by the App's eight client connections, so consecutive transactions of one client run on
different server connections. The core cases run through it: create, validate (miss, then
hit), invalidate, invalidate_user, the drain of pending revocations with the watermark,
health, migrations (their transaction-level advisory lock) and gc's batches. Without the
setting, the driver's named prepared statements break through the same pooler.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from uuid import uuid4

import asyncpg
import grpc
import pytest
import pytest_asyncio

from session_authority.adapters.migrate import apply_migrations, available_migrations
from session_authority.adapters.postgres_store import PostgresSessionStore
from session_authority.adapters.retention import collect_garbage
from session_authority.bootstrap import App
from session_authority.core.domain import TokenHash
from session_authority.core.errors import StoreUnavailable
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis
from session_authority.embedded.pgbouncer import EmbeddedPgBouncer
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from .support import NO_PROXY, app_settings

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

#: Server connections PgBouncer may open: fewer than the App's client pool.
POOL_SIZE = 2
CLIENT_POOL = 8


@pytest.fixture(scope="module")
def pgbouncer(
    tmp_path_factory: pytest.TempPathFactory, postgres_server: EmbeddedPostgres
) -> Iterator[EmbeddedPgBouncer]:
    with EmbeddedPgBouncer(
        tmp_path_factory.mktemp("pgbouncer"), pg_port=postgres_server.port, pool_size=POOL_SIZE
    ) as bouncer:
        yield bouncer


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path_factory.mktemp("pgb-redis")) as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app(
    pgbouncer: EmbeddedPgBouncer, postgres_server: EmbeddedPostgres, redis: EmbeddedRedis
) -> AsyncIterator[App]:
    conn = await asyncpg.connect(postgres_server.url)  # directly: the schema is set up
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
    settings = app_settings(
        pgbouncer.url,
        redis.url,
        database_pooler="pgbouncer",
        pg_pool_min=0,
        pg_pool_max=CLIENT_POOL,
        revocation_sweep_seconds=0,  # the test drains, and counts what it drained
        l1_cache_ttl_ms=0,  # a hit is Redis's answer
    )
    started = await App.start(settings)
    try:
        yield started
    finally:
        await started.stop(0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stub(app: App) -> AsyncIterator[pb_grpc.SessionAuthorityAsyncStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=NO_PROXY) as channel:
        yield pb_grpc.SessionAuthorityStub(channel)


def _admin(pgbouncer: EmbeddedPgBouncer, postgres: EmbeddedPostgres, command: str) -> list[str]:
    """Rows of a PgBouncer admin console command (psql speaks its simple protocol)."""
    psql = postgres.bin_dir / "psql"
    argv = [str(psql), "-h", pgbouncer.host, "-p", str(pgbouncer.port), "-U", "postgres"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    done = subprocess.run(
        [*argv, "-d", "pgbouncer", "-X", "-A", "-t", "-F", "|", "-c", command],
        env=env | {"PGPASSWORD": pgbouncer.password},
        capture_output=True,
        timeout=10,
        check=True,
    )
    return done.stdout.decode().splitlines()


async def _validate(stub: pb_grpc.SessionAuthorityAsyncStub, token: str) -> tuple[bool, int, int]:
    reply = await stub.ValidateSession(pb.ValidateSessionRequest(token=token), timeout=10)
    return reply.valid, reply.reason, reply.source


async def test_core_cases_run_through_pgbouncer_in_transaction_mode(
    app: App,
    stub: pb_grpc.SessionAuthorityAsyncStub,
    pgbouncer: EmbeddedPgBouncer,
    postgres_server: EmbeddedPostgres,
) -> None:
    user = f"pgb-{uuid4().hex[:8]}"
    # 40 creations and 40 first validations (misses: Postgres answers) at once: the client
    # pool grows past the two server connections, which every transaction shares.
    created = await asyncio.gather(
        *(stub.CreateSession(pb.CreateSessionRequest(user_id=user), timeout=10) for _ in range(40))
    )
    tokens = [c.token for c in created]
    misses = await asyncio.gather(*(_validate(stub, t) for t in tokens))
    assert misses == [(True, pb.REASON_UNSPECIFIED, pb.SOURCE_DATABASE)] * 40
    hits = await asyncio.gather(*(_validate(stub, t) for t in tokens))
    assert hits == [(True, pb.REASON_UNSPECIFIED, pb.SOURCE_CACHE)] * 40
    assert app.store.pool_stats().size > POOL_SIZE
    servers = _admin(pgbouncer, postgres_server, "SHOW SERVERS")
    assert 1 <= len([s for s in servers if "|session_authority|" in s]) <= POOL_SIZE, servers

    one = await stub.Invalidate(pb.InvalidateRequest(token=tokens[0]), timeout=10)
    assert (one.revoked, one.cache_purged) == (True, True)
    assert await _validate(stub, tokens[0]) == (False, pb.REASON_REVOKED, pb.SOURCE_CACHE)
    by_id = await stub.Invalidate(
        pb.InvalidateRequest(session_id=created[1].session.session_id), timeout=10
    )
    assert (by_id.revoked, by_id.cache_purged) == (True, True)
    rest = await stub.InvalidateUser(pb.InvalidateUserRequest(user_id=user), timeout=10)
    assert (rest.revoked_count, rest.cache_purged) == (38, True)
    answers = await asyncio.gather(*(_validate(stub, t) for t in tokens))
    assert {a[:2] for a in answers} == {(False, pb.REASON_REVOKED)}

    health = await stub.Health(pb.HealthRequest(), timeout=10)
    assert health.postgres.connected, health
    assert health.status == "healthy", health


async def test_pending_revocations_drain_and_the_watermark_advance_through_pgbouncer(
    app: App, stub: pb_grpc.SessionAuthorityAsyncStub, postgres_server: EmbeddedPostgres
) -> None:
    user = f"pgb-drain-{uuid4().hex[:8]}"
    created = [
        await stub.CreateSession(pb.CreateSessionRequest(user_id=user), timeout=10)
        for _ in range(5)
    ]
    for c in created:  # cached as live
        await _validate(stub, c.token)
    direct = await asyncpg.connect(postgres_server.url)
    try:
        before = await direct.fetchval("SELECT confirmed FROM revocation_watermark")
        # Revoked behind the service's back (an operator's UPDATE, or a revoker that died
        # before its tombstones): pending, and Redis still says live.
        await direct.execute(
            "UPDATE sessions SET revoked_at = now(), purge_pending = true WHERE user_id = $1",
            user,
        )
        assert await _validate(stub, created[0].token) == (
            True,
            pb.REASON_UNSPECIFIED,
            pb.SOURCE_CACHE,
        )
        assert await app.core.drain_revocations() == 5
        pending = await direct.fetchval(
            "SELECT count(*) FROM sessions WHERE user_id = $1 AND purge_pending", user
        )
        after = await direct.fetchval("SELECT confirmed FROM revocation_watermark")
        marks = await direct.fetch(
            """SELECT lpad(revocation_xid::text, 20, '0') || ':' || encode(token_hash, 'hex')
                      AS mark FROM sessions WHERE user_id = $1""",
            user,
        )
    finally:
        await direct.close()
    assert pending == 0
    assert after > before
    assert all(m["mark"] <= after for m in marks)  # sealed into Redis and confirmed
    for c in created:
        assert await _validate(stub, c.token) == (False, pb.REASON_REVOKED, pb.SOURCE_CACHE)


async def test_migrations_and_gc_run_through_pgbouncer(
    pgbouncer: EmbeddedPgBouncer, postgres_server: EmbeddedPostgres
) -> None:
    database = f"pgb_{uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_server.url)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
        # Three runners at once over two server connections: the transaction-level
        # advisory lock lets one apply everything; the others find nothing to do.
        conns = [
            await asyncpg.connect(pgbouncer.url_for(database), statement_cache_size=0)
            for _ in range(3)
        ]
        try:
            applied = await asyncio.gather(*(apply_migrations(c) for c in conns))
        finally:
            for c in conns:
                await c.close()
        assert sorted(len(a) for a in applied) == [0, 0, len(available_migrations())]
        # gc's batches, each a transaction of its own, through the pooler too.
        direct = await asyncpg.connect(postgres_server.url.rsplit("/", 1)[0] + f"/{database}")
        try:
            await direct.execute(
                """INSERT INTO sessions (session_id, token_hash, user_id, created_at, expires_at)
                   SELECT gen_random_uuid(), sha256(i::text::bytea), 'gc', now() - interval '3d',
                          now() - interval '2d'
                   FROM generate_series(1, 30) AS i"""
            )
        finally:
            await direct.close()
        conn = await asyncpg.connect(pgbouncer.url_for(database), statement_cache_size=0)
        try:
            report = await collect_garbage(conn, retention=86400, batch_size=7)
        finally:
            await conn.close()
        assert (report.deleted, report.batches) == (30, 5)
    finally:
        await admin.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
        await admin.close()


async def test_without_the_setting_prepared_statements_break_through_pgbouncer(
    pgbouncer: EmbeddedPgBouncer, app: App
) -> None:
    """Why DATABASE_POOLER exists: asyncpg's default (named prepared statements,
    cached per client connection) meets another server connection's statements."""
    store = PostgresSessionStore(
        pgbouncer.url,
        min_size=CLIENT_POOL,
        max_size=CLIENT_POOL,
        command_timeout=5,
        acquire_timeout=5,
        pooler="none",
    )
    try:
        results = await asyncio.gather(
            *(store.find(TokenHash(f"{i:064x}")) for i in range(200)), return_exceptions=True
        )
    finally:
        await store.aclose()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors, "every query succeeded without statement_cache_size=0"
    assert all(isinstance(e, StoreUnavailable) for e in errors), errors[:3]
    assert any("prepared statement" in str(e) for e in errors), errors[:3]


async def test_pgbouncer_killed_fails_closed_then_the_pool_recovers(
    tmp_path_factory: pytest.TempPathFactory, postgres_server: EmbeddedPostgres
) -> None:
    """PgBouncer is one more process between us and the truth: while it is down every
    store call fails (StoreUnavailable, which health reports as not connected: the core
    fails closed), and when it is back the pool's dead connections are replaced without a
    restart."""
    bouncer = EmbeddedPgBouncer(
        tmp_path_factory.mktemp("pgbouncer-killed"), pg_port=postgres_server.port
    )
    bouncer.start()
    store = PostgresSessionStore(
        bouncer.url,
        min_size=2,
        max_size=2,
        command_timeout=5,
        acquire_timeout=5,
        pooler="pgbouncer",
    )
    try:
        assert (await store.health()).connected
        bouncer.kill()
        outage = await asyncio.gather(*(store.health() for _ in range(10)))
        assert [h.connected for h in outage] == [False] * 10, outage
        bouncer.start()
        # Each dead pooled connection fails once, then is replaced.
        back = [(await store.health()).connected for _ in range(5)]
        assert back[-3:] == [True, True, True], back
    finally:
        await store.aclose()
        bouncer.stop()
