"""The client's local cache state (``_local_cache.Copies``) on injected clocks, no I/O: the
races the e2e test cannot order (an answer that was sent before an event and arrives after
it; an answer from before START), the TTL counted from when the request was sent, and the
expiry margin."""

from __future__ import annotations

import datetime

from session_authority.client import EventKind, LocalCache, RevocationEvent, Session, Source
from session_authority.client._local_cache import Copies, token_key
from session_authority.client._results import Validation

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
KEY = token_key("sat_" + "A" * 48)


class Clock:
    def __init__(self) -> None:
        self.seconds = 100.0

    def monotonic(self) -> float:
        return self.seconds

    def wall(self) -> datetime.datetime:
        return NOW + datetime.timedelta(seconds=self.seconds - 100.0)


def _valid(expires_in: float = 3600.0, session_id: str = "s1") -> Validation:
    session = Session(session_id, "u", NOW, NOW + datetime.timedelta(seconds=expires_in))
    return Validation(True, Source.DATABASE, session)


def _copies(clock: Clock, **kw: float) -> Copies:
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
