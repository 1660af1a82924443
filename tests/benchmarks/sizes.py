"""Postgres bytes per session: the sessions table and each of its indexes, per million rows.

A one-off measurement for the docs' "Scaling" section (not part of `make bench`):

    .venv/bin/python -m tests.benchmarks.sizes [--sessions 1000000] [--json out.json]

It starts a private Postgres (session_authority.embedded), applies the migrations, and inserts
`--sessions` rows with generate_series into the indexed table, as the service would write them
(random token hashes and session ids, created over the last 24 hours and expiring 24 hours
later, ten sessions per user, metadata ``{}``; in batches of
100,000, each one transaction). Then it measures, after VACUUM ANALYZE:

1. ``live``: every session live (the common case);
2. ``revoked_10pct``: one session in ten revoked (the partial indexes on revocations grow,
   ``sessions_user_live_idx`` keeps its entries until a vacuum);
3. ``after_gc``: the revoked tenth deleted (as ``session-authority gc`` would, past the
   window), then VACUUM: the space is free for new rows but not returned to the OS.

Sizes are ``pg_relation_size`` (main fork) of the table, its TOAST, and each index, divided by
the rows counted (``bytes_per_session``) or by one million (``mib_per_million``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from session_authority.adapters.migrate import apply_migrations
from session_authority.embedded import EmbeddedPostgres

_INSERT = """
INSERT INTO sessions (session_id, token_hash, user_id, created_at, expires_at, metadata)
SELECT gen_random_uuid(), sha256(('session-' || i)::bytea), 'user-' || (i % $3),
       created, created + interval '24 hours', '{}'::jsonb
FROM generate_series($1::bigint, $2::bigint) AS i,
     LATERAL (SELECT now() - random() * interval '24 hours' + i * interval '0') AS c(created)
"""
_RELATIONS = """
SELECT c.relname AS name, pg_relation_size(c.oid) AS bytes,
       CASE WHEN c.relkind = 'i' THEN 'index' ELSE 'table' END AS kind
FROM pg_class c
WHERE c.oid = 'sessions'::regclass
   OR c.oid = (SELECT reltoastrelid FROM pg_class WHERE oid = 'sessions'::regclass)
   OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'sessions'::regclass)
ORDER BY kind DESC, name
"""
BATCH = 100_000


async def _measure(conn: asyncpg.Connection) -> dict[str, Any]:
    await conn.execute("VACUUM ANALYZE sessions")
    rows = int(await conn.fetchval("SELECT count(*) FROM sessions"))
    sizes: dict[str, Any] = {"rows": rows, "relations": {}}
    total = 0
    for r in await conn.fetch(_RELATIONS):
        name = "toast" if r["name"].startswith("pg_toast") else r["name"]
        total += r["bytes"]
        sizes["relations"][name] = {
            "bytes": r["bytes"],
            "bytes_per_session": round(r["bytes"] / rows, 1) if rows else 0,
        }
    sizes["total_bytes"] = total
    sizes["total_bytes_per_session"] = round(total / rows, 1) if rows else 0
    return sizes


async def measure(sessions: int, base: Path) -> dict[str, Any]:
    report: dict[str, Any] = {"sessions": sessions}
    with EmbeddedPostgres(base / "pg") as pg:
        conn = await asyncpg.connect(pg.url)
        try:
            await apply_migrations(conn)
            version = await conn.fetchval("SHOW server_version")
            report["postgres"] = str(version)
            started = time.monotonic()
            users = max(sessions // 10, 1)
            for first in range(1, sessions + 1, BATCH):
                await conn.execute(_INSERT, first, min(first + BATCH - 1, sessions), users)
            report["insert_seconds"] = round(time.monotonic() - started, 1)
            report["live"] = await _measure(conn)
            await conn.execute(
                "UPDATE sessions SET revoked_at = now() WHERE get_byte(token_hash, 0) < 26"
            )
            report["revoked_10pct"] = await _measure(conn)
            await conn.execute("DELETE FROM sessions WHERE revoked_at IS NOT NULL")
            report["after_gc"] = await _measure(conn)
        finally:
            await conn.close()
    return report


def _table(report: dict[str, Any]) -> str:
    states = ("live", "revoked_10pct", "after_gc")
    names = list(report["live"]["relations"])
    lines = ["| relation | " + " | ".join(f"{s} B/session" for s in states) + " |"]
    lines.append("| --- |" + " ---: |" * len(states))
    for name in names:
        cells = [
            str(report[s]["relations"].get(name, {}).get("bytes_per_session", "-")) for s in states
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        "| **total** | "
        + " | ".join(str(report[s]["total_bytes_per_session"]) for s in states)
        + " |"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sa-sizes-") as tmp:
        report = asyncio.run(measure(args.sessions, Path(tmp)))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(report))
    print(
        f"({report['sessions']} sessions, Postgres {report['postgres']}, "
        f"inserted in {report['insert_seconds']} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
