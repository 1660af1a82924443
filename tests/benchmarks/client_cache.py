"""The Python client's local cache in the benchmark (``bench.py``): how many validations a
second it answers in process on one thread (``client_cached_validate_per_s``), and how long
after an Invalidate is sent its copy stops answering (``client_cache_revocation_*``).

Blocking code (the sync client, as most callers use it): ``bench.py`` runs it in a thread.
It asserts no timing; a wrong answer (a copy still answering VALID once the server said
REVOKED, a copy that never formed) is returned as a problem."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from session_authority.client import LocalCache, LocalCacheStats, Reason, SessionAuthorityClient
from tests.benchmarks.harness import NO_PROXY

__all__ = ["CacheRevocations", "cached_client", "cached_rate", "revocation_times"]

#: Calls between two looks at the clock in the throughput loop.
_BLOCK = 1000
#: How often the revocation loop asks again (it sleeps in between, leaving the GIL to the
#: cache's feed thread, as a caller doing other work would).
_POLL = 0.0002


def cached_client(target: str) -> SessionAuthorityClient:
    """A client with the local cache as shipped (``LocalCache()``), its stream answering."""
    client = SessionAuthorityClient(target, channel_options=NO_PROXY, local_cache=LocalCache())
    _until(lambda: _stats(client).answering, 30, "the local cache never started answering")
    return client


def cached_rate(client: SessionAuthorityClient, token: str, seconds: float) -> tuple[float, float]:
    """Validations of ``token`` a second from one thread, and the share answered in process."""
    validate = client.validate
    validate(token)  # the copy
    before = _stats(client)
    calls, started = 0, time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(_BLOCK):
            validate(token)
        calls += _BLOCK
        now = time.perf_counter()
        if now >= deadline:
            break
    after = _stats(client)
    return calls / (now - started), (after.hits - before.hits) / calls


@dataclass
class CacheRevocations:
    """Milliseconds from each Invalidate sent until the copy stopped answering."""

    times: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def revocation_times(
    cached: SessionAuthorityClient, other: SessionAuthorityClient, samples: int
) -> CacheRevocations:
    """For each sample: a session created and copied by ``cached``; Invalidate sent through
    ``other`` (another replica); then ``cached`` asked again until its answer is not a copy.
    The time is when the first such question was asked (before its round trip)."""
    out = CacheRevocations()
    for i in range(samples):
        token = other.create(f"client-cache-{i}", ttl=600).token
        cached.validate(token)
        copied = cached.validate(token)
        if not copied.from_client_cache:
            _until(lambda: _stats(cached).answering, 10, "the cache stopped answering")
            cached.validate(token)
            copied = cached.validate(token)
        if not (copied.valid and copied.from_client_cache):
            out.problems.append(f"client cache: no copy formed ({_stats(cached)})")
            continue
        started = time.perf_counter()
        other.invalidate(token=token)
        while True:
            asked = time.perf_counter()
            answer = cached.validate(token)
            if not answer.from_client_cache:
                break
            time.sleep(_POLL)
        if answer.valid or answer.reason != Reason.REVOKED:
            out.problems.append(f"client cache: after Invalidate the server said {answer}")
        out.times.append((asked - started) * 1000)
    return out


def _stats(client: SessionAuthorityClient) -> LocalCacheStats:
    stats = client.local_cache_stats
    assert stats is not None
    return stats


def _until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(what)
        time.sleep(0.01)
