"""``Telemetry``: the observability of one server, wired by ``bootstrap``.

Built in the serving process when the server starts (never at import time). It
owns a Prometheus registry of its own, the core's ``CoreMetrics``, the timing
observers of both ports, the breaker listeners, the gRPC interceptors, the
background health sampler and the admin HTTP server.

It knows no concrete class: the composition root asks it for port observers,
breakers to watch, and callables to read (cache counters, pool numbers, the
health report). Nor does it install the tracer provider: the composition root
calls ``install_tracing`` and passes the provider (or ``None``) in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence

import grpc
from opentelemetry import trace
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Metric,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from session_authority.config import Settings
from session_authority.core.breaker import Breaker
from session_authority.core.guarded import PortObserver
from session_authority.core.health import CacheStats, HealthReport, PoolStats
from session_authority.observability.admin import AdminServer
from session_authority.observability.collector import BusCollector, BusCounters, StateCollector
from session_authority.observability.interceptor import RpcMetricsInterceptor
from session_authority.observability.metrics import (
    Instruments,
    PrometheusMetrics,
    breaker_listener,
)
from session_authority.observability.sampler import HealthSampler
from session_authority.observability.server_spans import ServerSpans
from session_authority.observability.timings import CacheTimings, StoreTimings
from session_authority.observability.tracing import flush_tracing

__all__ = ["Telemetry"]

_log = logging.getLogger("session_authority.observability")


class Telemetry:
    def __init__(
        self, settings: Settings, *, tracer_provider: trace.TracerProvider | None = None
    ) -> None:
        """``tracer_provider``: what ``install_tracing`` returned; with
        ``None``, RPCs get no server span (the core's spans then go wherever
        the global provider sends them, usually nowhere)."""
        self.settings = settings
        self.tracer_provider = tracer_provider
        # The text format would show each counter's and histogram's creation
        # time as one more gauge series: noise to Prometheus. (Process-wide.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self.instruments = Instruments(self.registry)
        self.core_metrics = PrometheusMetrics(self.instruments, traced=tracer_provider is not None)
        self.sampler: HealthSampler | None = None
        self.admin: AdminServer | None = None
        self._watched: list[Breaker] = []
        self._task: asyncio.Task[None] | None = None

    def cache_observer(self) -> PortObserver:
        """Times every cache call into ``redis_latency`` (the guard calls it)."""
        return CacheTimings(self.instruments.redis_latency)

    def store_observer(self) -> PortObserver:
        """Times every store call into ``postgres_query_duration_seconds``."""
        return StoreTimings(self.instruments.store_query)

    def watch_breaker(self, breaker: Breaker) -> None:
        """The one place a breaker gets its listener: each transition is
        counted (``circuit_breaker_transitions``, by ``breaker.name``) and
        recorded as an event on the span that caused it. Watching the same
        breaker again adds nothing, so no transition is counted twice."""
        if any(watched is breaker for watched in self._watched):
            return
        self._watched.append(breaker)
        breaker.add_listener(breaker_listener(self.instruments, breaker.name))

    def watch_bus(self, bus: BusCounters) -> None:
        """The revocation bus's counters, exported at scrape time (``BusCollector``)."""
        self.registry.register(BusCollector(bus))

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The server spans outermost, so the RPC's span is current inside (only
        with a provider), then the RPC metrics. Both are handler decorators:
        the composition root applies them once, at registration."""
        chain: list[grpc.aio.ServerInterceptor] = []
        if self.tracer_provider is not None:
            chain.append(ServerSpans(self.tracer_provider))
        chain.append(RpcMetricsInterceptor(self.instruments))
        return chain

    def auth_denied(self, method: str, reason: str) -> None:
        """Counts a call refused by authorisation (``method``: ``/pkg.Service/Method``)."""
        service, _, name = method.lstrip("/").rpartition("/")
        self.instruments.auth_denied.labels(service, name, reason).inc()

    def count_handshake_failures(self, read: Callable[[], int]) -> None:
        """``session_authority_tls_handshake_failures_total``: what ``read``
        says at scrape time (the failures gRPC core reported on stderr,
        counted by ``logs.NativeStderr``)."""
        self.registry.register(_HandshakeFailures(read))

    def tls_reload_rejected(self) -> None:
        """Counts a refused TLS rotation (on gRPC's thread, or in a forward-auth handshake)."""
        self.instruments.tls_reload_rejected.inc()

    def rpc_refused(self, method: str, reason: str, code: grpc.StatusCode) -> None:
        """Counts a call the admission gate ended (``method``: ``/pkg.Service/Method``):
        by reason, and with the other calls in ``grpc_server_handled_total``."""
        service, _, name = method.lstrip("/").rpartition("/")
        self.instruments.rpc_shed.labels(reason).inc()
        self.instruments.rpc_handled.labels(service, name, code.name).inc()

    def attach(
        self,
        *,
        stats: Callable[[], CacheStats],
        breakers: Sequence[Breaker],
        store_pool: Callable[[], PoolStats],
        cache_pool: Callable[[], PoolStats] | None,
        health: Callable[[], Awaitable[HealthReport]],
    ) -> None:
        """What the scrape-time gauges and the health sampler read: the core's
        cache counters, the breakers' states, the pools' numbers (read without
        I/O; ``cache_pool`` is ``None`` without a cache, and then no
        ``redis_*`` gauge is exported) and the health report. Adds no breaker
        listener: ``watch_breaker`` does."""
        self.sampler = HealthSampler(health)
        self.registry.register(
            StateCollector(
                stats=stats,
                breakers=list(breakers),
                postgres_pool=store_pool,
                redis_pool=cache_pool,
                sampler=self.sampler,
            )
        )

    async def start(
        self, is_serving: Callable[[], bool], *, admin_socket: str | None = None
    ) -> None:
        """Bind the admin port (unless ADMIN_PORT=0) and start sampling health.

        An ADMIN_PORT that was set and cannot be bound is fatal (``OSError``);
        the default one (9464) being taken is only logged, so that several
        servers can share a host or a test process. With ``admin_socket`` (a
        worker of ``serve --workers``) the admin app listens on that Unix
        socket instead, for the supervisor that serves the port."""
        assert self.sampler is not None, "attach() first"
        port = self.settings.admin_port
        if port and admin_socket is not None:
            admin = AdminServer(self.registry, self.sampler, is_serving)
            await admin.start_unix(admin_socket)
            self.admin = admin
        elif port:
            admin = AdminServer(self.registry, self.sampler, is_serving)
            host = self.settings.admin_bind_host
            try:
                await admin.start(host, port)
                self.admin = admin
            except OSError as exc:
                if "admin_port" in self.settings.model_fields_set:
                    raise OSError(f"cannot bind admin port {host}:{port}: {exc}") from exc
                _log.warning(
                    "admin port %s:%d unavailable (%s): no /metrics or /health; set ADMIN_PORT",
                    host,
                    port,
                    exc.strerror or exc,
                )
        self._task = asyncio.create_task(self.sampler.run(), name="health-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.admin is not None:
            await self.admin.stop()
        # Off the event loop: an OTLP export may take a moment.
        await asyncio.to_thread(flush_tracing, self.tracer_provider)


class _HandshakeFailures(Collector):
    def __init__(self, read: Callable[[], int]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "session_authority_tls_handshake_failures",
            "TLS handshakes on the gRPC port that failed (no or untrusted client "
            "certificate, protocol mismatch, plaintext on a TLS port), as gRPC core "
            "reported them on stderr.",
        )
        family.add_metric([], self._read())
        yield family
