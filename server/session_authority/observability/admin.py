"""The admin HTTP server (aiohttp, in the serving event loop).

=====================  ==========================================================
``/metrics``           Prometheus exposition through prometheus_client's own
                       aiohttp handler: content negotiation (``Accept:
                       application/openmetrics-text`` gets OpenMetrics, anything
                       else the classic text format), gzip when asked for
``/health``            the runbook's health document as JSON (camelCase, numbers
``/api/health/redis``  as numbers): 200 when healthy or degraded, 503 when unhealthy
``/livez``             200 while the process runs
``/readyz``            200 while the gRPC health service says SERVING, else 503
=====================  ==========================================================

The health document comes from the core's ``HealthReport`` (``health_json``),
rendered as the gRPC ``Health`` reply's proto3 JSON would be, without going
through protobuf.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.exposition import choose_encoder

from session_authority.observability.collector import openmetrics_view
from session_authority.observability.health_json import health_document, health_http_status
from session_authority.observability.sampler import HealthSampler

__all__ = ["AdminServer"]

_log = logging.getLogger("session_authority.observability")
_OPENMETRICS = "application/openmetrics-text"


class AdminServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        sampler: HealthSampler,
        is_serving: Callable[[], bool],
    ) -> None:
        self._classic = make_aiohttp_handler(registry)
        self._openmetrics = make_aiohttp_handler(openmetrics_view(registry))
        self._sampler = sampler
        self._is_serving = is_serving
        self._runner: web.AppRunner | None = None
        self.port = 0

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        app.router.add_get("/api/health/redis", self._health)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        return app

    async def start(self, host: str, port: int) -> None:
        """Bind and serve. Raises ``OSError`` when the port cannot be bound."""
        # A /health still waiting on a dead Postgres must not hold up shutdown.
        runner = web.AppRunner(
            self._app(), access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = runner.addresses
        self.port = int(bound[0][1]) if bound else port
        _log.info(
            "admin HTTP server on %s:%d (/metrics, /health, /livez, /readyz)", host, self.port
        )

    async def start_unix(self, path: str) -> None:
        """Serve on a Unix socket instead (a ``serve --workers`` worker: its
        supervisor serves the one admin port and asks each worker here)."""
        runner = web.AppRunner(
            self._app(), access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            await web.UnixSite(runner, path).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        # prometheus_client negotiates the format; we only pick which view of
        # the registry it renders (see ``collector.openmetrics_view``).
        _, content_type = choose_encoder(",".join(request.headers.getall(hdrs.ACCEPT, [])))
        if content_type.startswith(_OPENMETRICS):
            return await self._openmetrics(request)
        return await self._classic(request)

    async def _health(self, request: web.Request) -> web.Response:
        report = await self._sampler.sample()
        return web.json_response(health_document(report), status=health_http_status(report))

    async def _livez(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self._is_serving():
            return web.Response(text="SERVING\n")
        return web.Response(text="NOT_SERVING\n", status=503)
