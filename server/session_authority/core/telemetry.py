"""The small telemetry surface the core reports to.

The core traces with the OpenTelemetry *API* (a no-op until an SDK provider is
installed at the edge) and counts through ``CoreMetrics``, which the metrics
adapter implements. Neither ever receives a token: at most a hash prefix.
"""

from __future__ import annotations

from typing import Protocol

from opentelemetry import trace

__all__ = ["ATTR_CACHE_RESULT", "ATTR_TOKEN_PREFIX", "CoreMetrics", "NoMetrics", "tracer"]

tracer = trace.get_tracer("session_authority.core")

#: Span attribute on the cache lookup: hit, miss, tombstone, negative, bypassed, error.
ATTR_CACHE_RESULT = "session_authority.cache.result"
#: First 8 hex digits of the token hash; never the token.
ATTR_TOKEN_PREFIX = "session_authority.token_hash_prefix"


class CoreMetrics(Protocol):
    """What the core reports as it works. Implementations count and annotate
    the current span; none raises, none blocks. Store timing and breaker
    transitions are not here: the edge wraps the ports and watches the
    breakers itself."""

    def cache_lookup(self, result: str) -> None:
        """One cache lookup with its result (see ``ATTR_CACHE_RESULT``)."""

    def cache_error(self, operation: str) -> None:
        """A cache operation failed (Redis error, timeout or open breaker)."""

    def validated(self, valid: bool, source: str, reason: str) -> None:
        """One validation's answer. ``source``: cache, database or
        token_format; ``reason``: none (valid), unknown, expired or revoked.
        Called outside the core's own child spans, so that the current span
        is the caller's (the RPC's server span)."""

    def revoked(self, count: int, cache_purged: bool) -> None:
        """Sessions revoked by one Invalidate/InvalidateUser."""

    def store_query(self, operation: str, seconds: float, ok: bool) -> None:
        """Not part of the port."""  # removed when the core stops calling it

    def breaker_transition(self, old: str, new: str, breaker: str = "redis") -> None:
        """Not part of the port."""  # removed when the core stops calling it


class NoMetrics:
    def cache_lookup(self, result: str) -> None:
        pass

    def cache_error(self, operation: str) -> None:
        pass

    def validated(self, valid: bool, source: str, reason: str) -> None:
        pass

    def revoked(self, count: int, cache_purged: bool) -> None:
        pass

    def store_query(self, operation: str, seconds: float, ok: bool) -> None:
        pass  # removed when the core stops calling it

    def breaker_transition(self, old: str, new: str, breaker: str = "redis") -> None:
        pass  # removed when the core stops calling it
