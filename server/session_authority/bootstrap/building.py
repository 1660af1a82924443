"""The core on real adapters: pools, breakers and their timing, the L1 cache and its bus."""

from __future__ import annotations

from dataclasses import dataclass

from session_authority.adapters.postgres_listener import PostgresRevocationListener
from session_authority.adapters.postgres_store import PostgresSessionStore
from session_authority.adapters.redis_bus import RedisRevocationBus
from session_authority.adapters.redis_cache import RedisSessionCache
from session_authority.adapters.redis_cluster import is_cluster_url
from session_authority.adapters.redis_cluster_cache import RedisClusterSessionCache
from session_authority.config import Settings
from session_authority.core.assembly import assemble_core
from session_authority.core.breaker import Breaker
from session_authority.core.domain import TokenHash
from session_authority.core.errors import StoreUnavailable
from session_authority.core.local import LocalCache
from session_authority.core.miss_limit import MissLimit
from session_authority.core.service import SessionAuthority
from session_authority.core.watch import RevocationWatch
from session_authority.observability import Telemetry

__all__ = ["Built", "build_core"]


@dataclass(frozen=True)
class Built:
    """The core and the adapters its owner must start, read and close."""

    core: SessionAuthority
    store: PostgresSessionStore
    cache: RedisSessionCache | RedisClusterSessionCache | None
    bus: RedisRevocationBus | None
    #: Wakes ``core.watch`` when a revocation commits (one LISTEN connection).
    listener: PostgresRevocationListener | None = None


def build_core(
    settings: Settings, telemetry: Telemetry | None = None, *, miss_limit: MissLimit | None = None
) -> Built:
    """The core on real adapters. With ``telemetry``, the core reports to its
    metrics, its port guards time every Redis and Postgres call into its
    histograms, and each breaker has its listener. The returned store and
    cache are the adapters themselves, for pool numbers, warming and closing.
    ``miss_limit``: the unknown-token limit shared by ``serve``'s workers
    (default: this process's own)."""
    if not settings.database_url:
        raise ValueError("DATABASE_URL is required")
    store = PostgresSessionStore(
        settings.database_url,
        min_size=settings.pg_pool_min,
        max_size=settings.pg_pool_max,
        command_timeout=settings.pg_command_timeout_ms / 1000,
        acquire_timeout=settings.pg_pool_timeout_ms / 1000,
        pooler=settings.database_pooler,
    )
    cache = None
    if settings.redis_url:
        adapter = (
            RedisClusterSessionCache if is_cluster_url(settings.redis_url) else RedisSessionCache
        )
        cache = adapter.from_url(
            settings.redis_url,
            min_connections=settings.redis_pool_min,
            max_connections=settings.redis_pool_max,
            timeout=settings.breaker_timeout_ms / 1000,
            pool_timeout=settings.redis_pool_timeout_ms / 1000,
            legacy_keys=settings.cache_legacy_keys,
        )
    breaker = Breaker(settings.breaker_policy(), name="redis")
    store_breaker = (
        Breaker(settings.pg_breaker_policy(), name="postgres", error=StoreUnavailable)
        if settings.pg_breaker_enabled
        else None
    )
    if telemetry is not None:
        telemetry.watch_breaker(breaker)
        if store_breaker is not None:
            telemetry.watch_breaker(store_breaker)
    watch = RevocationWatch(
        store,
        poll=settings.watch_poll_ms / 1000,
        retention=settings.revocation_event_retention_seconds,
        prune_every=settings.revocation_event_prune_seconds,
        heartbeat=settings.watch_heartbeat_ms / 1000 if settings.watch_heartbeat_ms else None,
    )
    listener = PostgresRevocationListener(
        settings.database_listen_url or settings.database_url,
        watch.wake,
        check=settings.watch_poll_ms / 1000,
        timeout=(settings.pg_pool_timeout_ms + settings.pg_command_timeout_ms) / 1000,
    )
    local, bus = _local_cache(settings)
    if telemetry is not None and bus is not None:
        telemetry.watch_bus(bus)
    core = assemble_core(
        store,
        cache,
        breaker=breaker,
        store_breaker=store_breaker,
        policy=settings.core_policy(),
        metrics=None if telemetry is None else telemetry.core_metrics,
        cache_observer=None if telemetry is None else telemetry.cache_observer(),
        store_observer=None if telemetry is None else telemetry.store_observer(),
        local=local,
        feed=bus,
        miss_limit=miss_limit,
        watch=watch,
    )
    return Built(core, store, cache, bus, listener)


def _local_cache(settings: Settings) -> tuple[LocalCache | None, RedisRevocationBus | None]:
    """The L1 cache and the revocation bus that keeps it (and other processes'
    L1 caches) honest. The bus runs whenever there is a Redis, so that this
    process's revocations reach every L1 even when its own is disabled."""
    if not settings.redis_url:
        return None, None
    local = (
        LocalCache(settings.l1_cache_size, settings.l1_cache_ttl_ms / 1000)
        if settings.l1_cache_ttl_ms > 0
        else None
    )

    def dropped(hashes: list[TokenHash] | None) -> None:
        if local is not None:
            local.drop(hashes)

    bus = RedisRevocationBus.from_url(
        settings.redis_url,
        timeout=settings.breaker_timeout_ms / 1000,
        on_revoked=dropped,
        ack_timeout=settings.l1_ack_timeout_ms / 1000,
        liveness=settings.l1_bus_liveness_ms / 1000,
    )
    return local, bus
