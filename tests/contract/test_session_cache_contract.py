"""The ``SessionCache`` contract (core/ports.py), run on the in-memory fake and on
``RedisSessionCache`` against a real Redis: one set of cases, so the fake cannot drift
from the Lua scripts it stands for.

The rules, as the Lua in adapters/redis_cache.py implements them:

* ``get``: a miss for an empty key, a creation marker, or an entry recorded for another
  token hash (reported in the log); otherwise the entry and its remaining lifetime.
* ``fill``: refused (False) over a tombstone; a non-revoked verdict is written only where
  nothing is cached (True either way); a live session or a tombstone replaces the rest.
* ``mark_created``: a marker, written by the same script as a live fill.
* ``tombstone``: unconditional, for every hash given.
* ``seal``: tombstones like ``tombstone``, and raises the watermark (never lowers it), unless
  it holds less than the floor: then ``CacheReplaced``, tombstones written, watermark untouched.
* Every write sets the TTL it was given; entries vanish when it runs out.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Literal
from uuid import uuid4

import pytest

from session_authority.core.domain import Reason, Session, TokenHash, new_token
from session_authority.core.errors import CacheReplaced, CacheUnavailable
from session_authority.core.ports import CachedVerdict, CacheEntry, SessionCache

from .subjects import CacheSubject

pytestmark = pytest.mark.asyncio

TTL = 60.0
LONG_TTL = 600.0
#: Short enough to wait for, long enough that a fill and a get fit in it on a busy machine.
SHORT_TTL = 0.3

TOMBSTONE = CachedVerdict(Reason.REVOKED)
Kind = Literal["live", "unknown", "expired", "revoked"]
KINDS: list[Kind] = ["live", "unknown", "expired", "revoked"]
NOT_TOMBSTONES: list[Kind] = ["live", "unknown", "expired"]
PLAIN_VERDICTS = [Reason.UNKNOWN, Reason.EXPIRED]


def _hash() -> TokenHash:
    return TokenHash.of(new_token())


def _live(token_hash: TokenHash, metadata: dict[str, str] | None = None) -> Session:
    return Session(
        session_id=str(uuid4()),
        user_id=f"user-{uuid4().hex[:8]}",
        token_hash=token_hash,
        created_at=datetime(2030, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        expires_at=datetime(2031, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        metadata={"device": "laptop"} if metadata is None else metadata,
    )


def _make(kind: Kind, token_hash: TokenHash) -> CacheEntry:
    return _live(token_hash) if kind == "live" else CachedVerdict(Reason(kind))


async def _entry(cache: SessionCache, token_hash: TokenHash) -> CacheEntry | None:
    hit = await cache.get(token_hash)
    return None if hit is None else hit.entry


async def _ttl_left(cache: SessionCache, token_hash: TokenHash) -> float:
    hit = await cache.get(token_hash)
    assert hit is not None
    return hit.ttl_left


# --- get and the round trip ------------------------------------------------------------


async def test_get_misses_where_nothing_was_written(cache_subject: CacheSubject) -> None:
    assert await cache_subject.cache.get(_hash()) is None


async def test_a_live_session_round_trips_exactly(cache_subject: CacheSubject) -> None:
    cache = cache_subject.cache
    rich = _live(_hash(), {"device": "laptop", "ünï": "cødé 🔑", "json": '"\\\n{}', "empty": ""})
    bare = _live(_hash(), {})
    for session in (rich, bare):
        assert await cache.fill(session.token_hash, session, TTL) is True
        hit = await cache.get(session.token_hash)
        assert hit is not None
        assert hit.entry == session  # every field, timestamps to the microsecond
        assert isinstance(hit.entry, Session)
        assert hit.entry.created_at.microsecond == 999_999
        assert hit.entry.expires_at.microsecond == 1
        assert 0 < hit.ttl_left <= TTL


@pytest.mark.parametrize("reason", list(Reason))
async def test_each_verdict_round_trips(cache_subject: CacheSubject, reason: Reason) -> None:
    token_hash = _hash()
    assert await cache_subject.cache.fill(token_hash, CachedVerdict(reason), TTL) is True
    assert await _entry(cache_subject.cache, token_hash) == CachedVerdict(reason)


async def test_the_cache_keeps_a_copy_of_what_it_was_given(cache_subject: CacheSubject) -> None:
    metadata = {"device": "laptop"}
    session = _live(_hash(), metadata)
    await cache_subject.cache.fill(session.token_hash, session, TTL)
    metadata["device"] = "changed after the fill"
    hit = await _entry(cache_subject.cache, session.token_hash)
    assert isinstance(hit, Session)
    assert hit.metadata == {"device": "laptop"}


# --- the conditional fill ----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_no_fill_writes_over_a_tombstone(cache_subject: CacheSubject, kind: Kind) -> None:
    cache, token_hash = cache_subject.cache, _hash()
    await cache.tombstone([token_hash], LONG_TTL)
    assert await cache.fill(token_hash, _make(kind, token_hash), TTL) is False
    hit = await cache.get(token_hash)
    assert hit is not None
    assert hit.entry == TOMBSTONE
    assert hit.ttl_left > TTL  # the tombstone's own lifetime, untouched


async def test_a_tombstone_written_by_fill_refuses_fills_too(cache_subject: CacheSubject) -> None:
    cache, token_hash = cache_subject.cache, _hash()
    assert await cache.fill(token_hash, TOMBSTONE, LONG_TTL) is True
    assert await cache.fill(token_hash, _live(token_hash), TTL) is False
    assert await _entry(cache, token_hash) == TOMBSTONE


@pytest.mark.parametrize("reason", PLAIN_VERDICTS)
async def test_a_verdict_is_written_where_nothing_is_cached(
    cache_subject: CacheSubject, reason: Reason
) -> None:
    cache, token_hash = cache_subject.cache, _hash()
    assert await cache.fill(token_hash, CachedVerdict(reason), TTL) is True
    assert await _entry(cache, token_hash) == CachedVerdict(reason)


@pytest.mark.parametrize("reason", PLAIN_VERDICTS)
@pytest.mark.parametrize("cached", NOT_TOMBSTONES)
async def test_a_verdict_never_replaces_a_cached_entry(
    cache_subject: CacheSubject, cached: Kind, reason: Reason
) -> None:
    cache, token_hash = cache_subject.cache, _hash()
    first = _make(cached, token_hash)
    await cache.fill(token_hash, first, LONG_TTL)
    # Not written, yet not refused: only a tombstone makes fill answer False.
    assert await cache.fill(token_hash, CachedVerdict(reason), TTL) is True
    hit = await cache.get(token_hash)
    assert hit is not None
    assert hit.entry == first
    assert hit.ttl_left > TTL  # the first entry's lifetime, untouched


@pytest.mark.parametrize("cached", NOT_TOMBSTONES)
async def test_a_live_session_replaces_anything_but_a_tombstone(
    cache_subject: CacheSubject, cached: Kind
) -> None:
    cache, token_hash = cache_subject.cache, _hash()
    await cache.fill(token_hash, _make(cached, token_hash), LONG_TTL)
    session = _live(token_hash, {"generation": "second"})
    assert await cache.fill(token_hash, session, TTL) is True
    hit = await cache.get(token_hash)
    assert hit is not None
    assert hit.entry == session
    assert hit.ttl_left <= TTL  # the new entry's lifetime


@pytest.mark.parametrize("cached", NOT_TOMBSTONES)
async def test_a_tombstone_fill_replaces_anything_else(
    cache_subject: CacheSubject, cached: Kind
) -> None:
    cache, token_hash = cache_subject.cache, _hash()
    await cache.fill(token_hash, _make(cached, token_hash), TTL)
    assert await cache.fill(token_hash, TOMBSTONE, LONG_TTL) is True
    hit = await cache.get(token_hash)
    assert hit is not None
    assert hit.entry == TOMBSTONE
    assert hit.ttl_left > TTL


# --- the creation marker -----------------------------------------------------------------


async def test_a_creation_marker_reads_as_a_miss(cache_subject: CacheSubject) -> None:
    token_hash = _hash()
    await cache_subject.cache.mark_created(token_hash, TTL)
    assert await cache_subject.cache.get(token_hash) is None


@pytest.mark.parametrize("cached", NOT_TOMBSTONES)
async def test_a_creation_marker_replaces_anything_but_a_tombstone(
    cache_subject: CacheSubject, cached: Kind
) -> None:
    cache, token_hash = cache_subject.cache, _hash()
    await cache.fill(token_hash, _make(cached, token_hash), TTL)
    await cache.mark_created(token_hash, TTL)
    assert await cache.get(token_hash) is None
    # A marker, not an empty key: a verdict is still not written.
    assert await cache.fill(token_hash, CachedVerdict(Reason.UNKNOWN), TTL) is True
    assert await cache.get(token_hash) is None


async def test_a_creation_marker_never_replaces_a_tombstone(cache_subject: CacheSubject) -> None:
    cache, token_hash = cache_subject.cache, _hash()
    await cache.tombstone([token_hash], LONG_TTL)
    await cache.mark_created(token_hash, TTL)
    hit = await cache.get(token_hash)
    assert hit is not None
    assert hit.entry == TOMBSTONE
    assert hit.ttl_left > TTL


@pytest.mark.parametrize("reason", PLAIN_VERDICTS)
async def test_a_verdict_fill_over_a_creation_marker_writes_nothing(
    cache_subject: CacheSubject, reason: Reason
) -> None:
    # The race the marker exists for: a read that predates the creation answers
    # "unknown" late; its fill must not hide the new session.
    cache, token_hash = cache_subject.cache, _hash()
    await cache.mark_created(token_hash, TTL)
    assert await cache.fill(token_hash, CachedVerdict(reason), TTL) is True
    assert await cache.get(token_hash) is None


async def test_a_live_fill_over_a_creation_marker_is_written(cache_subject: CacheSubject) -> None:
    cache, token_hash = cache_subject.cache, _hash()
    await cache.mark_created(token_hash, LONG_TTL)
    session = _live(token_hash)
    assert await cache.fill(token_hash, session, TTL) is True
    hit = await cache.get(token_hash)
    assert hit is not None
    assert hit.entry == session
    assert hit.ttl_left <= TTL


@pytest.mark.parametrize("via_fill", [False, True], ids=["tombstone", "fill"])
async def test_a_tombstone_replaces_a_creation_marker(
    cache_subject: CacheSubject, via_fill: bool
) -> None:
    cache, token_hash = cache_subject.cache, _hash()
    await cache.mark_created(token_hash, TTL)
    if via_fill:
        assert await cache.fill(token_hash, TOMBSTONE, LONG_TTL) is True
    else:
        await cache.tombstone([token_hash], LONG_TTL)
    assert await _entry(cache, token_hash) == TOMBSTONE


# --- tombstones ------------------------------------------------------------------------------


async def test_tombstone_replaces_every_entry_named(cache_subject: CacheSubject) -> None:
    cache = cache_subject.cache
    empty, marked, foreign = _hash(), _hash(), _hash()
    filled = {kind: _hash() for kind in KINDS}
    for kind, token_hash in filled.items():
        await cache.fill(token_hash, _make(kind, token_hash), LONG_TTL)
    await cache.mark_created(marked, LONG_TTL)
    await cache_subject.plant_foreign(foreign, _live(_hash()), LONG_TTL)
    named = [empty, marked, foreign, *filled.values()]
    bystander = _hash()
    await cache.fill(bystander, _live(bystander), TTL)

    await cache.tombstone(named, TTL)

    for token_hash in named:
        hit = await cache.get(token_hash)
        assert hit is not None, token_hash
        assert hit.entry == TOMBSTONE  # recorded for the right hash, even over a foreign entry
        assert hit.ttl_left <= TTL  # each one's lifetime restarts, an old tombstone's too
        assert await cache.fill(token_hash, _live(token_hash), TTL) is False
    assert isinstance(await _entry(cache, bystander), Session)


async def test_tombstone_of_no_hashes_does_nothing(cache_subject: CacheSubject) -> None:
    await cache_subject.cache.tombstone([], TTL)


# --- lifetimes ---------------------------------------------------------------------------------


async def test_the_lifetime_left_is_reported(cache_subject: CacheSubject) -> None:
    cache = cache_subject.cache
    session, tombstoned = _live(_hash()), _hash()
    await cache.fill(session.token_hash, session, 42.0)
    await cache.tombstone([tombstoned], 7.0)
    assert 40 < await _ttl_left(cache, session.token_hash) <= 42
    assert 5 < await _ttl_left(cache, tombstoned) <= 7


async def test_every_kind_of_entry_expires_with_its_ttl(cache_subject: CacheSubject) -> None:
    cache = cache_subject.cache
    filled = {kind: _hash() for kind in KINDS}
    for kind, token_hash in filled.items():
        assert await cache.fill(token_hash, _make(kind, token_hash), SHORT_TTL) is True
    tombstoned, marked = _hash(), _hash()
    await cache.tombstone([tombstoned], SHORT_TTL)
    await cache.mark_created(marked, SHORT_TTL)
    everything = [*filled.values(), tombstoned]
    for token_hash in everything:
        assert await cache.get(token_hash) is not None
    assert await cache.fill(marked, CachedVerdict(Reason.UNKNOWN), TTL) is True
    assert await cache.get(marked) is None  # the marker still holds verdicts off

    await cache_subject.wait(SHORT_TTL)
    for _ in range(40):  # bounded poll: Redis expires a key by its own clock
        if [await cache.get(h) for h in everything] == [None] * len(everything):
            break
        await cache_subject.wait(0.025)
    assert [await cache.get(h) for h in everything] == [None] * len(everything)

    # Gone for the fill rules too: the tombstone no longer refuses, the marker no
    # longer holds a verdict off.
    for token_hash in (tombstoned, marked):
        assert await cache.fill(token_hash, CachedVerdict(Reason.UNKNOWN), TTL) is True
        assert await _entry(cache, token_hash) == CachedVerdict(Reason.UNKNOWN)


# --- the integrity check ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_an_entry_recorded_for_another_hash_is_a_reported_miss(
    cache_subject: CacheSubject, caplog: pytest.LogCaptureFixture, kind: Kind
) -> None:
    victim = _hash()
    await cache_subject.plant_foreign(victim, _make(kind, _hash()), TTL)
    with caplog.at_level(logging.WARNING):
        assert await cache_subject.cache.get(victim) is None
    reports = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any(victim.prefix in r.getMessage() for r in reports), reports


async def test_a_live_fill_heals_an_entry_recorded_for_another_hash(
    cache_subject: CacheSubject,
) -> None:
    cache, victim = cache_subject.cache, _hash()
    await cache_subject.plant_foreign(victim, _live(_hash()), LONG_TTL)
    session = _live(victim)
    assert await cache.fill(victim, session, TTL) is True
    assert await _entry(cache, victim) == session


async def test_the_fill_rules_read_a_foreign_entry_by_its_state(
    cache_subject: CacheSubject,
) -> None:
    # The integrity check is made on read; the Lua fill looks at the state field only.
    # So a foreign tombstone still refuses fills, and a foreign live entry still
    # holds a verdict off (both misses to get), until a tombstone or expiry clears them.
    cache, under_tombstone, under_live = cache_subject.cache, _hash(), _hash()
    await cache_subject.plant_foreign(under_tombstone, TOMBSTONE, TTL)
    await cache_subject.plant_foreign(under_live, _live(_hash()), TTL)
    assert await cache.fill(under_tombstone, _live(under_tombstone), TTL) is False
    assert await cache.fill(under_live, CachedVerdict(Reason.UNKNOWN), TTL) is True
    assert await cache.get(under_tombstone) is None
    assert await cache.get(under_live) is None


# --- reachability ------------------------------------------------------------------------------


async def test_ping_and_health_answer(cache_subject: CacheSubject) -> None:
    await cache_subject.cache.ping()  # returns, does not raise
    health = await cache_subject.cache.health()
    assert health.connected is True
    assert health.version
    assert health.error is None


async def test_an_unreachable_cache_raises_cache_unavailable(cache_subject: CacheSubject) -> None:
    cache, token_hash = cache_subject.unreachable, _hash()
    with pytest.raises(CacheUnavailable):
        await cache.get(token_hash)
    with pytest.raises(CacheUnavailable):
        await cache.fill(token_hash, _live(token_hash), TTL)
    with pytest.raises(CacheUnavailable):
        await cache.mark_created(token_hash, TTL)
    with pytest.raises(CacheUnavailable):
        await cache.tombstone([token_hash], TTL)
    with pytest.raises(CacheUnavailable):
        await cache.ping()
    with pytest.raises(CacheUnavailable):
        await cache.adopt()
    with pytest.raises(CacheUnavailable):
        await cache.verify()
    health = await cache.health()  # never raises
    assert health.connected is False
    assert health.error


# --- trust: adopt and verify -------------------------------------------------------------------


async def test_verify_refuses_a_cache_never_adopted(cache_subject: CacheSubject) -> None:
    with pytest.raises(CacheReplaced):
        await cache_subject.cache.verify()


async def test_a_flushed_cache_is_refused_until_adopted_again(cache_subject: CacheSubject) -> None:
    cache, token_hash = cache_subject.cache, _hash()
    await cache.adopt()
    await cache.verify()  # the marker is there
    await cache.tombstone([token_hash], TTL)
    await cache_subject.flush()  # tombstones lost, behind the adapter's back
    with pytest.raises(CacheReplaced):
        await cache.verify()
    await cache.adopt()
    await cache.verify()
    assert await cache.get(token_hash) is None  # adopting restores nothing: replay does


# --- the revocation watermark: seal -----------------------------------------------------------


def _mark(xid: int) -> str:
    return f"{xid:020d}:~"


async def test_a_cache_without_a_watermark_holds_nothing(cache_subject: CacheSubject) -> None:
    await cache_subject.flush()
    assert await cache_subject.cache.watermark() == ""


async def test_seal_writes_tombstones_and_raises_the_watermark_never_lowers_it(
    cache_subject: CacheSubject,
) -> None:
    cache, first, second = cache_subject.cache, _hash(), _hash()
    await cache_subject.flush()
    await cache.fill(first, _live(first), TTL)
    assert await cache.seal([first, second], LONG_TTL, floor="", mark=_mark(7)) == _mark(7)
    assert await _entry(cache, first) == TOMBSTONE
    assert await _entry(cache, second) == TOMBSTONE
    assert await cache.watermark() == _mark(7)
    # A lower mark (another process, behind) leaves it; what is held is returned.
    assert await cache.seal([], LONG_TTL, floor="", mark=_mark(5)) == _mark(7)
    assert await cache.seal([], LONG_TTL, floor=_mark(7), mark=_mark(12)) == _mark(12)
    # Marks compare byte by byte: "~" (every hash of transaction 12) is above any one
    # hash of it, and below the first of transaction 13.
    assert await cache.seal([], LONG_TTL, floor="", mark=f"{12:020d}:{'f' * 64}") == _mark(12)
    next_one = f"{13:020d}:{'0' * 64}"
    assert await cache.seal([], LONG_TTL, floor="", mark=next_one) == next_one


async def test_seal_below_its_floor_writes_the_tombstones_and_reports_a_rewind(
    cache_subject: CacheSubject,
) -> None:
    cache, token_hash = cache_subject.cache, _hash()
    await cache_subject.flush()
    await cache.seal([], LONG_TTL, floor="", mark=_mark(3))
    await cache.fill(token_hash, _live(token_hash), TTL)
    with pytest.raises(CacheReplaced):
        await cache.seal([token_hash], LONG_TTL, floor=_mark(4), mark=_mark(9))
    assert await _entry(cache, token_hash) == TOMBSTONE  # written all the same
    assert await cache.watermark() == _mark(3)  # left alone: the rewind stays visible


async def test_the_replay_lease_is_held_by_one_until_given_back(
    cache_subject: CacheSubject,
) -> None:
    cache = cache_subject.cache
    await cache_subject.flush()
    assert await cache.lease(LONG_TTL) is True
    assert await cache.lease(LONG_TTL) is False  # another process, meanwhile
    await cache.release()
    assert await cache.lease(SHORT_TTL) is True
    await cache_subject.wait(SHORT_TTL * 2)  # a holder that died: it lapses
    assert await cache.lease(LONG_TTL) is True
    await cache.release()


# --- get_many: the batch lookup (ValidateSessions) ----------------------------------------------


async def test_get_many_answers_each_hash_as_get_does_in_order(cache_subject: CacheSubject) -> None:
    cache = cache_subject.cache
    live, unknown, revoked, marked, foreign, absent = (_hash() for _ in range(6))
    session = _live(live)
    await cache.fill(live, session, TTL)
    await cache.fill(unknown, CachedVerdict(Reason.UNKNOWN), TTL)
    await cache.tombstone([revoked], LONG_TTL)
    await cache.mark_created(marked, TTL)
    await cache_subject.plant_foreign(foreign, _live(foreign), TTL)
    asked = [live, unknown, revoked, marked, foreign, absent, live]  # duplicates allowed
    many = await cache.get_many(asked)
    assert [None if hit is None else hit.entry for hit in many] == [
        session,
        CachedVerdict(Reason.UNKNOWN),
        TOMBSTONE,
        None,  # a creation marker is a miss
        None,  # so is an entry recorded for another hash
        None,
        session,
    ]
    for token_hash, hit in zip(asked, many, strict=True):
        single = await cache.get(token_hash)
        assert (hit is None) == (single is None)
        if hit is not None and single is not None:
            assert hit.entry == single.entry
            assert 0 < hit.ttl_left <= LONG_TTL


async def test_get_many_of_no_hashes_asks_nothing(cache_subject: CacheSubject) -> None:
    assert await cache_subject.cache.get_many([]) == []
    assert await cache_subject.unreachable.get_many([]) == []


async def test_get_many_on_an_unreachable_cache_raises_cache_unavailable(
    cache_subject: CacheSubject,
) -> None:
    with pytest.raises(CacheUnavailable):
        await cache_subject.unreachable.get_many([_hash(), _hash()])


async def test_a_filled_entry_reports_its_age_a_tombstone_none(cache_subject: CacheSubject) -> None:
    cache = cache_subject.cache
    session, verdict, revoked = _live(_hash()), _hash(), _hash()
    await cache.fill(session.token_hash, session, TTL)
    await cache.fill(verdict, CachedVerdict(Reason.EXPIRED), TTL)
    await cache.tombstone([revoked], TTL)
    await cache_subject.wait(0.2)
    for hit in [await cache.get(session.token_hash), *await cache.get_many([verdict])]:
        assert hit is not None and hit.age is not None
        assert 0.2 <= hit.age < TTL  # at least the time waited (a lower bound only)
    tombstone = await cache.get(revoked)
    assert tombstone is not None and tombstone.age is None  # written by a revocation: unknown
