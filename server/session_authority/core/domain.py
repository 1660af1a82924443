"""Domain values: sessions, tokens, verdicts. Pure values, no I/O."""

from __future__ import annotations

import base64
import binascii
import enum
import re
import secrets
import unicodedata
import uuid
import zlib
from collections.abc import Mapping, Sized
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from session_authority.core.errors import InvalidArgument

try:  # CPython's own SHA-256: no OpenSSL context per call (3.2 -> 1.2 us a hit in the server)
    from _sha2 import sha256  # type: ignore[import-not-found]  # 3.12+
except ImportError:
    try:
        from _sha256 import sha256  # type: ignore[import-not-found]  # 3.11
    except ImportError:
        from hashlib import sha256

__all__ = [
    "MAX_BATCH_TOKENS",
    "MAX_TOKEN_LENGTH",
    "Position",
    "Reason",
    "Revocation",
    "Session",
    "SessionSummary",
    "Source",
    "TokenHash",
    "Validation",
    "check_batch",
    "check_metadata",
    "check_session_id",
    "check_ttl",
    "check_user_id",
    "is_well_formed",
    "new_token",
    "parse_token",
    "sha256",
]

#: Bytes of entropy in a token (256 bits).
TOKEN_BYTES = 32
#: Tokens look like ``sat_<48 URL-safe base64 chars>``: 32 random bytes and a
#: CRC-32 of them. The prefix lets secret scanners find leaked tokens; the
#: checksum lets a random or mistyped token be answered "unknown" without
#: asking Redis or Postgres (a flood of random tokens costs no queries). The
#: checksum is not a secret and proves nothing about validity.
TOKEN_PREFIX = "sat_"
#: Longest token accepted on input. Ours are 52 characters; the bound only
#: keeps hostile input cheap.
MAX_TOKEN_LENGTH = 512
#: Most tokens one ValidateSessions call may carry (more is INVALID_ARGUMENT):
#: the work of one call stays bounded, and one call is one Redis round trip and
#: one Postgres query of at most this many keys.
MAX_BATCH_TOKENS = 100
MAX_USER_ID_LENGTH = 256
MAX_METADATA_ENTRIES = 32
MAX_METADATA_KEY_BYTES = 64
MAX_METADATA_VALUE_BYTES = 1024

_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")


def new_token() -> str:
    """A fresh opaque bearer token: 256 bits from ``secrets``, URL-safe."""
    raw = secrets.token_bytes(TOKEN_BYTES)
    body = raw + zlib.crc32(raw).to_bytes(4, "big")
    return TOKEN_PREFIX + base64.urlsafe_b64encode(body).decode("ascii")


def is_well_formed(token: str) -> bool:
    """Whether ``token`` has the shape and checksum of a token we issue."""
    if not token.startswith(TOKEN_PREFIX) or len(token) != len(TOKEN_PREFIX) + 48:
        return False
    try:
        body = base64.urlsafe_b64decode(token[len(TOKEN_PREFIX) :])
    except (binascii.Error, ValueError):
        return False
    raw, check = body[:TOKEN_BYTES], body[TOKEN_BYTES:]
    return len(check) == 4 and zlib.crc32(raw).to_bytes(4, "big") == check


@dataclass(frozen=True, slots=True)
class TokenHash:
    """SHA-256 of a token, hex encoded: the only form in which a token is kept."""

    hex: str

    @classmethod
    def of(cls, token: str) -> TokenHash:
        return cls(sha256(token.encode("ascii")).hexdigest())

    @property
    def prefix(self) -> str:
        """First 8 hex digits: enough to correlate logs, useless to an attacker."""
        return self.hex[:8]

    def __repr__(self) -> str:
        return f"TokenHash({self.prefix}…)"

    __str__ = __repr__


class Reason(enum.Enum):
    """Why a token does not name a live session."""

    UNKNOWN = "unknown"
    EXPIRED = "expired"
    REVOKED = "revoked"


class Source(enum.Enum):
    """Which tier answered."""

    CACHE = "cache"
    DATABASE = "database"
    #: The token's shape or checksum ruled it out; no tier was asked.
    TOKEN_FORMAT = "token_format"


@dataclass(frozen=True, slots=True)
class Session:
    session_id: str
    user_id: str
    token_hash: TokenHash
    created_at: datetime
    expires_at: datetime
    metadata: Mapping[str, str] = field(default_factory=dict)
    revoked_at: datetime | None = None
    #: When the session was last touched (TouchSession), by the store's clock;
    #: None when never, or not known (the cache does not keep it).
    last_seen_at: datetime | None = None

    def verdict(self, now: datetime) -> Reason | None:
        """None when the session is live at ``now``; otherwise why not."""
        if self.revoked_at is not None:
            return Reason.REVOKED
        if self.expires_at <= now:
            return Reason.EXPIRED
        return None


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """What a listing shows of a session: never its token or the token's hash
    (there is no field for either)."""

    session_id: str
    user_id: str
    created_at: datetime
    expires_at: datetime
    metadata: Mapping[str, str] = field(default_factory=dict)
    #: When it was last seen (TouchSession); None when not known.
    last_seen_at: datetime | None = None
    revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """A place in a user's sessions, ordered by creation then id (canonical
    lower-case UUID text sorts as Postgres sorts ``uuid``: byte by byte)."""

    created_at: datetime
    session_id: str


@dataclass(frozen=True, slots=True)
class Validation:
    """The answer to "is this token valid?"."""

    valid: bool
    source: Source
    session: Session | None = None
    reason: Reason | None = None
    #: Provenance. How old the cached entry was when this process read it, in
    #: seconds (None: not from a cache, or unknown).
    cache_age: float | None = None
    #: A dependency was down: the Redis lookup failed or its breaker was open,
    #: so Postgres answered.
    degraded: bool = False
    #: This process's L1 copy answered (``source`` is then ``CACHE``).
    local: bool = False

    @classmethod
    def live(
        cls,
        session: Session,
        source: Source,
        *,
        cache_age: float | None = None,
        degraded: bool = False,
        local: bool = False,
    ) -> Validation:
        return cls(True, source, session, None, cache_age, degraded, local)

    @classmethod
    def invalid(
        cls,
        reason: Reason,
        source: Source,
        *,
        cache_age: float | None = None,
        degraded: bool = False,
        local: bool = False,
    ) -> Validation:
        return cls(False, source, None, reason, cache_age, degraded, local)


@dataclass(frozen=True, slots=True)
class Revocation:
    """The outcome of a revocation: how many live sessions it ended, and
    whether the cache purge was confirmed (False: Postgres holds the
    revocation and it is re-applied to Redis when Redis is reachable)."""

    revoked_count: int
    cache_purged: bool
    #: Every process with an L1 cache acknowledged dropping its copies.
    propagated: bool = True


# --- input checks: each raises InvalidArgument naming the field -------------


def parse_token(token: str, field_name: str = "token") -> TokenHash:
    """Check a presented token and return its hash. Never echoes the token."""
    if not token:
        raise InvalidArgument(field_name, "must not be empty")
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidArgument(field_name, f"must be at most {MAX_TOKEN_LENGTH} characters")
    if not _PRINTABLE_ASCII.fullmatch(token):
        raise InvalidArgument(field_name, "must be printable ASCII without spaces")
    return TokenHash.of(token)


def check_batch(tokens: Sized, field_name: str = "tokens") -> None:
    """Refuse a batch longer than ``MAX_BATCH_TOKENS`` (its tokens are checked one by one)."""
    if len(tokens) > MAX_BATCH_TOKENS:
        raise InvalidArgument(field_name, f"must hold at most {MAX_BATCH_TOKENS} tokens")


def check_user_id(user_id: str, field_name: str = "user_id") -> str:
    if not user_id or not user_id.strip():
        raise InvalidArgument(field_name, "must not be empty")
    if len(user_id) > MAX_USER_ID_LENGTH:
        raise InvalidArgument(field_name, f"must be at most {MAX_USER_ID_LENGTH} characters")
    if any(unicodedata.category(c) == "Cc" for c in user_id):  # C0, DEL and C1
        raise InvalidArgument(field_name, "must not contain control characters")
    return user_id


def check_session_id(session_id: str, field_name: str = "session_id") -> str:
    if not session_id:
        raise InvalidArgument(field_name, "must not be empty")
    try:
        return str(uuid.UUID(session_id))
    except ValueError:
        raise InvalidArgument(field_name, "must be a UUID") from None


def check_ttl(
    ttl: timedelta | None, default: timedelta, maximum: timedelta, field_name: str = "ttl"
) -> timedelta:
    """The session lifetime to use: ``default`` when unset, else bounded."""
    if ttl is None:
        return default
    if ttl <= timedelta(0):
        raise InvalidArgument(field_name, "must be positive")
    if ttl > maximum:
        raise InvalidArgument(field_name, f"must be at most {int(maximum.total_seconds())}s")
    return ttl


def check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise InvalidArgument("metadata", f"must have at most {MAX_METADATA_ENTRIES} entries")
    for key, value in metadata.items():
        if not key:
            raise InvalidArgument("metadata", "keys must not be empty")
        if len(key.encode()) > MAX_METADATA_KEY_BYTES:
            raise InvalidArgument(
                "metadata", f"keys must be at most {MAX_METADATA_KEY_BYTES} bytes"
            )
        if len(value.encode()) > MAX_METADATA_VALUE_BYTES:
            raise InvalidArgument(
                "metadata", f"values must be at most {MAX_METADATA_VALUE_BYTES} bytes"
            )
        if "\x00" in key or "\x00" in value:
            raise InvalidArgument("metadata", "must not contain NUL characters")
    return dict(metadata)
