"""Migration 0007 (a cheaper mass revocation) on real Postgres: the redundant index is gone
while every query that used it still reads an index, and the events trigger records each
revocation exactly once even on a connection whose cached plans are generic (the plans that
made a mass revocation's join a nested loop, square in its size). Counts and plans, never
timings."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import asyncpg
import pytest

from session_authority.adapters import postgres_store

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


async def _plan(conn: asyncpg.Connection, query: str, *args: object) -> str:
    rows = await conn.fetch("EXPLAIN (COSTS OFF) " + query, *args)
    return "\n".join(r[0] for r in rows)


async def _sessions(conn: asyncpg.Connection, user: str, count: int) -> None:
    now = datetime.now(UTC)
    await conn.executemany(
        """INSERT INTO sessions (session_id, token_hash, user_id, created_at, expires_at)
           VALUES ($1, $2, $3, $4, $5)""",
        [(uuid4(), os.urandom(32), user, now, now + timedelta(hours=1)) for _ in range(count)],
    )


async def test_the_redundant_live_index_is_gone_and_user_queries_still_use_an_index(
    pg_dsn: str,
) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        user = f"user-{uuid4().hex[:8]}"
        await _sessions(conn, user, 3)
        indexes = {
            r["indexname"]
            for r in await conn.fetch(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'sessions'"
            )
        }
        assert "sessions_user_live_idx" not in indexes
        assert "sessions_user_live_order_idx" in indexes
        # Plain index scans only, so that the plan names the index a query can use, even on a
        # table this small: a query no index serves falls back to a Seq Scan and fails.
        await conn.execute("SET enable_seqscan = off")
        await conn.execute("SET enable_bitmapscan = off")
        live = postgres_store._LIST_USER.format(live=postgres_store._LIVE, after="")
        revoke_user = """UPDATE sessions SET revoked_at = now() WHERE user_id = $1
                         AND revoked_at IS NULL RETURNING token_hash"""
        for query, args, index in [
            (live, (user, 10), "sessions_user_live_order_idx"),
            (
                postgres_store._LIST_USER.format(live="", after=""),
                (user, 10),
                "sessions_user_order_idx",
            ),
            (revoke_user, (user,), "sessions_user_live_order_idx"),
            (postgres_store._REVOKE_USER_EXCEPT, (user, uuid4()), "sessions_user_live_order_idx"),
        ]:
            plan = await _plan(conn, query, *args)
            assert f"Index Scan using {index} on sessions" in plan, plan
            assert "Seq Scan" not in plan, plan
    finally:
        await conn.close()


async def test_events_are_written_once_per_revocation_on_a_connection_with_generic_plans(
    pg_dsn: str,
) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        # Generic plans from the first call: what a pooled connection has after a few calls.
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        user = f"user-{uuid4().hex[:8]}"
        await _sessions(conn, user, 1 + 200)
        one = await conn.fetchval(
            "SELECT session_id FROM sessions WHERE user_id = $1 LIMIT 1", user
        )
        for _ in range(6):  # one-row UPDATEs: touches (no event)
            await conn.execute(
                "UPDATE sessions SET last_seen_at = now() WHERE session_id = $1", one
            )
        await conn.execute("UPDATE sessions SET revoked_at = now() WHERE session_id = $1", one)
        revoked = await conn.fetch(
            """UPDATE sessions SET revoked_at = now(), purge_pending = true
               WHERE user_id = $1 AND revoked_at IS NULL RETURNING session_id""",
            user,
        )
        await conn.execute(  # already revoked: re-stamping is no new revocation
            "UPDATE sessions SET revoked_at = now() WHERE user_id = $1", user
        )
        events = await conn.fetch(
            "SELECT session_id, reason FROM revocation_events WHERE user_id = $1", user
        )
        assert len(revoked) == 200
        assert len(events) == 201
        assert {e["session_id"] for e in events} == {one, *(r["session_id"] for r in revoked)}
        assert {e["reason"] for e in events} == {"admin"}
    finally:
        await conn.close()
