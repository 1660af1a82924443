"""``PostgresSessionStore``: the source of truth, on asyncpg."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import asyncpg

from session_authority.adapters.postgres_options import pool_options
from session_authority.core.domain import Position, Session, SessionSummary, TokenHash
from session_authority.core.errors import StoreBusy, StoreTimeout, StoreUnavailable
from session_authority.core.health import PoolStats, StoreHealth
from session_authority.core.ports import StoreRevocation, Touched
from session_authority.core.watch import MAX_SEQ, Cursor, EventPage, RevocationEvent
from session_authority.core.watermark import RevocationMarks, horizon_below, mark_of, parse_mark

_log = logging.getLogger("session_authority.store")

__all__ = ["STORE_ERRORS", "PostgresSessionStore"]

#: Everything that means "the store failed", mapped to StoreUnavailable in
#: one place (``_connection``). CancelledError is not among them. asyncpg's
#: exceptions are three trees: ``PostgresError`` (the server's errors, and
#: ``PostgresConnectionError`` such as ``ConnectionDoesNotExistError``),
#: ``InterfaceError`` (misuse, and a closed connection), and
#: ``InternalClientError`` (``ProtocolError``, ``OutdatedSchemaCacheError``,
#: and what the pool raises when a connection dies mid-protocol: "release()
#: called on a free connection holder"). Sockets fail with ``OSError``
#: (``ConnectionResetError``...) or ``EOFError`` (``IncompleteReadError``).
STORE_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    EOFError,
    TimeoutError,
)

# The revocation's reason, for its event (migration 0006): the statement sets the
# transaction-local `session_authority.revocation_reason` before any row is updated
# (an uncorrelated subquery is evaluated once, first), and the statement-level
# trigger reads it at the statement's end. Writers that do not set it are `admin`.
# Revocations are stamped by Postgres's clock (now()), never a replica's, and
# revoke whatever is not yet revoked, expired or not: a replica whose clock runs
# fast must not leave a session unrevoked that another replica still caches.
# `revoked_now` is true when this call ended a session that was live (by the same
# clock). Each revocation is left `purge_pending` until a tombstone is confirmed.
_REVOKE_ONE = """
WITH target AS (
    SELECT session_id, token_hash, revoked_at FROM sessions WHERE {column} = $1
), upd AS (
    UPDATE sessions s SET revoked_at = now(), purge_pending = true
    FROM target t
    WHERE s.session_id = t.session_id AND s.revoked_at IS NULL
      AND (SELECT set_config('session_authority.revocation_reason', 'explicit', true)) IS NOT NULL
    RETURNING s.session_id, s.expires_at > now() AS live
)
SELECT t.token_hash, COALESCE((SELECT live FROM upd), false) AS revoked_now
FROM target t
"""
_REVOKE_BY_HASH = _REVOKE_ONE.format(column="token_hash")

# "Log out everywhere else": one statement checks that the kept session is the user's and
# revokes the others, so a kept id of another user (or none) revokes nothing. Its snapshot is
# taken when it starts: a session committed after that is not revoked (as with revoke_user).
# A data-modifying CTE runs exactly once, however often it is read.
_REVOKE_USER_EXCEPT = """
WITH kept AS (
    SELECT 1 FROM sessions WHERE session_id = $2 AND user_id = $1
), upd AS (
    UPDATE sessions SET revoked_at = now(), purge_pending = true
    WHERE user_id = $1 AND revoked_at IS NULL AND session_id <> $2
      AND EXISTS (SELECT 1 FROM kept)
      AND (SELECT set_config('session_authority.revocation_reason', 'user_wide', true))
          IS NOT NULL
    RETURNING token_hash, expires_at > now() AS revoked_now
)
SELECT EXISTS (SELECT 1 FROM kept) AS kept,
       COALESCE((SELECT array_agg(token_hash) FROM upd), '{}') AS hashes,
       COALESCE((SELECT array_agg(revoked_now) FROM upd), '{}') AS live
"""

# The hashes joined as rows, not `token_hash = ANY($1) AND purge_pending`: once a pooled
# connection has run this statement a few times with a few hashes, Postgres may keep a generic
# plan that walks the pending rows and looks each one up in the array by a linear search; with
# the 50,000 hashes of a mass revocation pending, that is 50,000 x 50,000 comparisons (minutes).
# A join costs what the hashes and the pending rows cost, whichever plan is cached.
_CONFIRM_PURGED = """
UPDATE sessions s SET purge_pending = false
FROM unnest($1::bytea[]) AS h(token_hash)
WHERE s.token_hash = h.token_hash AND s.purge_pending
"""

# Keyset pages in (created_at, session_id) order; the partial index serves live listings, the
# full one listings with revoked sessions (migration 0004). "Live" is judged by Postgres's clock.
_LIST_USER = """
SELECT session_id, user_id, created_at, expires_at, revoked_at, last_seen_at, metadata
FROM sessions
WHERE user_id = $1 {live} {after}
ORDER BY created_at, session_id
LIMIT $2
"""
_LIVE = "AND revoked_at IS NULL AND expires_at > now()"
_AFTER = "AND (created_at, session_id) > ($3, $4)"
_REVOKE_BY_ID = _REVOKE_ONE.format(column="session_id")

# Sliding expiry, one statement, one clock (Postgres's now()). `due` picks the
# row only when a write is due (live, last touch an interval old or never) and
# locks it with SKIP LOCKED: a row that another touch or a revocation holds is
# skipped, never queued for, so thousands of touches at once make no lock
# queue (Kratos #3948: every request updated the row and waited on its lock).
# The lock also re-reads the newest committed row and re-checks the condition,
# so a touch that lost the race to another one, or to a revocation, writes
# nothing. The answer is the written row, else the row as read.
_TOUCH = """
WITH target AS (
    SELECT session_id, token_hash, user_id, created_at, expires_at, revoked_at, metadata,
           last_seen_at
    FROM sessions WHERE {column} = $1
), due AS (
    SELECT session_id FROM sessions
    WHERE {column} = $1 AND revoked_at IS NULL AND expires_at > now()
      AND (last_seen_at IS NULL OR last_seen_at <= now() - make_interval(secs => $4))
    FOR UPDATE SKIP LOCKED
), upd AS (
    UPDATE sessions s
    SET expires_at = greatest(s.expires_at, least(s.created_at + make_interval(secs => $3),
                                                  now() + make_interval(secs => $2))),
        last_seen_at = now()
    FROM due d
    WHERE s.session_id = d.session_id
    RETURNING s.expires_at, s.last_seen_at, s.revoked_at
)
SELECT t.session_id, t.token_hash, t.user_id, t.created_at, t.metadata,
       COALESCE(u.expires_at, t.expires_at) AS expires_at,
       COALESCE(u.last_seen_at, t.last_seen_at) AS last_seen_at,
       CASE WHEN u.expires_at IS NULL THEN t.revoked_at ELSE u.revoked_at END AS revoked_at,
       u.expires_at IS NOT NULL AS written,
       now() AS now
FROM target t LEFT JOIN upd u ON true
"""
_TOUCH_BY_HASH = _TOUCH.format(column="token_hash")
_TOUCH_BY_ID = _TOUCH.format(column="session_id")


# One statement, so one snapshot: the events after the cursor below the horizon
# (the snapshot's xmin: every older transaction has ended), the floor of what was
# pruned, the snapshot's xmax, and whether committed events wait above the horizon.
# Always at least one row (the LEFT JOIN); event columns are NULL when there is none.
_EVENTS_AFTER = """
WITH h AS MATERIALIZED (
    SELECT s.xmin, s.xmax, f.xid AS floor_xid, f.seq AS floor_seq,
           (SELECT max(xid) FROM revocation_events) >= s.xmin AS pending
    FROM (SELECT pg_snapshot_xmin(c)::text::bigint AS xmin,
                 pg_snapshot_xmax(c)::text::bigint AS xmax
          FROM pg_current_snapshot() AS c) s
    CROSS JOIN revocation_event_floor f
)
SELECT h.xmin, h.xmax, h.floor_xid, h.floor_seq, h.pending,
       e.xid, e.seq, e.session_id, e.user_id, e.reason, e.revoked_at
FROM h
LEFT JOIN LATERAL (
    SELECT * FROM revocation_events e
    WHERE (e.xid, e.seq) > ($1::bigint, $2::bigint) AND e.xid < h.xmin
    ORDER BY e.xid, e.seq
    LIMIT $3
) e ON true
ORDER BY e.xid, e.seq
"""

# A bounded batch: the oldest events past the retention (Postgres's clock), rows
# another replica is deleting skipped, and the floor raised to the highest
# position deleted (never lowered), in one statement.
_PRUNE_EVENTS = """
WITH gone AS (
    DELETE FROM revocation_events WHERE seq IN (
        SELECT seq FROM revocation_events
        WHERE recorded_at < now() - make_interval(secs => $1)
        ORDER BY recorded_at LIMIT $2
        FOR UPDATE SKIP LOCKED)
    RETURNING xid, seq
), top AS (
    SELECT xid, seq FROM gone ORDER BY xid DESC, seq DESC LIMIT 1
), raised AS (
    UPDATE revocation_event_floor f SET xid = top.xid, seq = top.seq
    FROM top WHERE (top.xid, top.seq) > (f.xid, f.seq)
)
SELECT count(*) FROM gone
"""


class PostgresSessionStore:
    """Connects lazily: until Postgres first answers, every call raises
    ``StoreUnavailable`` (so the server can start, and report NOT_SERVING,
    before its database is up). ``pooler``: what ``dsn`` points at
    (``pool_options``)."""

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int,
        max_size: int,
        command_timeout: float,
        acquire_timeout: float,
        connect_timeout: float = 5.0,
        pooler: str = "none",
    ) -> None:
        self._dsn = dsn
        self._options = pool_options(pooler)
        self._min_size = min_size
        self._max_size = max_size
        self._command_timeout = command_timeout
        self._acquire_timeout = acquire_timeout
        self._connect_timeout = connect_timeout
        self._pool: asyncpg.Pool | None = None
        self._connecting = asyncio.Lock()
        self.pending = 0

    async def connect(self) -> None:
        """Create the pool if there is none. Raises StoreUnavailable."""
        if self._pool is not None:
            return
        async with self._connecting:
            if self._pool is not None:  # set while we awaited the lock
                return  # type: ignore[unreachable]
            try:
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=self._min_size,
                    max_size=self._max_size,
                    command_timeout=self._command_timeout,
                    timeout=self._connect_timeout,
                    init=_init_connection,
                    **self._options,
                )
            except STORE_ERRORS as exc:
                raise StoreUnavailable(_describe(exc)) from exc

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        self.pending += 1
        acquired = False
        try:
            await self.connect()
            assert self._pool is not None
            try:
                conn = await self._pool.acquire(timeout=self._acquire_timeout)
            except TimeoutError as exc:
                raise StoreBusy(
                    f"postgres pool exhausted: no connection within {self._acquire_timeout:g}s"
                ) from exc
            self.pending -= 1
            acquired = True
            try:
                yield conn
            except BaseException:
                await _release(self._pool, conn, self._command_timeout)
                raise
            # The caller's work is done (and committed, for a write): a reset that
            # fails or is slow afterwards must not turn it into an error (a
            # committed CreateSession answered UNAVAILABLE). asyncpg then
            # terminates the connection and the pool opens another.
            try:
                await _release(self._pool, conn, self._command_timeout)
            except (TimeoutError, *STORE_ERRORS) as exc:
                _log.warning(
                    "postgres connection not reset after use, replaced: %s", _describe(exc)
                )
        except TimeoutError as exc:
            raise StoreTimeout("postgres query timed out") from exc
        except STORE_ERRORS as exc:
            raise StoreUnavailable(_describe(exc)) from exc
        finally:
            if not acquired:
                self.pending -= 1

    # --- SessionStore ------------------------------------------------------------

    async def create(self, session: Session) -> None:
        async with self._connection() as conn:
            await conn.execute(
                """INSERT INTO sessions (session_id, token_hash, user_id, created_at,
                                        expires_at, revoked_at, metadata)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)""",
                session.session_id,
                bytes.fromhex(session.token_hash.hex),
                session.user_id,
                session.created_at,
                session.expires_at,
                session.revoked_at,
                dict(session.metadata),
            )

    async def find(self, token_hash: TokenHash) -> Session | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                """SELECT session_id, token_hash, user_id, created_at, expires_at, revoked_at,
                          metadata
                   FROM sessions WHERE token_hash = $1""",
                bytes.fromhex(token_hash.hex),
            )
        return None if row is None else _session(row)

    async def revoke(
        self, *, token_hash: TokenHash | None = None, session_id: str | None = None
    ) -> StoreRevocation | None:
        if (token_hash is None) == (session_id is None):
            raise ValueError("name exactly one of token_hash or session_id")
        key: object
        if token_hash is not None:
            query, key = _REVOKE_BY_HASH, bytes.fromhex(token_hash.hex)
        else:
            query, key = _REVOKE_BY_ID, session_id
        async with self._connection() as conn:
            row = await conn.fetchrow(query, key)
        if row is None:
            return None
        return StoreRevocation(_hash(row), row["revoked_now"])

    async def revoke_user(self, user_id: str) -> list[StoreRevocation]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                """UPDATE sessions SET revoked_at = now(), purge_pending = true
                   WHERE user_id = $1 AND revoked_at IS NULL
                     AND (SELECT set_config('session_authority.revocation_reason', 'user_wide',
                                            true)) IS NOT NULL
                   RETURNING token_hash, expires_at > now() AS revoked_now""",
                user_id,
            )
        return [StoreRevocation(_hash(r), r["revoked_now"]) for r in rows]

    async def revoked_since(self, seconds: float) -> list[TokenHash]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                """SELECT token_hash FROM sessions
                   WHERE revoked_at >= now() - make_interval(secs => $1)""",
                seconds,
            )
        return [_hash(r) for r in rows]

    async def pending_purges(self, limit: int) -> list[TokenHash]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                """SELECT token_hash FROM sessions WHERE purge_pending
                   ORDER BY revoked_at LIMIT $1""",
                limit,
            )
        return [_hash(r) for r in rows]

    async def confirm_purged(self, token_hashes: Sequence[TokenHash]) -> None:
        async with self._connection() as conn:
            await conn.execute(_CONFIRM_PURGED, [bytes.fromhex(h.hex) for h in token_hashes])

    async def revocation_marks(self) -> RevocationMarks:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                """SELECT confirmed,
                          pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin
                   FROM revocation_watermark"""
            )
        confirmed = "" if row is None else str(row["confirmed"])
        xmin = 0 if row is None else int(row["xmin"])
        return RevocationMarks(confirmed=confirmed, horizon=horizon_below(xmin))

    async def revocations_after(
        self, after: str, limit: int, window: float
    ) -> list[tuple[str, TokenHash]]:
        xid, token_hash = parse_mark(after)
        async with self._connection() as conn:
            if xid < 0:
                # From the window's oldest, not from the first revocation ever.
                oldest = await conn.fetchval(
                    """SELECT min(COALESCE(revocation_xid, 0)) FROM sessions
                       WHERE revoked_at >= now() - make_interval(secs => $1)""",
                    window,
                )
                if oldest is None:
                    return []
                xid, token_hash = int(oldest) - 1, b"\xff" * 33
            rows = await conn.fetch(
                """SELECT COALESCE(revocation_xid, 0) AS xid, token_hash FROM sessions
                   WHERE revoked_at IS NOT NULL
                     AND (COALESCE(revocation_xid, 0), token_hash) > ($1::bigint, $2::bytea)
                     AND revoked_at >= now() - make_interval(secs => $3)
                   ORDER BY COALESCE(revocation_xid, 0), token_hash
                   LIMIT $4""",
                xid,
                token_hash,
                window,
                limit,
            )
        found = []
        for r in rows:
            row_hash = _hash(r)
            found.append((mark_of(int(r["xid"]), row_hash), row_hash))
        return found

    async def confirm_watermark(self, mark: str) -> None:
        async with self._connection() as conn:
            await conn.execute(
                """UPDATE revocation_watermark
                   SET confirmed = greatest(confirmed, $1 COLLATE "C")""",
                mark,
            )

    async def list_user_sessions(
        self, user_id: str, *, include_revoked: bool, after: Position | None, limit: int
    ) -> list[SessionSummary]:
        query = _LIST_USER.format(
            live="" if include_revoked else _LIVE, after="" if after is None else _AFTER
        )
        args: list[object] = [user_id, limit]
        if after is not None:
            args += [after.created_at, after.session_id]
        async with self._connection() as conn:
            rows = await conn.fetch(query, *args)
        return [
            SessionSummary(
                session_id=str(r["session_id"]),
                user_id=r["user_id"],
                created_at=r["created_at"],
                expires_at=r["expires_at"],
                metadata=r["metadata"],
                last_seen_at=r["last_seen_at"],
                revoked_at=r["revoked_at"],
            )
            for r in rows
        ]

    async def revoke_user_except(
        self, user_id: str, session_id: str
    ) -> list[StoreRevocation] | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(_REVOKE_USER_EXCEPT, user_id, session_id)
        if not row["kept"]:
            return None
        return [
            StoreRevocation(TokenHash(bytes(h).hex()), live)
            for h, live in zip(row["hashes"], row["live"], strict=True)
        ]

    async def page_token_key(self) -> bytes:
        async with self._connection() as conn:
            secret = await conn.fetchval(
                "SELECT secret FROM service_secrets WHERE name = 'page_token'"
            )
        if secret is None:  # the migration makes it: missing means not migrated
            raise StoreUnavailable("no page token secret in Postgres: run `migrate`")
        return bytes(secret)

    # --- RevocationLog (core/watch.py) ------------------------------------------------

    async def revocation_events_after(self, after: Cursor | None, limit: int) -> EventPage:
        xid, seq = (MAX_SEQ, MAX_SEQ) if after is None else after  # None: no events
        async with self._connection() as conn:
            rows = await conn.fetch(_EVENTS_AFTER, xid, seq, 0 if after is None else limit)
        head = rows[0]
        xmin = int(head["xmin"])
        events = [
            RevocationEvent(
                cursor=(int(r["xid"]), int(r["seq"])),
                session_id=str(r["session_id"]),
                user_id=r["user_id"],
                reason=r["reason"],
                revoked_at=r["revoked_at"],
            )
            for r in rows
            if r["seq"] is not None
        ]
        return EventPage(
            events=events,
            horizon=(xmin - 1, MAX_SEQ),
            floor=(int(head["floor_xid"]), int(head["floor_seq"])),
            xmax=int(head["xmax"]),
            pending=head["pending"] is True,
        )

    async def prune_revocation_events(self, older_than: float, limit: int) -> int:
        async with self._connection() as conn:
            deleted = await conn.fetchval(_PRUNE_EVENTS, older_than, limit)
        return int(deleted)

    async def find_many(self, token_hashes: Sequence[TokenHash]) -> dict[TokenHash, Session]:
        if not token_hashes:
            return {}
        keys = list({bytes.fromhex(token_hash.hex) for token_hash in token_hashes})
        async with self._connection() as conn:
            rows = await conn.fetch(
                """SELECT session_id, token_hash, user_id, created_at, expires_at, revoked_at,
                          metadata
                   FROM sessions WHERE token_hash = ANY($1::bytea[])""",
                keys,
            )
        found = (_session(row) for row in rows)
        return {session.token_hash: session for session in found}

    async def health(self) -> StoreHealth:
        stats = self.pool_stats()
        try:
            async with self._connection() as conn:
                started = time.perf_counter()
                await conn.fetchval("SELECT 1")
                ping = time.perf_counter() - started
                version = await conn.fetchval("SHOW server_version")
        except StoreUnavailable as exc:
            return StoreHealth(connected=False, pool=stats, error=str(exc))
        return StoreHealth(
            connected=True, version=str(version), pool=stats, ping_ms=round(ping * 1000, 3)
        )

    async def touch(
        self,
        *,
        token_hash: TokenHash | None = None,
        session_id: str | None = None,
        extend_by: timedelta,
        max_lifetime: timedelta,
        interval: float,
    ) -> Touched | None:
        if (token_hash is None) == (session_id is None):
            raise ValueError("name exactly one of token_hash or session_id")
        key: object
        if token_hash is not None:
            query, key = _TOUCH_BY_HASH, bytes.fromhex(token_hash.hex)
        else:
            query, key = _TOUCH_BY_ID, session_id
        async with self._connection() as conn:
            row = await conn.fetchrow(
                query, key, extend_by.total_seconds(), max_lifetime.total_seconds(), interval
            )
        if row is None:
            return None
        session = _session(row, last_seen_at=row["last_seen_at"])
        now = row["now"]
        seen = session.last_seen_at
        quiet = 0.0 if seen is None else max(0.0, interval - (now - seen).total_seconds())
        live = session.revoked_at is None and session.expires_at > now
        return Touched(session, bool(row["written"]), live, quiet)

    def pool_stats(self) -> PoolStats:
        pool = self._pool
        if pool is None:
            return PoolStats(pending=self.pending, min_size=self._min_size, max_size=self._max_size)
        return PoolStats(
            size=pool.get_size(),
            available=pool.get_idle_size(),
            pending=self.pending,
            min_size=pool.get_min_size(),
            max_size=pool.get_max_size(),
        )


async def _release(pool: asyncpg.Pool, conn: Any, reset_within: float | None) -> None:
    """``pool.release(conn)``, whose failure is retrieved even when nobody waits for it.

    asyncpg's ``Pool.release`` runs the release as a shielded task of its own.
    A release after a cancelled query waits for Postgres to confirm the
    cancellation; on a frozen Postgres that wait times out, asyncpg terminates
    the connection (the pool opens a new one) and the task fails. If our
    caller was cancelled meanwhile (a deadline, or the breaker's timeout of
    pool wait + statement timeout landing during the release), nobody awaits
    that task any more and asyncio logs "Task exception was never retrieved"
    at ERROR with a traceback. So the release runs in a task we own, whose
    outcome is always retrieved; a caller still waiting gets its error as
    before (a timeout becomes ``StoreUnavailable`` in ``_connection``).
    ``reset_within`` bounds the reset, a statement like any other (asyncpg's
    default is the acquire's timeout, e.g. 300 ms: a busy Postgres then had
    connections terminated and reopened for being slow to reset)."""
    release = asyncio.ensure_future(pool.release(conn, timeout=reset_within))
    release.add_done_callback(_retrieve)
    await asyncio.shield(release)


def _retrieve(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # the connection is terminated and replaced: nothing to report


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


def _hash(row: Any) -> TokenHash:
    return TokenHash(bytes(row["token_hash"]).hex())


def _session(row: Any, last_seen_at: Any = None) -> Session:
    return Session(
        session_id=str(row["session_id"]),
        user_id=row["user_id"],
        token_hash=TokenHash(bytes(row["token_hash"]).hex()),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        metadata=row["metadata"],
        last_seen_at=last_seen_at,
    )


def _describe(exc: BaseException) -> str:
    """Safe error text: asyncpg messages carry no DSN or password."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
