"""Row retention: delete sessions that ended (expired or revoked) longer ago than a window.

``session-authority gc`` runs this. Each batch is one ``DELETE`` of at most ``batch_size``
rows, a transaction of its own (autocommit), that takes its rows ``FOR UPDATE SKIP LOCKED``:
a row a revocation is updating is left for the next run, and validations (plain ``SELECT``s)
never wait for it. Postgres's clock decides what is old (``now()``), as it stamps revocations.

Why deleting is safe (never "valid" for a revoked session):

* A deleted row's token is unknown: a validation miss reads no row and answers
  ``REASON_UNKNOWN`` (invalid), cached as unknown for ``NEGATIVE_CACHE_TTL_SECONDS``; a
  tombstone still in Redis goes on answering revoked until it expires.
* Replays re-apply the revocations of the last ``CorePolicy.replay_window`` seconds only (the
  cache entries a revocation could contradict are younger); retention may not be shorter
  (``check_retention``), so no deleted row is one a replay still needs.
* A revocation still *pending* (its tombstone not confirmed in Redis) is never deleted; nor is
  one above the revocation watermark Postgres confirmed Redis holds (``core/watermark.py``):
  that revocation may still have to be sealed into Redis. Without Redis no watermark is ever
  confirmed (``''``) and revocations are never pending, so that rule holds nothing back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg

from session_authority.core.policy import CorePolicy

__all__ = ["GcReport", "check_retention", "collect_garbage", "parse_duration"]

# A row is *past* the window when it ended (expired or was revoked) before now() - $1 s; it is
# *above* the watermark when it is a revocation with a mark (watermark.mark_of, in SQL) above
# the confirmed watermark, once one has been confirmed. Past, not pending, not above: deleted.
_DELETE_BATCH = """
WITH doomed AS (
    SELECT s.session_id
    FROM sessions s LEFT JOIN revocation_watermark w ON true
    WHERE (s.expires_at < now() - make_interval(secs => $1)
           OR s.revoked_at < now() - make_interval(secs => $1))
      AND NOT s.purge_pending
      AND NOT (s.revoked_at IS NOT NULL AND COALESCE(w.confirmed, '') <> ''
               AND (lpad(COALESCE(s.revocation_xid, 0)::text, 20, '0') || ':'
                    || encode(s.token_hash, 'hex')) COLLATE "C" > w.confirmed)
    LIMIT $2
    FOR UPDATE OF s SKIP LOCKED
)
DELETE FROM sessions d USING doomed WHERE d.session_id = doomed.session_id
RETURNING d.revoked_at IS NOT NULL AS revoked
"""
_COUNT = """
WITH past AS (
    SELECT s.revoked_at IS NOT NULL AS revoked, s.purge_pending AS pending,
           (s.revoked_at IS NOT NULL AND COALESCE(w.confirmed, '') <> ''
            AND (lpad(COALESCE(s.revocation_xid, 0)::text, 20, '0') || ':'
                 || encode(s.token_hash, 'hex')) COLLATE "C" > w.confirmed) AS above
    FROM sessions s LEFT JOIN revocation_watermark w ON true
    WHERE s.expires_at < now() - make_interval(secs => $1)
       OR s.revoked_at < now() - make_interval(secs => $1)
)
SELECT count(*) FILTER (WHERE NOT pending AND NOT above AND NOT revoked) AS expired,
       count(*) FILTER (WHERE NOT pending AND NOT above AND revoked) AS revoked,
       count(*) FILTER (WHERE pending) AS held_pending,
       count(*) FILTER (WHERE NOT pending AND above) AS held_watermark
FROM past
"""

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``3600s`` or plain seconds. Raises ValueError."""
    value = text.strip().lower()
    unit = _UNITS.get(value[-1:])
    number = value[:-1] if unit is not None else value
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (e.g. 30d, 12h, 90m, 3600)") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"not a duration: {text!r} (e.g. 30d, 12h, 90m, 3600)")
    return seconds


def check_retention(retention: float, policy: CorePolicy) -> None:
    """Refuse a window that reaches into the revocations a replay still re-applies."""
    floor = policy.replay_window
    if retention < floor:
        raise ValueError(
            f"--retention {retention:g}s is shorter than the revocation replay window "
            f"({floor:g}s: CACHE_TTL_SECONDS + 5 s + REVOCATION_SKEW_SECONDS); "
            "a deleted revocation would not be replayed into a Redis that lost it"
        )


@dataclass(frozen=True, slots=True)
class GcReport:
    """What a run deleted (``dry_run``: what it would delete), and what it kept back."""

    retention_seconds: float
    dry_run: bool
    deleted: int
    expired: int
    revoked: int
    batches: int
    held_pending: int
    held_watermark: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (
            f"{verb} {self.deleted} sessions ended more than {self.retention_seconds:g}s ago "
            f"({self.expired} expired, {self.revoked} revoked) in {self.batches} batches; "
            f"kept {self.held_pending} with a pending revocation and {self.held_watermark} "
            "above the confirmed revocation watermark"
        )


async def collect_garbage(
    conn: asyncpg.Connection,
    *,
    retention: float,
    batch_size: int,
    dry_run: bool = False,
    after_batch: Callable[[int], Awaitable[None]] | None = None,
) -> GcReport:
    """Delete (or with ``dry_run`` count) what ended more than ``retention`` seconds ago, in
    batches of ``batch_size``, until a batch comes back short. ``after_batch(deleted)`` is
    awaited after each batch (the tests' gate; a pause between batches)."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if dry_run:
        row = await conn.fetchrow(_COUNT, retention)
        assert row is not None
        expired, revoked = int(row["expired"]), int(row["revoked"])
        total = expired + revoked
        batches = -(-total // batch_size)
        return GcReport(retention, True, total, expired, revoked, batches, *_held(row))
    expired = revoked = batches = 0
    while True:
        rows = await conn.fetch(_DELETE_BATCH, retention, batch_size)
        if rows:
            batches += 1
            gone = sum(1 for r in rows if r["revoked"])
            revoked, expired = revoked + gone, expired + len(rows) - gone
            if after_batch is not None:
                await after_batch(len(rows))
        if len(rows) < batch_size:
            break
    row = await conn.fetchrow(_COUNT, retention)
    assert row is not None
    return GcReport(retention, False, expired + revoked, expired, revoked, batches, *_held(row))


def _held(row: Any) -> tuple[int, int]:
    return int(row["held_pending"]), int(row["held_watermark"])
