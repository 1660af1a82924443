"""``RevocationWatch``: every revocation as an event, in one order, exactly once past a cursor.

Invariant: a watcher that resumes after cursor ``c`` receives every revocation
event after ``c`` in cursor order, none at or before it, or is told that it
cannot (``CursorExpired``) and must drop what it cached.

How. Postgres writes an event for every revocation, by trigger, in the
revoking transaction (migration ``0006``), numbered ``seq`` and stamped with
the transaction's id ``xid``. The stream's order is ``(xid, seq)``, and a read
returns only events whose ``xid`` lies below its snapshot's ``xmin`` (the
*horizon*): every transaction older than that has ended, so the set of events
below the horizon never grows again, however transactions commit (the
revocation watermark's rule, ``watermark.py``). A cursor is a position in
that order: an event's ``(xid, seq)``, or a horizon ``(h - 1, MAX_SEQ)``
after every event of the transactions below ``h``. Reading "after ``c``"
from any replica, at any time, returns the same events in the same order.

One reader per process (``run``) follows the record, woken by Postgres's
NOTIFY (``wake``; delivered at commit) and by a timer (``poll``), and keeps
the most recent events in memory (the *ring*). Each watcher pulls from the
ring from its own cursor; one that is behind the ring reads the record
itself, a page at a time. So a watcher holds at most one page of events,
whatever its pace: nothing is buffered for it without bound (the transport
cuts off one that stops reading: ``WATCH_STALL_TIMEOUT_MS``).

Retention: events older than ``retention`` seconds (Postgres's clock) are
pruned in batches; the highest pruned position (the *floor*) is kept, and a
cursor below it is refused with ``CursorExpired``. So is a cursor from
another database (its transaction id is not assigned here yet).

Heartbeats (a watcher that asks for them). The reader knows up to when it is
*current*: every revocation committed before a moment ``covered`` (this
process's monotonic clock) is at or before its cursor. A transaction that
committed before a read began has an ``xid`` below that read's ``xmax``; so a
read at ``t`` is covered once a later short page's horizon passes its ``xmax``
(every such transaction has ended and its events were read), and at once when
its page had nothing pending (nothing committed waits above the horizon). A
watcher that has sent everything up to the reader's cursor sends a
``Heartbeat`` whenever ``covered`` moved on, at most every ``heartbeat``
seconds, carrying ``covered`` as an offset from when the watch began: the
client adds it to when it sent the call, which places the point in its own
clock no later than it was, however late the heartbeat arrives. While the
reader cannot read, or waits behind a transaction held open, ``covered`` stands
still and no heartbeat is sent: a client sees silence, never a false claim.
While heartbeats are on and someone watches, the reader reads at least every
``heartbeat`` seconds (otherwise every ``poll``).

Expiry is not an event (``REVOCATION_REASON_EXPIRED`` is reserved): every
validated session carries its ``expires_at``, which a holder judges itself;
writing an event per expiry would cost a write per session.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from session_authority.core.errors import CursorExpired, InvalidArgument, Unavailable

__all__ = [
    "MAX_SEQ",
    "Cursor",
    "EventPage",
    "Heartbeat",
    "RevocationEvent",
    "RevocationLog",
    "RevocationWatch",
    "Start",
    "format_cursor",
    "parse_cursor",
]

_log = logging.getLogger("session_authority.watch")

#: A position in the stream: ``(xid, seq)``.
Cursor = tuple[int, int]
#: The largest ``seq`` (bigint): a horizon cursor is after every event of its transaction.
MAX_SEQ = 2**63 - 1
_CURSOR = re.compile(r"([0-9]{20})-([0-9]{20})")


def format_cursor(cursor: Cursor) -> str:
    """Twenty digits each: cursors compare as byte strings in stream order."""
    return f"{cursor[0]:020d}-{cursor[1]:020d}"


def parse_cursor(text: str) -> Cursor:
    """Raises ``InvalidArgument`` naming ``after`` (never echoing it)."""
    match = _CURSOR.fullmatch(text)
    if match is None:
        raise InvalidArgument(
            "after", "not a cursor from WatchRevocations (leave empty to start now)"
        )
    xid, seq = int(match[1]), int(match[2])
    if xid > MAX_SEQ or seq > MAX_SEQ:
        raise InvalidArgument("after", "not a cursor from WatchRevocations")
    return xid, seq


@dataclass(frozen=True, slots=True)
class RevocationEvent:
    """One revocation. Never a token or its hash."""

    cursor: Cursor
    session_id: str
    user_id: str
    #: ``explicit``, ``user_wide`` or ``admin`` (see the proto's ``RevocationReason``).
    reason: str
    revoked_at: datetime

    @property
    def sequence(self) -> int:
        return self.cursor[1]


@dataclass(frozen=True, slots=True)
class Start:
    """The first item of every watch: the cursor it starts after, and how often
    heartbeats come (None: none were asked for, or they are off)."""

    cursor: Cursor
    heartbeat: float | None = None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Every revocation committed before ``covered`` seconds after the watch
    began (negative: before it began; this process's monotonic clock) has been
    sent before this item. ``cursor``: resume after it."""

    cursor: Cursor
    covered: float


@dataclass(frozen=True, slots=True)
class EventPage:
    """One read of the record, all from one snapshot."""

    #: Events after the cursor asked for, below the horizon, in cursor order.
    events: list[RevocationEvent]
    #: ``(xmin - 1, MAX_SEQ)``: every event below it is in the record for good.
    horizon: Cursor
    #: The highest position pruned so far (``(0, 0)``: none).
    floor: Cursor
    #: The snapshot's ``xmax``: no transaction id at or above it has been assigned yet.
    xmax: int
    #: Events above the horizon exist (committed, not yet final): read again soon.
    pending: bool


class RevocationLog(Protocol):
    """The durable record of revocation events (Postgres). Every method raises
    ``StoreUnavailable`` when the store cannot be reached or fails."""

    async def revocation_events_after(self, after: Cursor | None, limit: int) -> EventPage:
        """Up to ``limit`` events after ``after`` (``None``: no events, only the
        page's positions), in cursor order, each below the page's horizon."""

    async def prune_revocation_events(self, older_than: float, limit: int) -> int:
        """Delete up to ``limit`` events recorded more than ``older_than``
        seconds ago (the store's clock), raising the floor to the highest
        position deleted; how many were deleted."""


#: Events read in one page (the ring's reader and a watcher behind the ring).
PAGE = 500
#: Events kept in memory for the watchers that keep up.
RING = 10_000
#: While events above the horizon are pending, read again after this long, doubling.
_PENDING_FIRST, _PENDING_MAX = 0.001, 0.025
_FAILED_FIRST, _FAILED_MAX = 0.05, 1.0
#: Reads remembered until a later horizon covers them (older ones are forgotten
#: first: that only makes ``covered`` later news, never wrong).
_READS = 256


@dataclass(slots=True)
class _Beats:
    """One watcher's heartbeats: the last one's ``covered`` and when it went."""

    covered: float | None = None
    sent: float = float("-inf")


class RevocationWatch:
    """The process's one reader of the record, and its watchers (module doc)."""

    def __init__(
        self,
        log: RevocationLog,
        *,
        poll: float = 1.0,
        retention: float = 86_400.0,
        prune_every: float = 60.0,
        page: int = PAGE,
        ring: int = RING,
        heartbeat: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``heartbeat``: seconds between heartbeats (None: never sent)."""
        self._log = log
        self._poll = poll
        self._heartbeat = heartbeat
        self._retention = retention
        self._prune_every = prune_every
        self._page = page
        self._ring_size = ring
        self._monotonic = monotonic
        self._ring: list[RevocationEvent] = []
        #: Every event in ``(_ring_after, _cursor]`` is in the ring.
        self._ring_after: Cursor | None = None
        self._cursor: Cursor | None = None
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._closed = False
        self.watchers = 0
        self._beating = 0  # watchers that asked for heartbeats
        #: Every revocation committed before this moment is at or before ``_cursor``.
        self.covered: float | None = None
        #: Reads not yet covered: (when it began, its snapshot's xmax).
        self._reads: collections.deque[tuple[float, int]] = collections.deque(maxlen=_READS)

    # --- the reader -----------------------------------------------------------------

    def wake(self) -> None:
        """A revocation committed (NOTIFY), or the listener reconnected: read now."""
        self._wake.set()

    async def run(self) -> None:
        """Follow the record until cancelled or closed."""
        delay = 0.0
        failed, pending = _FAILED_FIRST, _PENDING_FIRST
        while not self._closed:
            if delay:
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            self._wake.clear()
            began = self._monotonic()
            try:
                page = await self._log.revocation_events_after(self._cursor, self._page)
            except Unavailable as exc:
                _log.warning("revocation events not read: %s", exc)
                delay, failed = failed, min(failed * 2, _FAILED_MAX)
                continue
            failed = _FAILED_FIRST
            self._advance(page, began)
            if len(page.events) >= self._page:
                delay, pending = 0.0, _PENDING_FIRST
            elif page.pending:  # committed, waiting for an older transaction to end
                delay, pending = pending, min(pending * 2, _PENDING_MAX)
            else:
                delay, pending = self._idle(), _PENDING_FIRST

    def _idle(self) -> float:
        """How long the reader sleeps with nothing to read (a NOTIFY wakes it)."""
        if self._heartbeat is not None and self._beating:
            return min(self._poll, self._heartbeat)
        return self._poll

    def _advance(self, page: EventPage, began: float) -> None:
        if self._cursor is None:
            self._cursor = self._ring_after = page.horizon
        if page.events:
            self._ring.extend(page.events)
            self._cursor = page.events[-1].cursor
        self._reads.append((began, page.xmax))
        if len(page.events) < self._page:
            self._cursor = max(self._cursor, page.horizon)
            self._cover(page)
        if len(self._ring) > 2 * self._ring_size:
            cut = len(self._ring) - self._ring_size
            self._ring_after = self._ring[cut - 1].cursor
            del self._ring[:cut]
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _cover(self, page: EventPage) -> None:
        """After a short page (every event below its horizon read): which reads
        are now covered (module doc, "Heartbeats")."""
        if not page.pending:  # everything committed before this read is below the horizon
            self.covered = self._reads[-1][0]
            self._reads.clear()
            return
        reads = self._reads
        while reads and reads[0][1] - 1 <= page.horizon[0]:
            self.covered = reads.popleft()[0]

    async def run_pruning(self) -> None:
        """Delete events older than the retention, a bounded batch at a time
        (each its own statement), every ``prune_every`` seconds."""
        while not self._closed:
            await asyncio.sleep(self._prune_every)
            try:
                for _ in range(100):  # at most 100 batches a pass; the next pass goes on
                    if await self._log.prune_revocation_events(self._retention, 10_000) < 10_000:
                        break
            except Unavailable as exc:
                _log.warning("revocation events not pruned: %s", exc)

    def close(self) -> None:
        """End every watcher (``Unavailable``, with its cursor) and the reader."""
        self._closed = True
        self._wake.set()
        self._changed.set()

    # --- a watcher ------------------------------------------------------------------

    async def watch(
        self, after: str, *, heartbeats: bool = False
    ) -> AsyncIterator[Start | RevocationEvent | Heartbeat]:
        """``Start`` with the cursor the stream starts after, then every event
        after it, in order, for ever; with ``heartbeats`` (and heartbeats on),
        ``Heartbeat``s between them. Raises ``InvalidArgument`` (a malformed
        ``after``), ``CursorExpired`` (pruned past it, or another database's),
        ``StoreUnavailable``, and ``Unavailable`` when this process stops."""
        began = self._monotonic()
        beats = _Beats() if heartbeats and self._heartbeat is not None else None
        position = parse_cursor(after) if after else None
        self._check_open(position)
        first = await self._log.revocation_events_after(position, self._page)
        _check(position, first)
        events = [] if position is None else first.events
        start = first.horizon if position is None else position
        # A short page holds every event after ``start`` below the horizon.
        full = len(events) >= self._page
        position = events[-1].cursor if full else max(start, first.horizon)
        self.watchers += 1
        if beats is not None:
            self._beating += 1
            self._wake.set()  # read now: the reader may be sleeping its longer ``poll``
        try:
            yield Start(start, None if beats is None else self._heartbeat)
            for event in events:
                yield event
            while True:
                self._check_open(position)
                found = await self._next(position, beats)
                if isinstance(found, Heartbeat):
                    yield Heartbeat(found.cursor, found.covered - began)
                    position = found.cursor
                    continue
                for event in found:
                    yield event
                    position = event.cursor
        finally:
            self.watchers -= 1
            if beats is not None:
                self._beating -= 1

    async def _next(
        self, position: Cursor, beats: _Beats | None
    ) -> list[RevocationEvent] | Heartbeat:
        """The next events after ``position`` (waits until there are some), or
        a heartbeat (``covered`` by the monotonic clock) when one is due."""
        while True:
            ring_after, cursor = self._ring_after, self._cursor
            if ring_after is not None and cursor is not None and position >= ring_after:
                if position < cursor:
                    start = bisect.bisect_right(self._ring, position, key=_cursor_of)
                    batch = self._ring[start : start + self._page]
                    if batch:
                        return batch
                # Everything up to the reader's cursor is sent.
                changed = self._changed
                wait = None if beats is None else self._beat_due(beats)
                if isinstance(wait, Heartbeat):
                    return Heartbeat(max(position, cursor), wait.covered)
                try:
                    async with asyncio.timeout(wait):
                        await changed.wait()
                except TimeoutError:
                    pass
                self._check_open(position)
                continue
            # Behind the ring (or the reader has not read yet): read the record.
            page = await self._log.revocation_events_after(position, self._page)
            _check(position, page)
            if page.events:
                return page.events
            if page.horizon > position:
                position = page.horizon  # nothing before the horizon: wait from there
            changed = self._changed
            if self._cursor is None or position > self._cursor:
                # Ahead of the reader: wait for it (or poll, should it be failing).
                try:
                    async with asyncio.timeout(self._poll):
                        await changed.wait()
                except TimeoutError:
                    pass
                self._check_open(position)

    def _beat_due(self, beats: _Beats) -> Heartbeat | float | None:
        """A heartbeat to send now (its cursor filled in by the caller), or how
        long until one is due (None: not until the reader is covered further)."""
        covered = self.covered
        if covered is None or (beats.covered is not None and covered <= beats.covered):
            return None
        assert self._heartbeat is not None
        now = self._monotonic()
        if now < beats.sent + self._heartbeat:
            return beats.sent + self._heartbeat - now
        beats.covered, beats.sent = covered, now
        return Heartbeat((0, 0), covered)

    def _check_open(self, position: Cursor | None) -> None:
        if self._closed:
            where = "" if position is None else f"; resume after {format_cursor(position)}"
            raise Unavailable(f"server is shutting down{where} on another replica")


def _check(position: Cursor | None, page: EventPage) -> None:
    if position is None:
        return
    if position < page.floor:
        raise CursorExpired(
            "after: events after this cursor were pruned (older than the retention): "
            "drop every cached answer and watch again from now (empty after)"
        )
    if position[0] >= page.xmax:
        raise CursorExpired(
            "after: this cursor is ahead of this database (restored from a backup, or another "
            "database): drop every cached answer and watch again from now (empty after)"
        )


def _cursor_of(event: RevocationEvent) -> Cursor:
    return event.cursor
