"""The breaker's states, knobs and opening rule (``Breaker`` in breaker.py drives them).

When it opens
-------------
A closed breaker opens on whichever comes first:

1. **a run of failures**: ``consecutive_failures`` calls in a row failed or
   were slow, whatever the window holds. This is what opens it within about
   one ``timeout`` of a dependency dying or freezing under steady load: the
   window alone would not, because the seconds of successes before the outage
   dominate it, and a frozen dependency yields few failures per second (each
   one waits out its timeout);
2. **the runbook's rule**: at least ``volume_threshold`` calls in the rolling
   window, of which ``error_threshold_percentage`` failed (intermittent
   failures mixed with successes).

A failure is the dependency's own error, a call slower than ``timeout``, or a
call cancelled by its caller (the caller's deadline) after running at least
``slow_call`` seconds: without the last, callers whose deadlines are shorter
than ``timeout`` would never trip the breaker of a frozen dependency.

A slow call (timed out, or cancelled after ``slow_call``) counts only if the
dependency answered *no* call while it waited. A frozen or unreachable
dependency answers nothing, so its slow calls all count; but when the process
itself is the bottleneck (both cores saturated, an event loop running late, a
queue for a pooled connection, callers that hang up at the end of a load run)
other calls keep being answered, and those waits say nothing about the
dependency. The same holds for a timeout whose timer fired half a timeout
late (the process itself did not run: a stalled machine, a long pause) and
for a call that waited out the pool for a connection (``CacheBusy``,
``StoreBusy``), and for a Postgres statement past its own timeout
(``StoreTimeout``). The
call still fails for its own caller (a late timeout only after a grace of a
quarter of the timeout: ``breaker.STALL_GRACE``). What this gives up: a
dependency that answers some calls promptly while others hang is not opened
on by slowness (its errors still count), so each hung call costs its caller
one ``timeout``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BreakerPolicy", "BreakerState", "OpeningRule"]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """The runbook's knobs (opossum's model)."""

    timeout: float = 1.0
    """Per-call timeout in seconds; a slower call counts as a failure."""
    error_threshold_percentage: float = 70.0
    """Open when this percentage of calls in the window failed..."""
    volume_threshold: int = 10
    """...and at least this many calls were made in the window."""
    reset_timeout: float = 15.0
    """Seconds an open breaker waits before letting one probe through."""
    rolling_window: float = 10.0
    buckets: int = 10
    consecutive_failures: int = 5
    """Open after this many failed or slow calls in a row (0: never by this rule)."""
    slow_call: float = 0.1
    """A call cancelled by its caller after running this long counts as a failure."""

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.reset_timeout <= 0 or self.rolling_window <= 0:
            raise ValueError("breaker timeouts and window must be positive")
        if not 0 < self.error_threshold_percentage <= 100:
            raise ValueError("error_threshold_percentage must be in (0, 100]")
        if self.buckets < 1 or self.volume_threshold < 1:
            raise ValueError("buckets and volume_threshold must be at least 1")
        if self.consecutive_failures < 0 or self.slow_call <= 0:
            raise ValueError("consecutive_failures must be >= 0 and slow_call positive")


class OpeningRule:
    """Counts a closed breaker's calls: the rolling window (``buckets`` buckets
    over ``rolling_window`` seconds) and the current run of failures."""

    def __init__(self, policy: BreakerPolicy, clock: Callable[[], float]) -> None:
        self._policy = policy
        self._clock = clock
        self._bucket_len = policy.rolling_window / policy.buckets
        self._window: dict[int, list[int]] = {}  # bucket index -> [calls, failures]
        self._run = 0  # failures in a row, ended by any success

    def reset(self) -> None:
        self._window.clear()
        self._run = 0

    def success(self) -> None:
        self._run = 0
        self._record(failed=False)

    def failure(self, cause: str) -> str | None:
        """Count a failure; the reason to open now, if either rule says so."""
        calls, failures = self._record(failed=True)
        self._run += 1
        limit = self._policy.consecutive_failures
        if limit and self._run >= limit:
            return f"{self._run} calls in a row failed, last: {cause}"
        pct = 100.0 * failures / calls
        policy = self._policy
        if calls >= policy.volume_threshold and pct >= policy.error_threshold_percentage:
            return f"{failures}/{calls} calls failed ({pct:.0f}%), last: {cause}"
        return None

    def _record(self, failed: bool) -> tuple[int, int]:
        now_bucket = int(self._clock() / self._bucket_len)
        oldest = now_bucket - self._policy.buckets + 1
        for stale in [b for b in self._window if b < oldest]:
            del self._window[stale]
        counts = self._window.setdefault(now_bucket, [0, 0])
        counts[0] += 1
        counts[1] += int(failed)
        calls = sum(c[0] for c in self._window.values())
        failures = sum(c[1] for c in self._window.values())
        return calls, failures
