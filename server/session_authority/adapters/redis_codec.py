"""The Redis hash layout of a cache entry (see ``redis_cache``): encode, check, decode.

Two layouts, told apart by their fields; both are read, so replicas of the
previous release and of this one can share a Redis during a rolling upgrade:

* **compact** (written for live sessions since layout 2)::

      state live  h <first 16 hex of the token hash>  i <session id: 22 base64url>
      u <user id>  c <created_at>  e <expires_at>  [m <metadata JSON, when not empty>]

  Times are epoch microseconds, which Redis stores as 8-byte integers: exact,
  so cache and database answers are identical. ``h`` is the integrity check
  (the key names the whole hash; 64 bits tell a copied, hand-written or
  foreign entry from ours).
* **full** (layout 1; still written for tombstones, verdicts and creation
  markers, which are few)::

      state <live|revoked|unknown|expired|created>  token_hash <64 hex>
      [session_id, user_id, created_at, expires_at, metadata: live entries of layout 1]

``state`` stays in every entry under the same name and values: every release's
Lua scripts decide on it (``state == 'revoked'`` refuses a fill over a
tombstone), so a tombstone written by any release stops a fill by any other.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta

from session_authority.core.domain import Reason, Session, TokenHash
from session_authority.core.ports import CachedVerdict, CacheEntry

__all__ = ["IntegrityError", "decode_entry", "encode_entry", "epoch_us", "state_of"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Hex digits of the token hash kept in a compact entry for the integrity check.
CHECK_HEX = 16


class IntegrityError(ValueError):
    """The entry names another token hash than its key (copied or foreign)."""


def epoch_us(value: datetime) -> str:
    """Epoch microseconds: exact, so cache and database answers are identical."""
    return str((value - _EPOCH) // timedelta(microseconds=1))


def _from_us(value: str) -> datetime:
    return _EPOCH + timedelta(microseconds=int(value))


def _short_id(session_id: str) -> str:
    return base64.urlsafe_b64encode(uuid.UUID(session_id).bytes).decode("ascii").rstrip("=")


def _long_id(short: str) -> str:
    raw = base64.urlsafe_b64decode(short + "==")
    return str(uuid.UUID(bytes=raw))


def encode_entry(token_hash: TokenHash, entry: CacheEntry) -> list[str]:
    if isinstance(entry, CachedVerdict):
        return ["state", entry.reason.value, "token_hash", token_hash.hex]
    fields = [
        "state",
        "live",
        "h",
        token_hash.hex[:CHECK_HEX],
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
    return fields


def state_of(token_hash: TokenHash, fields: dict[str, str]) -> str:
    """The entry's ``state`` once its integrity check passed (either layout);
    raises ``IntegrityError`` for an entry of another token, or of nobody's."""
    if "h" in fields:
        if fields["h"] != token_hash.hex[:CHECK_HEX]:
            raise IntegrityError("compact entry names another hash")
    elif fields.get("token_hash") != token_hash.hex:
        raise IntegrityError("entry names another hash")
    return fields.get("state", "")


def decode_entry(token_hash: TokenHash, fields: dict[str, str]) -> CacheEntry:
    """An entry whose integrity ``state_of`` has checked."""
    state = fields["state"]
    if state != "live":
        return CachedVerdict(Reason(state))
    if "h" in fields:
        raw_metadata = fields.get("m", "{}")
        session_id = _long_id(fields["i"])
        user_id, created, expires = fields["u"], fields["c"], fields["e"]
    else:
        raw_metadata = fields["metadata"]
        session_id, user_id = fields["session_id"], fields["user_id"]
        created, expires = fields["created_at"], fields["expires_at"]
    metadata = json.loads(raw_metadata)
    if not isinstance(metadata, dict):
        raise ValueError("metadata is not an object")
    return Session(
        session_id=session_id,
        user_id=user_id,
        token_hash=token_hash,
        created_at=_from_us(created),
        expires_at=_from_us(expires),
        metadata={str(k): str(v) for k, v in metadata.items()},
    )
