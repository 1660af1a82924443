"""In-memory fakes of the core's ports, for the unit tier (no I/O).

``InMemorySessionStore`` follows the ``SessionStore`` contract as the Postgres
adapter implements it; ``InMemorySessionCache`` follows the ``SessionCache``
contract with the same conditional fill as the Redis Lua script. Neither ever
suspends on its own, so a test controls every interleaving: the only yield
points are the store's ``gate`` and the cache's ``hanging`` switch.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from session_authority.core.domain import Position, Reason, Session, SessionSummary, TokenHash
from session_authority.core.errors import CacheReplaced, CacheUnavailable, StoreUnavailable
from session_authority.core.health import CacheHealth, StoreHealth
from session_authority.core.local import LocalCache, RevocationFeed
from session_authority.core.ports import (
    Cached,
    CachedVerdict,
    CacheEntry,
    SessionCache,
    SessionStore,
    StoreRevocation,
    Touched,
)
from session_authority.core.telemetry import NoMetrics
from session_authority.core.watermark import NOTHING, RevocationMarks, horizon_below, mark_of

__all__ = [
    "FakeClock",
    "InMemoryRevocationFeed",
    "InMemoryRevocationHub",
    "InMemorySessionCache",
    "InMemorySessionStore",
    "RecordingMetrics",
    "until",
]


def _utcnow() -> datetime:
    return datetime.now(UTC)


async def until(predicate: Callable[[], bool], rounds: int = 100) -> None:
    """Let other tasks run until ``predicate`` holds: scheduling, never wall time."""
    for _ in range(rounds):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"still false after {rounds} scheduling rounds")


class FakeClock:
    """One hand-driven time source: aware UTC datetimes for the service and
    the store, monotonic seconds for the cache TTLs and the breaker."""

    def __init__(self, start: datetime | None = None) -> None:
        self._wall = start or datetime(2030, 1, 1, tzinfo=UTC)
        self._mono = 10_000.0

    def now(self) -> datetime:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._wall += timedelta(seconds=seconds)
        self._mono += seconds

    def set_wall(self, when: datetime) -> None:
        """The wall clock alone jumps (NTP, a VM resumed): monotonic time does not."""
        self._wall = when


def _copied(session: Session) -> Session:
    """Postgres hands out rows, not references: callers never share metadata with it."""
    return replace(session, metadata=dict(session.metadata))


def _canonical_id(session_id: str) -> str:
    """The uuid column's reading of a session id; the driver refuses anything else
    (asyncpg's DataError, which the adapter reports as StoreUnavailable)."""
    try:
        return str(uuid.UUID(session_id))
    except ValueError:
        raise StoreUnavailable(f"invalid input for query argument: {session_id!r}") from None


class RecordingMetrics(NoMetrics):
    """``CoreMetrics`` that keeps what the core reported of its touches (the
    rest, as ``NoMetrics``, is dropped)."""

    def __init__(self) -> None:
        self.touches: Counter[str] = Counter()
        self.touch_writes: Counter[str] = Counter()

    def touched(self, answer: str) -> None:
        self.touches[answer] += 1

    def touch_write(self, outcome: str) -> None:
        self.touch_writes[outcome] += 1


class InMemorySessionStore:
    """The source of truth, in a dict, with the Postgres adapter's semantics: session
    ids are UUIDs (matched in any case, read back canonical), ids and token hashes are
    unique, a session must expire after its creation, and what goes in or comes out
    is a copy.

    Time, as the SQL reads it: ``revoke`` and ``revoke_user`` stamp ``revoked_at``
    and judge liveness (``revoked_now``) by the injected ``clock`` (Postgres's
    ``now()``), and so does ``revoked_since``'s window; ``create`` and ``find``
    read no clock. Revocations stay pending (``pending_purges``) until
    ``confirm_purged``, ordered by ``revoked_at``.

    * ``unavailable = True`` makes every call but ``health`` raise
      ``StoreUnavailable`` (``health`` reports ``connected=False``).
    * ``calls`` counts calls per method name, failed ones included.
    * ``gate``: when set, ``find`` reads its answer, then waits for the event
      before returning it, so a test can hold a miss between its read and its
      fill. ``parked`` is how many finds are waiting; ``wait_parked(n)``
      returns once at least ``n`` are.
    """

    def __init__(self, clock: Callable[[], datetime] = _utcnow) -> None:
        self._now = clock
        self._by_hash: dict[str, Session] = {}
        self._hash_by_id: dict[str, str] = {}
        self._pending: set[str] = set()
        #: Per revoked hash, the "transaction" that revoked it (one per call).
        self._xid: dict[str, int] = {}
        self._next_xid = 1
        self._confirmed = NOTHING
        #: What migration 0004 makes in Postgres: one random secret per store.
        self._page_token_key = uuid.uuid4().bytes + uuid.uuid4().bytes
        self.calls: Counter[str] = Counter()
        self.unavailable = False
        self.gate: asyncio.Event | None = None
        self.parked = 0
        self._parked_changed = asyncio.Event()

    def _enter(self, method: str) -> None:
        self.calls[method] += 1
        if self.unavailable:
            raise StoreUnavailable(f"in-memory store switched off ({method})")

    # --- test helpers (not part of the port, not counted) -------------------

    def peek(self, token_hash: TokenHash) -> Session | None:
        return self._by_hash.get(token_hash.hex)

    def put(self, session: Session) -> None:
        """Insert or replace a session directly (e.g. one revoked long ago),
        without the checks ``create`` makes."""
        self._by_hash[session.token_hash.hex] = _copied(session)
        if session.revoked_at is not None and session.token_hash.hex not in self._xid:
            self._next_xid += 1  # the trigger's transaction id, as Postgres stamps an INSERT
            self._xid[session.token_hash.hex] = self._next_xid
        try:
            id_key = _canonical_id(session.session_id)
        except StoreUnavailable:
            id_key = session.session_id
        self._hash_by_id[id_key] = session.token_hash.hex

    async def wait_parked(self, count: int) -> None:
        while self.parked < count:
            self._parked_changed.clear()
            await self._parked_changed.wait()

    # --- SessionStore -------------------------------------------------------

    async def create(self, session: Session) -> None:
        self._enter("create")
        session_id = _canonical_id(session.session_id)
        if session.token_hash.hex in self._by_hash or session_id in self._hash_by_id:
            # Postgres raises a unique violation, which the adapter reports as
            # StoreUnavailable like every other driver error.
            raise StoreUnavailable("duplicate session id or token hash")
        if session.expires_at <= session.created_at:
            raise StoreUnavailable('violates check constraint "sessions_expiry_after_creation"')
        self.put(replace(session, session_id=session_id))

    async def find(self, token_hash: TokenHash) -> Session | None:
        self._enter("find")
        session = self._by_hash.get(token_hash.hex)  # the read: a snapshot
        session = None if session is None else _copied(session)
        if self.gate is not None:
            self.parked += 1
            self._parked_changed.set()
            try:
                await self.gate.wait()
            finally:
                self.parked -= 1
        return session

    async def revoke(
        self, *, token_hash: TokenHash | None = None, session_id: str | None = None
    ) -> StoreRevocation | None:
        if (token_hash is None) == (session_id is None):
            raise ValueError("name exactly one of token_hash or session_id")
        self._enter("revoke")
        if token_hash is not None:
            key: str | None = token_hash.hex
        else:
            key = self._hash_by_id.get(_canonical_id(session_id or ""))
        session = self._by_hash.get(key) if key is not None else None
        if session is None:
            return None
        if session.revoked_at is not None:
            return StoreRevocation(session.token_hash, revoked_now=False)
        self._next_xid += 1
        return self._revoke(session)

    def _revoke(self, session: Session) -> StoreRevocation:
        now = self._now()
        self._xid[session.token_hash.hex] = self._next_xid
        self.put(replace(session, revoked_at=now))
        self._pending.add(session.token_hash.hex)
        return StoreRevocation(session.token_hash, revoked_now=session.expires_at > now)

    async def revoke_user(self, user_id: str) -> list[StoreRevocation]:
        self._enter("revoke_user")
        self._next_xid += 1
        return [
            self._revoke(session)
            for session in list(self._by_hash.values())
            if session.user_id == user_id and session.revoked_at is None
        ]

    async def revoke_user_except(
        self, user_id: str, session_id: str
    ) -> list[StoreRevocation] | None:
        self._enter("revoke_user_except")
        kept_key = self._hash_by_id.get(_canonical_id(session_id))
        kept = self._by_hash.get(kept_key) if kept_key is not None else None
        if kept is None or kept.user_id != user_id:
            return None
        self._next_xid += 1
        return [
            self._revoke(session)
            for session in list(self._by_hash.values())
            if session.user_id == user_id
            and session.revoked_at is None
            and session.token_hash != kept.token_hash
        ]

    async def list_user_sessions(
        self, user_id: str, *, include_revoked: bool, after: Position | None, limit: int
    ) -> list[SessionSummary]:
        self._enter("list_user_sessions")
        now = self._now()
        found = sorted(
            (
                s
                for s in self._by_hash.values()
                if s.user_id == user_id
                and (include_revoked or (s.revoked_at is None and s.expires_at > now))
                and (after is None or Position(s.created_at, s.session_id) > after)
            ),
            key=lambda s: Position(s.created_at, s.session_id),
        )
        return [
            SessionSummary(
                session_id=s.session_id,
                user_id=s.user_id,
                created_at=s.created_at,
                expires_at=s.expires_at,
                metadata=dict(s.metadata),
                revoked_at=s.revoked_at,
            )
            for s in found[:limit]
        ]

    async def page_token_key(self) -> bytes:
        self._enter("page_token_key")
        return self._page_token_key

    async def revoked_since(self, seconds: float) -> list[TokenHash]:
        self._enter("revoked_since")
        since = self._now() - timedelta(seconds=seconds)
        return [
            s.token_hash
            for s in self._by_hash.values()
            if s.revoked_at is not None and s.revoked_at >= since
        ]

    async def pending_purges(self, limit: int) -> list[TokenHash]:
        self._enter("pending_purges")
        pending = sorted(
            (self._by_hash[h] for h in self._pending),
            key=lambda s: s.revoked_at or datetime.min.replace(tzinfo=UTC),
        )
        return [s.token_hash for s in pending[:limit]]

    async def confirm_purged(self, token_hashes: Sequence[TokenHash]) -> None:
        self._enter("confirm_purged")
        self._pending.difference_update(h.hex for h in token_hashes)

    async def revocation_marks(self) -> RevocationMarks:
        self._enter("revocation_marks")
        # Every "transaction" here has ended: the horizon is past the latest.
        return RevocationMarks(self._confirmed, horizon_below(self._next_xid + 1))

    async def revocations_after(
        self, after: str, limit: int, window: float
    ) -> list[tuple[str, TokenHash]]:
        self._enter("revocations_after")
        since = self._now() - timedelta(seconds=window)
        marked = sorted(
            (mark_of(self._xid.get(s.token_hash.hex, 0), s.token_hash), s.token_hash)
            for s in self._by_hash.values()
            if s.revoked_at is not None and s.revoked_at >= since
        )
        return [(mark, h) for mark, h in marked if mark > after][:limit]

    async def confirm_watermark(self, mark: str) -> None:
        self._enter("confirm_watermark")
        self._confirmed = max(self._confirmed, mark)

    def pending(self) -> set[TokenHash]:
        """Test helper: every revocation not confirmed yet."""
        return {TokenHash(h) for h in self._pending}

    async def find_many(self, token_hashes: Sequence[TokenHash]) -> dict[TokenHash, Session]:
        """``find`` for each, as one query (one snapshot), gated like ``find``."""
        if not token_hashes:
            return {}
        self._enter("find_many")
        found = {
            token_hash: _copied(self._by_hash[token_hash.hex])
            for token_hash in token_hashes
            if token_hash.hex in self._by_hash
        }
        if self.gate is not None:
            self.parked += 1
            self._parked_changed.set()
            try:
                await self.gate.wait()
            finally:
                self.parked -= 1
        return found

    async def health(self) -> StoreHealth:
        self.calls["health"] += 1
        if self.unavailable:
            return StoreHealth(connected=False, error="in-memory store switched off")
        return StoreHealth(connected=True, version="in-memory")

    async def touch(
        self,
        *,
        token_hash: TokenHash | None = None,
        session_id: str | None = None,
        extend_by: timedelta,
        max_lifetime: timedelta,
        interval: float,
    ) -> Touched | None:
        """As the SQL does it, by the injected clock (Postgres's ``now()``);
        no row is ever locked here, so nothing is skipped for a lock."""
        if (token_hash is None) == (session_id is None):
            raise ValueError("name exactly one of token_hash or session_id")
        self._enter("touch")
        if token_hash is not None:
            key: str | None = token_hash.hex
        else:
            key = self._hash_by_id.get(_canonical_id(session_id or ""))
        session = self._by_hash.get(key) if key is not None else None
        if session is None:
            return None
        now = self._now()
        seen = session.last_seen_at
        due = seen is None or seen <= now - timedelta(seconds=interval)
        live = session.revoked_at is None and session.expires_at > now
        written = live and due
        if written:
            wanted = min(session.created_at + max_lifetime, now + extend_by)
            session = replace(session, expires_at=max(session.expires_at, wanted), last_seen_at=now)
            self.put(session)
        seen = session.last_seen_at
        quiet = 0.0 if seen is None else max(0.0, interval - (now - seen).total_seconds())
        return Touched(_copied(session), written, live, quiet)


class _CreatedMarker:
    """What ``mark_created`` stores: not an answer, but it blocks verdict fills."""

    def __repr__(self) -> str:
        return "<created>"


_CREATED = _CreatedMarker()
_Stored = CacheEntry | _CreatedMarker
_log = logging.getLogger("tests.fakes.cache")


@dataclass(frozen=True, slots=True)
class _Slot:
    """One key: the entry, the token hash recorded beside it (Redis's ``token_hash``
    field, checked on read), and when it expires on the cache's clock."""

    stored: _Stored
    recorded_as: str
    expires_at: float
    #: When a fill wrote it, on the cache's clock (None: not written by a fill).
    filled_at: float | None = None


def _copy(entry: _Stored) -> _Stored:
    """What Redis keeps is a copy: later changes to the caller's metadata do not reach it."""
    return replace(entry, metadata=dict(entry.metadata)) if isinstance(entry, Session) else entry


#: What ``InMemorySessionCache.snapshot`` copies: entries, marker, watermark.
_Snapshot = tuple[dict[str, _Slot], int | None, str]


class InMemorySessionCache:
    """The cache, in a dict, with the Redis adapter's semantics.

    ``fill`` mirrors the Lua script: refused (False) over a live tombstone; a
    verdict other than REVOKED is written only where nothing is cached (True
    either way); a live session or a REVOKED verdict replaces anything else.
    ``mark_created`` writes a creation marker through the same script (so it
    replaces anything but a tombstone); ``get`` reads the marker as a miss.
    ``tombstone`` is unconditional. TTLs run on the injected monotonic clock.
    Each key also records the token hash it was written for, and ``get`` reports
    an entry recorded for another hash as a miss, as the adapter's integrity check
    does; the fill rules, like the Lua, look only at what is stored.

    * ``unavailable = True``: every call but ``health`` raises ``CacheUnavailable``.
    * ``hanging = True``: every call but ``health`` awaits forever, like a
      frozen Redis; only a timeout or cancellation ends it.
    * ``health`` never raises: it reports ``connected=False`` in both cases
      (the real adapter's socket timeout bounds it).
    * ``calls`` counts calls per method name, failed and hung ones included.
    * ``get_gate``: when set, ``get`` reads its answer, then waits for the event
      before returning it (a reply delayed on the way back).
    * ``fill_gate``: when set, ``fill`` applies its write, then waits for the
      event before answering (a reply delayed on the way back), so a test can
      hold a fill that Redis has already executed. ``parked_fills`` counts them.
    * Server identity, as the adapter sees Redis's ``run_id``: ``snapshot()``
      copies the entries (an RDB), ``restart(snapshot)`` is a new server
      process holding that snapshot (or nothing), ``flush()`` empties it. Once
      ``adopt`` has trusted a server, every call on another one raises
      ``CacheReplaced`` (after a restart every connection is new), and
      ``verify`` also notices the marker ``adopt`` left gone (a flush).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[str, _Slot] = {}
        self.calls: Counter[str] = Counter()
        self.unavailable = False
        self.hanging = False
        self.fill_gate: asyncio.Event | None = None
        self.get_gate: asyncio.Event | None = None
        self.parked_gets = 0
        self.parked_fills = 0
        self._parked_changed = asyncio.Event()
        self._server = 1  # the run_id of the server process
        self._trusted: int | None = None
        self._marker: int | None = None
        self._watermark = NOTHING
        self._lease_until = -math.inf

    async def _enter(self, method: str) -> None:
        self.calls[method] += 1
        if self.hanging:
            await asyncio.Event().wait()  # nobody ever sets it
        if self.unavailable:
            raise CacheUnavailable(f"in-memory cache switched off ({method})")
        if self._trusted is not None and self._server != self._trusted:
            raise CacheReplaced(f"server {self._server} is not the trusted {self._trusted}")

    def _live(self, key: str) -> _Slot | None:
        slot = self._entries.get(key)
        if slot is None:
            return None
        if self._clock() >= slot.expires_at:
            del self._entries[key]
            return None
        return slot

    def _write(
        self,
        key: str,
        entry: _Stored,
        ttl: float,
        recorded_as: str | None = None,
        *,
        filled: bool = False,
    ) -> None:
        ttl_ms = max(1, int(ttl * 1000))  # as the adapter sends PEXPIRE
        now = self._clock()
        expires_at = now + ttl_ms / 1000
        self._entries[key] = _Slot(
            _copy(entry), recorded_as or key, expires_at, now if filled else None
        )

    def _answer(self, token_hash: TokenHash, *, report: bool) -> Cached | None:
        """What ``get`` answers: None on a miss, a creation marker, or an entry
        recorded for another hash (checked first, as the adapter does)."""
        slot = self._live(token_hash.hex)
        if slot is None:
            return None
        if slot.recorded_as != token_hash.hex:
            if report:
                _log.warning(
                    "Token mismatch: cache entry for %s holds another hash; dropped",
                    token_hash.prefix,
                )
            return None
        if isinstance(slot.stored, _CreatedMarker):
            return None
        now = self._clock()
        age = None if slot.filled_at is None else max(0.0, now - slot.filled_at)
        return Cached(slot.stored, slot.expires_at - now, age)

    # --- test helpers (not part of the port, not counted) -------------------

    def snapshot(self) -> _Snapshot:
        """The keys as an RDB would hold them: entries (expiry times included),
        the marker and the watermark."""
        return dict(self._entries), self._marker, self._watermark

    def restart(self, snapshot: _Snapshot | None = None) -> None:
        """A new server process, loaded from ``snapshot`` if given."""
        self._server += 1
        self.rewind(snapshot or ({}, None, NOTHING))

    def rewind(self, snapshot: _Snapshot) -> None:
        """The same server process back at ``snapshot`` (a backup restored into
        it, DEBUG RELOAD, SWAPDB): the marker comes back with the data."""
        entries, marker, watermark = snapshot
        self._entries, self._marker, self._watermark = dict(entries), marker, watermark

    def flush(self) -> None:
        """FLUSHALL: same server, nothing in it."""
        self._entries.clear()
        self._marker = None
        self._watermark = NOTHING

    def peek(self, token_hash: TokenHash) -> CacheEntry | None:
        """What ``get`` would answer, without counting a call."""
        hit = self._answer(token_hash, report=False)
        return None if hit is None else hit.entry

    def has_creation_marker(self, token_hash: TokenHash) -> bool:
        slot = self._live(token_hash.hex)
        return slot is not None and isinstance(slot.stored, _CreatedMarker)

    async def wait_parked_fills(self, count: int) -> None:
        while self.parked_fills < count:
            self._parked_changed.clear()
            await self._parked_changed.wait()

    def remaining_ttl(self, token_hash: TokenHash) -> float | None:
        slot = self._live(token_hash.hex)
        return None if slot is None else slot.expires_at - self._clock()

    def put(
        self,
        token_hash: TokenHash,
        entry: CacheEntry,
        ttl: float,
        *,
        recorded_as: TokenHash | None = None,
    ) -> None:
        """Write unconditionally (e.g. a stale entry left from before). With
        ``recorded_as``, the entry is recorded for that other hash: a corrupt
        or poisoned entry, which ``get`` must report as a miss."""
        self._write(token_hash.hex, entry, ttl, None if recorded_as is None else recorded_as.hex)

    # --- SessionCache -------------------------------------------------------

    async def get(self, token_hash: TokenHash) -> Cached | None:
        await self._enter("get")
        answer = self._answer(token_hash, report=True)
        if self.get_gate is not None:
            self.parked_gets += 1
            self._parked_changed.set()
            try:
                await self.get_gate.wait()
            finally:
                self.parked_gets -= 1
        return answer

    async def wait_parked_gets(self, count: int) -> None:
        while self.parked_gets < count:
            self._parked_changed.clear()
            await self._parked_changed.wait()

    def _conditional_write(
        self, key: str, entry: _Stored, ttl: float, *, filled: bool = False
    ) -> bool:
        """The Lua fill script: it reads the state only, never the recorded hash."""
        slot = self._live(key)
        current = None if slot is None else slot.stored
        if isinstance(current, CachedVerdict) and current.reason is Reason.REVOKED:
            return False
        is_plain_verdict = isinstance(entry, CachedVerdict) and entry.reason is not Reason.REVOKED
        if is_plain_verdict and current is not None:
            return True  # not written, but not refused by a tombstone either
        self._write(key, entry, ttl, filled=filled)
        return True

    async def fill(self, token_hash: TokenHash, entry: CacheEntry, ttl: float) -> bool:
        await self._enter("fill")
        filled = self._conditional_write(token_hash.hex, entry, ttl, filled=True)
        if self.fill_gate is not None:
            self.parked_fills += 1
            self._parked_changed.set()
            try:
                await self.fill_gate.wait()
            finally:
                self.parked_fills -= 1
        return filled

    async def ping(self) -> None:
        await self._enter("ping")

    async def adopt(self) -> None:
        self._trusted = None
        await self._enter("adopt")
        self._trusted = self._marker = self._server

    async def verify(self) -> None:
        await self._enter("verify")
        if self._trusted is None:
            raise CacheReplaced("no server adopted yet")
        if self._marker != self._trusted:
            raise CacheReplaced("the marker is gone: flushed or replaced")

    async def mark_created(self, token_hash: TokenHash, ttl: float) -> None:
        await self._enter("mark_created")
        self._conditional_write(token_hash.hex, _CREATED, ttl)

    async def tombstone(self, token_hashes: Sequence[TokenHash], ttl: float) -> None:
        await self._enter("tombstone")
        for token_hash in token_hashes:
            self._write(token_hash.hex, CachedVerdict(Reason.REVOKED), ttl)

    async def watermark(self) -> str:
        await self._enter("watermark")
        return self._watermark

    async def lease(self, seconds: float) -> bool:
        await self._enter("lease")
        if self._clock() < self._lease_until:
            return False
        self._lease_until = self._clock() + seconds
        return True

    async def release(self) -> None:
        await self._enter("release")
        self._lease_until = -math.inf

    async def seal(
        self, token_hashes: Sequence[TokenHash], ttl: float, *, floor: str, mark: str
    ) -> str:
        await self._enter("seal")
        for token_hash in token_hashes:
            self._write(token_hash.hex, CachedVerdict(Reason.REVOKED), ttl)
        if self._watermark < floor:
            raise CacheReplaced(f"watermark {self._watermark!r} below {floor!r}: went back in time")
        self._watermark = max(self._watermark, mark)
        return self._watermark

    async def get_many(self, token_hashes: Sequence[TokenHash]) -> list[Cached | None]:
        """``get`` for each, as one call (one snapshot), gated like ``get``."""
        if not token_hashes:
            return []
        await self._enter("get_many")
        answers = [self._answer(token_hash, report=True) for token_hash in token_hashes]
        if self.get_gate is not None:
            self.parked_gets += 1
            self._parked_changed.set()
            try:
                await self.get_gate.wait()
            finally:
                self.parked_gets -= 1
        return answers

    async def health(self) -> CacheHealth:
        self.calls["health"] += 1
        if self.unavailable or self.hanging:
            return CacheHealth(connected=False, error="in-memory cache switched off")
        return CacheHealth(connected=True, version="in-memory", total_keys=len(self._entries))


class InMemoryRevocationHub:
    """Pub/sub between in-memory processes: ``feed()`` makes one process's
    ``RevocationFeed``. Publishing drops the hashes from every live feed's
    local cache and is acknowledged by all of them at once."""

    def __init__(self) -> None:
        self.feeds: list[InMemoryRevocationFeed] = []
        self.published: list[list[TokenHash] | None] = []

    def feed(self, local: LocalCache | None) -> InMemoryRevocationFeed:
        feed = InMemoryRevocationFeed(self, local)
        self.feeds.append(feed)
        return feed


class InMemoryRevocationFeed:
    """* ``subscribed = False``: cut off (not live, hears nothing; forgets its
    L1 the moment it is cut, as the Redis bus does).
    * ``deaf = True``: counted as a subscriber but never acknowledges (a process
    frozen while connected)."""

    def __init__(self, hub: InMemoryRevocationHub, local: LocalCache | None) -> None:
        self._hub = hub
        self._local = local
        self._subscribed = True
        self.deaf = False
        self.restarts = 0
        self.malformed = 0

    @property
    def live(self) -> bool:
        return self._subscribed

    @property
    def state(self) -> str:
        return "live" if self._subscribed else "subscribing"

    @property
    def subscribed(self) -> bool:
        return self._subscribed

    @subscribed.setter
    def subscribed(self, value: bool) -> None:
        if self._local is not None and value != self._subscribed:
            self._local.drop(None)
        self._subscribed = value

    async def publish(self, token_hashes: Iterable[TokenHash] | None) -> bool:
        hashes = None if token_hashes is None else list(token_hashes)
        self._hub.published.append(hashes)
        acknowledged = True
        for feed in self._hub.feeds:
            if not feed._subscribed:
                continue
            if feed.deaf:
                acknowledged = False
                continue
            if feed._local is not None:
                feed._local.drop(hashes)
        return acknowledged


# Structural checks, run by `make typecheck` (mypy --strict covers tests/): a fake whose
# method is renamed, dropped or re-signed no longer satisfies its port, and fails here.
_store_check: SessionStore = InMemorySessionStore()
_cache_check: SessionCache = InMemorySessionCache()
_feed_check: RevocationFeed = InMemoryRevocationHub().feed(None)
