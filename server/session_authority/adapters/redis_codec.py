"""The Redis hash layout of a cache entry (see ``redis_cache``): encode and decode."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from session_authority.core.domain import Reason, Session, TokenHash
from session_authority.core.ports import CachedVerdict, CacheEntry

__all__ = ["decode_entry", "encode_entry", "epoch_us"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_us(value: datetime) -> str:
    """Epoch microseconds: exact, so cache and database answers are identical."""
    return str((value - _EPOCH) // timedelta(microseconds=1))


def _from_us(value: str) -> datetime:
    return _EPOCH + timedelta(microseconds=int(value))


def encode_entry(token_hash: TokenHash, entry: CacheEntry) -> list[str]:
    if isinstance(entry, CachedVerdict):
        return ["state", entry.reason.value, "token_hash", token_hash.hex]
    return [
        "state",
        "live",
        "token_hash",
        token_hash.hex,
        "session_id",
        entry.session_id,
        "user_id",
        entry.user_id,
        "created_at",
        epoch_us(entry.created_at),
        "expires_at",
        epoch_us(entry.expires_at),
        "metadata",
        json.dumps(dict(entry.metadata), separators=(",", ":")),
    ]


def decode_entry(token_hash: TokenHash, fields: dict[str, str]) -> CacheEntry:
    state = fields["state"]
    if state != "live":
        return CachedVerdict(Reason(state))
    metadata = json.loads(fields["metadata"])
    if not isinstance(metadata, dict):
        raise ValueError("metadata is not an object")
    return Session(
        session_id=fields["session_id"],
        user_id=fields["user_id"],
        token_hash=token_hash,
        created_at=_from_us(fields["created_at"]),
        expires_at=_from_us(fields["expires_at"]),
        metadata={str(k): str(v) for k, v in metadata.items()},
    )
