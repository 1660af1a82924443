"""The client's revocation-safe local cache (``local_cache=True``): ``validate`` answered in
process from copies of the server's VALID answers, dropped by the server's revocation stream.

The invariant: **a copy answers only while the stream vouches for it: every revocation
committed up to ``max_silence`` ago has been applied (with a server that sends heartbeats), and
every revocation the stream delivers drops the copies of its session before the next answer.**
Kept by:

* No START, no cache: until the stream's START event arrives, and whenever the stream is not
  connected, reconnecting, or ended with an error, ``get`` answers nothing (every validate goes
  to the server) and every copy is dropped at the moment the stream is known down.
* Heartbeats (asked for; a server that sends them says so in START): each HEARTBEAT says every
  revocation committed before its ``covered`` point was sent before it. The point is an offset
  from when the server began the call; added to when this client *sent* the call (earlier), it
  lands in this client's clock no later than it was, however late the heartbeat arrives (a
  network that held it back, a starved thread). Copies answer only while that point is at most
  ``max_silence`` old: a stream gone silent (server stalled, its reader behind Postgres, the
  network black-holed with no RST) stops the answers within ``max_silence``, without waiting
  for gRPC's keepalive to declare the connection dead. A stream silent (no message at all) for
  ``reopen_after`` (default: ``max(2 x max_silence, 2 s)``) is cancelled and reopened from its
  cursor on a new connection (the client's watch channel is replaced: a new call on the old
  channel would go on the same dead connection), with the reconnect backoff; the new stream
  answers only after its START and first heartbeat, as any. Only with a server that sends
  heartbeats: without them, silence is normal. Offsets are counted short by
  ``CLOCK_RATE_ALLOWANCE`` (the two machines' clocks may run at slightly different rates) and
  the stream is reopened every ``stream_max_age`` seconds, so that allowance stays small.
* A server that sends no heartbeats (an older release, or ``WATCH_HEARTBEAT_MS=0``): copies
  answer from START on, bounded by ``ttl`` alone (as before heartbeats), unless
  ``require_heartbeats``: then they never answer.
* A copy of an answer is kept only if nothing happened between the request being sent and the
  answer arriving: every REVOKED event (and START, down) bumps ``generation``, and a ``put``
  whose request started in an older generation is refused. So an answer the server gave before
  a revocation, arriving after its event, is never kept. Nor is a VALID answer for a session a
  REVOKED event named in the last ``REVOKED_MEMORY`` seconds (a request sent after the event
  but answered by a replica that had not yet heard of it, before Invalidate returned).
* Each copy lives at most ``ttl`` seconds, counted from when its request was SENT (monotonic
  clock), and never once the client's wall clock plus ``expiry_margin`` reaches the session's
  ``expires_at``.
* Only VALID answers are copied (an invalid one is asked again); keys are the token's SHA-256.

The bound: after Invalidate returned, a cached answer may still say VALID for at most
``min(ttl, max_silence)`` with a server that sends heartbeats (``max_silence`` defaults to 3
heartbeat intervals: 0.75 s with the server's default), and ``ttl`` without.

``Copies`` is the pure state (thread-safe, clocks injected); ``SyncFeed`` (a thread) and
``AsyncFeed`` (a task) read the stream into it, reconnecting with backoff and resuming from
the last cursor (FAILED_PRECONDITION, a cursor too old: start again from now).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from session_authority.client._errors import DeadlineExceeded, SessionAuthorityError
from session_authority.client._results import EventKind, RevocationEvent, Validation
from session_authority.client._watch import AsyncRevocationWatch, RevocationWatch

__all__ = [
    "CLOCK_RATE_ALLOWANCE",
    "REVOKED_MEMORY",
    "AsyncFeed",
    "Copies",
    "LocalCache",
    "LocalCacheStats",
    "SyncFeed",
    "token_key",
]

_log = logging.getLogger("session_authority.client")

#: How much faster the server's monotonic clock may run than this one's (200 ppm: two
#: free-running crystals at their worst; NTP-disciplined clocks are far closer).
CLOCK_RATE_ALLOWANCE = 2e-4
#: Seconds a revoked session's id is remembered, its VALID answers never copied.
REVOKED_MEMORY = 60.0


@dataclass(frozen=True)
class LocalCache:
    """The local cache's settings. ``ttl``: seconds a copy may answer (from when its request
    was sent); ``expiry_margin``: seconds before the session's ``expires_at`` (by this
    machine's clock) a copy stops answering; ``max_entries``: copies kept at most (past it,
    new answers are not copied); ``reconnect_backoff``: (first, max) seconds between attempts
    to reopen the stream. ``max_silence``: seconds the newest heartbeat's covered point may be
    old for copies to answer (None: 3 x the interval the server announces); ``require_heartbeats``:
    never answer from a server that sends no heartbeats (default: answer, bounded by ``ttl``);
    ``stream_max_age``: seconds after which the stream is reopened (the clock-rate allowance
    grows with it). ``reopen_after``: seconds a stream with heartbeats may stay silent (no
    message at all) before it is cancelled and reopened on a new connection (None:
    ``max(2 x max_silence, 2 s)``)."""

    ttl: float = 1.0
    expiry_margin: float = 1.0
    max_entries: int = 100_000
    reconnect_backoff: tuple[float, float] = (0.1, 2.0)
    max_silence: float | None = None
    require_heartbeats: bool = False
    stream_max_age: float = 300.0
    reopen_after: float | None = None

    def __post_init__(self) -> None:
        if not self.ttl > 0:
            raise ValueError("LocalCache.ttl must be positive")
        if self.expiry_margin < 0:
            raise ValueError("LocalCache.expiry_margin must not be negative")
        if self.max_entries < 1:
            raise ValueError("LocalCache.max_entries must be at least 1")
        first, most = self.reconnect_backoff
        if not 0 < first <= most:
            raise ValueError("LocalCache.reconnect_backoff must be (first, max), 0 < first <= max")
        if self.max_silence is not None and not self.max_silence > 0:
            raise ValueError("LocalCache.max_silence must be positive (or None)")
        if not self.stream_max_age > 0:
            raise ValueError("LocalCache.stream_max_age must be positive")
        if self.reopen_after is not None and not self.reopen_after > 0:
            raise ValueError("LocalCache.reopen_after must be positive (or None)")


@dataclass(frozen=True)
class LocalCacheStats:
    """Counters of the local cache (``client.local_cache_stats``). ``hits``: validations
    answered in process; ``misses``: validations sent to the server (including every one while
    the stream was down); ``live``: the stream is up (past START); ``events``: REVOKED events
    applied; ``starts``: START events (1 + reconnections); ``restarts_from_now``: resumptions
    refused as too old (everything dropped, started from now); ``cursor``: the last one.
    ``heartbeats``: HEARTBEAT events received; ``heartbeat_interval``: what this stream's server
    announced (None: it sends none); ``answering``: copies may answer now (live and, with
    heartbeats, the newest covered point recent enough); ``covered_age``: seconds since that
    point (None: no heartbeat on this stream yet); ``silent_reopens``: streams cancelled and
    reopened on a new connection because they fell silent for ``reopen_after``."""

    hits: int
    misses: int
    entries: int
    live: bool
    events: int
    starts: int
    restarts_from_now: int
    cursor: str
    heartbeats: int = 0
    heartbeat_interval: float | None = None
    answering: bool = False
    covered_age: float | None = None
    silent_reopens: int = 0


_sha256 = hashlib.sha256


def token_key(token: str) -> bytes:
    return _sha256(token.encode()).digest()


@dataclass(slots=True)
class _Copy:
    answer: Validation
    session_id: str
    until: float  # monotonic: the ttl, or the expiry less the margin, whichever comes first


class Copies:
    """The copies and the stream's state. Every method takes the lock briefly; no I/O."""

    def __init__(
        self,
        settings: LocalCache,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._monotonic = monotonic
        self._wall = wall
        self._lock = threading.Lock()
        self._copies: dict[bytes, _Copy] = {}
        self._by_session: dict[str, set[bytes]] = {}
        self._live = False
        #: Copies answer while the monotonic clock is below this (-inf: not at all).
        self._answer_until = -math.inf
        self._generation = 0
        self._hits = self._misses = self._events = self._starts = self._from_now = 0
        self._heartbeats = 0
        self._cursor = ""
        self._opened = -math.inf  # when the current stream's call was sent (monotonic)
        self._interval: float | None = None
        self._covered: float | None = None  # the newest covered point (this clock)
        self._heard = -math.inf  # when the stream last delivered anything (monotonic)
        self._silent_reopens = 0
        self._revoked: collections.OrderedDict[str, float] = collections.OrderedDict()

    def begin(self) -> tuple[int, float]:
        """Before sending a validation: the generation and the time to ``put`` its answer with."""
        with self._lock:
            return self._generation, self._monotonic()

    def get(self, key: bytes) -> Validation | None:
        # The hot path takes no lock: each read below is atomic, and a writer (an event, down)
        # that races it is ordered after this answer, as if the answer had come first. Only
        # the counters may lose an increment under concurrent callers.
        now = self._monotonic()
        if now < self._answer_until:
            copy = self._copies.get(key)
            if copy is not None and now < copy.until:
                self._hits += 1
                return copy.answer
        with self._lock:
            copy = self._copies.get(key)
            if copy is not None and not now < copy.until:
                self._drop(key)
            self._misses += 1
            return None

    def put(self, key: bytes, answer: Validation, begun: tuple[int, float]) -> None:
        """Keep a copy of ``answer`` (to a request begun at ``begun``) if it is VALID, the
        stream is live, and nothing happened on the stream since the request was sent."""
        generation, sent = begun
        session = answer.session
        if not answer.valid or session is None:
            return
        with self._lock:
            if not self._live or generation != self._generation:
                return
            if session.session_id in self._revoked:
                return
            if len(self._copies) >= self._settings.max_entries and key not in self._copies:
                return
            self._drop(key)
            marked = dataclasses.replace(answer, from_client_cache=True)
            # Both limits on the monotonic clock: ``ttl`` from when the request was sent, and
            # the expiry (by the wall clock, less the margin) as seen now. A copy lives at most
            # ``ttl``, so a step of the wall clock in that time is all this can miss.
            left = session.expires_at.timestamp() - self._settings.expiry_margin - self._wall()
            until = min(sent + self._settings.ttl, self._monotonic() + left)
            self._copies[key] = _Copy(marked, session.session_id, until)
            self._by_session.setdefault(session.session_id, set()).add(key)

    def _drop(self, key: bytes) -> None:
        copy = self._copies.pop(key, None)
        if copy is not None:
            keys = self._by_session.get(copy.session_id)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_session[copy.session_id]

    def opening(self) -> str:
        """Before opening a stream: down (below), and remember when the call is sent (the
        anchor of its heartbeats' offsets). The cursor to resume after."""
        with self._lock:
            cursor = self._down(from_now=False)
            self._opened = self._monotonic()
            return cursor

    def opened_at(self) -> float:
        with self._lock:
            return self._opened

    def apply(self, event: RevocationEvent) -> None:
        """One event of the stream: START makes the cache live; REVOKED drops its session;
        HEARTBEAT moves the covered point on."""
        with self._lock:
            self._cursor = event.cursor or self._cursor
            self._heard = self._monotonic()
            if event.kind == EventKind.HEARTBEAT:
                self._heartbeat(event.covered)
                return
            self._generation += 1
            if event.kind == EventKind.START:
                self._start(event.heartbeat_interval)
            elif event.kind == EventKind.REVOKED:
                self._events += 1
                self._remember(event.session_id)
                for key in self._by_session.pop(event.session_id, set()):
                    self._copies.pop(key, None)

    def _start(self, interval: float | None) -> None:
        self._live = True
        self._starts += 1
        self._interval = interval
        self._covered = None
        if interval is not None or self._settings.require_heartbeats:
            self._answer_until = -math.inf  # until the first heartbeat (or never)
        else:
            self._answer_until = math.inf  # an older server: copies bounded by the ttl alone
            if self._starts == 1:
                _log.warning(
                    "the server sends no revocation heartbeats: the local cache's copies may "
                    "lag a revocation by their ttl (%.3g s) when the stream goes silent",
                    self._settings.ttl,
                )

    def _heartbeat(self, covered: float | None) -> None:
        if covered is None or not self._live or self._interval is None:
            return
        self._heartbeats += 1
        point = self._opened + covered - CLOCK_RATE_ALLOWANCE * abs(covered)
        if self._covered is None or point > self._covered:
            self._covered = point
            self._answer_until = point + self._max_silence(self._interval)

    def _max_silence(self, interval: float) -> float:
        chosen = self._settings.max_silence
        return 3 * interval if chosen is None else chosen

    def _reopen_after(self, interval: float) -> float:
        chosen = self._settings.reopen_after
        return max(2 * self._max_silence(interval), 2.0) if chosen is None else chosen

    def silence_left(self) -> float | None:
        """Seconds until the live stream counts as silent (``reopen_after`` since it last
        delivered anything; <= 0: it is). None when silence means nothing: not live, or a
        server that sends no heartbeats."""
        with self._lock:
            if not self._live or self._interval is None:
                return None
            return self._heard + self._reopen_after(self._interval) - self._monotonic()

    def silenced(self) -> None:
        """The feed cancels the stream for its silence (counted; ``down`` follows)."""
        with self._lock:
            self._silent_reopens += 1
            bound = self._reopen_after(self._interval or 0.0)
        _log.warning(
            "the revocation stream has been silent for %.3g s: reopening it on a new connection",
            bound,
        )

    def _remember(self, session_id: str) -> None:
        now = self._monotonic()
        revoked = self._revoked
        revoked[session_id] = now + REVOKED_MEMORY
        revoked.move_to_end(session_id)
        while revoked:
            oldest, until = next(iter(revoked.items()))
            if until > now:
                break
            del revoked[oldest]

    def down(self, *, from_now: bool = False) -> str:
        """The stream is not live (ended, failed, closed): answer nothing, drop everything.
        ``from_now``: the cursor is refused (too old); forget it. The cursor to resume after."""
        with self._lock:
            return self._down(from_now=from_now)

    def _down(self, *, from_now: bool) -> str:
        self._generation += 1
        self._live = False
        self._answer_until = -math.inf
        self._covered = None
        self._copies.clear()
        self._by_session.clear()
        if from_now:
            self._cursor = ""
            self._from_now += 1
        return self._cursor

    def stats(self) -> LocalCacheStats:
        with self._lock:
            now = self._monotonic()
            return LocalCacheStats(
                self._hits,
                self._misses,
                len(self._copies),
                self._live,
                self._events,
                self._starts,
                self._from_now,
                self._cursor,
                heartbeats=self._heartbeats,
                heartbeat_interval=self._interval,
                answering=now < self._answer_until,
                covered_age=None if self._covered is None else now - self._covered,
                silent_reopens=self._silent_reopens,
            )


def _proves_live(event: RevocationEvent) -> bool:
    """Whether the event resets the reconnect backoff: anything after START, or START from a
    server without heartbeats (with them, a stream that starts and falls silent again, as
    while the server's reader is stuck behind Postgres, is reopened ever more slowly)."""
    return event.kind != EventKind.START or event.heartbeat_interval is None


def _refused_cursor(exc: SessionAuthorityError) -> bool:
    return exc.code.name == "FAILED_PRECONDITION"


class SyncFeed:
    """A daemon thread that keeps a WatchRevocations stream open and feeds ``copies``.
    ``open_watch(after, fresh)`` opens one (``SessionAuthorityClient``'s watch channel;
    ``fresh``: on a new channel, so a new connection). A second thread cancels a stream that
    fell silent (``Copies.silence_left``); the feed then reopens it on a new connection."""

    def __init__(
        self,
        copies: Copies,
        open_watch: Callable[[str, bool], RevocationWatch],
        settings: LocalCache,
    ) -> None:
        self._copies = copies
        self._open = open_watch
        self._settings = settings
        self._stop = threading.Event()
        self._hold = threading.Event()  # the test hook: cut() with hold
        self._lock = threading.Lock()
        self._watch: RevocationWatch | None = None
        self._silenced = False  # the watchdog cancelled the current stream
        self._thread = threading.Thread(
            target=self._run, name="session-authority-cache", daemon=True
        )
        self._watchdog = threading.Thread(
            target=self._watch_silence, name="session-authority-cache-silence", daemon=True
        )
        self._thread.start()
        self._watchdog.start()

    def _run(self) -> None:
        first, most = self._settings.reconnect_backoff
        wait = first
        fresh = False
        while not self._stop.is_set():
            if self._hold.is_set():
                self._stop.wait(0.02)
                continue
            from_now = rotated = False
            try:
                watch = self._open(self._copies.opening(), fresh)
                fresh = False
                with self._lock:
                    self._watch = watch
                if self._stop.is_set() or self._hold.is_set():  # closed or cut while opening
                    continue
                retire = self._copies.opened_at() + self._settings.stream_max_age
                for event in watch:
                    self._copies.apply(event)
                    if _proves_live(event):
                        wait = first
                    if time.monotonic() >= retire:  # reopen: a fresh anchor for the offsets
                        rotated = True
                        break
            except SessionAuthorityError as exc:
                from_now = _refused_cursor(exc)
                # No START in time: that connection may be the dead one.
                fresh = isinstance(exc, DeadlineExceeded)
            finally:
                self._close_watch()
                self._copies.down(from_now=from_now)
            with self._lock:
                if self._silenced:
                    self._silenced, fresh = False, True
            if rotated:
                continue
            self._stop.wait(wait)
            wait = min(wait * 2, most)

    def _watch_silence(self) -> None:
        while not self._stop.is_set():
            left = self._copies.silence_left()
            if left is None or left > 0:
                self._stop.wait(0.25 if left is None else left)
                continue
            with self._lock:
                fire = self._watch is not None and not self._silenced
                if fire and self._watch is not None:
                    self._silenced = True
                    self._watch.close()  # cancels the call: the feed's iteration ends
            if fire:
                self._copies.silenced()
            else:
                self._stop.wait(0.02)  # already ending: down() follows

    def _close_watch(self) -> None:
        with self._lock:
            watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()

    def cut(self, *, hold: bool = False) -> None:
        """Test hook: end the current stream as a broken connection would (the cache stops
        answering at once); with ``hold``, do not reconnect until ``release()``."""
        if hold:
            self._hold.set()
        self._copies.down()
        self._close_watch()

    def release(self) -> None:
        self._hold.clear()

    def stop(self) -> None:
        """Stop without waiting for the thread (``close`` waits)."""
        self._stop.set()
        self._close_watch()

    def close(self) -> None:
        self.stop()
        self._thread.join(5)
        self._watchdog.join(5)
        self._copies.down()


class AsyncFeed:
    """The asyncio twin of ``SyncFeed``: a task on the client's loop; each read of the stream
    is bounded by the time left before it counts as silent."""

    def __init__(
        self,
        copies: Copies,
        open_watch: Callable[[str, bool], Awaitable[AsyncRevocationWatch]],
        settings: LocalCache,
    ) -> None:
        self._copies = copies
        self._open = open_watch
        self._settings = settings
        self._released = asyncio.Event()  # cleared by the test hook cut(hold=True)
        self._released.set()
        self._watch: AsyncRevocationWatch | None = None
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        first, most = self._settings.reconnect_backoff
        wait = first
        fresh = False
        while True:
            await self._released.wait()
            from_now = rotated = False
            try:
                self._watch = watch = await self._open(self._copies.opening(), fresh)
                fresh = False
                if not self._released.is_set():  # cut while opening
                    continue
                retire = self._copies.opened_at() + self._settings.stream_max_age
                events = aiter(watch)
                while True:
                    try:
                        async with asyncio.timeout(self._copies.silence_left()):
                            event = await anext(events)
                    except StopAsyncIteration:
                        break
                    except TimeoutError:  # silent: reopen on a new connection
                        self._copies.silenced()
                        fresh = True
                        break
                    self._copies.apply(event)
                    if _proves_live(event):
                        wait = first
                    if time.monotonic() >= retire:  # reopen: a fresh anchor for the offsets
                        rotated = True
                        break
            except SessionAuthorityError as exc:
                from_now = _refused_cursor(exc)
                fresh = isinstance(exc, DeadlineExceeded)  # no START in time
            finally:
                self._close_watch()
                self._copies.down(from_now=from_now)
            if rotated:
                continue
            await asyncio.sleep(wait)
            wait = min(wait * 2, most)

    def _close_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()

    def cut(self, *, hold: bool = False) -> None:
        """Test hook: as ``SyncFeed.cut``."""
        if hold:
            self._released.clear()
        self._copies.down()
        self._close_watch()

    def release(self) -> None:
        self._released.set()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._close_watch()
        self._copies.down()
