"""Logging set-up: one line per event; JSON in ``serve``, readable in ``dev``.

Greppable patterns from the runbook: ``Cache HIT`` / ``Cache MISS`` (DEBUG),
``SessionCache <op> Error``, ``Circuit breaker OPEN|HALF_OPEN|CLOSED``,
``Token mismatch``. Tokens are never logged (only 8-hex-digit hash prefixes).

JSON lines written while a span is active carry its ``trace_id`` and
``span_id`` (W3C hex), so a log line can be found from a trace and back.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from opentelemetry import trace

__all__ = ["JsonFormatter", "configure_logging", "quiet_grpc_client_gone"]

#: Libraries whose chatter would drown the runbook's lines; their errors reach
#: us as ours (or, for the exporters, matter only at WARNING and above).
_NOISY = ("asyncio", "grpc", "aiohttp", "opentelemetry")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            # `serve --workers N` interleaves N processes' lines on one stream.
            "pid": record.process,
            "message": record.getMessage(),
        }
        # Handlers run synchronously in the logging call, so the current span
        # is the one the line was logged under.
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            entry["trace_id"] = trace.format_trace_id(context.trace_id)
            entry["span_id"] = trace.format_span_id(context.span_id)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _ClientGone(logging.Filter):
    """Two ERROR lines that only say a caller went away mid-call (its deadline,
    a disconnect); the call itself is already counted as DEADLINE_EXCEEDED or
    CANCELLED, and there is nothing for an operator to do:

    * grpc-python's "ExecuteBatchError raised in core by servicer method", when
      a reply or status is sent after the caller cancelled;
    * asyncpg's "unexpected connection_lost() call", reported through asyncio's
      exception handler when a query cancelled mid-flight loses its connection
      (MagicStack/asyncpg#1211; the pool replaces the connection).

    Dropped from the logs here; everything else from these loggers passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "ExecuteBatchError" not in message and "unexpected connection_lost" not in message


_CLIENT_GONE = _ClientGone()


def quiet_grpc_client_gone() -> None:
    """Install the filter on grpc's core logger and asyncio's (idempotent)."""
    for name in ("grpc._cython.cygrpc", "asyncio"):
        logger = logging.getLogger(name)
        if _CLIENT_GONE not in logger.filters:
            logger.addFilter(_CLIENT_GONE)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    quiet_grpc_client_gone()
    root.setLevel(level.upper())
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
