"""``App``: the running server: gRPC, health, admin, background tasks, and its stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from session_authority.adapters.postgres_listener import PostgresRevocationListener
from session_authority.adapters.postgres_store import PostgresSessionStore
from session_authority.adapters.redis_bus import RedisRevocationBus
from session_authority.adapters.redis_cache import RedisSessionCache
from session_authority.adapters.redis_cluster_cache import RedisClusterSessionCache
from session_authority.bootstrap.building import build_core
from session_authority.bootstrap.grpc_server import (
    DecoratingServer,
    listen_address,
    server_options,
    split_chain,
)
from session_authority.bootstrap.security import (
    auth_policy,
    certificate_files,
    forward_auth_certificate_files,
    forward_auth_keys,
    gateway_policy,
    log_security,
)
from session_authority.config import Settings, redact_url
from session_authority.core.errors import CacheUnavailable
from session_authority.core.miss_limit import MissLimit
from session_authority.core.service import SessionAuthority
from session_authority.core.telemetry import set_tracing
from session_authority.logs import quiet_grpc_client_gone
from session_authority.observability import Telemetry, install_tracing
from session_authority.transport.admission import AdmissionGate, Budget
from session_authority.transport.auth import ApiKeys, Authoriser
from session_authority.transport.drain import DrainInterceptor
from session_authority.transport.ext_authz import (
    EXT_AUTHZ_DESCRIPTOR,
    ExtAuthzServicer,
    add_ext_authz,
)
from session_authority.transport.forward_auth import ForwardAuthServer
from session_authority.transport.handler import SERVICE_DESCRIPTOR, SERVICE_NAME, add_to_server
from session_authority.transport.reflection import add_reflection
from session_authority.transport.servicer import SessionAuthorityServicer

__all__ = ["App"]

_log = logging.getLogger("session_authority")
_HEALTH_INTERVAL = 2.0


@dataclass
class App:
    settings: Settings
    core: SessionAuthority
    store: PostgresSessionStore
    cache: RedisSessionCache | RedisClusterSessionCache | None
    server: grpc.aio.Server
    health: HealthServicer
    drain: DrainInterceptor
    port: int = 0
    telemetry: Telemetry | None = None
    bus: RedisRevocationBus | None = None
    listener: PostgresRevocationListener | None = None
    forward_auth: ForwardAuthServer | None = None
    serving: bool = False
    """What the standard health service says (SERVING); ``/readyz`` answers it."""
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def admin_port(self) -> int | None:
        """The bound admin HTTP port; None when disabled or unavailable."""
        admin = None if self.telemetry is None else self.telemetry.admin
        return None if admin is None else admin.port

    @classmethod
    async def start(
        cls,
        settings: Settings,
        *,
        reuse_port: bool = False,
        admin_socket: str | None = None,
        worker: tuple[int, int] = (0, 1),
        miss_limit: MissLimit | None = None,
        handshake_failures: Callable[[], int] | None = None,
    ) -> App:
        """Build everything, bind, and start serving. Postgres may still be
        down: the standard health service says NOT_SERVING until it answers.

        A worker of ``serve --workers`` passes ``reuse_port`` (its siblings bind
        the same port), ``admin_socket`` (its admin app, for the supervisor) and
        ``worker``: its index and the count (named in the Health document), and
        ``miss_limit``: the unknown-token limit the workers share.
        ``handshake_failures``: reads the count of failed TLS handshakes
        (``logs.NativeStderr``), exported as a metric."""
        quiet_grpc_client_gone()
        tls = certificate_files(settings)
        # First: unusable TLS files (mismatched, expired) stop start-up.
        credentials = None if tls is None else tls.credentials()
        forward_tls = (
            forward_auth_certificate_files(settings) if settings.forward_auth_port else None
        )
        forward_context = None if forward_tls is None else forward_tls.ssl_context()
        tracer_provider = install_tracing(settings)
        set_tracing(tracer_provider is not None)  # none: the hit path looks for no span
        telemetry = Telemetry(settings, tracer_provider=tracer_provider)
        built = build_core(settings, telemetry, miss_limit=miss_limit)
        core, store, cache = built.core, built.store, built.cache
        telemetry.attach(
            stats=lambda: core.stats,
            breakers=[b for b in (core.breaker, core.store_breaker) if b is not None],
            store_pool=store.pool_stats,
            # The adapter's pool keeps the numbers (its own waiter count
            # included); reading them costs no I/O.
            cache_pool=None if cache is None else cache.pool_stats,
            health=core.health,
        )
        for files in (tls, forward_tls):
            if files is not None:
                files.on_rejected = telemetry.tls_reload_rejected
        if handshake_failures is not None:
            telemetry.count_handshake_failures(handshake_failures)
        drain = DrainInterceptor()
        authoriser = Authoriser(
            auth_policy(settings),
            ApiKeys(settings.api_key_hashes()),
            trust_client_certificates=settings.tls_client_ca_file is not None,
            on_denied=telemetry.auth_denied,
        )
        # The gate outermost: it decides on metadata and peer before the request
        # is read (its refusals are counted by telemetry.rpc_refused and
        # auth_denied); tracing and metrics then outside the drain.
        gate = AdmissionGate(
            authoriser,
            authenticated=Budget(settings.max_concurrent_rpcs),
            # Long-lived streams hold no slot of the unary calls' budget.
            streams=Budget(settings.watch_max_watchers, full="streams_full"),
            stream_methods=frozenset({f"/{SERVICE_NAME}/WatchRevocations"}),
            public=Budget(settings.max_public_rpcs, settings.max_public_rpcs_per_peer),
            idle=settings.request_idle_timeout_ms / 1000,
            on_refused=telemetry.rpc_refused,
        )
        chain = [gate, *telemetry.interceptors(), drain]
        per_call, decorators = split_chain(chain)
        server = grpc.aio.server(
            interceptors=per_call or None,
            # None: grpc's one budget for every call is replaced by the gate's two.
            maximum_concurrent_rpcs=None,
            options=server_options(settings, reuse_port=reuse_port),
        )
        decorating = DecoratingServer(server, decorators)
        # It implements the two registration methods the generated code calls.
        services = cast(grpc.aio.Server, decorating)
        # Requests are decoded inside the call: garbage is INVALID_ARGUMENT, not UNKNOWN.
        servicer = SessionAuthorityServicer(
            core,
            worker=worker[0],
            workers=worker[1],
            watch_stall=settings.watch_stall_timeout_ms / 1000,
        )
        add_to_server(servicer, services)
        gateways = gateway_policy(settings)
        add_ext_authz(ExtAuthzServicer(core, gateways), services)
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, services)
        if settings.grpc_reflection:
            # Through ``services``, so that its handlers are decorated too.
            add_reflection(
                services,
                [
                    SERVICE_DESCRIPTOR,
                    EXT_AUTHZ_DESCRIPTOR,
                    health_pb2.DESCRIPTOR.services_by_name["Health"],
                ],
            )
        address = listen_address(settings.host, settings.port)
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
        if port == 0:
            raise OSError(f"cannot bind {address}")
        app = cls(
            settings,
            core,
            store,
            cache,
            server,
            health,
            drain,
            port,
            telemetry,
            built.bus,
            built.listener,
        )
        if settings.forward_auth_port:
            app.forward_auth = ForwardAuthServer(
                core,
                gateways,
                keys=forward_auth_keys(settings),
                timeout=settings.forward_auth_timeout_ms / 1000,
                max_concurrent=settings.max_concurrent_rpcs,
                ssl_context=forward_context,
            )
        await app._begin(telemetry, admin_socket, reuse_port=reuse_port)
        return app

    async def _begin(
        self, telemetry: Telemetry, admin_socket: str | None, *, reuse_port: bool = False
    ) -> None:
        """``start``'s second half, once the port is bound: the admin port,
        the cache trusted and the bus subscribed, then the server started and
        the background tasks running."""
        settings, core, cache, bus, server = (
            self.settings,
            self.core,
            self.cache,
            self.bus,
            self.server,
        )
        await self._set_serving(False)
        try:
            await telemetry.start(lambda: self.serving, admin_socket=admin_socket)
            if self.forward_auth is not None:  # the workers of one replica share the port
                await self.forward_auth.start(
                    settings.forward_auth_host, settings.forward_auth_port, reuse_port=reuse_port
                )
        except BaseException:
            await server.stop(None)  # releases the bound gRPC port
            await telemetry.stop()
            raise
        if cache is not None:
            await cache.warm()
            await self._trust_cache()
        if bus is not None:
            bus.start()
            with contextlib.suppress(TimeoutError):  # no L1 hits until it is subscribed
                await asyncio.wait_for(bus.subscribed_once.wait(), 1.0)
        # Everything built so far lives as long as the process: move it out of
        # the collector's sight, so that the collections the hot path's
        # allocations trigger do not walk it again and again (gc.freeze; +10 %
        # cache hits per worker under h2load here).
        gc.collect()
        gc.freeze()
        await server.start()
        self._tasks.append(asyncio.create_task(self._watch_health(), name="health-watch"))
        if core.watch is not None:
            self._tasks.append(asyncio.create_task(core.watch.run(), name="revocation-watch"))
            if settings.revocation_event_prune_seconds > 0:
                self._tasks.append(
                    asyncio.create_task(core.watch.run_pruning(), name="revocation-event-prune")
                )
            if self.listener is not None:
                self.listener.start()
        if cache is not None and settings.revocation_sweep_seconds > 0:
            self._tasks.append(
                asyncio.create_task(
                    core.run_drain(settings.revocation_sweep_seconds), name="revocation-drain"
                )
            )
        _log.info(
            "session-authority listening on %s (postgres %s, redis %s)",
            listen_address(settings.host, self.port),
            redact_url(settings.database_url),
            redact_url(settings.redis_url) or "disabled",
        )
        log_security(settings, self.port, self.admin_port)

    async def _trust_cache(self) -> None:
        """No cache read before revocations are re-applied to it: before the
        server starts, run what the breaker's probe runs (adopt this Redis,
        replay the window, drain what is pending). If that fails (Redis or
        Postgres down), open the breaker: validations go to Postgres, and the
        probe tries again after the reset timeout."""
        breaker = self.core.breaker
        try:
            async with asyncio.timeout(breaker.policy.timeout * 10):
                await self.core.replay_revocations()
        except (CacheUnavailable, TimeoutError) as exc:
            _log.warning("SessionCache not trusted at start-up: %s", exc or "timeout")
            breaker.trip("start-up: revocations could not be re-applied to the cache")

    async def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.serving = serving
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _watch_health(self) -> None:
        """SERVING while Postgres answers (Redis down is degraded, still SERVING)."""
        serving: bool | None = None
        while True:
            store = await self.core.store_health()
            if store.connected != serving:
                serving = store.connected
                await self._set_serving(serving)
                if serving:
                    _log.info("Postgres answers: SERVING")
                else:
                    _log.error("Postgres unavailable (%s): NOT_SERVING", store.error)
            await asyncio.sleep(_HEALTH_INTERVAL)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING first, finish in-flight RPCs, close pools."""
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        if self.core.watch is not None:
            # Watchers end at once with UNAVAILABLE and their cursor: they resume elsewhere.
            self.core.watch.close()
        if self.listener is not None:
            await self.listener.aclose()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.serving = False
        await self.health.enter_graceful_shutdown()
        started = time.monotonic()
        if not await self.drain.drain(grace) and self.drain.in_flight:
            _log.warning(
                "%d calls still running after %.1fs; cancelling", self.drain.in_flight, grace
            )
        await self.server.stop(max(0.0, grace - (time.monotonic() - started)))
        if self.forward_auth is not None:
            await self.forward_auth.stop()
        if self.telemetry is not None:
            await self.telemetry.stop()
        await self.core.aclose()
        if self.bus is not None:
            await self.bus.aclose()
        if self.cache is not None:
            await self.cache.aclose()
        await self.store.aclose()
        _log.info("session-authority stopped")

    async def wait(self) -> None:
        await self.server.wait_for_termination()
