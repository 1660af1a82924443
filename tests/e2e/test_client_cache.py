"""The Python client's revocation-safe local cache (``local_cache=``) against a real ``serve``
(the ``client_server`` of test_client.py): answers in process from copies of VALID answers,
an Invalidate made through another client drops the copy once its event arrived, a cut
stream answers nothing (every validate to the server), and the feed resumes from its cursor;
a stream black-holed by the network (no RST, no FIN) stops the answers once its heartbeats
fall silent, long before the TTL, and they resume when it speaks again, or, when it stays
silent, on a new stream on a new connection while the old one is still black-holed.
Copies live 60 s here, so that only the stream (never the TTL) can explain a dropped copy.
Order and counts, never timing: each wait is a bounded loop on a counter."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from session_authority.client import DeadlineExceeded, LocalCache, LocalCacheStats, Reason

from .client_support import FreezableProxy, Serving

pytestmark = pytest.mark.e2e

LONG = LocalCache(ttl=60.0)


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _stats(stats: LocalCacheStats | None) -> LocalCacheStats:
    assert stats is not None
    return stats


def test_copies_answer_until_the_revocation_event_and_never_while_cut(
    client_server: Serving,
) -> None:
    user = f"quinn-{time.monotonic_ns()}"
    with client_server.client(local_cache=LONG) as cached, client_server.client() as other:

        def stats() -> LocalCacheStats:
            return _stats(cached.local_cache_stats)

        feed = cached._feed  # the test hook: cut() ends the stream, as a broken connection
        assert feed is not None
        _until(lambda: stats().answering, "the first heartbeat after START")
        a, b, c = (other.create(user, ttl=600).token for _ in range(3))

        first = cached.validate(a)
        assert first.valid and not first.from_client_cache  # the server's answer, copied
        again = cached.validate(a)
        assert again.valid and again.from_client_cache and again.session == first.session
        assert (stats().hits, stats().misses, stats().entries) == (1, 1, 1)

        seen = stats().events
        assert other.invalidate(token=a).revoked  # through another client
        _until(lambda: stats().events > seen, "the REVOKED event")
        after = [cached.validate(a) for _ in range(3)]
        assert [(v.valid, v.reason, v.from_client_cache) for v in after] == [
            (False, Reason.REVOKED, False)
        ] * 3  # 0 valid answers once the event arrived; invalid answers are never copied
        assert stats().entries == 0

        assert cached.validate(b).valid and cached.validate(b).from_client_cache
        hits, cursor = stats().hits, stats().cursor
        feed.cut(hold=True)
        assert not stats().live and stats().entries == 0
        assert other.invalidate(token=c).revoked  # while the stream is cut
        while_cut = [cached.validate(b) for _ in range(3)]
        assert all(v.valid and not v.from_client_cache for v in while_cut)
        assert stats().hits == hits and stats().entries == 0  # nothing answered, nothing kept

        feed.release()
        _until(lambda: stats().live and stats().events > seen + 1, "resumed after the cut")
        # Resumed from its cursor (not from now): the revocation made while cut was delivered.
        assert stats().starts == 2 and stats().cursor > cursor
        assert cached.validate(c).reason == Reason.REVOKED

        # A session about to expire (by this clock, within the margin) is never answered locally.
        short = other.create(user, ttl=2).token
        margin = LocalCache(ttl=60.0, expiry_margin=5.0)
        with client_server.client(local_cache=margin) as careful:
            _until(lambda: _stats(careful.local_cache_stats).live, "START")
            answers = [careful.validate(short) for _ in range(3)]
            assert all(v.valid and not v.from_client_cache for v in answers)
            assert _stats(careful.local_cache_stats).hits == 0


def test_the_async_client_s_cache(client_server: Serving) -> None:
    user = f"rosa-{time.monotonic_ns()}"

    async def until(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 20
        while not condition():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        async with (
            client_server.async_client(local_cache=LONG) as cached,
            client_server.async_client() as other,
        ):

            def stats() -> LocalCacheStats:
                return _stats(cached.local_cache_stats)

            feed = cached._feed
            assert feed is not None
            await until(lambda: stats().answering, "the first heartbeat after START")
            a, b = [(await other.create(user, ttl=600)).token for _ in range(2)]
            assert not (await cached.validate(a)).from_client_cache
            assert (await cached.validate(a)).from_client_cache
            seen = stats().events
            assert (await other.invalidate(token=a)).revoked
            await until(lambda: stats().events > seen, "the REVOKED event")
            assert (await cached.validate(a)).reason == Reason.REVOKED

            assert (await cached.validate(b)).valid and (await cached.validate(b)).from_client_cache
            hits = stats().hits
            feed.cut(hold=True)
            assert not stats().live
            answers = [await cached.validate(b) for _ in range(3)]
            assert all(v.valid and not v.from_client_cache for v in answers)
            assert stats().hits == hits
            feed.release()
            await until(lambda: stats().live, "reconnected")
            assert stats().starts == 2

    asyncio.run(scenario())


def test_a_black_holed_stream_stops_the_answers_before_the_ttl_and_they_resume(
    client_server: Serving,
) -> None:
    """The cached client reaches the server through a proxy that black-holes the connection
    (bytes kept, delivered late on release). Its copies stop answering once the heartbeats'
    covered point is older than ``max_silence`` (0.75 s: 3 x the server's 250 ms), not after
    the 60 s TTL nor gRPC's keepalive (40 s); a revocation made meanwhile is applied before
    the copies answer again, on the same stream (``reopen_after`` long: never reopened here)."""
    user = f"sage-{time.monotonic_ns()}"
    proxy = FreezableProxy(client_server.port)
    patient = LocalCache(ttl=60.0, reopen_after=60.0)
    try:
        with (
            client_server.client(target=f"127.0.0.1:{proxy.port}", local_cache=patient) as cached,
            client_server.client() as other,
        ):

            def stats() -> LocalCacheStats:
                return _stats(cached.local_cache_stats)

            _until(lambda: stats().answering, "the first heartbeat")
            assert stats().heartbeat_interval == 0.25
            b, c = (other.create(user, ttl=600).token for _ in range(2))
            for token in (b, c):
                assert not cached.validate(token).from_client_cache
                assert cached.validate(token).from_client_cache
            seen, hits = stats().events, stats().hits

            proxy.hold()
            _until(lambda: not stats().answering, "the silence noticed")
            # Nothing ended the stream and no copy ran out: only the silence explains it.
            assert stats().live and stats().starts == 1 and stats().entries == 2
            assert other.invalidate(token=c).revoked  # while black-holed
            with pytest.raises(DeadlineExceeded):  # sent to the server (held), not answered here
                cached.validate(b, timeout=0.5)
            assert stats().hits == hits

            proxy.release()
            _until(lambda: stats().answering and stats().events > seen, "the stream speaks again")
            assert stats().starts == 1  # the same stream, late heartbeats and all
            assert cached.validate(c).reason == Reason.REVOKED
            again = cached.validate(b)
            assert again.valid and again.from_client_cache
    finally:
        proxy.close()


def test_a_silent_stream_is_reopened_on_a_new_connection_while_the_old_is_black_holed(
    client_server: Serving,
) -> None:
    """Only the cache's stream's connection is black-holed (it has a channel of its own; the
    validations' connection stays healthy). The copies stop answering once the heartbeats are
    late (``max_silence``); once the stream has been silent for ``reopen_after`` (2 s by
    default) the feed cancels it and opens a new one from its cursor on a new connection, not
    waiting for gRPC's keepalive (40 s): the revocation made meanwhile arrives on the new
    stream before its first heartbeat, so before any copy answers again."""
    user = f"uma-{time.monotonic_ns()}"
    proxy = FreezableProxy(client_server.port)
    try:
        with (
            client_server.client(target=f"127.0.0.1:{proxy.port}", local_cache=LONG) as cached,
            client_server.client() as other,
        ):

            def stats() -> LocalCacheStats:
                return _stats(cached.local_cache_stats)

            _until(lambda: stats().answering, "the first heartbeat")
            assert proxy.accepted == 1  # the stream's own channel; no validation sent yet
            b, c = (other.create(user, ttl=600).token for _ in range(2))
            for token in (b, c):
                assert not cached.validate(token).from_client_cache
                assert cached.validate(token).from_client_cache
            assert proxy.accepted == 2  # the validations' connection
            seen, hits, beats = stats().events, stats().hits, stats().heartbeats

            proxy.hold(connections=[0])  # the stream's connection: black-holed, no RST
            _until(lambda: not stats().answering, "the silence noticed")
            assert other.invalidate(token=c).revoked  # while black-holed
            served = cached.validate(b)  # to the server, over the healthy connection
            assert served.valid and not served.from_client_cache

            def answering_again() -> bool:
                now = stats()
                if now.answering:  # at the first moment seen: the event was applied before
                    assert now.events > seen and now.hits == hits, now
                return now.answering

            _until(answering_again, "a new stream on a new connection, heartbeats again")
            now = stats()
            assert now.silent_reopens >= 1 and now.starts >= 2 and now.heartbeats > beats
            assert proxy.accepted >= 3  # a new connection; the old one is still held
            assert now.restarts_from_now == 0  # resumed from the cursor
            revoked = cached.validate(c)
            assert revoked.reason == Reason.REVOKED and not revoked.from_client_cache
            cached.validate(b)  # copied (again) after the new stream's START
            again = cached.validate(b)
            assert again.valid and again.from_client_cache
    finally:
        proxy.close()


def test_the_async_client_reopens_a_silent_stream_on_a_new_connection(
    client_server: Serving,
) -> None:
    user = f"vera-{time.monotonic_ns()}"
    proxy = FreezableProxy(client_server.port)

    async def until(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 20
        while not condition():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        async with (
            client_server.async_client(
                target=f"127.0.0.1:{proxy.port}", local_cache=LONG
            ) as cached,
            client_server.async_client() as other,
        ):

            def stats() -> LocalCacheStats:
                return _stats(cached.local_cache_stats)

            await until(lambda: stats().answering, "the first heartbeat")
            assert proxy.accepted == 1
            token = (await other.create(user, ttl=600)).token
            seen = stats().events
            proxy.hold(connections=[0])
            await until(lambda: not stats().answering, "the silence noticed")
            assert (await other.invalidate(token=token)).revoked

            def answering_again() -> bool:
                now = stats()
                if now.answering:
                    assert now.events > seen, now
                return now.answering

            await until(answering_again, "a new stream on a new connection")
            assert stats().silent_reopens >= 1 and stats().starts >= 2
            assert proxy.accepted >= 2
            assert (await cached.validate(token)).reason == Reason.REVOKED

    try:
        asyncio.run(scenario())
    finally:
        proxy.close()


def test_the_stream_is_reopened_after_stream_max_age(client_server: Serving) -> None:
    """Heartbeats' offsets are anchored to when the call was sent; the clock-rate allowance
    grows with the stream's age, so the feed reopens it (from its cursor) once it is older
    than ``stream_max_age``, and answers again after the new stream's first heartbeat."""
    user = f"tove-{time.monotonic_ns()}"
    short = LocalCache(ttl=60.0, stream_max_age=0.5)
    with client_server.client(local_cache=short) as cached, client_server.client() as other:
        _until(lambda: _stats(cached.local_cache_stats).starts >= 3, "reopened twice")
        token = other.create(user, ttl=600).token
        _until(lambda: _stats(cached.local_cache_stats).answering, "a heartbeat")
        assert cached.validate(token).valid
        seen = _stats(cached.local_cache_stats).events
        assert other.invalidate(token=token).revoked
        _until(
            lambda: _stats(cached.local_cache_stats).events > seen, "the event, across reopenings"
        )
        assert cached.validate(token).reason == Reason.REVOKED
        assert _stats(cached.local_cache_stats).restarts_from_now == 0  # resumed, not from now


def test_closing_a_client_whose_stream_waits_for_its_start_ends_the_feed(
    client_server: Serving,
) -> None:
    """The server is black-holed before the cache's stream has its START: ``close`` cancels
    that opening (by closing the stream's channel first) and the feed's thread has ended when
    ``close`` returns, instead of outliving it by its 5 s join while the call waits for START
    (``watch_start``: 10 s). No channel is opened after ``close``."""
    proxy = FreezableProxy(client_server.port)
    try:
        proxy.hold()  # every connection, the ones to come included: no START will arrive
        cached = client_server.client(target=f"127.0.0.1:{proxy.port}", local_cache=True)
        feed = cached._feed
        assert feed is not None
        _until(
            lambda: _stats(cached.local_cache_stats).starts == 0 and feed._thread.is_alive(),
            "the feed",
        )
        time.sleep(0.3)  # the thread is inside its opening, waiting for START
        thread, alive_after_join = feed._thread, []
        join = thread.join

        def recorded_join(timeout: float | None = None) -> None:
            join(timeout)
            alive_after_join.append(thread.is_alive())

        thread.join = recorded_join  # type: ignore[method-assign]
        cached.close()
        assert alive_after_join == [False]  # ended within close's join, not left behind by it
        assert cached._watch_channel is None
        assert _stats(cached.local_cache_stats).starts == 0
    finally:
        proxy.close()
