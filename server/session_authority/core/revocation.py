"""Revocation: Postgres first, then tombstones; durable until Redis confirms.

Revocation invariant
--------------------
Once ``invalidate`` or ``invalidate_user`` has returned, no ``validate`` that
starts afterwards answers valid for those sessions, on any replica sharing the
Redis, whatever misses or fills were in flight:

1. Revocation commits in Postgres *first*, stamped by Postgres's clock, and
   left *pending* there; every later read of Postgres sees it.
2. It then replaces each cache entry with a *tombstone* (never a bare DEL), in
   chunks that each stay well under the breaker's per-call timeout, and marks
   the revocation confirmed. Fills are conditional in Redis (a Lua script
   refuses to write over a tombstone), so a miss that read Postgres before the
   revocation and fills after it is refused, and answers "revoked". A fill
   whose Postgres read is older than ``max_fill_lag`` is dropped, and
   tombstones live for ``tombstone_ttl`` > ``cache_ttl`` + ``max_fill_lag``.
3. If the tombstone cannot be written, this process trips its breaker (it
   stops reading Redis at once) and the answer says ``cache_purged: false``.
   A process whose breaker is already open still tries once, bounded by the
   breaker's timeout and uncounted: the other replicas may be reading that
   Redis (the breaker may have opened for this process alone).
   The revocation stays pending in Postgres, so it does not depend on this
   process living: every replica drains pending revocations into Redis every
   ``REVOCATION_SWEEP_SECONDS``.
4. Nothing reads a Redis before revocations are re-applied to it: at start-up,
   when the breaker's probe closes it, and when Redis turns out to be another
   server (restarted, restored from a snapshot, failed over: a new ``run_id``
   on a new connection) or to have lost its state (the adopted marker gone:
   flushed). The probe adopts the server, tombstones every revocation of the
   last ``cache_ttl + max_fill_lag + REVOCATION_SKEW_SECONDS`` (Postgres
   clock) and drains what is pending, before the breaker closes.
5. Nothing keeps reading a Redis that went back in time with the same
   ``run_id`` and marker (a backup restored into it, ``DEBUG RELOAD``,
   ``SWAPDB``, a lagging replica promoted): every sweep first compares the
   revocation watermark Redis holds with the one Postgres confirmed it held
   (``core/watermark.py``); less trips the breaker at once, with an
   immediate probe that replays. Each sweep then seals what was revoked since
   the confirmed watermark, so a copy of Redis taken after a revocation was
   written holds a watermark that says so. Bound: a rewound Redis is read for
   at most one ``REVOCATION_SWEEP_SECONDS`` (plus the sweep's own calls) by
   each process.

What remains is written next to the promise in server/ARCHITECTURE.md ("Revocation: the
promise and its failure model").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from session_authority.core.breaker import Breaker, BreakerState
from session_authority.core.domain import (
    Revocation,
    TokenHash,
    check_session_id,
    check_user_id,
    parse_token,
)
from session_authority.core.errors import (
    CacheReplaced,
    CacheUnavailable,
    InvalidArgument,
    StoreUnavailable,
)
from session_authority.core.guarded import BreakerCache
from session_authority.core.local import LocalCache, RevocationFeed
from session_authority.core.policy import CorePolicy
from session_authority.core.ports import SessionCache, SessionStore
from session_authority.core.telemetry import CoreMetrics

__all__ = ["Revoker"]

_log = logging.getLogger("session_authority.cache")


#: Tombstones per Redis call: 50,000 took ~1.3 s in one pipeline here (over the
#: 1 s breaker timeout); 2,000 take ~50 ms.
TOMBSTONE_CHUNK = 2000
#: Pending revocations drained per store query.
DRAIN_BATCH = 5000
#: Revocations pushed to L1 caches by hash; above this, "drop everything".
PUSH_LIMIT = 1000
#: A replay's time per probe, in breaker timeouts: half the probe's own limit
#: (``Breaker._run_probe``: ten timeouts), so a large replay is never cut off
#: mid-way; it stops at a sealed chunk and the next probe resumes.
REPLAY_BUDGET = 5.0
#: How often a process waiting for another's replay looks again (seconds).
LEASE_POLL = 0.1

#: A cache's ``tombstone`` (guarded, guarded-anyway, or the probe's inner one).
_Write = Callable[[Sequence[TokenHash], float], Awaitable[None]]


class Revoker:
    """Revokes sessions and keeps the cache from contradicting Postgres."""

    def __init__(
        self,
        store: SessionStore,
        cache: BreakerCache | None,
        breaker: Breaker,
        policy: CorePolicy,
        *,
        metrics: CoreMetrics,
        local: LocalCache | None = None,
        feed: RevocationFeed | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._monotonic = monotonic
        self._store = store
        self._cache = cache
        self._breaker = breaker
        self._policy = policy
        self._metrics = metrics
        self._local = local
        self._feed = feed

    async def invalidate(
        self, *, token: str | None = None, session_id: str | None = None
    ) -> Revocation:
        """Revoke one session by token or session id (exactly one). Idempotent:
        repeating it rewrites the tombstone."""
        if token is not None:
            found = await self._store.revoke(token_hash=parse_token(token))
        else:
            found = await self._store.revoke(session_id=check_session_id(session_id or ""))
        if found is None:
            return self._revoked(0, True)
        hashes = [found.token_hash]
        purged = await self._purge(hashes)
        return self._revoked(int(found.revoked_now), purged, await self._propagate(hashes))

    async def invalidate_user(
        self, user_id: str, *, except_session_id: str | None = None
    ) -> Revocation:
        """Revoke every session of ``user_id`` not revoked yet; with
        ``except_session_id``, every one but that session ("log out everywhere
        else"), which must be the user's: otherwise ``InvalidArgument`` naming
        it, and nothing is revoked (the store checks and revokes in one step).
        Either way the same path keeps the invariant: Postgres first, then
        tombstones, then the L1 push, for exactly the revoked rows (the kept
        session is never among them). Sessions created after the store's
        statement began are not revoked, with or without the exception."""
        user = check_user_id(user_id)
        if except_session_id is None:
            rows = await self._store.revoke_user(user)
        else:
            kept = check_session_id(except_session_id, "except_session_id")
            spared = await self._store.revoke_user_except(user, kept)
            if spared is None:
                raise InvalidArgument("except_session_id", "names no session of this user_id")
            rows = spared
        hashes = [r.token_hash for r in rows]
        purged = await self._purge(hashes)
        propagated = await self._propagate(hashes)
        return self._revoked(sum(r.revoked_now for r in rows), purged, propagated)

    def _revoked(self, count: int, purged: bool, propagated: bool = True) -> Revocation:
        self._metrics.revoked(count, purged)
        return Revocation(revoked_count=count, cache_purged=purged, propagated=propagated)

    async def _propagate(self, hashes: list[TokenHash]) -> bool:
        """Drop these sessions from every process's L1 cache, this one first;
        True once every subscriber acknowledged (see ``core/local.py``). A big
        revocation asks everyone to drop everything instead of listing it."""
        if not hashes or self._feed is None:
            return True
        if self._local is not None:
            self._local.drop(hashes)
        return await self._feed.publish(hashes if len(hashes) <= PUSH_LIMIT else None)

    async def _purge(self, hashes: list[TokenHash]) -> bool:
        """Tombstone ``hashes``; on failure stop trusting the cache (see module doc)."""
        cache = self._cache
        if not hashes:
            return True
        if cache is None:
            await self._confirm(hashes)  # nothing to purge: keep the pending index empty
            return True
        # With the breaker open this process does not read Redis, but the other
        # replicas may: try to reach it anyway, bounded, before answering.
        closed = self._breaker.state is BreakerState.CLOSED
        try:
            await self._tombstone(cache.tombstone if closed else cache.tombstone_anyway, hashes)
        except CacheUnavailable:
            pass  # counted and logged by the guard
        else:
            await self._confirm(hashes)
            return True
        self._breaker.trip("revocation could not be written to the cache")
        return False

    async def _tombstone(self, write: _Write, hashes: Sequence[TokenHash]) -> None:
        """``write`` (a cache's ``tombstone``) in chunks of ``TOMBSTONE_CHUNK``."""
        ttl = self._policy.tombstone_ttl
        for start in range(0, len(hashes), TOMBSTONE_CHUNK):
            await write(hashes[start : start + TOMBSTONE_CHUNK], ttl)

    async def _confirm(self, hashes: Sequence[TokenHash]) -> None:
        """Best effort: an unconfirmed revocation is only tombstoned again."""
        try:
            await self._store.confirm_purged(hashes)
        except StoreUnavailable as exc:
            _log.warning("SessionCache confirm Error: %s (will be drained again)", exc)

    async def replay_revocations(self) -> None:
        """The breaker's half-open probe: trust the Redis that answers now, and
        re-apply to it every revocation it may lack, before anything reads it.

        An entry written before a revocation lives at most ``cache_ttl`` and
        was filled from a read at most ``max_fill_lag`` older, so tombstoning
        the revocations of that window (plus the skew allowance between the
        Redis and Postgres clocks) leaves no stale entry, whatever snapshot
        the server came back from. Of those, the ones under the watermark this
        Redis holds are in it already (``core/watermark.py``): only the rest
        are written, in sealed chunks, so a replay cut short (or run by
        another worker meanwhile) resumes where the watermark got to. It talks
        to the cache directly: the breaker runs it, and would refuse it."""
        if self._cache is None:
            return
        cache = self._cache.inner
        await cache.adopt()  # also proves Redis answers, even with nothing to replay
        # Its cost per probe is bounded: past half the probe's time it stops,
        # sealed as far as it got, and the next probe (at once) resumes there.
        budget = self._breaker.policy.timeout * REPLAY_BUDGET
        until = self._monotonic() + budget
        try:
            marks = await self._store.revocation_marks()
            leased = await self._lease(cache, budget, marks.horizon, until)
            held = await cache.watermark()
            try:
                replayed, sealed = await self._reseal(cache, held, marks.horizon, until=until)
            finally:
                if leased:
                    await cache.release()
            if sealed < marks.horizon:
                cause = (
                    f"replay continues: {replayed} revocations written from watermark "
                    f"{held[:29] or 'nothing'} to {sealed[:29]}, resuming there"
                )
                _log.info("SessionCache %s", cause)
                self._breaker.trip(cause, probe_in=0.0)
                raise CacheUnavailable(cause)
            drained = await self._drain_into(cache)
        except StoreUnavailable as exc:
            raise CacheUnavailable(f"cannot replay revocations: store unavailable: {exc}") from exc
        if (replayed or drained) and self._feed is not None:
            # Other processes may have copied entries this Redis held before the
            # replay (a rewound Redis is read until each one's sweep sees it).
            if self._local is not None:
                self._local.drop(None)
            await self._feed.publish(None)
        _log.info(
            "SessionCache replayed %d revocations above watermark %s and %d pending "
            "before closing the breaker",
            replayed,
            held[:29] or "nothing",
            drained,
        )

    async def _lease(self, cache: SessionCache, budget: float, horizon: str, until: float) -> bool:
        """Take the replay lease; while another process holds it, wait for its
        watermark to reach ``horizon`` (or the lease to come free, or
        ``until``) rather than write the same revocations alongside it.
        Whether this process took it."""
        # Held past the budget, so it does not lapse under a holder finishing its
        # last chunk; the holder gives it back, and a waiter gives up at ``until``.
        while not await cache.lease(budget * 2):
            if self._monotonic() >= until or await cache.watermark() >= horizon:
                return False
            await asyncio.sleep(LEASE_POLL)
        return True

    async def _reseal(
        self, cache: SessionCache, after: str, horizon: str, *, until: float | None = None
    ) -> tuple[int, str]:
        """Tombstone every revocation of the replay window with a mark above
        ``after`` (a watermark ``cache`` held or was confirmed to hold), in
        chunks of ``TOMBSTONE_CHUNK``, each sealed with the watermark it
        completes (never past ``horizon``), the next page read from the store
        while one is written; then confirm in the store what was sealed.
        Stops after the chunk that ends past ``until`` (the monotonic clock)
        if given. Returns how many were written and the watermark sealed
        (``horizon`` or beyond once done). ``CacheReplaced`` if the cache turns
        out to hold less than it did (it went back in time)."""
        policy, store = self._policy, self._store
        window = policy.replay_window
        floor, written, confirmed = after, 0, after

        def read(after: str) -> asyncio.Future[list[tuple[str, TokenHash]]]:
            return asyncio.ensure_future(store.revocations_after(after, TOMBSTONE_CHUNK, window))

        fetch = read(after)
        try:
            while True:
                page = await fetch
                last = len(page) < TOMBSTONE_CHUNK
                if page:
                    after = page[-1][0]
                if not last:
                    fetch = read(after)
                # The last page leaves nothing below the horizon unwritten (every
                # transaction under it had ended before the page was read).
                mark = max(floor, horizon if last else min(after, horizon))
                held = floor
                if page or mark != floor:
                    hashes = [h for _, h in page]
                    held = await cache.seal(hashes, policy.tombstone_ttl, floor=floor, mark=mark)
                floor, written = mark, written + len(page)
                if last:
                    break
                if held > after:
                    # Another process (its sweep, or its own replay) has sealed
                    # further: what lies below is in Redis already.
                    _abandon(fetch)
                    floor = after = held
                    fetch = read(after)
                if until is not None and self._monotonic() >= until:
                    break
        finally:
            _abandon(fetch)
        if floor > confirmed:
            await store.confirm_watermark(floor)
        return written, floor

    async def drain(self) -> int:
        """Check that Redis still holds its state, then write every pending
        revocation to it. Run periodically by every replica: it finishes what
        a revoker that lost Redis, or died, left undone. Its cost is what is
        pending, and what was revoked since the last sweep, not every
        revocation in a window.

        "Its state" is two things: the marker ``adopt`` left (gone after a
        flush or a replacement), and the revocation watermark (lower than
        Postgres confirmed after Redis went back in time: a backup restored
        into it, DEBUG RELOAD, SWAPDB, a lagging replica promoted). Either
        opens the breaker at once, with an immediate probe that replays."""
        cache = self._cache
        if cache is None or self._breaker.state is not BreakerState.CLOSED:
            return 0  # an open breaker drains in its probe
        # Postgres first: a watermark is confirmed there only after Redis holds
        # it, so Redis read afterwards holds at least as much unless rewound.
        marks = await self._store.revocation_marks()
        try:
            await cache.verify()
            held = await cache.watermark()
        except CacheUnavailable:
            # Counted by the breaker like any failed call; a flushed or replaced
            # Redis (CacheReplaced) has already tripped it, with an immediate probe.
            return 0
        if held < marks.confirmed:
            self._rewound(held, marks.confirmed)
            return 0
        try:
            drained = await self._drain_into(cache)
            await self._reseal(cache, marks.confirmed, marks.horizon)
        except CacheReplaced:
            return 0  # went back in time meanwhile: the guard tripped the breaker
        except CacheUnavailable:
            # Pending revocations this replica cannot write: stop reading Redis.
            self._breaker.trip("pending revocations could not be written to the cache")
            return 0
        if drained and self._feed is not None:
            # Their revokers could not tell the L1 caches: drop everything (rare).
            if self._local is not None:
                self._local.drop(None)
            await self._feed.publish(None)
        return drained

    def _rewound(self, held: str, confirmed: str) -> None:
        cause = (
            f"redis went back in time: it holds revocation watermark {held[:29] or 'nothing'}, "
            f"below {confirmed[:29]} it was confirmed to hold "
            "(a backup restored, DEBUG RELOAD, SWAPDB or a lagging replica)"
        )
        self._metrics.cache_error("watermark")
        _log.warning("SessionCache watermark Error: %s", cause)
        self._breaker.trip(cause, probe_in=0.0)

    async def _drain_into(self, cache: SessionCache) -> int:
        drained = 0
        while True:
            hashes = await self._store.pending_purges(DRAIN_BATCH)
            if not hashes:
                return drained
            await self._tombstone(cache.tombstone, hashes)
            await self._store.confirm_purged(hashes)
            drained += len(hashes)
            if len(hashes) < DRAIN_BATCH:
                return drained

    async def run_drain(self, interval: float) -> None:
        """Drain every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.drain()
            except StoreUnavailable as exc:
                _log.warning("SessionCache drain Error: %s", exc)


def _abandon(task: asyncio.Future[Any]) -> None:
    """Cancel a read nobody will use, and retrieve its outcome when it ends."""
    if not task.done():
        task.cancel()
    task.add_done_callback(lambda t: None if t.cancelled() else t.exception())
