"""The ``SessionStore`` contract (core/ports.py), run on the in-memory fake and on
``PostgresSessionStore`` against a real Postgres: one set of cases, so the fake cannot
drift from the SQL it stands for.

One clock decides revocations: the store's own (Postgres ``now()``). ``revoke`` and
``revoke_user`` stamp ``revoked_at`` with it and judge by it whether the session was
live (``revoked_now``); ``revoked_since`` measures its window by it. No replica's
clock is passed in, so no replica's skew can change what is revoked.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from typing import Literal
from uuid import uuid4

import pytest

from session_authority.core.domain import Position, Session, TokenHash, new_token
from session_authority.core.errors import StoreUnavailable
from session_authority.core.ports import SessionStore, StoreRevocation, Touched

from .subjects import StoreSubject

pytestmark = pytest.mark.asyncio

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
MICROSECOND = timedelta(microseconds=1)
Name = Literal["hash", "id"]


def _session(
    now: datetime,
    *,
    expires_in: timedelta = DAY,
    user_id: str | None = None,
    revoked_at: datetime | None = None,
    metadata: dict[str, str] | None = None,
) -> Session:
    return Session(
        session_id=str(uuid4()),
        user_id=user_id or f"user-{uuid4().hex[:8]}",
        token_hash=TokenHash.of(new_token()),
        created_at=now - 2 * DAY,
        expires_at=now + expires_in,
        metadata={"device": "laptop"} if metadata is None else metadata,
        revoked_at=revoked_at,
    )


async def _created(store: SessionStore, session: Session) -> Session:
    await store.create(session)
    return session


async def _revoke(store: SessionStore, session: Session, by: Name) -> StoreRevocation | None:
    if by == "hash":
        return await store.revoke(token_hash=session.token_hash)
    return await store.revoke(session_id=session.session_id)


def _near(stamp: datetime | None, now: datetime) -> bool:
    """Stamped by the store's clock at about ``now`` (Postgres's clock moves on)."""
    return stamp is not None and abs(stamp - now) < timedelta(seconds=5)


async def _revoked_at(store: SessionStore, session: Session) -> datetime | None:
    found = await store.find(session.token_hash)
    assert found is not None
    return found.revoked_at


def _hexes(hashes: list[TokenHash]) -> list[str]:
    return sorted(h.hex for h in hashes)


# --- create and find -------------------------------------------------------------------------


async def test_find_answers_none_for_a_hash_never_stored(store_subject: StoreSubject) -> None:
    assert await store_subject.store.find(TokenHash.of(new_token())) is None


async def test_sessions_round_trip_exactly(store_subject: StoreSubject) -> None:
    store, now = store_subject.store, store_subject.now()
    live = Session(
        session_id=str(uuid4()),
        user_id="user ünï",
        token_hash=TokenHash.of(new_token()),
        created_at=now.replace(microsecond=1) - DAY,
        expires_at=now.replace(microsecond=999_999) + DAY,
        metadata={"device": "laptop", "ünï": "cødé 🔑", "json": '"\\\n{}', "empty": ""},
    )
    bare = _session(now, metadata={})
    # Revoked and expired sessions are found too.
    revoked = _session(now, revoked_at=now.replace(microsecond=123_456) - HOUR)
    expired = _session(now, expires_in=-HOUR)
    for session in (live, bare, revoked, expired):
        await store.create(session)
    for session in (live, bare, revoked, expired):
        assert await store.find(session.token_hash) == session  # to the microsecond


async def test_the_store_keeps_its_own_copy(store_subject: StoreSubject) -> None:
    store = store_subject.store
    metadata = {"device": "laptop"}
    session = await _created(store, _session(store_subject.now(), metadata=metadata))
    metadata["device"] = "changed after create"
    found = await store.find(session.token_hash)
    assert found is not None
    assert found.metadata == {"device": "laptop"}


async def test_token_hashes_are_unique(store_subject: StoreSubject) -> None:
    store, now = store_subject.store, store_subject.now()
    first = await _created(store, _session(now))
    twin = Session(str(uuid4()), "someone else", first.token_hash, now - DAY, now + DAY)
    with pytest.raises(StoreUnavailable):
        await store.create(twin)
    assert await store.find(first.token_hash) == first


async def test_session_ids_are_unique(store_subject: StoreSubject) -> None:
    store, now = store_subject.store, store_subject.now()
    first = await _created(store, _session(now))
    twin = Session(first.session_id, "someone else", TokenHash.of(new_token()), now, now + DAY)
    with pytest.raises(StoreUnavailable):
        await store.create(twin)
    assert await store.find(first.token_hash) == first
    assert await store.find(twin.token_hash) is None


async def test_session_ids_are_uuids(store_subject: StoreSubject) -> None:
    store, now = store_subject.store, store_subject.now()
    canonical = str(uuid4())
    shouted = _session(now)
    shouted = Session(canonical.upper(), shouted.user_id, shouted.token_hash, now - DAY, now + DAY)
    await store.create(shouted)
    found = await store.find(shouted.token_hash)
    assert found is not None
    assert found.session_id == canonical  # stored as a uuid, read back in canonical form
    revocation = await store.revoke(session_id=canonical.upper())
    assert revocation == StoreRevocation(shouted.token_hash, revoked_now=True)
    # Anything else is refused by the driver, which the adapter reports as StoreUnavailable.
    with pytest.raises(StoreUnavailable):
        await store.create(Session("not-a-uuid", "u", TokenHash.of(new_token()), now, now + DAY))
    with pytest.raises(StoreUnavailable):
        await store.revoke(session_id="not-a-uuid")


async def test_a_session_must_expire_after_its_creation(store_subject: StoreSubject) -> None:
    store, now = store_subject.store, store_subject.now()
    stillborn = Session(str(uuid4()), "u", TokenHash.of(new_token()), now, now)
    with pytest.raises(StoreUnavailable):
        await store.create(stillborn)
    assert await store.find(stillborn.token_hash) is None


# --- revoke -------------------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["hash", "id"])
async def test_revoke_ends_a_live_session_by_the_store_clock(
    store_subject: StoreSubject, by: Name
) -> None:
    store, now = store_subject.store, store_subject.now()
    session = await _created(store, _session(now))
    bystander = await _created(store, _session(now, user_id=session.user_id))
    assert await _revoke(store, session, by) == StoreRevocation(session.token_hash, True)
    assert _near(await _revoked_at(store, session), now)
    assert await _revoked_at(store, bystander) is None
    assert _hexes(await store.pending_purges(10)) == [session.token_hash.hex]


@pytest.mark.parametrize("by", ["hash", "id"])
async def test_revoking_again_reports_it_was_already_revoked(
    store_subject: StoreSubject, by: Name
) -> None:
    store, now = store_subject.store, store_subject.now()
    session = await _created(store, _session(now, revoked_at=now - HOUR))
    assert await _revoke(store, session, by) == StoreRevocation(session.token_hash, False)
    assert await _revoked_at(store, session) == now - HOUR  # the first revocation stands
    assert await store.pending_purges(10) == []  # nothing new to purge


@pytest.mark.parametrize("by", ["hash", "id"])
async def test_an_expired_session_is_revoked_too_but_was_not_live(
    store_subject: StoreSubject, by: Name
) -> None:
    """Revoke whatever is not revoked yet: a replica whose clock runs behind may
    still judge it live, and cache it."""
    store, now = store_subject.store, store_subject.now()
    session = await _created(store, _session(now, expires_in=-HOUR))
    assert await _revoke(store, session, by) == StoreRevocation(session.token_hash, False)
    assert _near(await _revoked_at(store, session), now)
    assert _hexes(await store.pending_purges(10)) == [session.token_hash.hex]


@pytest.mark.parametrize("by", ["hash", "id"])
async def test_revoke_answers_none_for_an_unknown_session(
    store_subject: StoreSubject, by: Name
) -> None:
    ghost = _session(store_subject.now())
    assert await _revoke(store_subject.store, ghost, by) is None


async def test_revoke_needs_exactly_one_name(store_subject: StoreSubject) -> None:
    store, now = store_subject.store, store_subject.now()
    session = await _created(store, _session(now))
    with pytest.raises(ValueError, match="exactly one"):
        await store.revoke()
    with pytest.raises(ValueError, match="exactly one"):
        await store.revoke(token_hash=session.token_hash, session_id=session.session_id)
    assert await _revoked_at(store, session) is None


# --- revoke_user ---------------------------------------------------------------------------


async def test_revoke_user_revokes_every_unrevoked_session_of_that_user(
    store_subject: StoreSubject,
) -> None:
    store, now = store_subject.store, store_subject.now()
    user = f"user-{uuid4().hex[:8]}"
    live = [await _created(store, _session(now, user_id=user)) for _ in range(3)]
    already = await _created(store, _session(now, user_id=user, revoked_at=now - DAY))
    expired = await _created(store, _session(now, user_id=user, expires_in=-HOUR))
    other = await _created(store, _session(now))

    revoked = await store.revoke_user(user)

    assert sorted((r.token_hash.hex, r.revoked_now) for r in revoked) == sorted(
        [(s.token_hash.hex, True) for s in live] + [(expired.token_hash.hex, False)]
    )
    for session in [*live, expired]:
        assert _near(await _revoked_at(store, session), now)
    assert await _revoked_at(store, already) == now - DAY
    assert await _revoked_at(store, other) is None
    assert await store.revoke_user(user) == []
    assert await store.revoke_user(f"user-{uuid4().hex[:8]}") == []
    pending = _hexes([s.token_hash for s in [*live, expired]])
    assert _hexes(await store.pending_purges(100)) == pending


# --- revoked_since, pending purges --------------------------------------------------------


async def test_revoked_since_measures_its_window_by_the_store_clock(
    store_subject: StoreSubject,
) -> None:
    store, now = store_subject.store, store_subject.now()
    recent = await _created(store, _session(now))
    lapsed = await _created(store, _session(now, expires_in=-HOUR))  # expired: still replayed
    old = await _created(store, _session(now, revoked_at=now - HOUR))
    await _created(store, _session(now))  # never revoked
    for session in (recent, lapsed):
        await store.revoke(token_hash=session.token_hash)
    both = _hexes([recent.token_hash, lapsed.token_hash])
    assert _hexes(await store.revoked_since(60)) == both
    assert _hexes(await store.revoked_since(2 * 3600)) == sorted([*both, old.token_hash.hex])


async def test_revoked_since_reads_the_store_clock_on_every_call(
    store_subject: StoreSubject,
) -> None:
    store, now = store_subject.store, store_subject.now()
    session = await _created(store, _session(now))
    await store.revoke(token_hash=session.token_hash)
    assert _hexes(await store.revoked_since(0.5)) == [session.token_hash.hex]
    await store_subject.wait(0.5)
    for _ in range(40):  # bounded poll: Postgres's now() is its own reading of the clock
        if await store.revoked_since(0.5) == []:
            break
        await store_subject.wait(0.025)
    assert await store.revoked_since(0.5) == []


async def test_pending_purges_come_oldest_first_until_confirmed(
    store_subject: StoreSubject,
) -> None:
    store, now = store_subject.store, store_subject.now()
    sessions = [await _created(store, _session(now)) for _ in range(3)]
    for session in sessions:
        await store.revoke(token_hash=session.token_hash)
        await store_subject.wait(0.01)  # distinct revoked_at stamps
    order = [s.token_hash.hex for s in sessions]
    assert [h.hex for h in await store.pending_purges(10)] == order
    assert [h.hex for h in await store.pending_purges(2)] == order[:2]
    await store.confirm_purged([sessions[0].token_hash, TokenHash.of(new_token())])
    assert [h.hex for h in await store.pending_purges(10)] == order[1:]
    await store.confirm_purged([s.token_hash for s in sessions])
    assert await store.pending_purges(10) == []
    await store.confirm_purged([])  # nothing to confirm is fine
    # Confirmed is not forgotten: the revocation is still replayed by its time.
    assert len(await store.revoked_since(60)) == 3


# --- reachability ------------------------------------------------------------------------------


async def test_health_answers(store_subject: StoreSubject) -> None:
    health = await store_subject.store.health()
    assert health.connected is True
    assert health.version
    assert health.error is None


async def test_an_unreachable_store_raises_store_unavailable(store_subject: StoreSubject) -> None:
    store, now = store_subject.unreachable, store_subject.now()
    session = _session(now)
    with pytest.raises(StoreUnavailable):
        await store.create(session)
    with pytest.raises(StoreUnavailable):
        await store.find(session.token_hash)
    with pytest.raises(StoreUnavailable):
        await store.revoke(token_hash=session.token_hash)
    with pytest.raises(StoreUnavailable):
        await store.revoke(session_id=session.session_id)
    with pytest.raises(StoreUnavailable):
        await store.revoke_user(session.user_id)
    with pytest.raises(StoreUnavailable):
        await store.revoked_since(60)
    with pytest.raises(StoreUnavailable):
        await store.pending_purges(10)
    with pytest.raises(StoreUnavailable):
        await store.confirm_purged([session.token_hash])
    health = await store.health()  # never raises
    assert health.connected is False
    assert health.error


# --- the revocation watermark -------------------------------------------------------------


async def test_revocations_after_walks_the_window_in_mark_order(
    store_subject: StoreSubject,
) -> None:
    store, now = store_subject.store, store_subject.now()
    user = f"user-{uuid4().hex[:8]}"
    first = await _created(store, _session(now))
    together = [await _created(store, _session(now, user_id=user)) for _ in range(2)]
    await _created(store, _session(now, revoked_at=now - HOUR))  # outside the window
    await store.revoke(token_hash=first.token_hash)
    await store.revoke_user(user)  # one transaction: one mark prefix

    walked = await store.revocations_after("", 10, 60)
    marks = [mark for mark, _ in walked]
    assert marks == sorted(marks) and len(set(marks)) == 3
    assert walked[0][1] == first.token_hash  # its transaction came first
    assert _hexes([h for _, h in walked[1:]]) == _hexes([s.token_hash for s in together])
    assert marks[1][:20] == marks[2][:20] > marks[0][:20]
    assert all(mark.endswith(":" + h.hex) for mark, h in walked)
    # Resumable: after a mark comes what follows it; a page holds at most ``limit``.
    assert await store.revocations_after(marks[0], 10, 60) == walked[1:]
    assert await store.revocations_after("", 2, 60) == walked[:2]
    assert await store.revocations_after(marks[2], 10, 60) == []
    assert len(await store.revocations_after("", 10, 2 * 3600)) == 4


async def test_the_horizon_covers_every_ended_revocation_and_confirmed_only_rises(
    store_subject: StoreSubject,
) -> None:
    store, now = store_subject.store, store_subject.now()
    session = await _created(store, _session(now))
    await store.revoke(token_hash=session.token_hash)
    (mark, _), *_ = await store.revocations_after("", 10, 60)
    marks = await store.revocation_marks()
    assert mark < marks.horizon  # its transaction has ended
    before = marks.confirmed
    await store.confirm_watermark(marks.horizon)
    assert (await store.revocation_marks()).confirmed == max(before, marks.horizon)
    await store.confirm_watermark("")  # never lowered
    assert (await store.revocation_marks()).confirmed == max(before, marks.horizon)


# --- revoke_user_except, list_user_sessions, page_token_key (ListUserSessions, issue 22) ------


async def test_revoke_user_except_spares_the_kept_session_and_nothing_else(
    store_subject: StoreSubject,
) -> None:
    store, now = store_subject.store, store_subject.now()
    user = f"user-{uuid4().hex[:8]}"
    kept = await _created(store, _session(now, user_id=user))
    others = [await _created(store, _session(now, user_id=user)) for _ in range(2)]
    expired = await _created(store, _session(now, user_id=user, expires_in=-HOUR))
    bystander = await _created(store, _session(now))

    revoked = await store.revoke_user_except(user, kept.session_id)

    assert revoked is not None
    assert sorted((r.token_hash.hex, r.revoked_now) for r in revoked) == sorted(
        [(s.token_hash.hex, True) for s in others] + [(expired.token_hash.hex, False)]
    )
    assert await _revoked_at(store, kept) is None
    assert await _revoked_at(store, bystander) is None
    assert await store.revoke_user_except(user, kept.session_id) == []


async def test_revoke_user_except_of_a_session_not_the_users_revokes_nothing(
    store_subject: StoreSubject,
) -> None:
    store, now = store_subject.store, store_subject.now()
    user = f"user-{uuid4().hex[:8]}"
    mine = [await _created(store, _session(now, user_id=user)) for _ in range(2)]
    foreign = await _created(store, _session(now))
    assert await store.revoke_user_except(user, foreign.session_id) is None
    assert await store.revoke_user_except(user, str(uuid4())) is None
    for session in [*mine, foreign]:
        assert await _revoked_at(store, session) is None
    assert await store.pending_purges(100) == []


async def test_list_user_sessions_pages_in_creation_order_live_or_all(
    store_subject: StoreSubject,
) -> None:
    store, now = store_subject.store, store_subject.now()
    user = f"user-{uuid4().hex[:8]}"
    made = []
    for i in range(5):  # two share a creation time: the id breaks the tie
        session = _session(now, user_id=user)
        made.append(replace(session, created_at=now - DAY + min(i, 3) * MICROSECOND))
    for session in made:
        await store.create(session)
    await store.revoke(session_id=made[1].session_id)
    expired = await _created(store, _session(now, user_id=user, expires_in=-HOUR))
    await _created(store, _session(now))  # another user's

    order = sorted([*made, expired], key=lambda s: Position(s.created_at, s.session_id))
    everything = await store.list_user_sessions(user, include_revoked=True, after=None, limit=10)
    assert [s.session_id for s in everything] == [s.session_id for s in order]
    assert [s.revoked_at is not None for s in everything] == [s is made[1] for s in order]
    live = [s for s in order if s is not made[1] and s is not expired]
    first = await store.list_user_sessions(user, include_revoked=False, after=None, limit=2)
    assert [s.session_id for s in first] == [s.session_id for s in live[:2]]
    after = Position(first[-1].created_at, first[-1].session_id)
    rest = await store.list_user_sessions(user, include_revoked=False, after=after, limit=10)
    assert [s.session_id for s in rest] == [s.session_id for s in live[2:]]
    assert first[0].metadata == {"device": "laptop"} and first[0].last_seen_at is None
    assert not hasattr(first[0], "token_hash")
    nobody = f"user-{uuid4().hex[:8]}"
    assert await store.list_user_sessions(nobody, include_revoked=True, after=None, limit=5) == []


async def test_page_token_key_is_a_stable_secret(store_subject: StoreSubject) -> None:
    key = await store_subject.store.page_token_key()
    assert len(key) >= 16
    assert await store_subject.store.page_token_key() == key


# --- touch (sliding expiry) ----------------------------------------------------------------------


async def _touch(
    store: SessionStore,
    session: Session,
    by: Name,
    *,
    extend_by: timedelta = HOUR,
    max_lifetime: timedelta = 30 * DAY,
    interval: float = 60.0,
) -> Touched | None:
    if by == "hash":
        return await store.touch(
            token_hash=session.token_hash,
            extend_by=extend_by,
            max_lifetime=max_lifetime,
            interval=interval,
        )
    return await store.touch(
        session_id=session.session_id,
        extend_by=extend_by,
        max_lifetime=max_lifetime,
        interval=interval,
    )


@pytest.mark.parametrize("by", ["hash", "id"])
async def test_touch_slides_a_live_session_by_the_store_clock_once_per_interval(
    store_subject: StoreSubject, by: Name
) -> None:
    store, now = store_subject.store, store_subject.now()
    session = await _created(store, _session(now, expires_in=timedelta(minutes=5)))
    touched = await _touch(store, session, by, interval=0.5)
    assert touched is not None and touched.written and touched.live
    assert _near(touched.session.expires_at - HOUR, now)
    assert _near(touched.session.last_seen_at, now)
    assert 0 < touched.quiet_for <= 0.5
    found = await store.find(session.token_hash)
    assert found is not None and found.expires_at == touched.session.expires_at
    again = await _touch(store, session, by, extend_by=2 * HOUR, interval=0.5)
    assert again is not None and (again.written, again.live) == (False, True)
    assert again.session.expires_at == touched.session.expires_at  # within the interval
    await store_subject.wait(0.5)
    for _ in range(40):  # bounded poll: Postgres's now() is its own reading of the clock
        later = await _touch(store, session, by, extend_by=2 * HOUR, interval=0.5)
        assert later is not None
        if later.written:
            break
        await store_subject.wait(0.025)
    assert later is not None and later.written
    assert later.session.expires_at > touched.session.expires_at


async def test_touch_is_capped_by_the_lifetime_and_never_shortens(
    store_subject: StoreSubject,
) -> None:
    store, now = store_subject.store, store_subject.now()
    session = await _created(store, _session(now))  # created two days ago, expires in a day
    capped = await _touch(store, session, "hash", extend_by=3 * DAY, max_lifetime=4 * DAY)
    assert capped is not None and capped.written
    assert capped.session.expires_at == session.created_at + 4 * DAY
    other = await _created(store, _session(now))
    kept = await _touch(store, other, "id", extend_by=HOUR)
    assert kept is not None and kept.written  # written (last seen), the expiry kept
    assert kept.session.expires_at == other.expires_at


async def test_touch_never_revives_and_answers_none_for_the_unknown(
    store_subject: StoreSubject,
) -> None:
    store, now = store_subject.store, store_subject.now()
    revoked = await _created(store, _session(now, revoked_at=now - HOUR))
    expired = await _created(store, _session(now, expires_in=-HOUR))
    for session in (revoked, expired):
        touched = await _touch(store, session, "hash")
        assert touched is not None and (touched.written, touched.live) == (False, False)
        assert touched.session.expires_at == session.expires_at
        assert touched.session.last_seen_at is None
    assert await _touch(store, _session(now), "hash") is None
    assert await _touch(store, _session(now), "id") is None


# --- find_many: the batch read (ValidateSessions) ----------------------------------------------


async def test_find_many_answers_each_hash_as_find_does(store_subject: StoreSubject) -> None:
    store, now = store_subject.store, store_subject.now()
    live = await _created(store, _session(now))
    revoked = await _created(store, _session(now, revoked_at=now - HOUR))
    expired = await _created(store, _session(now, expires_in=-HOUR))
    never = TokenHash.of(new_token())
    asked = [live.token_hash, never, revoked.token_hash, expired.token_hash, live.token_hash]
    found = await store.find_many(asked)
    assert found == {s.token_hash: s for s in (live, revoked, expired)}  # to the microsecond
    for token_hash in asked:
        assert found.get(token_hash) == await store.find(token_hash)


async def test_find_many_of_no_hashes_asks_nothing(store_subject: StoreSubject) -> None:
    assert await store_subject.store.find_many([]) == {}
    assert await store_subject.unreachable.find_many([]) == {}


async def test_find_many_on_an_unreachable_store_raises_store_unavailable(
    store_subject: StoreSubject,
) -> None:
    with pytest.raises(StoreUnavailable):
        await store_subject.unreachable.find_many([TokenHash.of(new_token())])
