"""Tracing: the OpenTelemetry SDK provider, built in the serving process.

The core traces through the OpenTelemetry *API* (its tracer is a proxy that
resolves to whatever global provider is installed), and the gRPC server span
comes from ``ServerSpans`` (server_spans.py), which continues a caller's W3C
``traceparent`` and starts nothing for a call that is not sampled. Both use
the global provider, so there is one per process, installed by the composition root's explicit call
to ``install_tracing`` (never as a side effect of building something): the
first call builds and installs it, later calls (a second ``App`` in the same
process, or a host that set up its own provider first, like the tests) reuse
the one in place. The SDK shuts it down (flushing spans) at interpreter exit;
``App.stop`` flushes.

Where spans go (``Settings.traces_exporters``): OTLP over gRPC (the exporter
reads the standard ``OTEL_EXPORTER_OTLP_*`` variables) and/or the console (one
JSON object per line on stdout). With neither, no SDK is installed and the
RPCs get no span wrapper at all. The sampler comes from
``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``, read by the SDK.
"""

from __future__ import annotations

import logging
import sys

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)

from session_authority.config import Settings
from session_authority.core.breaker import BreakerState

__all__ = [
    "ATTR_BREAKER_CAUSE",
    "ATTR_BREAKER_FROM",
    "ATTR_BREAKER_NAME",
    "ATTR_BREAKER_TO",
    "ATTR_VALID",
    "ATTR_VALIDATION_REASON",
    "ATTR_VALIDATION_SOURCE",
    "EVENT_BREAKER_TRANSITION",
    "add_event",
    "breaker_event",
    "flush_tracing",
    "install_tracing",
]

_log = logging.getLogger("session_authority.observability")

EVENT_BREAKER_TRANSITION = "circuit_breaker.transition"
ATTR_BREAKER_FROM = "session_authority.breaker.from"
ATTR_BREAKER_TO = "session_authority.breaker.to"
ATTR_BREAKER_CAUSE = "session_authority.breaker.cause"
ATTR_BREAKER_NAME = "session_authority.breaker.name"
#: On the RPC's server span: what ValidateSession answered.
ATTR_VALID = "session_authority.validation.valid"
ATTR_VALIDATION_SOURCE = "session_authority.validation.source"
ATTR_VALIDATION_REASON = "session_authority.validation.reason"


def install_tracing(settings: Settings) -> trace.TracerProvider | None:
    """The provider the server's spans go to, installing the SDK one if none
    is in place yet; the caller hands it to ``Telemetry``. ``None`` (no
    tracing, no server interceptor) when OTEL_SDK_DISABLED is set, or when
    no provider is in place and no exporter is configured."""
    if settings.otel_sdk_disabled:
        return None
    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider):
        return current  # ours from an earlier App, a host's, or a test's
    exporters = _exporters(settings)
    if not exporters:
        return None
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: settings.otel_service_name}))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _log.info("tracing: exporting to %s", ",".join(sorted(settings.traces_exporters())))
    return trace.get_tracer_provider()  # the API keeps the first one set


def _exporters(settings: Settings) -> list[SpanExporter]:
    chosen = settings.traces_exporters()
    exporters: list[SpanExporter] = []
    if "otlp" in chosen:
        # Imported here: the gRPC exporter pulls in its protobuf modules.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporters.append(OTLPSpanExporter())
    if "console" in chosen:
        exporters.append(ConsoleSpanExporter(out=sys.stdout, formatter=_one_line))
    return exporters


def _one_line(span: ReadableSpan) -> str:
    return str(span.to_json(indent=None)) + "\n"


def flush_tracing(provider: trace.TracerProvider | None, timeout_millis: int = 2000) -> None:
    """Export what the SDK provider still buffers (no-op for any other)."""
    if isinstance(provider, TracerProvider):
        provider.force_flush(timeout_millis)


def add_event(name: str, attributes: dict[str, str]) -> None:
    """An event on the current span, if one is recording."""
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(name, attributes)


def breaker_event(old: BreakerState, new: BreakerState, cause: str, breaker: str = "redis") -> None:
    """A breaker transition as an event on the span that caused it (none when
    it happened outside a traced call); ``metrics.breaker_listener`` calls it."""
    add_event(
        EVENT_BREAKER_TRANSITION,
        {
            ATTR_BREAKER_NAME: breaker,
            ATTR_BREAKER_FROM: old.value,
            ATTR_BREAKER_TO: new.value,
            ATTR_BREAKER_CAUSE: cause,
        },
    )
