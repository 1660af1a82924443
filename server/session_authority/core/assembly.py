"""The core assembled from its collaborators over given ports (no I/O, no adapters).

Importing it loads no driver, gRPC, Prometheus or OpenTelemetry SDK (a test
imports it alone in a fresh interpreter): the unit tests assemble their cores
here on fakes, and ``bootstrap.build_core`` on the real adapters."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import datetime

from session_authority.core.breaker import Breaker
from session_authority.core.domain import new_token
from session_authority.core.guarded import PortObserver, guard_cache, guard_store
from session_authority.core.health import CacheStats
from session_authority.core.issuance import Issuer
from session_authority.core.listing import Lister
from session_authority.core.local import LocalCache, RevocationFeed
from session_authority.core.miss_limit import MissLimit, MissLimiter
from session_authority.core.policy import CorePolicy, utcnow
from session_authority.core.ports import SessionCache, SessionStore
from session_authority.core.reporting import HealthReporter
from session_authority.core.revocation import Revoker
from session_authority.core.service import SessionAuthority
from session_authority.core.telemetry import CoreMetrics, NoMetrics
from session_authority.core.touch import Toucher
from session_authority.core.validation import Validator
from session_authority.core.watch import RevocationWatch

__all__ = ["assemble_core"]


def assemble_core(
    store: SessionStore,
    cache: SessionCache | None,
    *,
    breaker: Breaker,
    store_breaker: Breaker | None = None,
    policy: CorePolicy | None = None,
    metrics: CoreMetrics | None = None,
    cache_observer: PortObserver | None = None,
    store_observer: PortObserver | None = None,
    clock: Callable[[], datetime] = utcnow,
    rng: Callable[[], float] = random.random,
    token_factory: Callable[[], str] = new_token,
    monotonic: Callable[[], float] = time.monotonic,
    local: LocalCache | None = None,
    feed: RevocationFeed | None = None,
    miss_limit: MissLimit | None = None,
    watch: RevocationWatch | None = None,
) -> SessionAuthority:
    """The core's collaborators over the given ports (no I/O). Both ports go
    behind their breakers the same way (``core/guarded.py``), each timed into
    its observer when one is given; the Redis breaker's half-open probe is the
    revoker's replay. Tests assemble their cores here too, on fakes.

    ``miss_limit``: the unknown-token limit to use (``serve --workers``' table
    shared by the workers); by default a ``MissLimiter`` of this process's own.
    None either way when ``policy.unknown_token_rate`` is 0 (no limit)."""
    policy = policy or CorePolicy()
    metrics = metrics or NoMetrics()
    stats = CacheStats()
    guarded_store = guard_store(store, store_breaker, observer=store_observer)
    guarded_cache = (
        None
        if cache is None
        else guard_cache(cache, breaker, stats=stats, metrics=metrics, observer=cache_observer)
    )
    if cache is None:
        local = feed = None  # L1 and its revocation feed live on Redis
    revoker = Revoker(
        guarded_store,
        guarded_cache,
        breaker,
        policy,
        metrics=metrics,
        local=local,
        feed=feed,
        monotonic=monotonic,
    )
    breaker.set_probe(revoker.replay_revocations)
    return SessionAuthority(
        issuer=Issuer(
            guarded_store, guarded_cache, policy, clock=clock, token_factory=token_factory
        ),
        validator=Validator(
            guarded_store,
            guarded_cache,
            breaker,
            policy,
            stats=stats,
            metrics=metrics,
            clock=clock,
            rng=rng,
            monotonic=monotonic,
            limiter=_miss_limit(policy, miss_limit, monotonic),
            local=local,
            feed=feed,
        ),
        revoker=revoker,
        reporter=HealthReporter(
            guarded_store,
            guarded_cache,
            breaker,
            store_breaker,
            policy,
            stats,
            local=local,
            feed=feed,
        ),
        lister=Lister(guarded_store, key=policy.page_token_key),
        stats=stats,
        breaker=breaker,
        store=guarded_store,
        toucher=Toucher(
            guarded_store,
            guarded_cache,
            breaker,
            policy,
            clock=clock,
            monotonic=monotonic,
            local=local,
            feed=feed,
            metrics=metrics,
        ),
        store_breaker=store_breaker,
        watch=watch,
    )


def _miss_limit(
    policy: CorePolicy, given: MissLimit | None, monotonic: Callable[[], float]
) -> MissLimit | None:
    """The unknown-token limit: none at rate 0, else ``given`` or one of our own."""
    if policy.unknown_token_rate <= 0:
        return None
    if given is not None:
        return given
    return MissLimiter(policy.unknown_token_rate, policy.unknown_token_burst, clock=monotonic)
