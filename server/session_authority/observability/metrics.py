"""Prometheus instruments counted as things happen; ``PrometheusMetrics``, the
core's ``CoreMetrics`` port on top of them; ``breaker_listener``, the one
listener each breaker gets (a counted transition and a span event).

Values that are read rather than counted (the runbook's cache counters, pool
and breaker gauges) come from ``collector.StateCollector`` at scrape time.
Every instrument lives in the registry handed in (one per ``App``), never in
prometheus_client's global one, so two servers in one process do not collide.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from session_authority.core.breaker import BreakerState
from session_authority.core.telemetry import TOUCH_ANSWERS, TOUCH_WRITES
from session_authority.observability.tracing import (
    ATTR_VALID,
    ATTR_VALIDATION_REASON,
    ATTR_VALIDATION_SOURCE,
    add_event,
    breaker_event,
)

__all__ = [
    "CACHE_OPERATIONS",
    "CACHE_RESULTS",
    "EVENT_CACHE_ERROR",
    "EVENT_CACHE_FALLBACK",
    "Cell",
    "HistogramCell",
    "Instruments",
    "LoopCounter",
    "LoopHistogram",
    "PrometheusMetrics",
    "breaker_listener",
]

#: Every value of ``session_authority.cache.result`` (plus ``malformed``: the
#: token's shape ruled it out before any lookup).
CACHE_RESULTS = (
    "local",
    "hit",
    "miss",
    "tombstone",
    "negative",
    "bypassed",
    "error",
    "disabled",
    "malformed",
)
#: What the core names its failed cache operations (``CoreMetrics.cache_error``).
CACHE_OPERATIONS = ("get", "fill", "mark_created", "tombstone", "adopt", "verify")
#: Lookups that fell back to Postgres because the cache could not be asked.
_FALLBACKS = frozenset({"bypassed", "error"})
EVENT_CACHE_FALLBACK = "session_cache.fallback"
EVENT_CACHE_ERROR = "session_cache.error"

#: Milliseconds, as the runbook's thresholds (p99 < 5 ms for hits, alert > 10 ms).
REDIS_LATENCY_MS_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 25, 50, 100, 250, 500, 1000, 2500)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BREAKER_STEPS = (
    ("closed", "open"),
    ("open", "half_open"),
    ("half_open", "closed"),
    ("half_open", "open"),
)

#: The cell type of a ``_LoopFamily``.
C = TypeVar("C")


class Cell:
    """One labelled series of a ``LoopCounter``."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _LoopFamily(Generic[C]):
    """A labelled family of hot-path cells (``LoopCounter``, ``LoopHistogram``):
    one cell per label values, made on first use; registered as a collector."""

    def __init__(
        self, name: str, documentation: str, labelnames: list[str], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = labelnames
        self._cells: dict[tuple[str, ...], C] = {}
        registry.register(self)

    def labels(self, *values: str) -> C:
        cell = self._cells.get(values)
        if cell is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name}: expected labels {self._labelnames}")
            cell = self._cells[values] = self._new_cell()
        return cell

    def _new_cell(self) -> C:
        raise NotImplementedError

    def collect(self) -> Iterator[Metric]:
        raise NotImplementedError


class LoopCounter(_LoopFamily[Cell]):
    """A labelled counter for the hot path, exposed exactly like a prometheus
    ``Counter`` (``<name>_total``, same help and labels) but counted in plain
    floats: no lock and no method chain per increment. prometheus_client's
    ``inc`` takes a lock each time (about 2 us a call, twice per validation,
    and a multiple of that inside a loaded gRPC server). Only the event loop's
    thread increments it; a scrape reads the values as they are."""

    def _new_cell(self) -> Cell:
        return Cell()

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, cell in list(self._cells.items()):
            family.add_metric(list(values), cell.value)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)


class HistogramCell:
    """One labelled series of a ``LoopHistogram``: a count per bucket and a sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Bucket ``le`` counts values <= le: the first bound not below the value.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class LoopHistogram(_LoopFamily[HistogramCell]):
    """A labelled histogram for the hot path, exposed exactly like a prometheus
    ``Histogram`` (``_bucket{le}``, ``_count``, ``_sum``) but observed without a
    lock, for the reason ``LoopCounter`` gives (the RPC duration is observed on
    every call). Only the event loop's thread observes it."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: list[str],
        registry: CollectorRegistry,
        buckets: tuple[float, ...],
    ) -> None:
        if list(buckets) != sorted(set(buckets)):
            raise ValueError(f"{name}: buckets must be increasing")
        self._bounds = tuple(float(b) for b in buckets)
        super().__init__(name, documentation, labelnames, registry)

    def _new_cell(self) -> HistogramCell:
        return HistogramCell(self._bounds)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, cell in list(self._cells.items()):
            counts, total, buckets = list(cell.counts), 0, []
            for bound, count in zip((*self._bounds, math.inf), counts, strict=True):
                total += count
                buckets.append((floatToGoString(bound), float(total)))  # type: ignore[no-untyped-call]
            family.add_metric(list(values), buckets, cell.sum)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)


class Instruments:
    """The counters and histograms of one server."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.cache_lookups = LoopCounter(
            "session_cache_lookups",
            "Cache lookups by result (local: the in-process L1 cache; hit, miss, tombstone, "
            "negative, bypassed, error, "
            "disabled, malformed).",
            ["result"],
            registry,
        )
        self.cache_operation_errors = Counter(
            "session_cache_operation_errors",
            "Failed cache operations (Redis error, timeout, open breaker) by operation.",
            ["operation"],
            registry=registry,
        )
        self.redis_latency = Histogram(
            "redis_latency",
            "Latency of session-cache calls to Redis, in milliseconds, by operation.",
            ["operation"],
            buckets=REDIS_LATENCY_MS_BUCKETS,
            registry=registry,
        )
        self.store_query = Histogram(
            "postgres_query_duration_seconds",
            "Latency of session-store (Postgres) calls by operation and outcome (ok, error).",
            ["operation", "outcome"],
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.revocations = Counter(
            "session_revocations",
            "Sessions revoked by Invalidate/InvalidateUser, by whether the cache purge "
            "was confirmed.",
            ["cache_purged"],
            registry=registry,
        )
        self.touches = LoopCounter(
            "session_touches",
            "TouchSession answers by where they came from (cache: no write due; behind: the "
            "cache, with a write behind it; store: after a store statement).",
            ["answer"],
            registry,
        )
        self.touch_writes = LoopCounter(
            "session_touch_writes",
            "Store statements run by touches, behind an answer or waited for, by outcome "
            "(written, coalesced, refused: not found or not live, failed: store error).",
            ["outcome"],
            registry,
        )
        self.breaker_transitions = Counter(
            "circuit_breaker_transitions",
            "Circuit breaker state changes.",
            ["breaker", "from_state", "to_state"],
            registry=registry,
        )
        self.rpc_handled = LoopCounter(
            "grpc_server_handled",
            "RPCs completed on the server, by service, method and status code.",
            ["grpc_service", "grpc_method", "grpc_code"],
            registry,
        )
        self.rpc_duration = LoopHistogram(
            "grpc_server_handling_seconds",
            "RPC handling time on the server, by service and method.",
            ["grpc_service", "grpc_method"],
            registry,
            buckets=SECONDS_BUCKETS,
        )
        self.validations = LoopCounter(
            "session_validations",
            "ValidateSession answers by validity, source (cache, database, token_format) "
            "and reason (none, unknown, expired, revoked).",
            ["valid", "source", "reason"],
            registry,
        )
        self.auth_denied = Counter(
            "session_authority_auth_denied",
            "Calls refused by authorisation, by service, method and reason (no_credentials, "
            "invalid_credentials: UNAUTHENTICATED; not_allowed, unclassified: PERMISSION_DENIED).",
            ["grpc_service", "grpc_method", "reason"],
            registry=registry,
        )
        self.rpc_shed = Counter(
            "session_authority_rpc_shed",
            "Calls ended by the admission gate before their request was read, by reason "
            "(authenticated_full, public_full, peer_full, streams_full: RESOURCE_EXHAUSTED; idle: "
            "UNAVAILABLE, no request message within REQUEST_IDLE_TIMEOUT_MS).",
            ["reason"],
            registry=registry,
        )
        self.tls_reload_rejected = Counter(
            "session_authority_tls_reload_rejected",
            "Rotated TLS files refused (mismatched key, unreadable, certificate not valid "
            "now); the previous certificate stays in use.",
            registry=registry,
        )
        for reason in ("authenticated_full", "public_full", "peer_full", "streams_full", "idle"):
            self.rpc_shed.labels(reason)
        # Series that exist from the start read 0 rather than being absent,
        # so rate() and alerts see the first increment.
        for result in CACHE_RESULTS:
            self.cache_lookups.labels(result)
        for operation in CACHE_OPERATIONS:
            self.cache_operation_errors.labels(operation)
        for purged in ("true", "false"):
            self.revocations.labels(purged)
        for answer in TOUCH_ANSWERS:
            self.touches.labels(answer)
        for outcome in TOUCH_WRITES:
            self.touch_writes.labels(outcome)
        for name in ("redis", "postgres"):
            for old, new in _BREAKER_STEPS:
                self.breaker_transitions.labels(name, old, new)


class PrometheusMetrics:
    """``CoreMetrics`` (see core/telemetry.py): counts, plus span events for
    fallbacks and cache errors and the validation's answer as attributes, on
    the span current at the time.

    Every validation passes here twice, so the hot methods keep each labelled
    child they have used (a ``labels()`` lookup takes a lock and builds a
    tuple), and with ``traced=False`` (no tracer provider: no span records)
    they do not look for a current span at all."""

    def __init__(self, instruments: Instruments, *, traced: bool = True) -> None:
        self._i = instruments
        self._traced = traced
        self._lookups: dict[str, Cell] = {}
        self._validations: dict[tuple[bool, str, str], Cell] = {}
        # Fixed label sets: every cell made now, so a touch costs one subscript.
        self._touches = {a: instruments.touches.labels(a) for a in TOUCH_ANSWERS}
        self._touch_writes = {o: instruments.touch_writes.labels(o) for o in TOUCH_WRITES}

    def cache_lookup(self, result: str) -> None:
        child = self._lookups.get(result) or self._lookup_cell(result)
        child.value += 1  # Cell.inc without the call: this runs on every validation
        if self._traced and result in _FALLBACKS:
            add_event(EVENT_CACHE_FALLBACK, {"session_authority.cache.result": result})

    def cache_error(self, operation: str) -> None:
        self._i.cache_operation_errors.labels(operation).inc()
        add_event(EVENT_CACHE_ERROR, {"session_authority.cache.operation": operation})

    def local_hit(self, valid: bool, reason: str) -> None:
        """``cache_lookup("local")`` and ``validated(valid, "cache", reason)`` in one call."""
        local = self._lookups.get("local") or self._lookup_cell("local")
        local.value += 1
        key = (valid, "cache", reason)
        child = self._validations.get(key) or self._validation_cell(key)
        child.value += 1
        if self._traced:
            self._answer_attributes(valid, "cache", reason)

    def validated(self, valid: bool, source: str, reason: str) -> None:
        key = (valid, source, reason)
        child = self._validations.get(key) or self._validation_cell(key)
        child.value += 1
        if self._traced:
            self._answer_attributes(valid, source, reason)

    def _lookup_cell(self, result: str) -> Cell:
        cell = self._lookups[result] = self._i.cache_lookups.labels(result)
        return cell

    def _validation_cell(self, key: tuple[bool, str, str]) -> Cell:
        valid, source, reason = key
        labels = ("true" if valid else "false", source, reason)
        cell = self._validations[key] = self._i.validations.labels(*labels)
        return cell

    @staticmethod
    def _answer_attributes(valid: bool, source: str, reason: str) -> None:
        # The core reports outside its own child spans: this is the RPC's span
        # (none current when the call was not sampled: then nothing is built).
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(
                {ATTR_VALID: valid, ATTR_VALIDATION_SOURCE: source, ATTR_VALIDATION_REASON: reason}
            )

    def revoked(self, count: int, cache_purged: bool) -> None:
        self._i.revocations.labels("true" if cache_purged else "false").inc(count)

    def touched(self, answer: str) -> None:
        self._touches[answer].value += 1

    def touch_write(self, outcome: str) -> None:
        self._touch_writes[outcome].value += 1


def breaker_listener(
    instruments: Instruments, breaker: str
) -> Callable[[BreakerState, BreakerState, str], None]:
    """The listener for the breaker named ``breaker``: counts each transition
    in ``circuit_breaker_transitions`` and records it as an event on the span
    that caused it (``tracing.breaker_event``)."""
    transitions = instruments.breaker_transitions

    def on_transition(old: BreakerState, new: BreakerState, cause: str) -> None:
        transitions.labels(breaker, old.value, new.value).inc()
        breaker_event(old, new, cause, breaker=breaker)

    return on_transition
