"""The session authority: cache-aside validation over the source of truth.

Revocation invariant
--------------------
Once ``invalidate`` or ``invalidate_user`` has returned, no ``validate`` that
starts afterwards answers valid for those sessions, on any replica sharing the
Redis, whatever misses or fills were in flight:

1. Revocation commits in Postgres *first*; every later read of Postgres sees it.
2. It then replaces each cache entry with a *tombstone* (never a bare DEL), and
   fills are conditional in Redis (a Lua script refuses to write over a
   tombstone). A miss that read Postgres before the revocation and fills after
   it is refused, and answers "revoked". Tombstones outlive any fill that could
   race them: a fill whose Postgres read is older than ``max_fill_lag`` is
   dropped, and tombstones live for ``tombstone_ttl`` > ``max_fill_lag``.
3. If the tombstone cannot be written (Redis unreachable), this process trips
   its breaker, so it stops reading Redis at once, and the breaker's half-open
   probe re-applies every revocation of the last cache TTL from Postgres
   before the breaker closes and Redis is read again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Mapping
from datetime import timedelta
from uuid import uuid4

from session_authority.core.breaker import Breaker, BreakerState
from session_authority.core.domain import (
    Reason,
    Session,
    Source,
    TokenHash,
    Validation,
    check_metadata,
    check_ttl,
    check_user_id,
    is_well_formed,
    parse_token,
)
from session_authority.core.errors import CacheUnavailable, StoreUnavailable
from session_authority.core.health import (
    BreakerReport,
    CacheHealth,
    HealthReport,
    StoreHealth,
)
from session_authority.core.policy import CorePolicy
from session_authority.core.ports import Cached, CachedVerdict, CacheEntry
from session_authority.core.revocation import Revocations
from session_authority.core.singleflight import Flight
from session_authority.core.telemetry import ATTR_CACHE_RESULT, ATTR_TOKEN_PREFIX, tracer

__all__ = ["CorePolicy", "SessionAuthority"]

_log = logging.getLogger("session_authority.cache")


class SessionAuthority(Revocations):
    """Create, validate (cache-aside), revoke (see ``Revocations``), report health."""

    # --- create ---------------------------------------------------------------

    async def create(
        self, user_id: str, ttl: timedelta | None, metadata: Mapping[str, str]
    ) -> tuple[str, Session]:
        """Issue a token for ``user_id``. Returns the token (shown once) and the session."""
        user_id = check_user_id(user_id)
        lifetime = check_ttl(ttl, self.policy.default_session_ttl, self.policy.max_session_ttl)
        meta = check_metadata(metadata)
        token = self._new_token()
        now = self._now()
        session = Session(
            session_id=str(uuid4()),
            user_id=user_id,
            token_hash=TokenHash.of(token),
            created_at=now,
            expires_at=now + lifetime,
            metadata=meta,
        )
        await self._timed_store("create", self.store.create(session))
        await self._mark_created(session.token_hash)
        return token, session

    async def _mark_created(self, token_hash: TokenHash) -> None:
        """Shield the new session from a racing "unknown" fill (see the port).
        Best effort: with Redis unreachable there are no fills to race."""
        cache = self.cache
        if cache is None or not self.breaker.allows():
            return
        ttl = self.policy.max_fill_lag + self.policy.negative_ttl
        try:
            await self.breaker.call(lambda: cache.mark_created(token_hash, ttl))
        except CacheUnavailable as exc:
            self._cache_failed("mark_created", exc)

    # --- validate ---------------------------------------------------------------

    async def validate(self, token: str) -> Validation:
        """Whether ``token`` names a live session. Raises ``InvalidArgument`` for
        malformed input and ``StoreUnavailable`` when the answer is not in the
        cache and Postgres cannot be asked: never a guess."""
        token_hash = parse_token(token)
        if not is_well_formed(token):
            self._metrics.cache_lookup("malformed")
            return Validation.invalid(Reason.UNKNOWN, Source.TOKEN_FORMAT)
        looked_at = time.monotonic()
        with tracer.start_as_current_span("session_cache.lookup") as span:
            span.set_attribute(ATTR_TOKEN_PREFIX, token_hash.prefix)
            result, hit = await self._lookup(token_hash)
            span.set_attribute(ATTR_CACHE_RESULT, result)
        self._metrics.cache_lookup(result)
        if hit is not None:
            self.stats.hits += 1
            _log.debug("Cache HIT %s (%s)", token_hash.prefix, result)
            self._maybe_refresh(token_hash, hit)
            return self._judge(hit.entry, Source.CACHE)
        if result == "miss":
            self.stats.misses += 1
            _log.debug("Cache MISS %s", token_hash.prefix)
        # A caller whose own lookup was a clean miss saw no tombstone, so no
        # revocation had returned before it looked: it may share a load that
        # settled after it looked. Callers that bypassed the cache may not.
        (answer, confirmed, opened), late = await self._loads.do(
            token_hash,
            lambda flight: self._load(token_hash, flight),
            since=looked_at if result == "miss" else None,
        )
        if late and (not confirmed or opened != self.breaker.opened_count):
            # We joined a load whose Postgres read began before we did, and
            # either no cache fill vouched for it (a tombstone would have
            # refused it), or the breaker opened since it began (a revocation
            # whose tombstone failed trips it, and leaves no tombstone to
            # refuse anything): a revocation that returned before we started
            # may postdate that read. Read for ourselves.
            answer, _, _ = await self._load(token_hash, Flight())
        return answer

    async def _lookup(self, token_hash: TokenHash) -> tuple[str, Cached | None]:
        cache = self.cache
        if cache is None:
            return "disabled", None
        if not self.breaker.allows():
            return "bypassed", None
        try:
            hit = await self.breaker.call(lambda: cache.get(token_hash))
        except CacheUnavailable as exc:
            self._cache_failed("get", exc)
            return "error", None
        if hit is None:
            return "miss", None
        if isinstance(hit.entry, CachedVerdict):
            return ("tombstone" if hit.entry.reason is Reason.REVOKED else "negative"), hit
        return "hit", hit

    def _maybe_refresh(self, token_hash: TokenHash, hit: Cached) -> None:
        """XFetch (Vattani et al., VLDB 2015): refresh a live entry early with a
        probability that grows as its expiry nears, so a hot session is
        reloaded in the background by one caller instead of missing for many.
        Refresh when ``ttl_left <= -gap * ln(U)``, U uniform in (0, 1]; ``gap``
        (δ·β in the paper) is ``early_refresh``: a hit at ``ttl_left = gap``
        refreshes with probability 1/e, at ``3 * gap`` with 5 %. The refresh is
        an ordinary single-flight load and conditional fill, so it can never
        resurrect a revoked session."""
        gap = self.policy.early_refresh
        if gap <= 0 or not isinstance(hit.entry, Session) or token_hash in self._loads:
            return
        if hit.ttl_left > -gap * math.log(1.0 - random.random()):
            return
        self.stats.early_refreshes += 1
        task = asyncio.create_task(self._refresh(token_hash))
        self._refreshes.add(task)
        task.add_done_callback(self._refreshes.discard)

    async def _refresh(self, token_hash: TokenHash) -> None:
        try:
            await self._loads.do(token_hash, lambda flight: self._load(token_hash, flight))
        except (StoreUnavailable, CacheUnavailable) as exc:
            _log.debug("early refresh of %s skipped: %s", token_hash.prefix, exc)

    async def aclose(self) -> None:
        """Cancel background refreshes (the pools are closed by their owner)."""
        tasks = list(self._refreshes)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _judge(self, entry: CacheEntry, source: Source) -> Validation:
        if isinstance(entry, CachedVerdict):
            return Validation.invalid(entry.reason, source)
        reason = entry.verdict(self._now())
        if reason is not None:
            return Validation.invalid(reason, source)
        return Validation.live(entry, source)

    async def _load(self, token_hash: TokenHash, flight: Flight) -> tuple[Validation, bool, int]:
        """Miss path: ask Postgres, then fill the cache conditionally. Returns
        the answer, whether the cache confirmed it (filled, or refused), and
        the breaker's opened count when the read began."""
        opened = self.breaker.opened_count
        flight.begin()
        read_started = time.monotonic()
        with tracer.start_as_current_span("session_store.find") as span:
            span.set_attribute(ATTR_TOKEN_PREFIX, token_hash.prefix)
            session = await self._timed_store("find", self.store.find(token_hash))
        now = self._now()
        if session is None:
            entry: CacheEntry = CachedVerdict(Reason.UNKNOWN)
            ttl = self.policy.negative_ttl
        else:
            reason = session.verdict(now)
            if reason is None:
                entry = session
                remaining = (session.expires_at - now).total_seconds()
                jitter = random.uniform(0, self.policy.ttl_jitter) * self.policy.cache_ttl
                ttl = min(self.policy.cache_ttl - jitter, remaining)
            elif reason is Reason.REVOKED:
                entry, ttl = CachedVerdict(reason), self.policy.tombstone_ttl
            else:
                entry, ttl = CachedVerdict(reason), self.policy.negative_ttl
        answer = self._judge(entry, Source.DATABASE)
        if time.monotonic() - read_started > self.policy.max_fill_lag:
            return answer, False, opened  # too old to trust against an expired tombstone
        filled = await self._fill(token_hash, entry, ttl)
        if filled is False:
            # A tombstone refused the fill: the session was revoked after our read.
            return Validation.invalid(Reason.REVOKED, Source.CACHE), True, opened
        return answer, filled is True, opened

    async def _fill(self, token_hash: TokenHash, entry: CacheEntry, ttl: float) -> bool | None:
        """True when filled, False when a tombstone refused it, None when the
        cache was not written (disabled, unavailable, or nothing to keep)."""
        cache = self.cache
        if cache is None or ttl <= 0 or not self.breaker.allows():
            return None
        with tracer.start_as_current_span("session_cache.fill") as span:
            try:
                filled = await self.breaker.call(lambda: cache.fill(token_hash, entry, ttl))
            except CacheUnavailable as exc:
                self._cache_failed("fill", exc)
                return None
            span.set_attribute("session_authority.cache.fill_refused", not filled)
            return filled

    # --- health -------------------------------------------------------------------

    async def health(self) -> HealthReport:
        """Healthy: both tiers answer and the breakers are closed. Degraded:
        Redis is down or bypassed, Postgres answers. Unhealthy: Postgres is
        down, or its breaker is refusing calls."""
        store, cache = await asyncio.gather(self.store.health(), self._cache_health())
        breaker, store_breaker = self.breaker, self.store_breaker
        errors = []
        if not store.connected:
            errors.append(f"postgres: {store.error or 'unreachable'}")
        if self.cache is not None and not cache.connected:
            errors.append(f"redis: {cache.error or 'unreachable'}")
        if breaker.state is not BreakerState.CLOSED:
            errors.append(f"circuit breaker {breaker.state.value}: cache bypassed")
        store_refusing = store_breaker is not None and store_breaker.state is BreakerState.OPEN
        if store_refusing:
            errors.append("postgres circuit breaker open: calls needing the database refused")
        cache_healthy = cache.connected and breaker.state is BreakerState.CLOSED
        if not store.connected or store_refusing:
            status = "unhealthy"
        elif self.cache is not None and not cache_healthy:
            status = "degraded"
        else:
            status = "healthy"
        return HealthReport(
            status=status,
            cache_enabled=self.cache is not None,
            cache_healthy=cache_healthy,
            cache=cache,
            stats=self.stats,
            cache_ttl_seconds=int(self.policy.cache_ttl),
            store=store,
            breaker=_report(breaker),
            errors=tuple(errors),
            store_breaker=None if store_breaker is None else _report(store_breaker),
        )

    async def _cache_health(self) -> CacheHealth:
        if self.cache is None:
            return CacheHealth(connected=False, error="cache disabled (no REDIS_URL)")
        return await self.cache.health()

    async def store_health(self) -> StoreHealth:
        return await self.store.health()


def _report(breaker: Breaker) -> BreakerReport:
    policy = breaker.policy
    return BreakerReport(
        state=breaker.state.value,
        timeout_ms=int(policy.timeout * 1000),
        error_threshold_percentage=policy.error_threshold_percentage,
        reset_timeout_ms=int(policy.reset_timeout * 1000),
        seconds_until_half_open=round(breaker.seconds_until_half_open(), 3),
        opened_count=breaker.opened_count,
    )
