"""Validation: cache-aside reads, the miss path, and early refresh.

The revocation invariant this must keep is stated in ``revocation.py``. Here
that means: fills are conditional (a tombstone refuses them), and a caller
that shares a load it did not see start (a "late" joiner) trusts it only if
the cache confirmed it and the breaker has not opened since it began.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from session_authority.core.breaker import Breaker
from session_authority.core.domain import (
    MAX_TOKEN_LENGTH,
    Reason,
    Session,
    Source,
    TokenHash,
    Validation,
    check_batch,
    is_well_formed,
    parse_token,
    sha256,
)
from session_authority.core.errors import (
    CacheUnavailable,
    CircuitOpen,
    InvalidArgument,
    RateLimited,
    StoreUnavailable,
)
from session_authority.core.health import CacheStats
from session_authority.core.local import LocalCache, RevocationFeed
from session_authority.core.miss_limit import MissLimit
from session_authority.core.policy import CorePolicy, utcnow
from session_authority.core.ports import (
    Cached,
    CachedVerdict,
    CacheEntry,
    SessionCache,
    SessionStore,
)
from session_authority.core.singleflight import Flight, SingleFlight
from session_authority.core.telemetry import (
    ATTR_CACHE_RESULT,
    ATTR_TOKEN_PREFIX,
    CoreMetrics,
    recording,
    span,
)

__all__ = ["CallerKey", "Loaded", "Validator"]

#: Who asks, for the per-caller limit on unknown tokens: a name, or a function
#: that tells it (the transport's is only worth calling on a cache miss).
CallerKey = str | Callable[[], str]

_log = logging.getLogger("session_authority.cache")


@dataclass(frozen=True, slots=True)
class Loaded:
    """What one miss-path load found; shared by every caller of the flight."""

    answer: Validation
    #: The cache confirmed the answer: the fill landed, or a tombstone refused it.
    confirmed: bool
    #: The Redis breaker's ``opened_count`` when the Postgres read began.
    opened_count: int


class Validator:
    """``validate``: cache first, then Postgres through a per-process
    single-flight, then a conditional fill. Never answers valid on a guess."""

    def __init__(
        self,
        store: SessionStore,
        cache: SessionCache | None,
        breaker: Breaker,
        policy: CorePolicy,
        *,
        stats: CacheStats,
        metrics: CoreMetrics,
        clock: Callable[[], datetime],
        rng: Callable[[], float],
        monotonic: Callable[[], float],
        limiter: MissLimit | None = None,
        local: LocalCache | None = None,
        feed: RevocationFeed | None = None,
    ) -> None:
        self._store = store
        self._limiter = limiter
        self._cache = cache
        self._breaker = breaker
        self._policy = policy
        self._stats = stats
        self._metrics = metrics
        self._now = clock
        # The same clock in seconds since the epoch, for the L1 copies' expiry.
        self._epoch: Callable[[], float] = (
            time.time if clock is utcnow else (lambda: clock().timestamp())
        )
        self._rng = rng
        # Seconds, for the age of reads: ``max_fill_lag`` and the single-flight's
        # ``since`` (the same clock, so the two compare).
        self._monotonic = monotonic
        self._loads: SingleFlight[TokenHash, Loaded] = SingleFlight(clock=monotonic)
        # The L1 cache needs the revocation feed that keeps it honest.
        self._local = local if feed is not None else None
        self._feed = feed
        self._refreshes: set[asyncio.Task[None]] = set()
        self._renewing: set[str] = set()  # hex digests of L1 copies being re-read
        if self._local is not None:
            self._local.on_due = self._renew_copy

    def loading(self, token_hash: TokenHash) -> bool:
        """Whether a load (miss or early refresh) for this hash is in flight."""
        return token_hash in self._loads

    def callers(self, token_hash: TokenHash) -> int:
        """How many validations await the load in flight for this hash."""
        return self._loads.callers(token_hash)

    async def validate(self, token: str, caller: CallerKey = "") -> Validation:
        """Whether ``token`` names a live session. Raises ``InvalidArgument`` for
        malformed input, ``StoreUnavailable`` when the answer is not in the
        cache and Postgres cannot be asked (never a guess), and ``RateLimited``
        when Postgres would have to be asked but ``caller`` has sent too many
        unknown tokens (``MissLimiter``). ``caller`` may be a function: it is
        then asked only on that path, never for a cache hit."""
        answer = self.validate_local(token)
        if answer is not None:
            return answer
        answer = await self._validate(token, caller)
        self._validated(answer)
        return answer

    def validate_local(self, token: str | bytes) -> Validation | None:
        """The answer from this process's L1 copy, synchronously; None when
        there is none to trust (no L1, not sure of the revocation feed, breaker
        not closed, no copy, or a token ``validate`` would refuse): then ask
        ``validate``. The same answer ``validate`` would give, without a
        coroutine, a timer or an await. ``token`` may be its UTF-8 bytes, as
        received (the transport's hit path does not decode the request).

        This is the hot path's hot path, written flat: inside a loaded gRPC
        server every Python call costs several times what it does in a loop
        (measured: the same code 3 us in a loop, 16 us of CPU per call in
        the server), so it makes as few as it can."""
        local, feed = self._local, self._feed
        if local is None or feed is None:
            return None
        if not (feed.live and self._breaker.closed):
            self._trusted_local()  # not sure any more: it forgets every copy
            return None
        if len(token) > MAX_TOKEN_LENGTH:
            return None
        # No shape check: a copy is only ever kept under the hash of a token
        # that passed ``parse_token``, and no other string (or bytes) hashes to it.
        # ``TokenHash.of`` inline (the same ``sha256``), without the object.
        try:
            hex_digest = sha256(token if isinstance(token, bytes) else token.encode()).hexdigest()
        except UnicodeEncodeError:  # a lone surrogate: validate refuses it
            return None
        found = local.lookup(hex_digest)
        if found is None:
            return None
        entry, live, expires_at = found
        self._stats.hits += 1
        if recording():
            self._trace_local(hex_digest)
        if live is None or self._epoch() >= expires_at:
            live = self._judge_local(entry, live)  # a verdict, or expired since stored
        reason = live.reason
        self._metrics.local_hit(live.valid, "none" if reason is None else reason.value)
        return live

    def _judge_local(self, entry: CacheEntry, prepared: Validation | None) -> Validation:
        answer = self._judge(entry, Source.CACHE)
        age = None if prepared is None else prepared.cache_age
        return replace(answer, cache_age=age, local=True)

    @staticmethod
    def _trace_local(hex_digest: str) -> None:
        with span("session_cache.lookup") as current:
            current.set_attribute(ATTR_TOKEN_PREFIX, hex_digest[:8])
            current.set_attribute(ATTR_CACHE_RESULT, "local")

    def _validated(self, answer: Validation) -> None:
        reason = answer.reason
        self._metrics.validated(
            answer.valid, answer.source.value, "none" if reason is None else reason.value
        )

    def _trusted_local(self) -> LocalCache | None:
        """The L1 cache, while this process is sure it hears every revocation
        and trusts Redis (the breaker is closed); else None."""
        local, feed = self._local, self._feed
        if local is None or feed is None:
            return None
        if feed.live and self._breaker.closed:
            return local
        if len(local):
            local.drop(None)  # not sure any more: forget everything
        return None

    async def _validate(self, token: str, caller: CallerKey) -> Validation:
        token_hash = parse_token(token)
        # ``validate`` asked the L1 copy first; from here on a copy read is
        # stored only if no drop came since (``version``).
        local = self._trusted_local()
        version = 0 if local is None else local.version
        if not is_well_formed(token):
            self._metrics.cache_lookup("malformed")
            return Validation.invalid(Reason.UNKNOWN, Source.TOKEN_FORMAT)
        looked_at = self._monotonic()
        with span("session_cache.lookup") as current:
            current.set_attribute(ATTR_TOKEN_PREFIX, token_hash.prefix)
            result, hit = await self._lookup(token_hash)
            current.set_attribute(ATTR_CACHE_RESULT, result)
        self._metrics.cache_lookup(result)
        if hit is not None:
            self._stats.hits += 1
            _log.debug("Cache HIT %s (%s)", token_hash.prefix, result)
            if local is not None and result != "negative":
                local.put(token_hash, hit.entry, hit.ttl_left, version, hit.age)
            self._maybe_refresh(token_hash, hit)
            return self._judge(hit.entry, Source.CACHE, age=hit.age)
        if result == "miss":
            self._stats.misses += 1
            _log.debug("Cache MISS %s", token_hash.prefix)
        # A caller whose own lookup was a clean miss saw no tombstone, so no
        # revocation had returned before it looked: it may share a load that
        # settled after it looked. Callers that bypassed the cache may not.
        # After a failed or refused lookup the rest of this request skips the
        # cache: one validation pays at most one cache timeout.
        clean = result == "miss"
        loaded = await self._load_shared(token_hash, caller, clean=clean, looked_at=looked_at)
        return self._settled(
            token_hash, loaded, local, version, degraded=_DEGRADED.get(result, False)
        )

    def _settled(
        self,
        token_hash: TokenHash,
        loaded: Loaded,
        local: LocalCache | None,
        version: int,
        *,
        degraded: bool,
    ) -> Validation:
        """A caller's answer from a miss-path load: kept in L1 when the cache
        confirmed it, and judged again at the caller's own time."""
        answer = loaded.answer
        if local is not None and loaded.confirmed and answer.session is not None:
            local.put(token_hash, answer.session, local.ttl, version, 0.0)  # Redis holds it too
        if answer.valid and answer.session is not None:
            # A shared answer was judged at its load's time: judge expiry
            # again at ours (a caller starting just after expires_at).
            return self._judge(answer.session, answer.source, degraded=degraded)
        if degraded and not answer.degraded:
            return replace(answer, degraded=True)
        return answer

    async def _load_shared(
        self, token_hash: TokenHash, caller: CallerKey, *, clean: bool, looked_at: float
    ) -> Loaded:
        """The miss path's Postgres answer: charged to ``caller``'s unknown-token
        budget, shared through the single-flight, read again when what was
        shared may predate a revocation that returned before we looked."""
        # Only a caller that starts a Postgres read is charged: joining a load in
        # flight costs Postgres nothing (1,000 callers of one token: one credit).
        limiter = self._limiter if token_hash not in self._loads else None
        who = ""
        if limiter is not None:
            who = caller() if callable(caller) else caller
        if limiter is not None and not limiter.take(who):
            _log.debug("Unknown-token limit: %s refused (%s)", token_hash.prefix, who)
            raise RateLimited("too many unknown tokens from this caller; retry later")
        try:
            loaded, late = await self._loads.do(
                token_hash,
                lambda flight: self._load(token_hash, flight, fill=clean),
                since=looked_at if clean else None,
            )
        except BaseException:
            if limiter is not None:
                limiter.refund(who)  # no answer: not the caller's unknown token
            raise
        if limiter is not None and loaded.answer.reason is not Reason.UNKNOWN:
            limiter.refund(who)  # Postgres knew it: only unknown tokens cost
        if late and (
            not clean or not loaded.confirmed or loaded.opened_count != self._breaker.opened_count
        ):
            # We joined a load whose Postgres read began before we did, and
            # either we saw no clean miss ourselves (a failed lookup proves no
            # tombstone was absent), or no cache fill vouched for the load (a
            # tombstone would have refused it), or the breaker opened since it
            # began (a revocation whose tombstone failed trips it, and leaves
            # no tombstone to refuse anything): a revocation that returned
            # before we started may postdate that read. Read for ourselves.
            return await self._load(token_hash, Flight(), fill=clean)
        return loaded

    async def _lookup(self, token_hash: TokenHash) -> tuple[str, Cached | None]:
        cache = self._cache
        if cache is None:
            return "disabled", None
        try:
            hit = await cache.get(token_hash)
        except CircuitOpen:
            return "bypassed", None
        except CacheUnavailable:
            return "error", None
        return _classified(hit)

    def _maybe_refresh(self, token_hash: TokenHash, hit: Cached) -> None:
        """XFetch (Vattani et al., VLDB 2015): refresh a live entry early with a
        probability that grows as its expiry nears, so a hot session is
        reloaded in the background by one caller instead of missing for many.
        Refresh when ``ttl_left <= -gap * ln(U)``, U uniform in (0, 1]; ``gap``
        (δ·β in the paper) is ``early_refresh``: a hit at ``ttl_left = gap``
        refreshes with probability 1/e, at ``3 * gap`` with 5 %. The refresh is
        an ordinary single-flight load and conditional fill, so it can never
        resurrect a revoked session."""
        gap = self._policy.early_refresh
        if gap <= 0 or not isinstance(hit.entry, Session) or token_hash in self._loads:
            return
        if hit.ttl_left > -gap * math.log(1.0 - self._rng()):
            return
        self._stats.early_refreshes += 1
        task = asyncio.create_task(self._refresh(token_hash))
        self._refreshes.add(task)
        task.add_done_callback(self._refreshes.discard)

    def _renew_copy(self, hex_digest: str) -> None:
        """A hit in the second half of an L1 copy's life: re-read Redis in the
        background while callers go on using the copy, so a hot session's copy
        is replaced before it expires instead of every caller in flight
        missing at once (under load that burst queued for the Redis pool and
        timed out: answers from Postgres). The new copy lands under the usual
        rule: only if no revocation dropped copies since the read began."""
        if hex_digest in self._renewing:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._renew(hex_digest))
        except RuntimeError:  # no loop (a synchronous caller): the copy just expires
            return
        self._renewing.add(hex_digest)
        self._refreshes.add(task)
        task.add_done_callback(self._refreshes.discard)

    async def _renew(self, hex_digest: str) -> None:
        try:
            local = self._trusted_local()
            if local is None:
                return
            version = local.version
            token_hash = TokenHash(hex_digest)
            result, hit = await self._lookup(token_hash)
            if hit is not None and result != "negative":
                local.put(token_hash, hit.entry, hit.ttl_left, version, hit.age)
        finally:
            self._renewing.discard(hex_digest)

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

    def _judge(
        self,
        entry: CacheEntry,
        source: Source,
        *,
        age: float | None = None,
        degraded: bool = False,
    ) -> Validation:
        if isinstance(entry, CachedVerdict):
            return Validation.invalid(entry.reason, source, cache_age=age, degraded=degraded)
        reason = entry.verdict(self._now())
        if reason is not None:
            return Validation.invalid(reason, source, cache_age=age, degraded=degraded)
        return Validation.live(entry, source, cache_age=age, degraded=degraded)

    async def _load(self, token_hash: TokenHash, flight: Flight, *, fill: bool = True) -> Loaded:
        """Miss path: ask Postgres, then (with ``fill``) fill the cache conditionally."""
        opened = self._breaker.opened_count
        flight.begin()
        read_started = self._monotonic()
        with span("session_store.find") as current:
            current.set_attribute(ATTR_TOKEN_PREFIX, token_hash.prefix)
            session = await self._store.find(token_hash)
        entry, ttl = self._entry_for(session)
        answer = self._judge(entry, Source.DATABASE)
        if not fill:
            return Loaded(answer, False, opened)
        if self._monotonic() - read_started > self._policy.max_fill_lag:
            return Loaded(answer, False, opened)  # too old to trust against an expired tombstone
        filled = await self._fill(token_hash, entry, ttl)
        if filled is False:
            # A tombstone refused the fill: the session was revoked after our read.
            return Loaded(Validation.invalid(Reason.REVOKED, Source.CACHE), True, opened)
        return Loaded(answer, filled is True, opened)

    def _entry_for(self, session: Session | None) -> tuple[CacheEntry, float]:
        """What to cache for a Postgres answer, and for how long."""
        policy = self._policy
        if session is None:
            return CachedVerdict(Reason.UNKNOWN), policy.negative_ttl
        now = self._now()
        reason = session.verdict(now)
        if reason is None:
            remaining = (session.expires_at - now).total_seconds()
            jitter = self._rng() * policy.ttl_jitter * policy.cache_ttl
            return session, min(policy.cache_ttl - jitter, remaining)
        if reason is Reason.REVOKED:
            return CachedVerdict(reason), policy.tombstone_ttl
        return CachedVerdict(reason), policy.negative_ttl

    async def _fill(self, token_hash: TokenHash, entry: CacheEntry, ttl: float) -> bool | None:
        """True when filled, False when a tombstone refused it, None when the
        cache was not written (disabled, unavailable, or nothing to keep)."""
        cache = self._cache
        if cache is None or ttl <= 0:
            return None
        with span("session_cache.fill") as current:
            try:
                filled = await cache.fill(token_hash, entry, ttl)
            except CacheUnavailable:
                return None
            current.set_attribute("session_authority.cache.fill_refused", not filled)
            return filled

    # --- batches (ValidateSessions) ------------------------------------------------

    async def validate_many(
        self, tokens: Sequence[str], caller: CallerKey = ""
    ) -> list[Validation]:
        """``validate`` for each token, answers in request order, with the same
        rules: L1 copies answer at once; the rest is one cache round trip
        (``get_many``) and, for what it missed, one store query (``find_many``)
        shared through the single-flight with every other caller of those
        hashes, then conditional fills. A token ``validate`` would refuse as
        malformed answers ``UNKNOWN`` from ``TOKEN_FORMAT`` in its own entry.
        Raises ``InvalidArgument`` (``tokens``) for more than
        ``MAX_BATCH_TOKENS``, and, for the whole batch, what ``validate``
        raises for one of its tokens (``StoreUnavailable``, ``RateLimited``):
        never a guess for any of them."""
        check_batch(tokens)
        answers = self._local_many(tokens)
        if None not in answers:
            return answers  # type: ignore[return-value]  # every one answered from L1
        # ``validate_local`` has answered what it could; from here on a copy
        # read is stored only if no drop came since (``version``).
        local = self._trusted_local()
        version = 0 if local is None else local.version
        positions: dict[TokenHash, list[int]] = {}
        for index, token in enumerate(tokens):
            if answers[index] is not None:
                continue
            try:
                token_hash = parse_token(token)
            except InvalidArgument:
                token_hash = None
            if token_hash is None or not is_well_formed(token):
                self._metrics.cache_lookup("malformed")
                answers[index] = Validation.invalid(Reason.UNKNOWN, Source.TOKEN_FORMAT)
            else:
                positions.setdefault(token_hash, []).append(index)
        if positions:
            found = await self._validate_hashes(list(positions), caller, local, version)
            for token_hash, indexes in positions.items():
                for index in indexes:
                    answers[index] = found[token_hash]
        done: list[Validation] = []
        for answer in answers:
            assert answer is not None
            if not answer.local:  # ``validate_local`` counted its own
                self._validated(answer)
            done.append(answer)
        return done

    def _local_many(self, tokens: Sequence[str]) -> list[Validation | None]:
        """``validate_local`` for each token, its checks made once per batch
        (L1 trusted, tracing on, the clock): a batch of 100 L1 hits must cost
        far less than 100 calls (the bench's ``batch_vs_hit``). The same rules:
        keep the two in step."""
        local, feed = self._local, self._feed
        if local is None or feed is None:
            return [None] * len(tokens)
        if not (feed.live and self._breaker.closed):
            self._trusted_local()  # not sure any more: it forgets every copy
            return [None] * len(tokens)
        traced, now = recording(), self._epoch()
        lookup, local_hit = local.lookup, self._metrics.local_hit
        answers: list[Validation | None] = []
        hits = 0
        for token in tokens:
            # A lone surrogate (never from gRPC) hashes to where no copy is
            # kept (copies are kept under hashes of checked ASCII tokens).
            found = (
                lookup(sha256(token.encode("utf-8", "surrogatepass")).hexdigest())
                if len(token) <= MAX_TOKEN_LENGTH
                else None
            )
            if found is None:
                answers.append(None)
                continue
            entry, live, expires_at = found
            hits += 1
            if traced:
                self._trace_local(TokenHash.of(token).hex)
            if live is None or now >= expires_at:
                live = self._judge_local(entry, live)  # a verdict, or expired since stored
            reason = live.reason
            local_hit(live.valid, "none" if reason is None else reason.value)
            answers.append(live)
        self._stats.hits += hits
        return answers

    async def _validate_hashes(
        self,
        token_hashes: list[TokenHash],
        caller: CallerKey,
        local: LocalCache | None,
        version: int,
    ) -> dict[TokenHash, Validation]:
        """``_validate`` for distinct well-formed hashes: one lookup, one load."""
        looked_at = self._monotonic()
        with span("session_cache.lookup_many") as current:
            current.set_attribute("session_authority.batch.size", len(token_hashes))
            looked = await self._lookup_many(token_hashes)
        answers: dict[TokenHash, Validation] = {}
        missed: list[TokenHash] = []
        result = "miss"
        for token_hash, (result, hit) in zip(token_hashes, looked, strict=True):
            self._metrics.cache_lookup(result)
            if hit is None:
                if result == "miss":
                    self._stats.misses += 1
                missed.append(token_hash)
                continue
            self._stats.hits += 1
            if local is not None and result != "negative":
                local.put(token_hash, hit.entry, hit.ttl_left, version, hit.age)
            self._maybe_refresh(token_hash, hit)
            answers[token_hash] = self._judge(hit.entry, Source.CACHE, age=hit.age)
        if not missed:
            return answers
        # One lookup for all: every miss saw the same kind of result (a clean
        # miss, or a lookup that failed or was refused, which the rest of this
        # call then bypasses: one batch pays at most one cache timeout).
        clean = result == "miss"
        degraded = _DEGRADED.get(result, False)
        loads = await self._load_many_shared(missed, caller, clean=clean, looked_at=looked_at)
        for token_hash in missed:
            answers[token_hash] = self._settled(
                token_hash, loads[token_hash], local, version, degraded=degraded
            )
        return answers

    async def _lookup_many(self, token_hashes: list[TokenHash]) -> list[tuple[str, Cached | None]]:
        cache = self._cache
        if cache is None:
            return [("disabled", None)] * len(token_hashes)
        try:
            hits = await cache.get_many(token_hashes)
        except CircuitOpen:
            return [("bypassed", None)] * len(token_hashes)
        except CacheUnavailable:
            return [("error", None)] * len(token_hashes)
        return [_classified(hit) for hit in hits]

    async def _load_many_shared(
        self, token_hashes: list[TokenHash], caller: CallerKey, *, clean: bool, looked_at: float
    ) -> dict[TokenHash, Loaded]:
        """``_load_shared`` for many hashes: each charged, shared and read again
        under the same rules, the reads that start here made in one query."""
        limiter = self._limiter
        starting = [h for h in token_hashes if h not in self._loads] if limiter else []
        who = ""
        taken = 0
        if limiter is not None and starting:
            who = caller() if callable(caller) else caller
            for _ in starting:
                if not limiter.take(who):
                    for _ in range(taken):
                        limiter.refund(who)  # the batch is refused as a whole
                    _log.debug("Unknown-token limit: a batch refused (%s)", who)
                    raise RateLimited("too many unknown tokens from this caller; retry later")
                taken += 1
        try:
            shared = await self._loads.do_many(
                token_hashes,
                lambda flights: self._load_many(flights, fill=clean),
                since=looked_at if clean else None,
            )
        except BaseException:
            if limiter is not None:
                for _ in range(taken):
                    limiter.refund(who)  # no answer: not the caller's unknown tokens
            raise
        if limiter is not None:
            for token_hash in starting:
                if shared[token_hash][0].answer.reason is not Reason.UNKNOWN:
                    limiter.refund(who)  # Postgres knew it: only unknown tokens cost
        opened = self._breaker.opened_count
        loads = {token_hash: loaded for token_hash, (loaded, _) in shared.items()}
        again = [
            token_hash
            for token_hash, (loaded, late) in shared.items()
            if late and (not clean or not loaded.confirmed or loaded.opened_count != opened)
        ]
        if again:
            # The late joiners' rule of ``_load_shared``, for each: read for ourselves.
            loads.update(await self._load_many({h: Flight() for h in again}, fill=clean))
        return loads

    async def _load_many(
        self, flights: Mapping[TokenHash, Flight], *, fill: bool
    ) -> dict[TokenHash, Loaded]:
        """``_load`` for many hashes: one store query, then the conditional fills."""
        opened = self._breaker.opened_count
        for flight in flights.values():
            flight.begin()
        read_started = self._monotonic()
        with span("session_store.find_many") as current:
            current.set_attribute("session_authority.batch.size", len(flights))
            found = await self._store.find_many(list(flights))
        judged: dict[TokenHash, tuple[CacheEntry, float, Validation]] = {}
        for token_hash in flights:
            entry, ttl = self._entry_for(found.get(token_hash))
            judged[token_hash] = (entry, ttl, self._judge(entry, Source.DATABASE))
        if not fill or self._monotonic() - read_started > self._policy.max_fill_lag:
            return {h: Loaded(answer, False, opened) for h, (_, _, answer) in judged.items()}
        filled = await asyncio.gather(
            *(self._fill(h, entry, ttl) for h, (entry, ttl, _) in judged.items())
        )
        loads: dict[TokenHash, Loaded] = {}
        for (token_hash, (_, _, answer)), done in zip(judged.items(), filled, strict=True):
            if done is False:  # a tombstone refused the fill: revoked after our read
                loads[token_hash] = Loaded(
                    Validation.invalid(Reason.REVOKED, Source.CACHE), True, opened
                )
            else:
                loads[token_hash] = Loaded(answer, done is True, opened)
        return loads


#: Lookup results after which Postgres answers because Redis could not: degraded.
_DEGRADED = {"error": True, "bypassed": True}


def _classified(hit: Cached | None) -> tuple[str, Cached | None]:
    """A lookup's answer as the ``session_cache_lookups_total`` result it counts as."""
    if hit is None:
        return "miss", None
    if isinstance(hit.entry, CachedVerdict):
        return ("tombstone" if hit.entry.reason is Reason.REVOKED else "negative"), hit
    return "hit", hit
