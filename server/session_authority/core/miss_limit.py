"""``MissLimiter``: per caller, how many unknown tokens may reach Postgres.

Why: the token checksum answers random strings without a query, and the negative cache
answers a repeated unknown token; but anyone who knows the format can make *new*
well-formed tokens without end, and each new one is a Postgres query. A token bucket per
caller bounds that: a validation that must ask Postgres takes a credit first (so that
concurrent calls cannot overrun it), and gets it back when Postgres knew the token
(live, expired or revoked). Only unknown tokens cost, so a caller presenting real
tokens, however many and however stale, is never limited.

``caller`` is whatever the transport identifies a caller by (the peer address). Idle
callers are forgotten once their bucket is full again, so memory stays bounded.

``MissLimit`` is what the core asks of a limiter. ``MissLimiter`` is the one-process
default; ``serve --workers N`` hands its workers one table shared by all of them
(``session_authority.shared_limit``), so that a caller whose connections the kernel
spreads over N workers still gets one budget, not N.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["MissLimit", "MissLimiter"]


class MissLimit(Protocol):
    """A token bucket per caller: ``take`` a credit before a Postgres lookup
    (False: none left), ``refund`` it when Postgres knew the token (or could not
    be asked), ``limited``: whether ``take`` would refuse now (takes nothing)."""

    def take(self, caller: str) -> bool: ...

    def refund(self, caller: str) -> None: ...

    def limited(self, caller: str) -> bool: ...


@dataclass(slots=True)
class _Bucket:
    credit: float
    at: float


class MissLimiter:
    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_callers: int = 10_000,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_callers = max_callers
        self._buckets: dict[str, _Bucket] = {}

    def take(self, caller: str) -> bool:
        """Take a credit for a Postgres lookup by ``caller``; False when it has none."""
        now = self._clock()
        bucket = self._buckets.get(caller)
        if bucket is None:
            if len(self._buckets) >= self._max_callers:
                self._forget_idle(now)
            bucket = self._buckets[caller] = _Bucket(float(self.burst), now)
        else:
            bucket.credit = min(self.burst, bucket.credit + (now - bucket.at) * self.rate)
            bucket.at = now
        if bucket.credit < 1:
            return False
        bucket.credit -= 1
        return True

    def refund(self, caller: str) -> None:
        """Give back a credit: the lookup found the token (or could not be made)."""
        bucket = self._buckets.get(caller)
        if bucket is not None:
            bucket.credit = min(self.burst, bucket.credit + 1)

    def limited(self, caller: str) -> bool:
        """Whether ``caller`` would be refused now (no credit taken)."""
        bucket = self._buckets.get(caller)
        if bucket is None:
            return False
        return bucket.credit + (self._clock() - bucket.at) * self.rate < 1

    def _forget_idle(self, now: float) -> None:
        full = [
            caller
            for caller, b in self._buckets.items()
            if b.credit + (now - b.at) * self.rate >= self.burst
        ]
        for caller in full:
            del self._buckets[caller]
        if len(self._buckets) >= self._max_callers:
            # Everyone is busy: drop the longest idle rather than grow without bound.
            oldest = min(self._buckets, key=lambda c: self._buckets[c].at)
            del self._buckets[oldest]
