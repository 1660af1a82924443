"""``RevocationWatch`` on an in-memory record: cursors, the horizon rule, and
watchers served from the ring or from the record alike."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from session_authority.core.errors import CursorExpired, InvalidArgument
from session_authority.core.watch import (
    MAX_SEQ,
    Cursor,
    EventPage,
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
