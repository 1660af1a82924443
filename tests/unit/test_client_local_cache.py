"""The client's local cache state (``_local_cache.Copies``) on injected clocks, no I/O: the
races the e2e test cannot order (an answer that was sent before an event and arrives after
it; an answer from before START; a heartbeat that arrives late), the TTL counted from when
the request was sent, the expiry margin, and heartbeats' covered point against
``max_silence``; and the feeds (sync and asyncio) reopening a silent stream on a new channel,
on fake streams (counts, not timings)."""

from __future__ import annotations

import asyncio
import datetime
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from session_authority.client import EventKind, LocalCache, RevocationEvent, Session, Source
from session_authority.client._local_cache import AsyncFeed, Copies, SyncFeed, token_key
from session_authority.client._results import Validation

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
KEY = token_key("sat_" + "A" * 48)


class Clock:
    def __init__(self) -> None:
        self.seconds = 100.0

    def monotonic(self) -> float:
        return self.seconds

    def wall(self) -> float:
        return NOW.timestamp() + self.seconds - 100.0


def _valid(expires_in: float = 3600.0, session_id: str = "s1") -> Validation:
    session = Session(session_id, "u", NOW, NOW + datetime.timedelta(seconds=expires_in))
    return Validation(True, Source.DATABASE, session)


def _copies(clock: Clock, **kw: float | bool) -> Copies:
    return Copies(LocalCache(**kw), clock.monotonic, clock.wall)  # type: ignore[arg-type]


START = RevocationEvent(EventKind.START, "c0")


def test_an_answer_sent_before_an_event_is_not_kept() -> None:
    clock = Clock()
    copies = _copies(clock)
    copies.apply(START)
    begun = copies.begin()  # the validate is sent ...
    copies.apply(RevocationEvent(EventKind.REVOKED, "c1", "s1", "u"))  # ... its session revoked
    copies.put(KEY, _valid(), begun)  # ... and the (now stale) VALID answer arrives
    assert copies.get(KEY) is None and copies.stats().entries == 0


def test_nothing_is_kept_or_answered_before_start_or_while_down() -> None:
    clock = Clock()
    copies = _copies(clock)
    begun = copies.begin()
    copies.put(KEY, _valid(), begun)  # no START yet
    copies.apply(START)
    assert copies.get(KEY) is None
    copies.put(KEY, _valid(), begun)  # begun before START: refused too
    assert copies.get(KEY) is None
    copies.put(KEY, _valid(), copies.begin())
    assert copies.get(KEY) is not None
    assert copies.down() == "c0"  # the cursor to resume after
    assert copies.get(KEY) is None and copies.stats().entries == 0


def test_a_copy_lives_ttl_from_its_request_and_stops_short_of_expiry() -> None:
    clock = Clock()
    copies = _copies(clock, ttl=1.0, expiry_margin=2.0)
    copies.apply(START)
    begun = copies.begin()
    clock.seconds += 0.6  # the call took 0.6 s
    copies.put(KEY, _valid(), begun)
    clock.seconds += 0.3
    assert copies.get(KEY) is not None  # 0.9 s after the request was sent
    clock.seconds += 0.2
    assert copies.get(KEY) is None  # 1.1 s: past the TTL

    copies.put(KEY, _valid(expires_in=10.0), copies.begin())  # expires 10 s after NOW
    clock.seconds = 100.0 + 7.9  # 2.1 s before expiry: answers
    copies.put(KEY, _valid(expires_in=10.0), copies.begin())
    assert copies.get(KEY) is not None
    clock.seconds = 100.0 + 8.1  # within the 2 s margin: not any more
    assert copies.get(KEY) is None


def test_a_revocation_drops_only_its_session_and_invalid_answers_are_never_kept() -> None:
    clock = Clock()
    copies = _copies(clock)
    copies.apply(START)
    other = token_key("sat_" + "B" * 48)
    copies.put(KEY, _valid(session_id="s1"), copies.begin())
    copies.put(other, _valid(session_id="s2"), copies.begin())
    copies.apply(RevocationEvent(EventKind.REVOKED, "c1", "s1", "u"))
    assert copies.get(KEY) is None and copies.get(other) is not None
    copies.put(KEY, Validation(False, Source.DATABASE), copies.begin())
    assert copies.get(KEY) is None


def _beat(covered: float) -> RevocationEvent:
    return RevocationEvent(EventKind.HEARTBEAT, "c-beat", covered=covered)


def _started(clock: Clock, interval: float | None = 0.25, **kw: float | bool) -> Copies:
    copies = _copies(clock, ttl=60.0, **kw)
    copies.opening()  # the call is sent at 100.0
    copies.apply(RevocationEvent(EventKind.START, "c0", heartbeat_interval=interval))
    return copies


def test_with_heartbeats_copies_answer_only_while_the_covered_point_is_recent() -> None:
    clock = Clock()
    copies = _started(clock)
    copies.put(KEY, _valid(), copies.begin())
    assert copies.get(KEY) is None  # START is no heartbeat: nothing covered yet
    assert copies.stats().entries == 1 and not copies.stats().answering
    clock.seconds += 0.1
    copies.apply(_beat(0.05))  # covered: 100.05 by this clock
    assert copies.get(KEY) is not None
    clock.seconds = 100.05 + 0.74  # max_silence: 3 x 0.25 s
    assert copies.get(KEY) is not None
    clock.seconds = 100.05 + 0.76
    assert copies.get(KEY) is None  # silent too long: not answered, still kept
    assert copies.stats().entries == 1 and not copies.stats().answering
    copies.apply(_beat(0.7))  # the stream speaks again
    assert copies.get(KEY) is not None
    stats = copies.stats()
    assert (stats.heartbeats, stats.heartbeat_interval, stats.answering) == (2, 0.25, True)


def test_a_heartbeat_that_arrives_late_vouches_only_for_when_it_was_sent() -> None:
    clock = Clock()
    copies = _started(clock)
    copies.put(KEY, _valid(), copies.begin())
    clock.seconds += 5.0  # held back in the network for 5 s, then delivered
    copies.apply(_beat(0.2))  # covered 100.2 by this clock: 4.8 s ago
    assert copies.get(KEY) is None
    copies.apply(_beat(4.9))  # a later one, fresh
    assert copies.get(KEY) is not None
    copies.apply(_beat(1.0))  # out of date again: never moves the point back
    assert copies.get(KEY) is not None


def test_max_silence_is_the_caller_s_when_given_and_offsets_are_counted_short() -> None:
    clock = Clock()
    copies = _started(clock, max_silence=2.0)
    clock.seconds = 1100.0
    copies.put(KEY, _valid(), copies.begin())
    copies.apply(_beat(1000.0))  # 1000 s into the stream: counted 0.2 s short (200 ppm)
    clock.seconds = 1099.8 + 1.99
    assert copies.get(KEY) is not None  # covered at 1099.8: 1.99 s ago
    clock.seconds = 1099.8 + 2.05
    assert copies.get(KEY) is None  # 2.05 s (uncorrected, it would have been 1.85 s)


def test_a_server_without_heartbeats_falls_back_to_the_ttl_unless_required() -> None:
    clock = Clock()
    old = _started(clock, interval=None)
    old.put(KEY, _valid(), old.begin())
    assert old.get(KEY) is not None  # answers from START on (bounded by ttl alone)
    assert old.stats().heartbeat_interval is None and old.stats().answering
    strict = _started(clock, interval=None, require_heartbeats=True)
    strict.put(KEY, _valid(), strict.begin())
    clock.seconds += 0.1
    strict.apply(_beat(0.05))  # not announced: ignored
    assert strict.get(KEY) is None and not strict.stats().answering


def test_a_revoked_session_s_later_valid_answer_is_never_copied() -> None:
    """A request sent after the event, answered VALID by a replica that had not heard of the
    revocation yet (Invalidate had not returned): not kept."""
    clock = Clock()
    copies = _copies(clock)
    copies.apply(START)
    copies.apply(RevocationEvent(EventKind.REVOKED, "c1", "s1", "u"))
    copies.put(KEY, _valid(session_id="s1"), copies.begin())
    assert copies.get(KEY) is None and copies.stats().entries == 0
    clock.seconds += 61.0  # remembered for a minute
    copies.apply(RevocationEvent(EventKind.REVOKED, "c2", "s9", "u"))  # forgets the old ones
    copies.put(KEY, _valid(session_id="s1"), copies.begin())
    assert copies.stats().entries == 1


def test_a_stream_silent_for_reopen_after_is_due_to_be_reopened_only_with_heartbeats() -> None:
    clock = Clock()
    copies = _copies(clock, ttl=60.0)
    assert copies.silence_left() is None  # no stream yet
    copies.opening()
    assert copies.silence_left() is None  # sent, no START yet
    copies.apply(RevocationEvent(EventKind.START, "c0", heartbeat_interval=0.25))
    assert copies.silence_left() == 2.0  # max(2 x max_silence (0.75 s), 2 s)
    clock.seconds += 1.5
    assert copies.silence_left() == 0.5
    copies.apply(_beat(1.4))  # anything the stream delivers counts
    assert copies.silence_left() == 2.0
    clock.seconds += 2.5
    left = copies.silence_left()
    assert left is not None and left < 0  # silent: due
    copies.silenced()
    copies.down()
    assert copies.silence_left() is None and copies.stats().silent_reopens == 1
    slow = _started(clock, interval=5.0)  # a server that beats every 5 s: max_silence 15 s
    assert slow.silence_left() == 30.0
    assert _started(clock, reopen_after=0.5).silence_left() == 0.5  # the caller's
    assert _started(clock, max_silence=1.5).silence_left() == 3.0
    old = _started(clock, interval=None)  # no heartbeats: silence is normal
    clock.seconds += 3600.0
    assert old.silence_left() is None


class FakeWatch:
    """A stream that delivers ``events`` and then nothing, until ``close()``."""

    def __init__(self, events: list[RevocationEvent]) -> None:
        self._events = list(events)
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[RevocationEvent]:
        yield from self._events
        self._closed.wait(30)

    def close(self) -> None:
        self._closed.set()


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


QUICK = {"ttl": 60.0, "reopen_after": 0.05, "reconnect_backoff": (0.01, 0.02)}
BEATING = [RevocationEvent(EventKind.START, "c0", heartbeat_interval=0.25), _beat(0.0)]
MUTE = [RevocationEvent(EventKind.START, "c0")]  # a server without heartbeats


def test_the_sync_feed_reopens_a_silent_stream_on_a_fresh_channel_and_only_with_heartbeats() -> (
    None
):
    opened: dict[str, list[bool]] = {"beating": [], "mute": []}

    def opener(kind: str, events: list[RevocationEvent]) -> Callable[[str, bool], FakeWatch]:
        def open_watch(after: str, fresh: bool) -> FakeWatch:
            opened[kind].append(fresh)
            return FakeWatch(events)

        return open_watch

    beating = Copies(LocalCache(**QUICK))  # type: ignore[arg-type]
    mute = Copies(LocalCache(**QUICK))  # type: ignore[arg-type]
    feeds = [
        SyncFeed(beating, opener("beating", BEATING), beating._settings),  # type: ignore[arg-type]
        SyncFeed(mute, opener("mute", MUTE), mute._settings),  # type: ignore[arg-type]
    ]
    try:
        _until(lambda: len(opened["beating"]) >= 3, "reopened twice")
        # Side by side: the stream without heartbeats stays open the while.
        assert opened["mute"] == [False] and mute.stats().silent_reopens == 0
        assert opened["beating"][:3] == [False, True, True]  # each reopening on a new channel
        assert beating.stats().silent_reopens >= 2
    finally:
        for feed in feeds:
            feed.close()
    # Each silence counted once, and followed by one reopening (but perhaps the last, cut by
    # close()).
    reopened = sum(opened["beating"])
    assert reopened <= beating.stats().silent_reopens <= reopened + 1


class FakeAsyncWatch:
    def __init__(self, events: list[RevocationEvent]) -> None:
        self._events = list(events)
        self.closed = asyncio.Event()

    def __aiter__(self) -> FakeAsyncWatch:
        return self

    async def __anext__(self) -> RevocationEvent:
        if self._events:
            return self._events.pop(0)
        await self.closed.wait()
        raise StopAsyncIteration

    def close(self) -> None:
        self.closed.set()


def test_the_async_feed_reopens_a_silent_stream_on_a_fresh_channel_and_only_with_heartbeats() -> (
    None
):
    opened: dict[str, list[bool]] = {"beating": [], "mute": []}

    async def scenario() -> None:
        def opener(kind: str, events: list[RevocationEvent]) -> Callable[[str, bool], object]:
            async def open_watch(after: str, fresh: bool) -> FakeAsyncWatch:
                opened[kind].append(fresh)
                return FakeAsyncWatch(events)

            return open_watch

        beating = Copies(LocalCache(**QUICK))  # type: ignore[arg-type]
        mute = Copies(LocalCache(**QUICK))  # type: ignore[arg-type]
        feeds = [
            AsyncFeed(beating, opener("beating", BEATING), beating._settings),  # type: ignore[arg-type]
            AsyncFeed(mute, opener("mute", MUTE), mute._settings),  # type: ignore[arg-type]
        ]
        try:
            deadline = time.monotonic() + 20
            while len(opened["beating"]) < 3:
                assert time.monotonic() < deadline, "reopened twice"
                await asyncio.sleep(0.005)
            assert opened["mute"] == [False] and mute.stats().silent_reopens == 0
            assert opened["beating"][:3] == [False, True, True]
            assert beating.stats().silent_reopens >= 2
        finally:
            for feed in feeds:
                await feed.close()
        reopened = sum(opened["beating"])
        assert reopened <= beating.stats().silent_reopens <= reopened + 1

    asyncio.run(scenario())


def test_settings_out_of_range_are_refused() -> None:
    for bad in ({"max_silence": 0.0}, {"max_silence": -1.0}, {"stream_max_age": 0.0},
                {"reopen_after": 0.0}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            LocalCache(**bad)  # type: ignore[arg-type]
