"""Port timings: the ``PortObserver`` of each port (``core/guarded.py``).

* ``CacheTimings``: every call of the ``SessionCache`` into ``redis_latency``
  (milliseconds), by operation, failed calls included.
* ``StoreTimings``: every call of the ``SessionStore`` into
  ``postgres_query_duration_seconds``, by operation and outcome (``ok``, or
  ``error`` when the call raised, cancellation included).

The operation is the port method's name. The guard times each call inside
its breaker, so a call cut short by the breaker's timeout is recorded with
the time it took until then, and a call an open breaker refuses is not.

``health`` is not timed as one call: it is several round trips with timings of
their own. The cache's PING, SET and GET round trips of a health probe that
reached Redis go into ``redis_latency`` under the operation ``health``: the
health sampler probes every 5 s, so the histogram always holds current
samples, and HighLatency (p99 over the last 2 minutes) describes the Redis of
now, not the timeouts of an outage that is over, even on a replica with no
traffic. A probe that failed adds nothing (RedisDown reports it). The store's
health stays out of ``postgres_query_duration_seconds``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Histogram

__all__ = ["CacheTimings", "StoreTimings"]


class CacheTimings:
    def __init__(self, latency_ms: Histogram) -> None:
        self._latency = latency_ms

    def operation(self, name: str) -> Callable[[float, bool], None]:
        # The labelled child looked up once: a ``labels()`` lookup takes a lock.
        observe = self._latency.labels(name).observe
        return lambda seconds, ok: observe(seconds * 1000)


class StoreTimings:
    def __init__(self, duration_seconds: Histogram) -> None:
        self._duration = duration_seconds

    def operation(self, name: str) -> Callable[[float, bool], None]:
        # Each outcome's child looked up on first use (its series appears when
        # first observed), then kept.
        children: dict[bool, Callable[[float], None]] = {}

        def observe(seconds: float, ok: bool) -> None:
            child = children.get(ok)
            if child is None:
                child = children[ok] = self._duration.labels(name, "ok" if ok else "error").observe
            child(seconds)

        return observe
