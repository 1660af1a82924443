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

__all__ = ["JsonFormatter", "configure_logging"]

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
    root.setLevel(level.upper())
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
