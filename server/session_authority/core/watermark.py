"""Revocation watermarks: how far a Redis is known to hold revocations.

Every revocation has a *mark*: the id of the Postgres transaction that made it
(``revocation_xid``, set by a trigger, so by Postgres for every writer) and its
token hash, written ``"<xid, 20 digits>:<64 hex>"``, so that marks order as
strings, byte by byte, the same way in Python, in Redis's script and in
Postgres (``COLLATE "C"``). Revocations made before marks existed read as
transaction 0: older than every watermark.

A Redis holding the watermark ``w`` holds the tombstone of every revocation
with a mark ``<= w`` (or of a revocation old enough for the cache entries it
refused to have expired). Only a *seal* raises it, in the same Lua script that
writes the tombstones it covers (so no snapshot, reload, swap or replica can
hold the watermark without them), and only if Redis still holds at least the
*floor* its caller knows it held. Postgres then records the highest
watermark confirmed (``revocation_watermark.confirmed``). A Redis holding less
than Postgres confirmed has gone back in time.

The *horizon* is the highest mark that can be sealed now: every transaction
older than Postgres's snapshot ``xmin`` has ended, so no revocation with a
lower mark can still appear; a later one may.
"""

from __future__ import annotations

from dataclasses import dataclass

from session_authority.core.domain import TokenHash

__all__ = ["NOTHING", "RevocationMarks", "horizon_below", "mark_of", "parse_mark"]

#: The watermark of a Redis that holds none (absent key): below every mark.
NOTHING = ""
#: After every hash in a transaction's marks (``~`` sorts after hex digits).
_ALL = "~"


def mark_of(xid: int, token_hash: TokenHash) -> str:
    return f"{xid:020d}:{token_hash.hex}"


def horizon_below(xmin: int) -> str:
    """The highest mark of every transaction older than ``xmin``."""
    return f"{max(xmin - 1, 0):020d}:{_ALL}"


def parse_mark(mark: str) -> tuple[int, bytes]:
    """``(xid, hash bytes)`` to resume after ``mark``: ``(-1, b"")`` for
    ``NOTHING``; a horizon's hash is above every real hash."""
    if mark == NOTHING:
        return -1, b""
    xid, _, rest = mark.partition(":")
    return int(xid), (b"\xff" * 33 if rest == _ALL else bytes.fromhex(rest))


@dataclass(frozen=True, slots=True)
class RevocationMarks:
    """What Postgres says about the watermark (``SessionStore.revocation_marks``)."""

    #: The highest watermark a replica wrote into Redis and confirmed here.
    confirmed: str
    #: The highest mark that may be sealed now (see the module doc).
    horizon: str
