"""``session-authority gc``: row retention (``adapters/retention.py``), from the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from session_authority.config import Settings, redact_url
from session_authority.logs import configure_logging

__all__ = ["run_gc"]

_log = logging.getLogger("session_authority.gc")


def run_gc(args: argparse.Namespace) -> int:
    """Raises pydantic's ValidationError for a bad environment (``main`` reports it)."""
    from session_authority.adapters.retention import check_retention, parse_duration

    settings = Settings()
    configure_logging(settings.log_level, "text")
    if not settings.database_url:
        print("session-authority gc: DATABASE_URL is required", file=sys.stderr)
        return 2
    try:
        retention = parse_duration(args.retention)
        check_retention(retention, settings.core_policy())
        if args.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
    except ValueError as exc:
        print(f"session-authority gc: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_gc(settings, args, retention))


async def _gc(settings: Settings, args: argparse.Namespace, retention: float) -> int:
    import asyncpg

    from session_authority.adapters.postgres_options import connect_options
    from session_authority.adapters.postgres_store import STORE_ERRORS
    from session_authority.adapters.retention import collect_garbage

    assert settings.database_url is not None
    options = connect_options(settings.database_pooler)
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=10, **options)
    except (*STORE_ERRORS,) as exc:
        _log.error("cannot connect to %s: %s", redact_url(settings.database_url), exc)
        return 1
    try:
        report = await collect_garbage(
            conn, retention=retention, batch_size=args.batch_size, dry_run=args.dry_run
        )
    except STORE_ERRORS as exc:
        _log.error("gc failed: %s", exc)
        return 1
    finally:
        await conn.close()
    print(json.dumps(report.as_dict()) if args.json else report.summary())
    return 0
