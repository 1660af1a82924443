"""Ports: what the core needs from the outside world, by role.

Adapters implement these by technology (``RedisSessionCache``,
``PostgresSessionStore``); tests use in-memory fakes (``InMemory…``).

Each method also says how the core reaches it, where it is declared:
``@guarded`` (through the port's breaker, timed, its failures counted) or
``@unguarded`` (straight to the adapter: a method that reports on the
dependency itself and never raises). ``core/guarded.py`` builds each port's
wrapper from these declarations, once, at import, and refuses a port with a
method that declares neither (``guards``), so a new method cannot skip the
breaker by omission.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, Protocol, TypeAlias, TypeVar

from session_authority.core.domain import Position, Reason, Session, SessionSummary, TokenHash
from session_authority.core.health import CacheHealth, StoreHealth
from session_authority.core.watermark import RevocationMarks

__all__ = [
    "CacheEntry",
    "Cached",
    "CachedVerdict",
    "Guard",
    "SessionCache",
    "SessionStore",
    "StoreRevocation",
    "Touched",
    "guarded",
    "guards",
    "unguarded",
]

Guard: TypeAlias = Literal["guarded", "unguarded"]
_GUARD = "__session_authority_guard__"
F = TypeVar("F", bound=Callable[..., Any])


def guarded(method: F) -> F:
    """Declares a port method reached through the port's breaker: refused at
    once while the breaker is open, bounded by its timeout, timed by the
    port's observer and counted by the breaker when it fails."""
    setattr(method, _GUARD, "guarded")
    return method


def unguarded(method: F) -> F:
    """Declares a port method called straight on the adapter, neither through
    the breaker nor timed as one call: one that reports on the dependency
    itself and never raises (``health``)."""
    setattr(method, _GUARD, "unguarded")
    return method


def guards(port: type) -> dict[str, Guard]:
    """Each method ``port`` declares -> how it is guarded. ``TypeError``
    naming a method that declares neither ``@guarded`` nor ``@unguarded``, or
    a data member (a wrapper can only pass methods through)."""
    if vars(port).get("__annotations__"):
        raise TypeError(f"{port.__name__} declares data members: a port declares methods only")
    found: dict[str, Guard] = {}
    for name, member in vars(port).items():
        if name.startswith("_") or not callable(member):
            continue
        if not inspect.iscoroutinefunction(member):
            raise TypeError(f"{port.__name__}.{name} is not a coroutine: a port method awaits")
        guard: Guard | None = getattr(member, _GUARD, None)
        if guard is None:
            raise TypeError(
                f"{port.__name__}.{name} declares no guard: mark it @guarded or @unguarded"
            )
        found[name] = guard
    return found


@dataclass(frozen=True, slots=True)
class CachedVerdict:
    """A cached negative answer. ``REVOKED`` is a tombstone: it refuses fills."""

    reason: Reason


#: What the cache holds for a token hash: a live session or a verdict.
CacheEntry = Session | CachedVerdict


@dataclass(frozen=True, slots=True)
class Cached:
    """A cache hit: the entry, and how many seconds the cache will keep it
    (``math.inf`` when it has no expiry). The core uses the latter to refresh
    hot entries shortly before they expire (XFetch)."""

    entry: CacheEntry
    ttl_left: float
    #: Seconds since the entry was filled (by the filling process's clock, never
    #: below zero); None when unknown (a tombstone, an entry of an older release).
    age: float | None = None


@dataclass(frozen=True, slots=True)
class StoreRevocation:
    """One session touched by a revocation in the store."""

    token_hash: TokenHash
    #: True when this call ended a live session; False when it was already revoked.
    revoked_now: bool


@dataclass(frozen=True, slots=True)
class Touched:
    """What a store touch found and did (``SessionStore.touch``)."""

    #: The session as it stands after the call (new expiry and ``last_seen_at``
    #: when written).
    session: Session
    #: This call wrote the row.
    written: bool
    #: Live by the store's clock (not revoked, not expired) after the call.
    live: bool
    #: Seconds until the row may be written again (the rest of the interval
    #: since its last write, by the store's clock; 0 when due now).
    quiet_for: float


class SessionStore(Protocol):
    """The source of truth (Postgres). Every method raises ``StoreUnavailable``
    when the store cannot be reached or fails; none returns a guess.

    Revocations are stamped by the store's own clock (Postgres ``now()``), and
    every window below is measured by it: no decision compares two replicas'
    clocks. A revocation stays *pending* until ``confirm_purged`` says its
    tombstone reached the cache, so any replica can finish what a revoker that
    died (or lost Redis) left undone."""

    @guarded
    async def create(self, session: Session) -> None:
        """Insert a new session. Session ids and token hashes are unique."""

    @guarded
    async def find(self, token_hash: TokenHash) -> Session | None:
        """The session with this token hash, revoked and expired ones included;
        ``None`` when no session ever had it."""

    @guarded
    async def revoke(
        self, *, token_hash: TokenHash | None = None, session_id: str | None = None
    ) -> StoreRevocation | None:
        """Revoke the one session named by exactly one of ``token_hash`` or
        ``session_id`` unless it is revoked already, expired or not (the store's
        clock decides ``revoked_now``: whether it was live). ``None`` when no
        such session exists; ``revoked_now=False`` when it was revoked before
        or had expired. A newly revoked session is left pending."""

    @guarded
    async def revoke_user(self, user_id: str) -> list[StoreRevocation]:
        """Revoke every session of the user not revoked yet (expired ones too),
        leaving each pending; ``revoked_now`` says which were live."""

    @guarded
    async def revoked_since(self, seconds: float) -> list[TokenHash]:
        """Hashes of sessions revoked in the last ``seconds`` by the store's
        clock, expired or not (to re-apply what a cache may have lost)."""

    @guarded
    async def pending_purges(self, limit: int) -> list[TokenHash]:
        """Up to ``limit`` revocations whose tombstone is not confirmed yet,
        oldest first."""

    @guarded
    async def confirm_purged(self, token_hashes: Sequence[TokenHash]) -> None:
        """Record that these revocations' tombstones are in the cache."""

    @guarded
    async def revocation_marks(self) -> RevocationMarks:
        """The watermark confirmed so far and the horizon that may be sealed
        now (``core/watermark.py``), read together in one query."""

    @guarded
    async def revocations_after(
        self, after: str, limit: int, window: float
    ) -> list[tuple[str, TokenHash]]:
        """Up to ``limit`` revocations with a mark above ``after``, in mark
        order, as ``(mark, hash)``: only those revoked in the last ``window``
        seconds (the store's clock), expired sessions included."""

    @guarded
    async def confirm_watermark(self, mark: str) -> None:
        """Record that the cache holds the watermark ``mark`` (never lowers it)."""

    @unguarded
    async def health(self) -> StoreHealth:
        """Connection state, version, pool numbers and a live ping. Never raises."""

    @guarded
    async def list_user_sessions(
        self, user_id: str, *, include_revoked: bool, after: Position | None, limit: int
    ) -> list[SessionSummary]:
        """Up to ``limit`` sessions of ``user_id`` in ``Position`` order
        (``created_at``, then ``session_id``), only those strictly after
        ``after`` when given. Only live ones (not revoked, expiring after the
        store's clock) unless ``include_revoked``, then every one, with its
        ``revoked_at``. Read from the store itself, never a cache; an unknown
        user has none. Never reads or returns a token hash."""

    @guarded
    async def revoke_user_except(
        self, user_id: str, session_id: str
    ) -> list[StoreRevocation] | None:
        """``revoke_user`` sparing the one session ``session_id`` (a canonical
        UUID), in one atomic step, provided it is a session of ``user_id``
        (revoked, expired or live). ``None``, with nothing revoked, when no
        session of that user has this id. A session created while the step runs
        (committed after it began) is not revoked."""

    @guarded
    async def page_token_key(self) -> bytes:
        """The secret every replica shares to sign page tokens (made once with
        the store's schema, kept across restarts). At least 16 bytes."""

    @guarded
    async def touch(
        self,
        *,
        token_hash: TokenHash | None = None,
        session_id: str | None = None,
        extend_by: timedelta,
        max_lifetime: timedelta,
        interval: float,
    ) -> Touched | None:
        """Slide the expiry of the one session named by exactly one of
        ``token_hash`` or ``session_id``, in one statement, by the store's
        clock: only if it is live (not revoked, not expired), its last touch
        (``last_seen_at``) is at least ``interval`` seconds old or never
        happened, and no other transaction holds its row (skipped, never
        waited for: no lock queue however many touch at once). The new expiry
        is ``now + extend_by``, never earlier than the current one, never past
        ``created_at + max_lifetime``; ``last_seen_at`` becomes now. Otherwise
        nothing is written and the session is answered as it stands. ``None``
        when no such session exists."""

    @guarded
    async def find_many(self, token_hashes: Sequence[TokenHash]) -> dict[TokenHash, Session]:
        """``find`` for each hash, in one query (one snapshot): the sessions
        found, revoked and expired ones included, by hash; a hash no session
        ever had is absent. Duplicates are allowed; none given, nothing asked."""


class SessionCache(Protocol):
    """The cache (Redis), keyed by token hash. Every method raises
    ``CacheUnavailable`` on any failure; callers treat that as "no cache"."""

    @guarded
    async def get(self, token_hash: TokenHash) -> Cached | None:
        """The cached entry with its remaining lifetime, or ``None`` on a miss
        (including an entry that fails its integrity check, which is reported
        and dropped, and a creation marker)."""

    @guarded
    async def fill(self, token_hash: TokenHash, entry: CacheEntry, ttl: float) -> bool:
        """Store ``entry`` for ``ttl`` seconds, atomically and conditionally:
        never over a tombstone; a non-revoked verdict only where nothing is
        cached; a tombstone always. False when the fill was refused."""

    @guarded
    async def ping(self) -> None:
        """One round trip to the cache server; raises ``CacheUnavailable``."""

    @guarded
    async def adopt(self) -> None:
        """Trust the cache server reachable now, whatever it holds: record its
        identity (and leave a marker in it). Until then, and whenever a
        connection finds another server (restarted, restored from a snapshot,
        failed over) or the marker gone (flushed), calls raise
        ``CacheReplaced``. The breaker's probe adopts, then re-applies every
        revocation the cache may have lost, before anything reads it again."""

    @guarded
    async def verify(self) -> None:
        """One round trip proving the trusted server still holds its state
        (the marker left by ``adopt``); raises ``CacheReplaced`` if not."""

    @guarded
    async def mark_created(self, token_hash: TokenHash, ttl: float) -> None:
        """Record that a session was just created for this hash, replacing
        anything but a tombstone. ``get`` treats the marker as a miss; it
        exists so that a slow "unknown" fill from a read that predates the
        creation is refused (verdicts are only written where nothing is)."""

    @guarded
    async def tombstone(self, token_hashes: Sequence[TokenHash], ttl: float) -> None:
        """Replace each entry with a revocation tombstone, in one pipelined
        round trip. Succeeds only when every tombstone was written."""

    @guarded
    async def watermark(self) -> str:
        """The revocation watermark the cache holds (``core/watermark.py``);
        ``NOTHING`` when it holds none."""

    @guarded
    async def seal(
        self, token_hashes: Sequence[TokenHash], ttl: float, *, floor: str, mark: str
    ) -> str:
        """Tombstone ``token_hashes`` and raise the watermark to ``mark`` (never
        lower it), atomically: no copy of the cache can hold the new watermark
        without these tombstones. Returns the watermark held afterwards. If the
        cache held less than ``floor`` (it went back in time), the tombstones
        are written, the watermark is left alone and ``CacheReplaced`` is raised."""

    @guarded
    async def lease(self, seconds: float) -> bool:
        """Take the replay lease for ``seconds`` unless another process holds
        it; True when taken. Advisory: it spares a second process from writing
        the same revocations alongside the first, correctness never depends on it."""

    @guarded
    async def release(self) -> None:
        """Give the replay lease back (whoever holds it: it is advisory)."""

    @unguarded
    async def health(self) -> CacheHealth:
        """Server facts, pool numbers and live PING/SET/GET timings. Never raises."""

    @guarded
    async def get_many(self, token_hashes: Sequence[TokenHash]) -> list[Cached | None]:
        """``get`` for each hash, in request order, in one round trip (one
        atomic read on a single node; on a Redis Cluster, one script per hash
        tag, pipelined: atomic per tag only). Each answer follows ``get``'s
        rules on its own: nothing relies on the batch being read at one
        instant. None given, nothing asked. Raises ``CacheUnavailable`` for the
        whole batch."""
