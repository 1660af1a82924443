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
import os
import sys
import threading
from datetime import UTC, datetime

from opentelemetry import trace

__all__ = ["JsonFormatter", "NativeStderr", "configure_logging", "quiet_grpc_client_gone"]

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


#: gRPC core's (absl's) severity letters, first character of its lines.
_NATIVE_LEVELS = {"I": "INFO", "W": "WARNING", "E": "ERROR", "F": "CRITICAL"}
#: What gRPC core writes when a TLS handshake fails (absl, at INFO or above).
_HANDSHAKE_FAILED = b"Handshake failed"


class NativeStderr:
    """Every line written to this process's stderr as one JSON object.

    gRPC core (C++, absl logging) writes its own lines to file descriptor 2,
    not through Python's logging: handshake failures
    (``PEER_DID_NOT_RETURN_A_CERTIFICATE``), for instance. ``start`` points
    descriptor 2 at a pipe and moves Python's log handlers to a duplicate of
    the original stderr; a thread reads the pipe and writes each line there,
    as it is when it already is a JSON object, else wrapped as one (logger
    ``grpc.core``; level from absl's severity letter; anything else written
    there, a traceback's lines included, as ERROR). It also counts the
    handshake failures gRPC reports, which no Python API exposes: with
    ``GRPC_VERBOSITY`` set to hide them (``NONE``), they are not counted."""

    def __init__(self) -> None:
        self.handshake_failures = 0
        self._out: int | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Idempotent; call before gRPC starts serving."""
        if self._out is not None:
            return
        sys.stderr.flush()
        self._out = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        out = os.fdopen(os.dup(self._out), "w", buffering=1, encoding="utf-8")
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in (
                sys.stderr,
                sys.__stderr__,
            ):
                handler.setStream(out)
        self._thread = threading.Thread(
            target=self._pump, args=(read, self._out), name="native-stderr", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Give descriptor 2 back and forward what is still in the pipe."""
        if self._out is None or self._thread is None:
            return
        sys.stderr.flush()
        os.dup2(self._out, 2)  # the pipe's last writer closed: the thread sees EOF
        self._thread.join(timeout)

    def _pump(self, read: int, out: int) -> None:
        with os.fdopen(read, "rb") as lines:
            for raw in lines:
                if _HANDSHAKE_FAILED in raw:
                    self.handshake_failures += 1
                os.write(out, _as_json_line(raw))


def _as_json_line(raw: bytes) -> bytes:
    text = raw.rstrip(b"\r\n").decode("utf-8", errors="replace")
    if text.startswith("{"):
        try:
            if isinstance(json.loads(text), dict):
                return text.encode() + b"\n"
        except ValueError:
            pass
    entry = {
        "time": datetime.now(tz=UTC).isoformat(timespec="milliseconds"),
        "level": _NATIVE_LEVELS.get(text[:1], "ERROR") if text[1:5].isdigit() else "ERROR",
        "logger": "grpc.core",
        "pid": os.getpid(),
        "message": text,
    }
    return json.dumps(entry, ensure_ascii=False).encode() + b"\n"
