"""Sliding expiry (``TouchSession``): expiry moved forward on request, writes coalesced.

Only a caller that asks slides a session: validation never writes. The store
decides everything that matters, in one statement by its own clock
(``SessionStore.touch``): whether the session is live, whether a write is due
(its last one ``touch_interval`` old), the new expiry (``now + extend_by``,
never earlier than it was, never past ``created_at + session_max_lifetime``),
and it skips a row another transaction holds instead of queueing for it.

Coalescing, in four layers:

1. **In flight**: concurrent touches of one session in this process share one
   statement (a single-flight per session).
2. **Quiet period**: once the store said when the next write may happen
   (``Touched.quiet_for``: the rest of the interval since the last write, on
   any replica), this process answers touches of that session until then from
   what the cache holds (the L1 copy while trusted, else Redis), asking the
   store nothing. A tombstone, a verdict or a miss there sends the call to the
   store instead, so a revoked session is never answered as touched.
3. **Write behind**: when a write is due (the interval is over, or this
   process has not written the session yet), a touch the cache can answer is
   answered so (``written: false``, the expiry as it stood) and the write goes
   on behind it, one in flight per session: no touch waits for Postgres while
   the cache vouches for its session, so a hot session's callers are answered
   at the cost of a cache hit (the bench's ``touch_max_ms``). A touch waits
   for the statement when the cache cannot answer (a miss; a session named by
   id that this process has not touched: the cache is keyed by token hash) or
   when its caller asks for it (``write_through``: answered after the write
   with the new expiry, for a one-off extension whose caller wants to see it).
4. **Across replicas**: the statement's condition (``last_seen_at`` an
   interval old) and ``SKIP LOCKED``: one write per interval at most, and no
   lock waits however many replicas touch at once.

The revocation invariant (``revocation.py``) holds:

* a touch writes only a row that is live by Postgres's clock and not locked by
  a revocation in flight; a revocation that commits first is seen by the
  lock's re-check, so a revoked session is never revived in the store;
* the new expiry reaches the cache by the ordinary conditional fill, which a
  tombstone refuses (the touch then answers FAILED_PRECONDITION), and only
  within ``max_fill_lag`` of the statement, like every fill: a touch racing an
  Invalidate can never put the session back in the cache;
* answers from the cache come from the same sources, under the same rules, as
  a ``ValidateSession`` hit (L1 only while the revocation feed is live and the
  breaker closed); a caller that joins a statement already under way (which
  may predate a revocation that returned before the caller started) re-checks
  the cache, and reads the store itself when the cache cannot vouch.

Freshness of other readers: this process's L1 copy is replaced at once (under
the L1 version rule); every other process's copy lives at most
``L1_CACHE_TTL_MS`` and is replaced from Redis, which holds the new expiry
once the fill landed.

Reported through ``CoreMetrics``: each touch by where its answer came from
(``touched``), each statement by what it did (``touch_write``), so writes
behind that fail (their error is only logged at debug) can be seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from session_authority.core.breaker import Breaker
from session_authority.core.domain import (
    Session,
    TokenHash,
    check_session_id,
    check_ttl,
    is_well_formed,
    parse_token,
)
from session_authority.core.errors import CacheUnavailable, SessionNotFound, SessionNotLive
from session_authority.core.local import LocalCache, RevocationFeed
from session_authority.core.policy import CorePolicy
from session_authority.core.ports import SessionCache, SessionStore
from session_authority.core.singleflight import Flight, SingleFlight
from session_authority.core.telemetry import CoreMetrics, NoMetrics

__all__ = ["Touch", "Toucher"]

_log = logging.getLogger("session_authority.touch")

#: Sessions whose quiet period this process remembers (oldest forgotten first:
#: forgetting one costs one more statement, never a wrong answer).
QUIET_MAX = 100_000


@dataclass(frozen=True, slots=True)
class Touch:
    """The answer to a touch: the session as it now stands, and whether this
    call wrote it (False: coalesced with a recent or concurrent write)."""

    session: Session
    written: bool


class Toucher:
    """``touch``: slide a live session's expiry, coalesced (see the module doc)."""

    def __init__(
        self,
        store: SessionStore,
        cache: SessionCache | None,
        breaker: Breaker,
        policy: CorePolicy,
        *,
        clock: Callable[[], datetime],
        monotonic: Callable[[], float],
        local: LocalCache | None = None,
        feed: RevocationFeed | None = None,
        metrics: CoreMetrics | None = None,
    ) -> None:
        self._store = store
        self._cache = cache
        self._breaker = breaker
        self._policy = policy
        self._now = clock
        self._monotonic = monotonic
        self._local = local if feed is not None else None
        self._feed = feed
        self._metrics = metrics or NoMetrics()
        self._flights: SingleFlight[str, Touch] = SingleFlight(clock=monotonic)
        # target key -> (monotonic time until which no write is due, its token hash)
        self._quiet: OrderedDict[str, tuple[float, TokenHash]] = OrderedDict()
        self._behind: set[asyncio.Task[tuple[Touch, bool]]] = set()

    async def touch(
        self,
        *,
        token: str | None = None,
        session_id: str | None = None,
        extend_by: timedelta | None = None,
        write_through: bool = False,
    ) -> Touch:
        """Slide the session named by ``token`` or ``session_id`` (exactly one).
        ``write_through``: when a write is due, answer after it (the new expiry,
        ``written``) instead of from the cache with the write behind.
        Raises ``InvalidArgument`` for bad input, ``SessionNotFound``,
        ``SessionNotLive`` (revoked or expired: never revived), and
        ``StoreUnavailable`` when the store would have to be asked and cannot."""
        policy = self._policy
        extend = check_ttl(
            extend_by, policy.default_session_ttl, policy.max_session_ttl, "extend_by"
        )
        token_hash: TokenHash | None = None
        if token is not None:
            token_hash = parse_token(token)
            if not is_well_formed(token):  # not one of ours: no store statement for it
                raise SessionNotFound("session: no such session")
            key = "h:" + token_hash.hex
        else:
            session_id = check_session_id(session_id or "")
            key = "i:" + session_id
        quiet = self._quiet.get(key)
        known = token_hash if quiet is None else quiet[1]
        due = quiet is None or self._monotonic() >= quiet[0]
        if known is not None and not (due and write_through):
            answer = await self._from_cache(known)
            if answer is not None:
                if due:
                    # A write is due (the interval is over, or this process has not
                    # written the session yet): it goes on behind this answer, one at a
                    # time per session, so a touch never waits for Postgres while the
                    # cache vouches for the session; the expiry moves once it lands, as
                    # every later answer then shows.
                    self._write_behind(key, token_hash, session_id, extend)
                    self._metrics.touched("behind")
                else:
                    self._metrics.touched("cache")
                return answer
            self._quiet.pop(key, None)  # the cache cannot vouch: the store decides now
        self._metrics.touched("store")
        joining = key in self._flights
        answer, late = await self._flights.do(
            key, lambda flight: self._write(key, flight, token_hash, session_id, extend)
        )
        if joining:
            answer = Touch(answer.session, False)  # the starter wrote, if anyone did
        if late:
            # Our call joined a statement already under way: a revocation that
            # returned before we started may postdate it. Trust the shared
            # answer only as far as the cache confirms it; else ask ourselves.
            confirmed = await self._from_cache(answer.session.token_hash)
            if confirmed is not None:
                return Touch(answer.session, False)
            return await self._write(key, Flight(), token_hash, session_id, extend)
        return answer

    def _write_behind(
        self, key: str, token_hash: TokenHash | None, session_id: str | None, extend: timedelta
    ) -> None:
        """Start the write of a session whose interval is over, unless one is
        in flight; nobody waits for it. Its failure is logged; the quiet
        period stays over, so the next touch tries again (a revoked or
        expired session's is forgotten: the next touch asks the store)."""
        if key in self._flights:
            return
        task = asyncio.ensure_future(
            self._flights.do(
                key, lambda flight: self._write(key, flight, token_hash, session_id, extend)
            )
        )
        self._behind.add(task)
        task.add_done_callback(self._written_behind)

    def _written_behind(self, task: asyncio.Task[tuple[Touch, bool]]) -> None:
        self._behind.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            _log.debug("touch written behind failed: %s", exc)

    async def aclose(self) -> None:
        """Cancel writes still running behind answers."""
        tasks = list(self._behind)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _write(
        self,
        key: str,
        flight: Flight,
        token_hash: TokenHash | None,
        session_id: str | None,
        extend: timedelta,
    ) -> Touch:
        """One store statement (counted by its outcome), then (when it wrote)
        the cache and this process's L1 copy."""
        local = self._trusted_local()
        version = 0 if local is None else local.version
        flight.begin()
        started = self._monotonic()
        try:
            touched = await self._store.touch(
                token_hash=token_hash,
                session_id=session_id,
                extend_by=extend,
                max_lifetime=self._policy.session_max_lifetime,
                interval=self._policy.touch_interval,
            )
        except Exception:  # a cancellation is no outcome: not counted
            self._metrics.touch_write("failed")
            raise
        if touched is None:
            self._metrics.touch_write("refused")
            raise SessionNotFound("session: no such session")
        session = touched.session
        if not touched.live:
            self._metrics.touch_write("refused")
            self._quiet.pop(key, None)
            raise SessionNotLive(
                "session: "
                + ("revoked" if session.revoked_at is not None else "expired")
                + "; a touch never revives a session"
            )
        # A row written is counted so even if a tombstone then refuses its fill.
        self._metrics.touch_write("written" if touched.written else "coalesced")
        if touched.written and not await self._publish(session, started, version):
            self._quiet.pop(key, None)
            raise SessionNotLive("session: revoked; a touch never revives a session")
        self._remember(key, started + touched.quiet_for, session.token_hash)
        return Touch(session, touched.written)

    async def _publish(self, session: Session, started: float, version: int) -> bool:
        """The new expiry into Redis (a conditional fill: never over a
        tombstone) and into this process's L1 copy. False when a tombstone
        refused it: the session was revoked since the statement. A fill that
        fails, or comes later than ``max_fill_lag`` after the statement, is
        skipped: the cached entry then keeps the old expiry until it expires
        (its TTL never outlives the old expiry), then a miss reads the new one."""
        cache, policy = self._cache, self._policy
        if cache is None:
            return True
        if self._monotonic() - started > policy.max_fill_lag:
            return True  # too old to trust against an expired tombstone
        entry = dataclasses.replace(session, last_seen_at=None)  # the cache keeps no touch time
        remaining = (entry.expires_at - self._now()).total_seconds()
        ttl = min(policy.cache_ttl * (1 - policy.ttl_jitter), remaining)
        if ttl <= 0:
            return True
        try:
            filled = await cache.fill(entry.token_hash, entry, ttl)
        except CacheUnavailable as exc:
            _log.debug("touch of %s not cached: %s", entry.token_hash.prefix, exc)
            return True
        if not filled:
            return False
        local = self._trusted_local()
        if local is not None:
            local.put(entry.token_hash, entry, local.ttl, version)
        return True

    async def _from_cache(self, token_hash: TokenHash) -> Touch | None:
        """The session as this process's L1 copy (while trusted) or Redis holds
        it, if live by this replica's clock (the rule ``ValidateSession``
        judges a cached entry by); None when the cache cannot vouch for a live
        session (a tombstone, a verdict, a miss, an error): then the store decides."""
        local = self._trusted_local()
        if local is not None:
            found = local.lookup(token_hash.hex)
            if found is not None and found[1] is not None:
                entry = found[0]
                if isinstance(entry, Session) and entry.verdict(self._now()) is None:
                    return Touch(entry, False)
        if self._cache is None:
            return None
        try:
            hit = await self._cache.get(token_hash)
        except CacheUnavailable:
            return None
        if hit is None or not isinstance(hit.entry, Session):
            return None
        if hit.entry.verdict(self._now()) is not None:
            return None
        return Touch(hit.entry, False)

    def _trusted_local(self) -> LocalCache | None:
        """The L1 cache while the revocation feed is live and the Redis
        breaker closed (the rule every L1 read and write follows)."""
        local, feed = self._local, self._feed
        if local is None or feed is None or not (feed.live and self._breaker.closed):
            return None
        return local

    def _remember(self, key: str, until: float, token_hash: TokenHash) -> None:
        quiet = self._quiet
        with contextlib.suppress(KeyError):
            del quiet[key]
        if until > self._monotonic():
            quiet[key] = (until, token_hash)
            if len(quiet) > QUIET_MAX:
                quiet.popitem(last=False)
