"""The composition root: settings in, a running server out. Nothing here runs
at import time.

Observability is wired here too: ``install_tracing`` once, then
``observability.Telemetry``: the core gets its ``CoreMetrics`` and both ports
timed, each breaker its listener, the gRPC server its tracing and metrics
interceptors, and the admin HTTP port starts with the server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, cast, runtime_checkable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from session_authority.adapters.postgres_store import PostgresSessionStore
from session_authority.adapters.redis_bus import RedisRevocationBus
from session_authority.adapters.redis_cache import RedisSessionCache
from session_authority.config import Settings, redact_url
from session_authority.core.breaker import Breaker
from session_authority.core.domain import TokenHash, new_token
from session_authority.core.errors import CacheUnavailable, StoreUnavailable
from session_authority.core.guarded import GuardedCache, GuardedStore
from session_authority.core.health import CacheStats
from session_authority.core.issuance import Issuer
from session_authority.core.local import LocalCache, RevocationFeed
from session_authority.core.miss_limit import MissLimiter
from session_authority.core.policy import CorePolicy, utcnow
from session_authority.core.ports import SessionCache, SessionStore
from session_authority.core.reporting import HealthReporter
from session_authority.core.revocation import Revoker
from session_authority.core.service import SessionAuthority
from session_authority.core.telemetry import CoreMetrics, NoMetrics
from session_authority.core.validation import Validator
from session_authority.observability import Telemetry, install_tracing
from session_authority.transport.auth import ApiKeys, AuthInterceptor, AuthPolicy
from session_authority.transport.drain import DrainInterceptor
from session_authority.transport.handler import add_to_server
from session_authority.transport.servicer import SessionAuthorityServicer
from session_authority.transport.tls import CertificateFiles
from session_authority.v1 import session_authority_pb2 as pb

__all__ = ["App", "Built", "assemble_core", "auth_policy", "build_core", "server_options"]

_log = logging.getLogger("session_authority")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SessionAuthority"].full_name
_HEALTH_INTERVAL = 2.0


def assemble_core(
    store: SessionStore,
    cache: SessionCache | None,
    *,
    breaker: Breaker,
    store_breaker: Breaker | None = None,
    policy: CorePolicy | None = None,
    metrics: CoreMetrics | None = None,
    clock: Callable[[], datetime] = utcnow,
    rng: Callable[[], float] = random.random,
    token_factory: Callable[[], str] = new_token,
    monotonic: Callable[[], float] = time.monotonic,
    local: LocalCache | None = None,
    feed: RevocationFeed | None = None,
) -> SessionAuthority:
    """The core's collaborators over the given ports (no I/O). Both ports go
    behind their breakers the same way; the Redis breaker's half-open probe is
    the revoker's replay. Tests assemble their cores here too, on fakes."""
    policy = policy or CorePolicy()
    metrics = metrics or NoMetrics()
    stats = CacheStats()
    guarded_store: SessionStore = (
        store if store_breaker is None else GuardedStore(store, store_breaker)
    )
    guarded_cache = (
        None if cache is None else GuardedCache(cache, breaker, stats=stats, metrics=metrics)
    )
    if cache is None:
        local = feed = None  # L1 and its revocation feed live on Redis
    revoker = Revoker(
        guarded_store, guarded_cache, breaker, policy, metrics=metrics, local=local, feed=feed
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
            limiter=(
                MissLimiter(policy.unknown_token_rate, policy.unknown_token_burst, clock=monotonic)
                if policy.unknown_token_rate > 0
                else None
            ),
            local=local,
            feed=feed,
        ),
        revoker=revoker,
        reporter=HealthReporter(
            store, cache, breaker, store_breaker, policy, stats, local=local, feed=feed
        ),
        stats=stats,
        breaker=breaker,
        store_breaker=store_breaker,
    )


@dataclass(frozen=True)
class Built:
    """The core and the adapters its owner must start, read and close."""

    core: SessionAuthority
    store: PostgresSessionStore
    cache: RedisSessionCache | None
    bus: RedisRevocationBus | None


def build_core(settings: Settings, telemetry: Telemetry | None = None) -> Built:
    """The core on real adapters. With ``telemetry``, the core reports to its
    metrics and reaches Redis and Postgres through timing wrappers (the
    returned store and cache are the adapters themselves, for pool numbers,
    warming and closing), and each breaker has its listener."""
    if not settings.database_url:
        raise ValueError("DATABASE_URL is required")
    store = PostgresSessionStore(
        settings.database_url,
        min_size=settings.pg_pool_min,
        max_size=settings.pg_pool_max,
        command_timeout=settings.pg_command_timeout_ms / 1000,
        acquire_timeout=settings.pg_pool_timeout_ms / 1000,
    )
    cache = None
    if settings.redis_url:
        cache = RedisSessionCache.from_url(
            settings.redis_url,
            ttl=settings.cache_ttl_seconds,
            min_connections=settings.redis_pool_min,
            max_connections=settings.redis_pool_max,
            timeout=settings.breaker_timeout_ms / 1000,
            pool_timeout=settings.redis_pool_timeout_ms / 1000,
        )
    breaker = Breaker(settings.breaker_policy(), name="redis")
    store_breaker = (
        Breaker(settings.pg_breaker_policy(), name="postgres", error=StoreUnavailable)
        if settings.pg_breaker_enabled
        else None
    )
    store_port: SessionStore = store
    port: SessionCache | None = cache
    if telemetry is not None:
        store_port = telemetry.instrument_store(store)
        if cache is not None:
            port = telemetry.instrument_cache(cache)
        telemetry.watch_breaker(breaker)
        if store_breaker is not None:
            telemetry.watch_breaker(store_breaker)
    local, bus = _local_cache(settings)
    core = assemble_core(
        store_port,
        port,
        breaker=breaker,
        store_breaker=store_breaker,
        policy=settings.core_policy(),
        metrics=None if telemetry is None else telemetry.core_metrics,
        local=local,
        feed=bus,
    )
    return Built(core, store, cache, bus)


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
    )
    return local, bus


@runtime_checkable
class HandlerDecorator(Protocol):
    """An interceptor that can also wrap a method's handler once, when it is
    registered (``WrappingInterceptor``s: drain, auth; ``RpcMetricsInterceptor``)."""

    def decorate(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]: ...


class _Decorating:
    """Stands for the server while the generated ``add_*Servicer_to_server``
    functions register their handlers, and registers each one decorated by
    ``decorators`` (the first outermost). grpc.aio runs every interceptor's
    ``intercept_service`` on every call (measured with h2load: two of them
    cost ~45 us a call, a fifth of what the framework itself takes); a
    handler decorated at registration costs only its wrapper. Registered
    handlers take precedence over the generic ones registered beside them.
    Per-call interceptors (tracing) still run outside the decorated ones."""

    def __init__(self, server: grpc.aio.Server, decorators: list[HandlerDecorator]) -> None:
        self._server = server
        self._decorators = decorators

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        # Decorated too: a method served by a generic handler (reflection, or one
        # grpc matches there) must not skip authorisation or the drain.
        self._server.add_generic_rpc_handlers(
            [_DecoratedGeneric(h, self._decorators) for h in handlers]
        )

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        decorated = {}
        for name, handler in handlers.items():
            for decorator in reversed(self._decorators):
                handler = decorator.decorate(f"/{service}/{name}", handler)
            decorated[name] = handler
        self._server.add_registered_method_handlers(service, decorated)


class _DecoratedGeneric(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, decorators: list[HandlerDecorator]) -> None:
        self._inner = inner
        self._decorators = decorators
        self._done: dict[str, tuple[object, grpc.RpcMethodHandler[Any, Any]]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        done = self._done.get(method)
        if done is not None and done[0] is handler:
            return done[1]
        decorated = handler
        for decorator in reversed(self._decorators):
            decorated = decorator.decorate(method, decorated)
        self._done[method] = (handler, decorated)
        return decorated


def _split_chain(
    chain: list[grpc.aio.ServerInterceptor],
) -> tuple[list[grpc.aio.ServerInterceptor], list[HandlerDecorator]]:
    """The per-call interceptors (run first, outermost) and the handler
    decorators (applied at registration, inside them), keeping ``chain``'s
    order: no per-call interceptor may come after a decorator."""
    per_call = [i for i in chain if not isinstance(i, HandlerDecorator)]
    decorators: list[HandlerDecorator] = [i for i in chain if isinstance(i, HandlerDecorator)]
    if chain != [*per_call, *decorators]:
        raise ValueError("per-call interceptors must come before handler decorators")
    return per_call, decorators


def server_options(settings: Settings, *, reuse_port: bool = False) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments. ``max_connection_age`` sends
    long-lived client connections a GOAWAY now and then: the kernel spreads
    connections, not calls, over workers (and a load balancer over replicas),
    so a client that never reconnects would stay wherever it first landed."""
    options = [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.max_receive_message_length", 64 * 1024),
    ]
    if settings.grpc_max_connection_age_ms:
        options += [
            ("grpc.max_connection_age_ms", settings.grpc_max_connection_age_ms),
            ("grpc.max_connection_age_grace_ms", settings.grpc_max_connection_age_grace_ms),
        ]
    if reuse_port:
        options.append(("grpc.so_reuseport", 1))
    return options


@dataclass
class App:
    settings: Settings
    core: SessionAuthority
    store: PostgresSessionStore
    cache: RedisSessionCache | None
    server: grpc.aio.Server
    health: HealthServicer
    drain: DrainInterceptor
    port: int = 0
    telemetry: Telemetry | None = None
    bus: RedisRevocationBus | None = None
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
        cls, settings: Settings, *, reuse_port: bool = False, admin_socket: str | None = None
    ) -> App:
        """Build everything, bind, and start serving. Postgres may still be
        down: the standard health service says NOT_SERVING until it answers.

        A worker of ``serve --workers`` passes ``reuse_port`` (its siblings bind
        the same port) and ``admin_socket`` (its admin app, for the supervisor)."""
        credentials = _server_credentials(settings)  # first: unusable TLS files stop start-up
        telemetry = Telemetry(settings, tracer_provider=install_tracing(settings))
        built = build_core(settings, telemetry)
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
        drain = DrainInterceptor()
        auth = AuthInterceptor(
            auth_policy(settings),
            ApiKeys(settings.api_key_hashes()),
            trust_client_certificates=settings.tls_client_ca_file is not None,
            on_denied=telemetry.auth_denied,
        )
        # Tracing and metrics outside authorisation and the drain, so refused calls show.
        chain = [*telemetry.interceptors(), auth, drain]
        per_call, decorators = _split_chain(chain)
        server = grpc.aio.server(
            interceptors=per_call or None,
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
            options=server_options(settings, reuse_port=reuse_port),
        )
        decorating = _Decorating(server, decorators)
        # It implements the two registration methods the generated code calls.
        services = cast(grpc.aio.Server, decorating)
        # Requests are decoded inside the call: garbage is INVALID_ARGUMENT, not UNKNOWN.
        add_to_server(SessionAuthorityServicer(core), services)
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, services)
        if settings.grpc_reflection:
            names = [
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ]
            # What reflection.enable_server_reflection does for an aio server,
            # through ``services`` so that its handlers are decorated too.
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
                ReflectionServicer(names), services
            )
        address = f"{settings.host}:{settings.port}"
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
        if port == 0:
            raise OSError(f"cannot bind {settings.host}:{settings.port}")
        app = cls(settings, core, store, cache, server, health, drain, port, telemetry, built.bus)
        await app._set_serving(False)
        try:
            await telemetry.start(lambda: app.serving, admin_socket=admin_socket)
        except BaseException:
            await server.stop(None)  # releases the bound gRPC port
            await telemetry.stop()
            raise
        if cache is not None:
            await cache.warm()
            await app._trust_cache()
        if built.bus is not None:
            built.bus.start()
            with contextlib.suppress(TimeoutError):  # no L1 hits until it is subscribed
                await asyncio.wait_for(built.bus.subscribed_once.wait(), 1.0)
        await server.start()
        app._tasks.append(asyncio.create_task(app._watch_health(), name="health-watch"))
        if cache is not None and settings.revocation_sweep_seconds > 0:
            app._tasks.append(
                asyncio.create_task(
                    core.run_drain(settings.revocation_sweep_seconds), name="revocation-drain"
                )
            )
        _log.info(
            "session-authority listening on %s:%d (postgres %s, redis %s)",
            settings.host,
            port,
            redact_url(settings.database_url),
            redact_url(settings.redis_url) or "disabled",
        )
        _log_security(settings, port, app.admin_port)
        return app

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


_HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
#: Open to every caller, so that probes and grpcurl need no credentials.
_PUBLIC_SERVICES = frozenset(
    {_HEALTH_SERVICE, reflection.SERVICE_NAME, "grpc.reflection.v1.ServerReflection"}
)
#: What any authenticated caller may call; every other SessionAuthority
#: method (CreateSession, Invalidate, InvalidateUser, any added later) needs
#: an identity in AUTH_ALLOWED_IDENTITIES.
_READS = ("ValidateSession", "Health")


def auth_policy(settings: Settings) -> AuthPolicy:
    """Who may call what, from AUTH_* and TLS_CLIENT_CA_FILE (README "Security")."""
    return AuthPolicy(
        enforced=settings.authentication_configured,
        public_services=_PUBLIC_SERVICES,
        reads=frozenset(f"/{SERVICE_NAME}/{name}" for name in _READS),
        allowed=settings.allowed_identities(),
        anonymous_reads=settings.auth_anonymous_reads,
    )


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (and mTLS) credentials that follow their files; None: plaintext."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    files = CertificateFiles(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    )
    return files.credentials()


def _log_security(settings: Settings, port: int, admin_port: int | None) -> None:
    """Start-up lines that say who can reach what."""
    if settings.tls_cert_file is None:
        _log.warning("gRPC port is PLAINTEXT (no TLS_CERT_FILE / --tls-cert)")
    elif settings.tls_client_ca_file is None:
        _log.info(
            "gRPC port: TLS (certificate %s, reloaded when it changes)", settings.tls_cert_file
        )
    else:
        _log.info(
            "gRPC port: mTLS, client certificates from %s required (reloaded when they change)",
            settings.tls_client_ca_file,
        )
    mutating = "CreateSession, Invalidate and InvalidateUser"
    if not settings.authentication_configured:
        _log.warning(
            "NO AUTHENTICATION (ALLOW_UNAUTHENTICATED / --allow-unauthenticated): every caller "
            "that reaches %s:%d may call %s (mint or revoke any user's sessions); "
            "for local and test set-ups only",
            settings.host,
            port,
            mutating,
        )
    else:
        means = [
            *(["client certificate"] if settings.tls_client_ca_file is not None else []),
            *([f"{len(settings.api_key_hashes())} API key(s)"] if settings.auth_api_keys else []),
        ]
        allowed = sorted(settings.allowed_identities())
        _log.info(
            "authentication: %s; ValidateSession and Health: %s; %s: %s",
            " or ".join(means),
            "any caller" if settings.auth_anonymous_reads else "authenticated callers",
            mutating,
            ", ".join(allowed) if allowed else "nobody (AUTH_ALLOWED_IDENTITIES is empty)",
        )
        if settings.auth_api_keys and settings.tls_cert_file is None:
            _log.warning("API keys over a PLAINTEXT port: anyone on the path can read them")
    if admin_port is not None:
        loopback = settings.admin_host in ("127.0.0.1", "::1", "localhost")
        _log.info(
            "admin HTTP (/metrics, /health) on %s:%d, plaintext and unauthenticated%s",
            settings.admin_host,
            admin_port,
            "; loopback only (set ADMIN_HOST to expose it)" if loopback else "",
        )
