"""``PostgresSessionStore``: the source of truth, on asyncpg."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from session_authority.core.domain import Session, TokenHash
from session_authority.core.errors import StoreBusy, StoreTimeout, StoreUnavailable
from session_authority.core.health import PoolStats, StoreHealth
from session_authority.core.ports import StoreRevocation
from session_authority.core.watermark import RevocationMarks, horizon_below, mark_of, parse_mark

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
    RETURNING s.session_id, s.expires_at > now() AS live
)
SELECT t.token_hash, COALESCE((SELECT live FROM upd), false) AS revoked_now
FROM target t
"""
_REVOKE_BY_HASH = _REVOKE_ONE.format(column="token_hash")
_REVOKE_BY_ID = _REVOKE_ONE.format(column="session_id")


class PostgresSessionStore:
    """Connects lazily: until Postgres first answers, every call raises
    ``StoreUnavailable`` (so the server can start, and report NOT_SERVING,
    before its database is up)."""

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int,
        max_size: int,
        command_timeout: float,
        acquire_timeout: float,
        connect_timeout: float = 5.0,
    ) -> None:
        self._dsn = dsn
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
            finally:
                await _release(self._pool, conn)
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
            await conn.execute(
                """UPDATE sessions SET purge_pending = false
                   WHERE token_hash = ANY($1::bytea[]) AND purge_pending""",
                [bytes.fromhex(h.hex) for h in token_hashes],
            )

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


async def _release(pool: asyncpg.Pool, conn: Any) -> None:
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
    before (a timeout becomes ``StoreUnavailable`` in ``_connection``)."""
    release = asyncio.ensure_future(pool.release(conn))
    release.add_done_callback(_retrieve)
    await asyncio.shield(release)


def _retrieve(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # the connection is terminated and replaced: nothing to report


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


def _hash(row: Any) -> TokenHash:
    return TokenHash(bytes(row["token_hash"]).hex())


def _session(row: Any) -> Session:
    return Session(
        session_id=str(row["session_id"]),
        user_id=row["user_id"],
        token_hash=TokenHash(bytes(row["token_hash"]).hex()),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        metadata=row["metadata"],
    )


def _describe(exc: BaseException) -> str:
    """Safe error text: asyncpg messages carry no DSN or password."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
