"""``PostgresRevocationListener``: one LISTEN connection per process, waking the
revocation watch (``core/watch.py``) when a revocation commits.

The trigger of migration ``0006`` NOTIFYs ``session_authority_revocations``;
Postgres delivers it at commit, to every listening connection, so a watcher on
any replica hears of a revocation made on any other within a round trip. The
notification is only a wake-up: what is sent is always read from the durable
record, and the watch also reads on a timer, so a lost notification (the
connection cut, Postgres restarted) delays an event by at most that timer.

The connection is its own, not the pool's: LISTEN needs a session that stays
with us, which a PgBouncer in transaction pooling mode does not give. So its
DSN is ``DATABASE_LISTEN_URL`` (default ``DATABASE_URL``): point it at
Postgres itself (or a session-mode pool) when ``DATABASE_URL`` goes through
such a PgBouncer. It is live because of what it answers: a ``SELECT 1`` every
``check`` seconds must come back within ``timeout``, else it is closed and
opened again (after 0.05 to 1 s), and every (re)connection wakes the watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from session_authority.adapters.postgres_store import STORE_ERRORS

__all__ = ["CHANNEL", "PostgresRevocationListener"]

CHANNEL = "session_authority_revocations"
_log = logging.getLogger("session_authority.watch")


class PostgresRevocationListener:
    def __init__(
        self,
        dsn: str,
        on_notify: Callable[[], None],
        *,
        check: float = 1.0,
        timeout: float = 2.0,
    ) -> None:
        self._dsn = dsn
        self._on_notify = on_notify
        self._check = check
        self._timeout = timeout
        self._task: asyncio.Task[None] | None = None
        self.connected = False
        self.reconnects = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="revocation-listener")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _notified(self, *_: Any) -> None:
        self._on_notify()

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            conn: Any = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=self._timeout)
                await conn.add_listener(CHANNEL, self._notified)
                self.connected = True
                backoff = 0.05
                self._on_notify()  # whatever committed while we were not listening
                while True:
                    await asyncio.sleep(self._check)
                    async with asyncio.timeout(self._timeout):
                        await conn.fetchval("SELECT 1")
            except asyncio.CancelledError:
                raise
            except STORE_ERRORS as exc:
                _log.warning("revocation listener: %s: %s", type(exc).__name__, exc)
            finally:
                self.connected = False
                if conn is not None:
                    conn.terminate()
            self.reconnects += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)
