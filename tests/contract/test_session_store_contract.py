"""The ``SessionStore`` contract (core/ports.py), run on the in-memory fake and on
``PostgresSessionStore`` against a real Postgres: one set of cases, so the fake cannot
drift from the SQL it stands for.

Two clocks, as in the SQL of adapters/postgres_store.py:

* ``revoke`` and ``revoke_user`` judge expiry against the ``at`` they are given
  (``expires_at > $2``), and write it as ``revoked_at``;
* ``revoked_since`` judges expiry against the store's own clock (``now()``).

So the tests pick ``at`` far from the store's "now" wherever the two would disagree.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal
from uuid import uuid4

import pytest

from session_authority.core.domain import Session, TokenHash, new_token
from session_authority.core.errors import StoreUnavailable
from session_authority.core.ports import SessionStore, StoreRevocation

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


async def _revoke(
    store: SessionStore, at: datetime, session: Session, by: Name
) -> StoreRevocation | None:
    if by == "hash":
        return await store.revoke(at, token_hash=session.token_hash)
    return await store.revoke(at, session_id=session.session_id)


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
    revocation = await store.revoke(now, session_id=canonical.upper())
    assert revocation == StoreRevocation(shouted.token_hash, revoked_now=True)
    # Anything else is refused by the driver, which the adapter reports as StoreUnavailable.
    with pytest.raises(StoreUnavailable):
        await store.create(Session("not-a-uuid", "u", TokenHash.of(new_token()), now, now + DAY))
    with pytest.raises(StoreUnavailable):
        await store.revoke(now, session_id="not-a-uuid")


async def test_a_session_must_expire_after_its_creation(store_subject: StoreSubject) -> None:
    store, now = store_subject.store, store_subject.now()
    stillborn = Session(str(uuid4()), "u", TokenHash.of(new_token()), now, now)
    with pytest.raises(StoreUnavailable):
        await store.create(stillborn)
    assert await store.find(stillborn.token_hash) is None


# --- revoke -------------------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["hash", "id"])
async def test_revoke_ends_a_live_session_at_the_time_given(
    store_subject: StoreSubject, by: Name
) -> None:
    store, now = store_subject.store, store_subject.now()
    session = await _created(store, _session(now))
    bystander = await _created(store, _session(now, user_id=session.user_id))
    at = now.replace(microsecond=654_321) - HOUR  # not the store's clock: the time given
    assert await _revoke(store, at, session, by) == StoreRevocation(session.token_hash, True)
    assert await _revoked_at(store, session) == at
    assert await _revoked_at(store, bystander) is None


@pytest.mark.parametrize("by", ["hash", "id"])
async def test_revoking_again_reports_it_was_already_revoked(
    store_subject: StoreSubject, by: Name
) -> None:
    store, now = store_subject.store, store_subject.now()
    session = await _created(store, _session(now))
    await _revoke(store, now - HOUR, session, by)
    assert await _revoke(store, now, session, by) == StoreRevocation(session.token_hash, False)
    assert await _revoked_at(store, session) == now - HOUR  # the first revocation stands


@pytest.mark.parametrize("by", ["hash", "id"])
async def test_a_revoked_session_is_still_reported_after_it_expired(
    store_subject: StoreSubject, by: Name
) -> None:
    store, now = store_subject.store, store_subject.now()
    session = await _created(store, _session(now, expires_in=-HOUR, revoked_at=now - 2 * HOUR))
    assert await _revoke(store, now, session, by) == StoreRevocation(session.token_hash, False)


@pytest.mark.parametrize("by", ["hash", "id"])
async def test_revoke_answers_none_for_an_unknown_session(
    store_subject: StoreSubject, by: Name
) -> None:
    ghost = _session(store_subject.now())
    assert await _revoke(store_subject.store, store_subject.now(), ghost, by) is None


@pytest.mark.parametrize("by", ["hash", "id"])
async def test_revoke_judges_expiry_by_the_time_given(
    store_subject: StoreSubject, by: Name
) -> None:
    store, now = store_subject.store, store_subject.now()
    # Live by the store's clock, expired at the time given: nothing to purge.
    session = await _created(store, _session(now, expires_in=DAY))
    assert await _revoke(store, session.expires_at, session, by) is None
    assert await _revoked_at(store, session) is None
    # Expired by the store's clock, live at the time given: revoked.
    assert await _revoke(store, session.expires_at - MICROSECOND, session, by) == (
        StoreRevocation(session.token_hash, True)
    )
    past = await _created(store, _session(now, expires_in=-HOUR))
    assert await _revoke(store, now - 2 * HOUR, past, by) == StoreRevocation(past.token_hash, True)


async def test_revoke_needs_exactly_one_name(store_subject: StoreSubject) -> None:
    store, now = store_subject.store, store_subject.now()
    session = await _created(store, _session(now))
    with pytest.raises(ValueError, match="exactly one"):
        await store.revoke(now)
    with pytest.raises(ValueError, match="exactly one"):
        await store.revoke(now, token_hash=session.token_hash, session_id=session.session_id)
    assert await _revoked_at(store, session) is None


# --- revoke_user ---------------------------------------------------------------------------


async def test_revoke_user_revokes_only_the_live_sessions_of_that_user(
    store_subject: StoreSubject,
) -> None:
    store, now = store_subject.store, store_subject.now()
    user = f"user-{uuid4().hex[:8]}"
    live = [await _created(store, _session(now, user_id=user)) for _ in range(3)]
    already = await _created(store, _session(now, user_id=user, revoked_at=now - DAY))
    expired = await _created(store, _session(now, user_id=user, expires_in=-HOUR))
    other = await _created(store, _session(now))

    revoked = await store.revoke_user(user, now)

    assert _hexes(revoked) == _hexes([s.token_hash for s in live])
    for session in live:
        assert await _revoked_at(store, session) == now
    assert await _revoked_at(store, already) == now - DAY
    assert await _revoked_at(store, expired) is None
    assert await _revoked_at(store, other) is None
    assert await store.revoke_user(user, now + HOUR) == []
    assert await store.revoke_user(f"user-{uuid4().hex[:8]}", now) == []


async def test_revoke_user_judges_expiry_by_the_time_given(store_subject: StoreSubject) -> None:
    store, now = store_subject.store, store_subject.now()
    user = f"user-{uuid4().hex[:8]}"
    session = await _created(store, _session(now, user_id=user, expires_in=DAY))
    assert await store.revoke_user(user, now + 2 * DAY) == []  # live now, expired then
    past = await _created(store, _session(now, user_id=user, expires_in=-HOUR))
    revoked = await store.revoke_user(user, now - 2 * HOUR)  # expired now, live then
    assert _hexes(revoked) == _hexes([session.token_hash, past.token_hash])
    assert await _revoked_at(store, past) == now - 2 * HOUR


# --- revoked_since -------------------------------------------------------------------------


async def test_revoked_since_includes_revocations_at_or_after_since(
    store_subject: StoreSubject,
) -> None:
    store, now = store_subject.store, store_subject.now()
    at = now.replace(microsecond=500_000) - HOUR
    revoked = await _created(store, _session(now))
    earlier = await _created(store, _session(now))
    await _created(store, _session(now))  # never revoked
    await store.revoke(at, token_hash=revoked.token_hash)
    await store.revoke(at - HOUR, token_hash=earlier.token_hash)
    assert _hexes(await store.revoked_since(at)) == [revoked.token_hash.hex]
    assert await store.revoked_since(at + MICROSECOND) == []
    both = _hexes([revoked.token_hash, earlier.token_hash])
    assert _hexes(await store.revoked_since(at - HOUR)) == both


async def test_revoked_since_judges_expiry_by_the_store_clock(
    store_subject: StoreSubject,
) -> None:
    store, now = store_subject.store, store_subject.now()
    live = await _created(store, _session(now, expires_in=DAY))
    # Revoked while live, expired since by the store's clock: no longer worth re-applying,
    # although it expired after both ``since`` and its revocation.
    lapsed = await _created(store, _session(now, expires_in=-30 * timedelta(minutes=1)))
    for session in (live, lapsed):
        assert await store.revoke(now - HOUR, token_hash=session.token_hash) is not None
    assert _hexes(await store.revoked_since(now - 3 * HOUR)) == [live.token_hash.hex]


async def test_revoked_since_reads_the_store_clock_on_every_call(
    store_subject: StoreSubject,
) -> None:
    store, now = store_subject.store, store_subject.now()
    lifetime = timedelta(seconds=0.5)  # long enough for the first call on a busy machine
    session = await _created(store, _session(now, expires_in=lifetime))
    await store.revoke(now - timedelta(seconds=1), token_hash=session.token_hash)
    assert _hexes(await store.revoked_since(now - HOUR)) == [session.token_hash.hex]
    await store_subject.wait(lifetime.total_seconds())
    for _ in range(40):  # bounded poll: Postgres's now() is its own reading of the clock
        if await store.revoked_since(now - HOUR) == []:
            break
        await store_subject.wait(0.025)
    assert await store.revoked_since(now - HOUR) == []


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
        await store.revoke(now, token_hash=session.token_hash)
    with pytest.raises(StoreUnavailable):
        await store.revoke(now, session_id=session.session_id)
    with pytest.raises(StoreUnavailable):
        await store.revoke_user(session.user_id, now)
    with pytest.raises(StoreUnavailable):
        await store.revoked_since(now)
    health = await store.health()  # never raises
    assert health.connected is False
    assert health.error
