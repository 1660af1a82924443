"""Row retention (``session-authority gc``, ``adapters/retention.py``) on a real Postgres.

A database of its own in the session's Postgres, refilled for each test with sessions of
every kind: live, recently ended, ended past the window (expired, revoked), and revocations
past the window that must stay (still pending for Redis; above the confirmed watermark).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4

import asyncpg
import grpc
import pytest
import pytest_asyncio

from session_authority.adapters.migrate import apply_migrations
from session_authority.adapters.retention import collect_garbage
from session_authority.bootstrap import App
from session_authority.core.domain import TokenHash, new_token
from session_authority.embedded import EmbeddedPostgres
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from .support import NO_PROXY, app_settings, server_env

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

HOUR = 3600.0
EXPIRED_OLD, REVOKED_OLD = 250, 50  # past the window: deleted
BATCH = 40


@dataclass
class Population:
    """Tokens by what gc must do with them."""

    kept: dict[str, str] = field(default_factory=dict)  # token -> why
    deleted_expired: list[str] = field(default_factory=list)
    deleted_revoked: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    above_watermark: list[str] = field(default_factory=list)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gc_url(postgres_server: EmbeddedPostgres) -> AsyncIterator[str]:
    database = f"gc_{uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_server.url)
    await admin.execute(f'CREATE DATABASE "{database}"')
    url = postgres_server.url.rsplit("/", 1)[0] + f"/{database}"
    conn = await asyncpg.connect(url)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
    try:
        yield url
    finally:
        await admin.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
        await admin.close()


async def _insert(
    conn: asyncpg.Connection,
    user: str,
    count: int,
    *,
    expires_in: float,
    revoked_ago: float | None = None,
    pending: bool = False,
) -> list[str]:
    now = datetime.now(UTC)
    tokens = [new_token() for _ in range(count)]
    expires = now + timedelta(seconds=expires_in)
    revoked = None if revoked_ago is None else now - timedelta(seconds=revoked_ago)
    await conn.executemany(
        """INSERT INTO sessions (session_id, token_hash, user_id, created_at, expires_at,
                                 revoked_at, purge_pending)
           VALUES ($1, $2, $3, $4, $5, $6, $7)""",
        [
            (
                uuid4(),
                bytes.fromhex(TokenHash.of(t).hex),
                user,
                min(now, expires) - timedelta(days=1),
                expires,
                revoked,
                pending,
            )
            for t in tokens
        ],
    )
    return tokens


@pytest_asyncio.fixture(loop_scope="module")
async def population(gc_url: str) -> AsyncIterator[Population]:
    """Sessions of every kind; the watermark confirmed between two revocation transactions."""
    conn = await asyncpg.connect(gc_url)
    try:
        await conn.execute("TRUNCATE sessions")
        await conn.execute("UPDATE revocation_watermark SET confirmed = ''")
        p = Population()
        for token in await _insert(conn, "live", 20, expires_in=HOUR):
            p.kept[token] = "live"
        for token in await _insert(conn, "recent", 20, expires_in=-600):
            p.kept[token] = "expired 10 min ago"
        for token in await _insert(conn, "recent", 20, expires_in=HOUR, revoked_ago=600):
            p.kept[token] = "revoked 10 min ago"
        p.deleted_expired = await _insert(conn, "old", EXPIRED_OLD, expires_in=-2 * HOUR)
        # Revoked two hours ago: each batch one transaction (one revocation_xid), so the
        # watermark confirmed after the first falls between them.
        p.deleted_revoked = await _insert(
            conn, "old", REVOKED_OLD, expires_in=HOUR, revoked_ago=2 * HOUR
        )
        # Pending (the tombstone not confirmed in Redis), under the watermark: held by that.
        p.pending = await _insert(
            conn, "old", 5, expires_in=HOUR, revoked_ago=2 * HOUR, pending=True
        )
        await conn.execute(
            """UPDATE revocation_watermark SET confirmed = (
                   SELECT max(lpad(revocation_xid::text, 20, '0') || ':' ||
                              encode(token_hash, 'hex')) COLLATE "C"
                   FROM sessions WHERE revoked_at IS NOT NULL)"""
        )
        p.above_watermark = await _insert(conn, "old", 7, expires_in=HOUR, revoked_ago=2 * HOUR)
        for token in p.above_watermark:
            p.kept[token] = "above the watermark"
        for token in p.pending:
            p.kept[token] = "pending"
        yield p
    finally:
        await conn.close()


async def _remaining(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT encode(token_hash, 'hex') AS h FROM sessions")
    finally:
        await conn.close()
    return {r["h"] for r in rows}


def _hashes(tokens: list[str] | dict[str, str]) -> set[str]:
    return {TokenHash.of(t).hex for t in tokens}


async def test_dry_run_counts_and_deletes_nothing(gc_url: str, population: Population) -> None:
    before = await _remaining(gc_url)
    conn = await asyncpg.connect(gc_url)
    try:
        report = await collect_garbage(conn, retention=HOUR, batch_size=BATCH, dry_run=True)
    finally:
        await conn.close()
    assert (report.deleted, report.expired, report.revoked) == (300, EXPIRED_OLD, REVOKED_OLD)
    assert (report.held_pending, report.held_watermark) == (5, 7)
    assert report.dry_run
    assert await _remaining(gc_url) == before


async def test_gc_deletes_exactly_what_ended_past_the_window_in_batches(
    gc_url: str, population: Population
) -> None:
    sizes: list[int] = []

    async def after_batch(deleted: int) -> None:
        sizes.append(deleted)

    conn = await asyncpg.connect(gc_url)
    try:
        report = await collect_garbage(
            conn, retention=HOUR, batch_size=BATCH, after_batch=after_batch
        )
        again = await collect_garbage(conn, retention=HOUR, batch_size=BATCH)
    finally:
        await conn.close()
    assert sizes == [BATCH] * 7 + [20]
    assert (report.deleted, report.expired, report.revoked, report.batches) == (300, 250, 50, 8)
    assert (report.held_pending, report.held_watermark) == (5, 7)
    assert await _remaining(gc_url) == _hashes(population.kept)
    assert (again.deleted, again.batches) == (0, 0)


async def test_a_row_a_revocation_holds_is_skipped_not_waited_for(
    gc_url: str, population: Population
) -> None:
    """A revocation in flight (its transaction open) on an old expired row: gc skips the
    row (SKIP LOCKED) instead of waiting, and the row, pending once committed, stays."""
    victim = population.deleted_expired[0]
    revoker = await asyncpg.connect(gc_url)
    gc = await asyncpg.connect(gc_url)
    try:
        async with revoker.transaction():
            await revoker.execute(
                """UPDATE sessions SET revoked_at = now(), purge_pending = true
                   WHERE token_hash = $1""",
                bytes.fromhex(TokenHash.of(victim).hex),
            )
            report = await asyncio.wait_for(
                collect_garbage(gc, retention=HOUR, batch_size=BATCH), timeout=60
            )
        after = await collect_garbage(gc, retention=HOUR, batch_size=BATCH)
    finally:
        await revoker.close()
        await gc.close()
    assert report.deleted == 299
    assert after.deleted == 0
    assert after.held_pending == 6
    assert TokenHash.of(victim).hex in await _remaining(gc_url)


async def test_validations_are_answered_between_every_batch_and_deleted_tokens_never_validate(
    gc_url: str, population: Population
) -> None:
    """Postgres-only replicas (every validation reads the sessions table): gc waits after
    each batch until the replica has answered another validation, so a gc that held
    validations back for its whole run would never finish."""
    app = await App.start(app_settings(gc_url, None))
    answered: list[bool] = []
    progress = asyncio.Condition()
    done = asyncio.Event()
    live = [t for t, why in population.kept.items() if why == "live"]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=NO_PROXY) as ch:
            stub = pb_grpc.SessionAuthorityStub(ch)

            async def validate_until_done() -> None:
                while not done.is_set():
                    for token in live:
                        reply = await stub.ValidateSession(
                            pb.ValidateSessionRequest(token=token), timeout=10
                        )
                        async with progress:
                            answered.append(reply.valid)
                            progress.notify_all()

            async def after_batch(_: int) -> None:
                async with progress:
                    seen = len(answered)
                    await asyncio.wait_for(
                        progress.wait_for(lambda: len(answered) > seen), timeout=30
                    )

            validator = asyncio.create_task(validate_until_done())
            conn = await asyncpg.connect(gc_url)
            try:
                report = await collect_garbage(
                    conn, retention=HOUR, batch_size=10, after_batch=after_batch
                )
            finally:
                done.set()
                await conn.close()
                await validator
            assert report.batches == 30
            assert len(answered) >= report.batches
            assert all(answered)
            gone = population.deleted_expired[:5] + population.deleted_revoked[:5]
            for token in gone:
                reply = await stub.ValidateSession(pb.ValidateSessionRequest(token=token))
                assert (reply.valid, reply.reason) == (False, pb.REASON_UNKNOWN)
            for token in population.pending[:2] + population.above_watermark[:2]:
                reply = await stub.ValidateSession(pb.ValidateSessionRequest(token=token))
                assert (reply.valid, reply.reason) == (False, pb.REASON_REVOKED)
    finally:
        await app.stop(0)


def _gc(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [str(Path(sys.executable).parent / "session-authority"), "gc", *args]
    return subprocess.run(
        argv,
        env=server_env(DATABASE_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_dry_run_then_gc(gc_url: str, population: Population) -> None:
    dry = _gc(gc_url, "--retention", "1h", "--batch-size", "100", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout) == {
        "retention_seconds": HOUR,
        "dry_run": True,
        "deleted": 300,
        "expired": 250,
        "revoked": 50,
        "batches": 3,
        "held_pending": 5,
        "held_watermark": 7,
    }
    real = _gc(gc_url, "--retention", "60m", "--batch-size", "100")
    assert real.returncode == 0, real.stderr
    assert real.stdout.startswith("deleted 300 sessions ended more than 3600s ago"), real.stdout
    assert await _remaining(gc_url) == _hashes(population.kept)
