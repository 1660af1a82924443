"""How we connect to Postgres: always a primary, and through a transaction pooler when told.

``pool_options`` for the service's pool, ``connect_options`` for one connection (``migrate``,
``gc``); ``DATABASE_POOLER`` (``POOLERS``) says what ``DATABASE_URL`` points at.
"""

from __future__ import annotations

from typing import Any

import asyncpg

__all__ = ["POOLERS", "connect_options", "pool_options"]

#: ``DATABASE_POOLER``'s values: what stands between us and Postgres.
POOLERS = ("none", "pgbouncer")


def pool_options(pooler: str) -> dict[str, Any]:
    """asyncpg options for what ``DATABASE_URL`` points at (``POOLERS``).

    ``pgbouncer``: a pooler in *transaction* mode (PgBouncer, or any other
    that hands each transaction a different server connection). Then every
    statement must stand alone, and so it does here (audited: no ``LISTEN``,
    no ``SET``, no session advisory lock, no cursor, no temporary table; each
    store method is one statement outside any explicit transaction, and the
    migration runner's lock is ``pg_advisory_xact_lock`` inside its one
    transaction). Two driver habits do not, and are turned off:

    * named prepared statements, cached per connection
      (``statement_cache_size=0``): through the pooler, a statement prepared on
      one server connection is executed on another ("prepared statement
      "__asyncpg_stmt_5__" does not exist"). asyncpg then parses each query as
      the unnamed statement: Parse, Describe and Flush, then Bind, Execute and
      Sync, and a pooler gives the server connection back only at the Sync, so
      both halves reach the same one (PgBouncer 1.18 has no protocol-level
      prepared statements; this needs none). The price: two round trips per
      query instead of one, and a parse each time (measured in the benchmark,
      ``pgbouncer_vs_direct``).
    * the reset query asyncpg runs on every release (``pg_advisory_unlock_all();
      CLOSE ALL; UNLISTEN *; RESET ALL``): it would run on some other client's
      server connection, and cost a round trip per checkout for state we never
      create. An open transaction is still rolled back (asyncpg does that before
      calling ``reset``).

    The reset query is off for Postgres itself too: the same audit holds (the
    pooler's tests run every store method without it), and it was a round trip
    each call waited for after its own statement, a miss's and a touch's
    included (the one ``LISTEN`` is ``postgres_listener``'s own connection,
    outside the pool)."""
    options = connect_options(pooler)
    options["reset"] = _keep_session
    return options


def connect_options(pooler: str) -> dict[str, Any]:
    """The options of ``pool_options`` that one ``asyncpg.connect`` takes too (``migrate``,
    ``gc``).

    Every connection is to a primary: ``target_session_attrs=read-write``, whatever the URL
    says, so a read replica (hot standby, or ``default_transaction_read_only``) is refused at
    connect ("no suitable server"). Validation must read what every revocation wrote, and a
    replica lags: a miss answered there could call a just-revoked session valid (and a
    just-created one unknown). A URL naming several hosts (``postgresql://pg-a,pg-b/db``)
    connects to whichever is the primary, so a failover needs no new URL."""
    if pooler not in POOLERS:
        raise ValueError(f"unknown pooler {pooler!r}: one of {', '.join(POOLERS)}")
    options: dict[str, Any] = {"target_session_attrs": "read-write"}
    if pooler == "pgbouncer":
        options["statement_cache_size"] = 0
    return options


async def _keep_session(conn: asyncpg.Connection) -> None:
    """No reset query: see ``pool_options``."""
