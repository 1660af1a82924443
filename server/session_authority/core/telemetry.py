"""The small telemetry surface the core reports to.

The core traces with the OpenTelemetry *API* (a no-op until an SDK provider is
installed at the edge) and reports outcomes through ``CoreMetrics``, which the
observability package implements. Timing of Redis and Postgres calls and
breaker transitions are observed at the edges (port wrappers and breaker
listeners wired by the composition root), not here. Nothing here ever
receives a token: at most a hash prefix.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

from opentelemetry import trace

__all__ = [
    "ATTR_CACHE_RESULT",
    "ATTR_TOKEN_PREFIX",
    "TOUCH_ANSWERS",
    "TOUCH_WRITES",
    "CoreMetrics",
    "NoMetrics",
    "recording",
    "set_tracing",
    "span",
    "tracer",
]

tracer = trace.get_tracer("session_authority.core")

_NOT_RECORDING: AbstractContextManager[trace.Span] = nullcontext(trace.INVALID_SPAN)


#: Whether an SDK tracer provider may be installed (``set_tracing``). Until the
#: composition root says there is none, spans are looked for.
_tracing = True


def set_tracing(enabled: bool) -> None:
    """Told by the composition root: with no tracer provider, ``recording`` is
    False without asking the API (five Python calls on every cache hit)."""
    global _tracing
    _tracing = enabled


def recording() -> bool:
    """Whether the current span records: a child span would then record too."""
    return _tracing and trace.get_current_span().is_recording()


def span(name: str) -> AbstractContextManager[trace.Span]:
    """A child span of the current one, only if that one is recording: with no
    SDK installed, or a caller's trace not sampled, the hot path creates none
    (its children would record nothing anyway under a parent-based sampler)."""
    if recording():
        return tracer.start_as_current_span(name)
    return _NOT_RECORDING


#: Span attribute on the cache lookup: hit, miss, tombstone, negative, bypassed, error.
ATTR_CACHE_RESULT = "session_authority.cache.result"
#: First 8 hex digits of the token hash; never the token.
ATTR_TOKEN_PREFIX = "session_authority.token_hash_prefix"


#: Where a touch's answer came from (``CoreMetrics.touched``): ``cache`` (no
#: write due), ``behind`` (the cache, a write started or already running behind
#: it), ``store`` (after a store statement: its own or one it joined).
TOUCH_ANSWERS = ("cache", "behind", "store")
#: What one touch statement did (``CoreMetrics.touch_write``): ``written``,
#: ``coalesced`` (wrote nothing: written within the interval, or the row
#: locked), ``refused`` (not found, not live), ``failed`` (the store's error).
TOUCH_WRITES = ("written", "coalesced", "refused", "failed")


class CoreMetrics(Protocol):
    def cache_lookup(self, result: str) -> None:
        """One cache lookup with its result (see ``ATTR_CACHE_RESULT``)."""

    def cache_error(self, operation: str) -> None:
        """A cache operation failed (Redis error or timeout; not a refusal by
        an open breaker)."""

    def local_hit(self, valid: bool, reason: str) -> None:
        """An answer from this process's L1 copy: ``cache_lookup("local")`` and
        ``validated(valid, "cache", reason)``, in one call (the hot path's)."""

    def validated(self, valid: bool, source: str, reason: str) -> None:
        """One ValidateSession answer: ``source`` is cache, database or
        token_format; ``reason`` none, unknown, expired or revoked. Called in
        the caller's context (outside the core's own spans)."""

    def revoked(self, count: int, cache_purged: bool) -> None:
        """Sessions revoked by one Invalidate/InvalidateUser."""

    def touched(self, answer: str) -> None:
        """One TouchSession that passed its input checks, by where its answer
        came from (one of ``TOUCH_ANSWERS``; ``store`` whatever the statement
        answered, errors included)."""

    def touch_write(self, outcome: str) -> None:
        """One store statement run by a touch, written behind an answer or
        waited for (one of ``TOUCH_WRITES``); callers joining it add none."""


class NoMetrics:
    def cache_lookup(self, result: str) -> None:
        pass

    def cache_error(self, operation: str) -> None:
        pass

    def local_hit(self, valid: bool, reason: str) -> None:
        pass

    def validated(self, valid: bool, source: str, reason: str) -> None:
        pass

    def revoked(self, count: int, cache_purged: bool) -> None:
        pass

    def touched(self, answer: str) -> None:
        pass

    def touch_write(self, outcome: str) -> None:
        pass
