"""``RevocationWatch`` on an in-memory record: cursors, the horizon rule, and
watchers served from the ring or from the record alike."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from session_authority.core.errors import CursorExpired, InvalidArgument, StoreUnavailable
from session_authority.core.watch import (
    MAX_SEQ,
    Cursor,
    EventPage,
    Heartbeat,
    RevocationEvent,
    RevocationWatch,
    Start,
    format_cursor,
    parse_cursor,
)

_NOW = datetime(2026, 12, 7, tzinfo=UTC)


class InMemoryRevocationLog:
    """Committed events and the oldest running transaction (``xmin``)."""

    def __init__(self) -> None:
        self.events: list[RevocationEvent] = []
        self.xmin = 10
        self.floor: Cursor = (0, 0)
        self.reads = 0

    def commit(self, xid: int, seq: int, session_id: str) -> None:
        self.events.append(RevocationEvent((xid, seq), session_id, "u", "explicit", _NOW))

    async def revocation_events_after(self, after: Cursor | None, limit: int) -> EventPage:
        self.reads += 1
        final = sorted((e for e in self.events if e.cursor[0] < self.xmin), key=lambda e: e.cursor)
        found = [] if after is None else [e for e in final if e.cursor > after][:limit]
        return EventPage(
            events=found,
            horizon=(self.xmin - 1, MAX_SEQ),
            floor=self.floor,
            xmax=self.xmin + 100,
            pending=any(e.cursor[0] >= self.xmin for e in self.events),
        )

    async def prune_revocation_events(self, older_than: float, limit: int) -> int:
        return 0


def test_cursors_round_trip_and_order_as_strings() -> None:
    cursors = [(5, 9), (5, 10), (6, 1), (12, MAX_SEQ)]
    texts = [format_cursor(c) for c in cursors]
    assert [parse_cursor(t) for t in texts] == cursors
    assert sorted(texts) == texts
    for bad in ("", "1-2", "x" * 41, f"{2**64:020d}-{0:020d}", format_cursor((1, 2)) + " "):
        with pytest.raises(InvalidArgument) as refused:
            parse_cursor(bad)
        assert refused.value.field == "after"


async def _collect(watch: RevocationWatch, after: str, count: int) -> list[Start | RevocationEvent]:
    items: list[Start | RevocationEvent] = []
    async with asyncio.timeout(5):
        async for item in watch.watch(after):
            assert not isinstance(item, Heartbeat)  # not asked for
            items.append(item)
            if len(items) == count + 1:
                break
    return items


@pytest.mark.asyncio
async def test_a_later_transaction_committing_first_waits_for_the_horizon() -> None:
    log = InMemoryRevocationLog()
    watch = RevocationWatch(log, poll=0.01, page=2, ring=4)
    reader = asyncio.create_task(watch.run())
    try:
        first = asyncio.create_task(_collect(watch, "", 6))
        await asyncio.sleep(0.05)
        log.commit(11, 2, "b")  # T(11) took seq 2 and committed; T(10) (seq 1) is running
        await asyncio.sleep(0.05)
        log.commit(10, 1, "a")
        log.xmin = 12
        for i in range(4):
            log.commit(12 + i, 3 + i, f"c{i}")
        log.xmin = 20
        watch.wake()
        items = await first
        ids = [i.session_id for i in items if isinstance(i, RevocationEvent)]
        assert ids == ["a", "b", "c0", "c1", "c2", "c3"]
        # Resumed after "b": from the record (behind the ring, page of 2) or the ring, the same.
        after_b = format_cursor(items[2].cursor)
        again = await _collect(watch, after_b, 4)
        assert isinstance(again[0], Start) and format_cursor(again[0].cursor) == after_b
        assert [i.session_id for i in again[1:] if isinstance(i, RevocationEvent)] == [
            "c0",
            "c1",
            "c2",
            "c3",
        ]
    finally:
        watch.close()
        reader.cancel()


@pytest.mark.asyncio
async def test_a_cursor_below_the_floor_is_refused() -> None:
    log = InMemoryRevocationLog()
    log.floor = (9, 5)
    watch = RevocationWatch(log, poll=0.01)
    with pytest.raises(CursorExpired):
        await _collect(watch, format_cursor((9, 4)), 1)
    with pytest.raises(CursorExpired):  # ahead of this database
        await _collect(watch, format_cursor((10_000, 0)), 1)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def _next_item(items: AsyncIterator[Start | RevocationEvent | Heartbeat]) -> object:
    async with asyncio.timeout(5):
        return await anext(items)


@pytest.mark.asyncio
async def test_heartbeats_claim_only_what_the_reader_covered() -> None:
    log = InMemoryRevocationLog()
    clock = _Clock()
    watch = RevocationWatch(log, poll=0.01, heartbeat=0.25, monotonic=clock)
    reader = asyncio.create_task(watch.run())
    items = watch.watch("", heartbeats=True)
    try:
        start = await _next_item(items)
        assert isinstance(start, Start) and start.heartbeat == 0.25
        # Caught up and nothing pending: covered as of the reader's last read.
        first = await _next_item(items)
        assert isinstance(first, Heartbeat) and first.covered == 0.0  # the clock stood still
        # A transaction (xid 10) holds the horizon while a later one (11) committed:
        # the reader is behind, so nothing new is covered and no heartbeat goes out.
        log.commit(11, 1, "b")
        clock.now += 1.0
        behind = asyncio.create_task(_next_item(items))
        await asyncio.sleep(0.2)  # ~20 reads of the record meanwhile
        assert not behind.done() and log.reads > 5
        covered_before = watch.covered
        # It ends: the event first, then a heartbeat covering the reads since it was held.
        log.xmin = 12
        clock.now += 1.0
        watch.wake()
        event = await behind
        assert isinstance(event, RevocationEvent) and event.session_id == "b"
        beat = await _next_item(items)
        assert isinstance(beat, Heartbeat) and beat.cursor >= event.cursor
        # Covered up to the first read after the transaction ended (2 s after the watch began).
        assert covered_before == 100.0 and beat.covered == 2.0
    finally:
        watch.close()
        reader.cancel()


@pytest.mark.asyncio
async def test_a_pending_page_covers_reads_its_horizon_passed() -> None:
    """Reads whose xmax the horizon passed are covered even while later events wait."""
    log = InMemoryRevocationLog()
    clock = _Clock()
    watch = RevocationWatch(log, heartbeat=0.25, monotonic=clock)
    page = await log.revocation_events_after(None, 10)  # xmin 10, xmax 110, nothing pending
    watch._advance(page, began=1.0)
    assert watch.covered == 1.0
    log.commit(200, 1, "late")  # committed above the horizon: pending from now on
    log.xmin = 150
    page = await log.revocation_events_after((9, MAX_SEQ), 10)
    assert page.pending
    watch._advance(page, began=2.0)  # its xmax (250) is above its own horizon (149)
    assert watch.covered == 1.0
    log.xmin = 251
    page = await log.revocation_events_after((149, MAX_SEQ), 10)
    log.commit(300, 2, "later")
    log.xmin = 260  # this read sees 'later' pending
    page = await log.revocation_events_after(page.horizon, 10)
    assert page.pending
    watch._advance(page, began=3.0)  # horizon 259 passed read 2's xmax (250): 2.0 covered
    assert watch.covered == 2.0


@pytest.mark.asyncio
async def test_no_heartbeat_while_the_record_cannot_be_read() -> None:
    log = InMemoryRevocationLog()
    watch = RevocationWatch(log, poll=0.01, heartbeat=0.02)
    reader = asyncio.create_task(watch.run())
    items = watch.watch("", heartbeats=True)
    try:
        assert isinstance(await _next_item(items), Start)
        assert isinstance(await _next_item(items), Heartbeat)
        assert isinstance(await _next_item(items), Heartbeat)

        async def down(after: Cursor | None, limit: int) -> EventPage:
            raise StoreUnavailable("down")

        log.revocation_events_after = down  # type: ignore[method-assign]
        await asyncio.sleep(0.1)  # a read in flight when it went down may still cover
        silent = asyncio.create_task(_next_item(items))
        await asyncio.sleep(0.3)  # at least 15 intervals
        assert not silent.done()
        del log.revocation_events_after  # up again
        assert isinstance(await silent, Heartbeat)
    finally:
        watch.close()
        reader.cancel()


@pytest.mark.asyncio
async def test_no_heartbeats_unless_asked_for_and_on() -> None:
    log = InMemoryRevocationLog()
    off = RevocationWatch(log, poll=0.01)
    on = RevocationWatch(log, poll=0.01, heartbeat=0.01)
    readers = [asyncio.create_task(w.run()) for w in (off, on)]
    try:
        for watch, asked in ((off, True), (on, False)):
            items = watch.watch("", heartbeats=asked)
            start = await _next_item(items)
            assert isinstance(start, Start) and start.heartbeat is None
            quiet = asyncio.create_task(_next_item(items))
            await asyncio.sleep(0.1)
            assert not quiet.done()
            quiet.cancel()
    finally:
        for watch in (off, on):
            watch.close()
        for reader in readers:
            reader.cancel()
