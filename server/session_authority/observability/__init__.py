"""Observability at the edges: traces (OpenTelemetry SDK), Prometheus metrics
and the admin HTTP server (/metrics, /health, /api/health/redis, /livez,
/readyz). The core only sees ``CoreMetrics`` and the OpenTelemetry API.

The composition root calls ``install_tracing`` once, then builds one
``Telemetry`` per server with the provider it returned."""

from session_authority.observability.telemetry import Telemetry
from session_authority.observability.tracing import install_tracing

__all__ = ["Telemetry", "install_tracing"]
