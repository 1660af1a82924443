"""The Redis hash layout of a cache entry (see ``redis_cache``): encode, check, decode.

Under the key ``session:<base64url SHA-256>`` (``redis_cache.cache_key``)::

    live session:   h <first 16 hex of the token hash>  i <session id: 22 base64url>
                    u <user id>  c <created_at>  e <expires_at>  [m <metadata JSON, if any>]
                    [a <filled at>]
    anything else:  state <revoked|unknown|expired|created>  h <first 16 hex>  [a <filled at>]

``a`` (epoch milliseconds modulo 2**31, by the filling process's clock) is written by fills
only; it tells a reader the entry's age (``Cached.age``). Entries without it
(tombstones and creation markers, written by revocations and creations, and
entries filled by an older release) have no known age.

A live session has no ``state`` field: its absence is what says "live" (the
scripts test ``state == 'revoked'`` and key existence, nothing else). Times are
epoch microseconds, which Redis stores as 8-byte integers: exact, so cache and
database answers are identical. ``h`` is the integrity check (64 bits tell a
copied, hand-written or foreign entry from ours).

The previous release's keys, ``session:<64 hex>``, hold the *full* layout
(``state``, ``token_hash`` with all 64 hex, and for live entries
``session_id``, ``user_id``, ``created_at``, ``expires_at``, ``metadata``). This
release still writes tombstones and creation markers there (the scripts in
``redis_cache``), and honours the tombstones found there, while
``CACHE_LEGACY_KEYS`` is on: hence the full-layout check in ``state_of``.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta

from session_authority.core.domain import Reason, Session, TokenHash
from session_authority.core.ports import CachedVerdict, CacheEntry

__all__ = [
    "CHECK_HEX",
    "IntegrityError",
    "age_of",
    "decode_entry",
    "encode_entry",
    "epoch_us",
    "state_of",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Hex digits of the token hash kept in an entry for the integrity check.
CHECK_HEX = 16
#: ``state_of``'s answer for a live session (which has no ``state`` field).
LIVE = "live"


class IntegrityError(ValueError):
    """The entry names another token hash than its key (copied or foreign)."""


#: ``a`` is the fill's epoch milliseconds modulo 2**31 (about 24.8 days): a
#: 32-bit integer to Redis, 5 bytes an entry instead of 9, which keeps a
#: typical session within 200 B; no entry lives long enough to be ambiguous.
_STAMP_MODULUS = 2**31


def epoch_us(value: datetime) -> str:
    """Epoch microseconds: exact, so cache and database answers are identical."""
    return str((value - _EPOCH) // timedelta(microseconds=1))


def _from_us(value: str) -> datetime:
    return _EPOCH + timedelta(microseconds=int(value))


def _short_id(session_id: str) -> str:
    return base64.urlsafe_b64encode(uuid.UUID(session_id).bytes).decode("ascii").rstrip("=")


def _long_id(short: str) -> str:
    return str(uuid.UUID(bytes=base64.urlsafe_b64decode(short + "==")))


def _check(token_hash: TokenHash) -> str:
    return token_hash.hex[:CHECK_HEX]


def encode_entry(
    token_hash: TokenHash, entry: CacheEntry, filled_at: float | None = None
) -> list[str]:
    """The hash's fields; with ``filled_at`` (epoch seconds) also ``a``."""
    stamp = [] if filled_at is None else ["a", str(int(filled_at * 1000) % _STAMP_MODULUS)]
    if isinstance(entry, CachedVerdict):
        return ["state", entry.reason.value, "h", _check(token_hash), *stamp]
    fields = [
        "h",
        _check(token_hash),
        "i",
        _short_id(entry.session_id),
        "u",
        entry.user_id,
        "c",
        epoch_us(entry.created_at),
        "e",
        epoch_us(entry.expires_at),
    ]
    if entry.metadata:
        fields += ["m", json.dumps(dict(entry.metadata), separators=(",", ":"))]
    return fields + stamp


def age_of(fields: dict[str, str], now: float) -> float | None:
    """Seconds since the entry was filled (``now``: epoch seconds), never
    below zero (another replica's clock may be ahead); None when unknown."""
    stamp = fields.get("a")
    if stamp is None:
        return None
    try:
        elapsed = (int(now * 1000) - int(stamp)) % _STAMP_MODULUS
    except ValueError:
        return None
    # Past half the modulus (12 days, far beyond any entry's TTL): a stamp
    # from a clock ahead of ours.
    return 0.0 if elapsed > _STAMP_MODULUS // 2 else elapsed / 1000


def state_of(token_hash: TokenHash, fields: dict[str, str]) -> str:
    """The entry's state (``LIVE`` for a session) once its integrity check
    passed; raises ``IntegrityError`` for an entry of another token, or of
    nobody's. A full-layout entry (a previous release's tombstone, returned by
    the lookup script) is checked against all 64 hex digits."""
    if "h" in fields:
        if fields["h"] != _check(token_hash):
            raise IntegrityError("entry names another hash")
    elif fields.get("token_hash") != token_hash.hex:
        raise IntegrityError("entry names another hash")
    return fields.get("state", LIVE)


def decode_entry(token_hash: TokenHash, fields: dict[str, str]) -> CacheEntry:
    """An entry whose integrity ``state_of`` has checked."""
    state = fields.get("state", LIVE)
    if state != LIVE:
        return CachedVerdict(Reason(state))
    metadata = json.loads(fields.get("m", "{}"))
    if not isinstance(metadata, dict):
        raise ValueError("metadata is not an object")
    return Session(
        session_id=_long_id(fields["i"]),
        user_id=fields["u"],
        token_hash=token_hash,
        created_at=_from_us(fields["c"]),
        expires_at=_from_us(fields["e"]),
        metadata={str(k): str(v) for k, v in metadata.items()},
    )
