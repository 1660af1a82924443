"""Revocation: Postgres first, then tombstones; replay and sweep when Redis missed one.

The invariant these methods keep is stated in ``service.py``'s docstring."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from session_authority.core.base import CoreBase
from session_authority.core.breaker import BreakerState
from session_authority.core.domain import (
    Revocation,
    TokenHash,
    check_session_id,
    check_user_id,
    parse_token,
)
from session_authority.core.errors import CacheUnavailable, StoreUnavailable

__all__ = ["Revocations"]

_log = logging.getLogger("session_authority.cache")


class Revocations(CoreBase):
    async def invalidate(
        self, *, token: str | None = None, session_id: str | None = None
    ) -> Revocation:
        """Revoke one session by token or session id (exactly one). Idempotent."""
        now = self._now()
        if token is not None:
            found = await self._timed_store(
                "revoke", self.store.revoke(now, token_hash=parse_token(token))
            )
        else:
            sid = check_session_id(session_id or "")
            found = await self._timed_store("revoke", self.store.revoke(now, session_id=sid))
        if found is None:
            return self._revoked(0, True)
        purged = await self._purge([found.token_hash])
        return self._revoked(int(found.revoked_now), purged)

    async def invalidate_user(self, user_id: str) -> Revocation:
        """Revoke every live session of ``user_id``."""
        user_id = check_user_id(user_id)
        hashes = await self._timed_store(
            "revoke_user", self.store.revoke_user(user_id, self._now())
        )
        purged = await self._purge(hashes)
        return self._revoked(len(hashes), purged)

    def _revoked(self, count: int, purged: bool) -> Revocation:
        self._metrics.revoked(count, purged)
        return Revocation(revoked_count=count, cache_purged=purged)

    async def _purge(self, hashes: list[TokenHash]) -> bool:
        """Tombstone ``hashes``; on failure stop trusting the cache (see module doc)."""
        cache = self.cache
        if cache is None or not hashes:
            return True
        if self.breaker.state is BreakerState.CLOSED:
            try:
                await self.breaker.call(lambda: cache.tombstone(hashes, self.policy.tombstone_ttl))
                return True
            except CacheUnavailable as exc:
                self._cache_failed("tombstone", exc)
        self.breaker.trip("revocation could not be written to the cache")
        return False

    async def replay_revocations(self) -> None:
        """Re-apply recent revocations to the cache: the breaker's half-open probe.

        Any entry written before a revocation lives at most ``cache_ttl``, so
        tombstoning every session revoked in the last ``cache_ttl`` (plus the
        fill lag) leaves no stale entry behind."""
        cache = self.cache
        if cache is None:
            return
        await cache.ping()  # the probe proves Redis answers, even with nothing to replay
        window = timedelta(seconds=self.policy.cache_ttl + self.policy.max_fill_lag)
        try:
            hashes = await self._timed_store(
                "revoked_since", self.store.revoked_since(self._now() - window)
            )
        except StoreUnavailable as exc:
            raise CacheUnavailable("cannot replay revocations: store unavailable") from exc
        if hashes:
            await cache.tombstone(hashes, self.policy.tombstone_ttl)
        _log.info("SessionCache replayed %d revocations before closing the breaker", len(hashes))

    async def sweep_revocations(self, window: float) -> int:
        """Re-apply the revocations of the last ``window`` seconds to the cache.

        Run periodically by every replica. It bounds what the invariant cannot
        cover alone: a replica that could not reach Redis when it revoked (a
        partial outage) leaves stale entries that *other* replicas can still
        read; the next sweep of any replica that reaches Redis tombstones them.
        Tombstones are idempotent, so overlapping windows cost only writes."""
        cache = self.cache
        if cache is None or self.breaker.state is not BreakerState.CLOSED:
            return 0  # an open breaker replays everything in its probe
        since = self._now() - timedelta(seconds=window)
        hashes = await self._timed_store("revoked_since", self.store.revoked_since(since))
        if hashes:
            try:
                await self.breaker.call(lambda: cache.tombstone(hashes, self.policy.tombstone_ttl))
            except CacheUnavailable as exc:
                self._cache_failed("sweep", exc)
                self.breaker.trip("revocation sweep could not write to the cache")
                return 0
        return len(hashes)

    async def run_sweeper(self, interval: float, margin: float = 10.0) -> None:
        """Sweep every ``interval`` seconds until cancelled. Each sweep looks
        back ``interval + margin`` seconds (margin covers clock skew between
        replicas, whose clocks stamp ``revoked_at``)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep_revocations(interval + margin)
            except StoreUnavailable as exc:
                _log.warning("SessionCache sweep Error: %s", exc)
