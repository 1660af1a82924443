"""The client's revocation-safe local cache (``local_cache=True``): ``validate`` answered in
process from copies of the server's VALID answers, dropped by the server's revocation stream.

The invariant: **a copy answers only while a WatchRevocations stream is live, and every
revocation the stream delivers drops the copies of its session before the next answer.**
Kept by:

* No START, no cache: until the stream's START event arrives, and whenever the stream is not
  connected, reconnecting, or ended with an error, ``get`` answers nothing (every validate goes
  to the server) and every copy is dropped at the moment the stream is known down.
* A copy of an answer is kept only if nothing happened between the request being sent and the
  answer arriving: every event (START, REVOKED, down) bumps ``generation``, and a ``put``
  whose request started in an older generation is refused. So an answer the server gave before
  a revocation, arriving after its event, is never kept.
* Each copy lives at most ``ttl`` seconds, counted from when its request was SENT (monotonic
  clock), and never once the client's wall clock plus ``expiry_margin`` reaches the session's
  ``expires_at``: a stream silently dead (no RST, no event) lets a copy lag a revocation by at
  most ``ttl``; clock skew beyond the margin, by at most ``ttl`` too.
* Only VALID answers are copied (an invalid one is asked again); keys are the token's SHA-256.

The bound: a cached answer lags a revocation by the event's delivery time (the server's
durable-event path plus the network) plus the time the client takes to notice a dead stream
(the channel's keepalive: a ping after ``Keepalive.time_ms`` of silence, the connection
declared dead ``timeout_ms`` later: 30 s + 10 s by default), and never more than ``ttl``.

``Copies`` is the pure state (thread-safe, clocks injected); ``SyncFeed`` (a thread) and
``AsyncFeed`` (a task) read the stream into it, reconnecting with backoff and resuming from
the last cursor (FAILED_PRECONDITION, a cursor too old: start again from now).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from session_authority.client._errors import SessionAuthorityError
from session_authority.client._results import EventKind, RevocationEvent, Validation
from session_authority.client._watch import AsyncRevocationWatch, RevocationWatch

__all__ = ["AsyncFeed", "Copies", "LocalCache", "LocalCacheStats", "SyncFeed", "token_key"]


@dataclass(frozen=True)
class LocalCache:
    """The local cache's settings. ``ttl``: seconds a copy may answer (from when its request
    was sent); ``expiry_margin``: seconds before the session's ``expires_at`` (by this
    machine's clock) a copy stops answering; ``max_entries``: copies kept at most (past it,
    new answers are not copied); ``reconnect_backoff``: (first, max) seconds between attempts
    to reopen the stream."""

    ttl: float = 1.0
    expiry_margin: float = 1.0
    max_entries: int = 100_000
    reconnect_backoff: tuple[float, float] = (0.1, 2.0)

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


@dataclass(frozen=True)
class LocalCacheStats:
    """Counters of the local cache (``client.local_cache_stats``). ``hits``: validations
    answered in process; ``misses``: validations sent to the server (including every one while
    the stream was down); ``live``: the stream is up (past START); ``events``: REVOKED events
    applied; ``starts``: START events (1 + reconnections); ``restarts_from_now``: resumptions
    refused as too old (everything dropped, started from now); ``cursor``: the last one."""

    hits: int
    misses: int
    entries: int
    live: bool
    events: int
    starts: int
    restarts_from_now: int
    cursor: str


def token_key(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass
class _Copy:
    answer: Validation
    session_id: str
    until: float  # monotonic
    expires_at: datetime.datetime


class Copies:
    """The copies and the stream's state. Every method takes the lock briefly; no I/O."""

    def __init__(
        self,
        settings: LocalCache,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        self._settings = settings
        self._monotonic = monotonic
        self._wall = wall
        self._lock = threading.Lock()
        self._copies: dict[bytes, _Copy] = {}
        self._by_session: dict[str, set[bytes]] = {}
        self._live = False
        self._generation = 0
        self._hits = self._misses = self._events = self._starts = self._from_now = 0
        self._cursor = ""

    def begin(self) -> tuple[int, float]:
        """Before sending a validation: the generation and the time to ``put`` its answer with."""
        with self._lock:
            return self._generation, self._monotonic()

    def get(self, key: bytes) -> Validation | None:
        with self._lock:
            copy = self._copies.get(key) if self._live else None
            if copy is not None and self._fresh(copy):
                self._hits += 1
                return copy.answer
            if copy is not None:
                self._drop(key)
            self._misses += 1
            return None

    def _fresh(self, copy: _Copy) -> bool:
        margin = datetime.timedelta(seconds=self._settings.expiry_margin)
        return self._monotonic() < copy.until and self._wall() + margin < copy.expires_at

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
            if len(self._copies) >= self._settings.max_entries and key not in self._copies:
                return
            self._drop(key)
            marked = dataclasses.replace(answer, from_client_cache=True)
            until = sent + self._settings.ttl
            self._copies[key] = _Copy(marked, session.session_id, until, session.expires_at)
            self._by_session.setdefault(session.session_id, set()).add(key)

    def _drop(self, key: bytes) -> None:
        copy = self._copies.pop(key, None)
        if copy is not None:
            keys = self._by_session.get(copy.session_id)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_session[copy.session_id]

    def apply(self, event: RevocationEvent) -> None:
        """One event of the stream: START makes the cache live; REVOKED drops its session."""
        with self._lock:
            self._generation += 1
            self._cursor = event.cursor or self._cursor
            if event.kind == EventKind.START:
                self._live = True
                self._starts += 1
            elif event.kind == EventKind.REVOKED:
                self._events += 1
                for key in self._by_session.pop(event.session_id, set()):
                    self._copies.pop(key, None)

    def down(self, *, from_now: bool = False) -> str:
        """The stream is not live (ended, failed, closed): answer nothing, drop everything.
        ``from_now``: the cursor is refused (too old); forget it. The cursor to resume after."""
        with self._lock:
            self._generation += 1
            self._live = False
            self._copies.clear()
            self._by_session.clear()
            if from_now:
                self._cursor = ""
                self._from_now += 1
            return self._cursor

    def stats(self) -> LocalCacheStats:
        with self._lock:
            return LocalCacheStats(
                self._hits,
                self._misses,
                len(self._copies),
                self._live,
                self._events,
                self._starts,
                self._from_now,
                self._cursor,
            )


def _refused_cursor(exc: SessionAuthorityError) -> bool:
    return exc.code.name == "FAILED_PRECONDITION"


class SyncFeed:
    """A daemon thread that keeps a WatchRevocations stream open and feeds ``copies``.
    ``open_watch(after)`` opens one (``SessionAuthorityClient.watch_revocations``)."""

    def __init__(
        self,
        copies: Copies,
        open_watch: Callable[[str], RevocationWatch],
        settings: LocalCache,
    ) -> None:
        self._copies = copies
        self._open = open_watch
        self._settings = settings
        self._stop = threading.Event()
        self._hold = threading.Event()  # the test hook: cut() with hold
        self._lock = threading.Lock()
        self._watch: RevocationWatch | None = None
        self._thread = threading.Thread(
            target=self._run, name="session-authority-cache", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        first, most = self._settings.reconnect_backoff
        wait = first
        while not self._stop.is_set():
            if self._hold.is_set():
                self._stop.wait(0.02)
                continue
            from_now = False
            try:
                watch = self._open(self._copies.down())
                with self._lock:
                    self._watch = watch
                if self._stop.is_set() or self._hold.is_set():  # closed or cut while opening
                    continue
                for event in watch:
                    self._copies.apply(event)
                    wait = first
            except SessionAuthorityError as exc:
                from_now = _refused_cursor(exc)
            finally:
                self._close_watch()
                self._copies.down(from_now=from_now)
            self._stop.wait(wait)
            wait = min(wait * 2, most)

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

    def close(self) -> None:
        self._stop.set()
        self._close_watch()
        self._thread.join(5)
        self._copies.down()


class AsyncFeed:
    """The asyncio twin of ``SyncFeed``: a task on the client's loop."""

    def __init__(
        self,
        copies: Copies,
        open_watch: Callable[[str], Awaitable[AsyncRevocationWatch]],
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
        while True:
            await self._released.wait()
            from_now = False
            try:
                self._watch = watch = await self._open(self._copies.down())
                if not self._released.is_set():  # cut while opening
                    continue
                async for event in watch:
                    self._copies.apply(event)
                    wait = first
            except SessionAuthorityError as exc:
                from_now = _refused_cursor(exc)
            finally:
                self._close_watch()
                self._copies.down(from_now=from_now)
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
