"""The core's tunables, validated once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial

__all__ = ["CorePolicy", "utcnow"]


#: Now, timezone-aware UTC: the core's default clock. A partial, not a
#: function: it is read on every cache hit, and this adds no Python frame.
utcnow: Callable[[], datetime] = partial(datetime.now, UTC)


@dataclass(frozen=True, slots=True)
class CorePolicy:
    cache_ttl: float = 300.0
    """Seconds a live session stays cached (never beyond its own expiry)."""
    negative_ttl: float = 5.0
    """Seconds an unknown/expired verdict stays cached."""
    tombstone_ttl: float = 600.0
    """Seconds a revocation tombstone refuses fills."""
    max_fill_lag: float = 5.0
    """A fill whose Postgres read started longer ago than this is dropped."""
    ttl_jitter: float = 0.1
    """Fraction of ``cache_ttl`` randomly shaved off each fill, so entries
    filled together do not expire together."""
    revocation_skew: float = 60.0
    """Seconds of clock difference allowed between Redis's host and Postgres's
    when replaying revocations (Redis expires entries by its own clock)."""
    early_refresh: float = 3.0
    """XFetch's δ·β in seconds: how early hot entries get refreshed (0: never)."""
    unknown_token_rate: float = 20.0
    """Per caller, unknown tokens per second that may reach Postgres (0: no limit)."""
    unknown_token_burst: int = 200
    """Per caller, how many unknown tokens may reach Postgres at once before the rate applies."""
    default_session_ttl: timedelta = timedelta(hours=24)
    max_session_ttl: timedelta = timedelta(days=30)
    page_token_key: bytes | None = field(default=None, repr=False)
    """Signs ListUserSessions' page tokens (``core/listing.py``); None: the
    secret the store keeps for every replica."""
    touch_interval: float = 60.0
    """Seconds: at most one store write per session per interval (TouchSession)."""
    session_max_lifetime: timedelta = timedelta(days=30)
    """TouchSession never moves a session's expiry past ``created_at`` plus this."""

    @property
    def replay_window(self) -> float:
        """Seconds of revocations (Postgres clock) a replay re-applies to a Redis: an entry
        written before a revocation lives at most ``cache_ttl``, from a read at most
        ``max_fill_lag`` older, judged by a Redis clock up to ``revocation_skew`` off.
        Row retention (``session-authority gc``) never reaches into it."""
        return self.cache_ttl + self.max_fill_lag + self.revocation_skew

    def __post_init__(self) -> None:
        if min(self.cache_ttl, self.negative_ttl, self.max_fill_lag) <= 0:
            raise ValueError("cache TTLs and max_fill_lag must be positive")
        if self.tombstone_ttl <= max(self.cache_ttl, self.max_fill_lag):
            raise ValueError("tombstone_ttl must exceed cache_ttl and max_fill_lag")
        if not 0 <= self.early_refresh < self.cache_ttl:
            # At or beyond the TTL nearly every hit would trigger a reload.
            raise ValueError("early_refresh must be at least 0 and below cache_ttl")
        if not 0 <= self.ttl_jitter < 1:
            raise ValueError("ttl_jitter must be in [0, 1)")
        if self.unknown_token_rate < 0 or self.unknown_token_burst < 1:
            raise ValueError("unknown_token_rate must be at least 0 and the burst at least 1")
        if not timedelta(0) < self.default_session_ttl <= self.max_session_ttl:
            raise ValueError("default_session_ttl must be positive and at most max_session_ttl")
        if self.touch_interval < 0 or self.session_max_lifetime <= timedelta(0):
            raise ValueError("touch_interval must be at least 0, session_max_lifetime positive")
