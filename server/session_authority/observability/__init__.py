"""Observability at the edges: traces (OpenTelemetry SDK), Prometheus metrics
and the admin HTTP server (/metrics, /health, /api/health/redis, /livez,
/readyz). The core only sees ``CoreMetrics`` and the OpenTelemetry API."""

from session_authority.observability.telemetry import Telemetry

__all__ = ["Telemetry"]
