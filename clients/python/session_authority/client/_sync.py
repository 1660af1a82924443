"""``SessionAuthorityClient``: the blocking client (thread-safe: one per process is enough)."""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from session_authority.client import _config, _requests, _results
from session_authority.client._config import Deadlines, Hedging, Keepalive, Retry, Tls
from session_authority.client._errors import Unavailable, mapped
from session_authority.client._hedging import hedge_sync
from session_authority.client._local_cache import (
    Copies,
    LocalCache,
    LocalCacheStats,
    SyncFeed,
    token_key,
)
from session_authority.client._watch import RevocationWatch
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

__all__ = ["SessionAuthorityClient"]

Req = TypeVar("Req")
Rep = TypeVar("Rep")


class SessionAuthorityClient:
    """A client of one session-authority service.

    ``target``: ``host:port``, or ``dns:///host:port`` to spread calls over every address the
    name resolves to (round robin). ``tls``: None for plaintext (local use only); ``Tls()`` for
    the system's roots; ``Tls.from_files(ca_file=..., cert_file=..., key_file=...)`` for a
    private CA and mTLS. ``api_key``: sent as ``authorization: Bearer`` on every call.

    Every method raises a ``SessionAuthorityError`` subclass on failure; an invalid session is a
    normal answer (``Validation.valid`` False). See ``_config`` for the defaults and why.
    """

    def __init__(
        self,
        target: str,
        *,
        tls: Tls | None = None,
        api_key: str | None = None,
        deadlines: Deadlines | None = None,
        retry: Retry | None = None,
        hedging: Hedging | None = None,
        keepalive: Keepalive | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        local_cache: bool | LocalCache = False,
    ) -> None:
        options = _config.channel_options(
            retry or Retry(), keepalive or Keepalive(), tls, channel_options
        )
        self.target = target
        self._tls = tls
        self._options = options
        self._channel = self._new_channel(options)
        self._stub = pb_grpc.SessionAuthorityStub(self._channel)
        self._metadata = _config.metadata(api_key)
        self._deadlines = deadlines or Deadlines()
        self._hedging = hedging
        self._copies: Copies | None = None
        self._feed: SyncFeed | None = None
        # The local cache's stream has a channel (so a connection) of its own, replaced when
        # the stream falls silent: a new call on a black-holed connection would hang too.
        self._watch_lock = threading.Lock()
        self._watch_channel: grpc.Channel | None = None
        self._closed = False
        if local_cache:
            settings = local_cache if isinstance(local_cache, LocalCache) else LocalCache()
            self._copies = Copies(settings)
            self._feed = SyncFeed(self._copies, self._open_cache_watch, settings)

    def _new_channel(self, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
        if self._tls is None:
            return grpc.insecure_channel(self.target, options=options)
        return grpc.secure_channel(self.target, _config.credentials(self._tls), options=options)

    def _open_cache_watch(self, after: str, fresh: bool) -> RevocationWatch:
        """The local cache's stream, on its own channel (a new one when ``fresh``)."""
        with self._watch_lock:
            if self._closed:  # no new channel once closed
                raise Unavailable(grpc.StatusCode.UNAVAILABLE, "client closed")
            old = None
            if fresh or self._watch_channel is None:
                old = self._watch_channel
                options = _config.watch_channel_options(self._options)
                self._watch_channel = self._new_channel(options)
            stub = pb_grpc.SessionAuthorityStub(self._watch_channel)
        if old is not None:
            old.close()
        call = stub.WatchRevocations(_requests.watch(after, True), metadata=self._metadata)
        return RevocationWatch(call, self._deadlines.watch_start)

    def __repr__(self) -> str:
        return f"SessionAuthorityClient(target={self.target!r})"

    def __enter__(self) -> SessionAuthorityClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        if self._feed is not None:
            self._feed.stop()
        with self._watch_lock:
            self._closed = True
            watch_channel, self._watch_channel = self._watch_channel, None
        if watch_channel is not None:
            # Cancels the cache's stream, one still waiting for its START included (a
            # black-holed server): the feed's thread then ends at once.
            watch_channel.close()
        if self._feed is not None:
            self._feed.close()
        self._channel.close()

    @property
    def local_cache_stats(self) -> LocalCacheStats | None:
        """The local cache's counters (None without ``local_cache``)."""
        return None if self._copies is None else self._copies.stats()

    def validate(self, token: str, *, timeout: float | None = None) -> _results.Validation:
        """Whether ``token`` names a live session. Hedged when the client was given
        ``hedging``; retried on UNAVAILABLE. With ``local_cache``, answered in process when a
        copy can vouch for it (``Validation.from_client_cache``; see ``_local_cache``)."""
        if self._copies is None:
            return self._validate(token, timeout)
        key = token_key(token)
        cached = self._copies.get(key)
        if cached is not None:
            return cached
        begun = self._copies.begin()
        answer = self._validate(token, timeout)
        self._copies.put(key, answer, begun)
        return answer

    def _validate(self, token: str, timeout: float | None) -> _results.Validation:
        request = _requests.validate(token)
        seconds = timeout or self._deadlines.validate
        if self._hedging is None:
            reply = self._call(self._stub.ValidateSession, request, seconds, (token,))
        else:
            method = self._stub.ValidateSession
            start: Callable[[float], grpc.Future[Any]] = lambda remaining: method.future(  # noqa: E731
                request, timeout=remaining, metadata=self._metadata
            )
            try:
                reply = hedge_sync(start, self._hedging, seconds)
            except grpc.RpcError as exc:
                raise mapped(exc, (token,)) from None
        return _results.validation(reply)

    def create(
        self,
        user_id: str,
        *,
        ttl: float | datetime.timedelta | None = None,
        metadata: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> _results.CreatedSession:
        """A new session for ``user_id`` (``ttl`` in seconds; the server's default when None).
        Never retried: a lost reply may have created a session."""
        request = _requests.create(user_id, ttl, metadata)
        seconds = timeout or self._deadlines.create
        return _results.created(self._call(self._stub.CreateSession, request, seconds, ()))

    def invalidate(
        self,
        *,
        token: str | None = None,
        session_id: str | None = None,
        timeout: float | None = None,
    ) -> _results.Revocation:
        """Revoke one session, named by exactly one of ``token`` and ``session_id``.
        Idempotent (``revoked`` False: nothing live was left to revoke)."""
        request = _requests.invalidate(token, session_id)
        seconds = timeout or self._deadlines.invalidate
        secrets = (token,) if token else ()
        return _results.revocation(self._call(self._stub.Invalidate, request, seconds, secrets))

    def invalidate_user(
        self,
        user_id: str,
        *,
        except_session_id: str | None = None,
        timeout: float | None = None,
    ) -> _results.UserRevocation:
        """Revoke every live session of ``user_id`` (but ``except_session_id``, when given:
        "log out my other devices")."""
        request = _requests.invalidate_user(user_id, except_session_id)
        seconds = timeout or self._deadlines.invalidate_user
        reply = self._call(self._stub.InvalidateUser, request, seconds, ())
        return _results.user_revocation(reply)

    def validate_many(
        self, tokens: Sequence[str], *, timeout: float | None = None
    ) -> list[_results.Validation]:
        """One ``Validation`` per token, in order (duplicates allowed). Sent as ValidateSessions
        calls of up to 100 tokens each, one after another, each with its own deadline; a
        failed call fails the whole list (no partial answer)."""
        seconds = timeout or self._deadlines.validate_many
        answers: list[_results.Validation] = []
        for at in range(0, len(tokens), _requests.MAX_BATCH):
            part = tokens[at : at + _requests.MAX_BATCH]
            request = _requests.validate_many(part)
            reply = self._call(self._stub.ValidateSessions, request, seconds, tuple(part))
            answers.extend(_results.validations(reply, len(part)))
        return answers

    def list_sessions(
        self,
        user_id: str,
        *,
        include_revoked: bool = False,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> Iterator[_results.Session]:
        """The sessions of ``user_id``, oldest first, fetched a page (``page_size``; 0: the
        server's default) at a time as the iterator is consumed. ``timeout``: per page."""
        seconds = timeout or self._deadlines.list_sessions
        first = _requests.list_sessions(user_id, include_revoked, page_size, "")
        return self._pages(first, seconds)

    def _pages(
        self, request: pb.ListUserSessionsRequest, seconds: float
    ) -> Iterator[_results.Session]:
        while True:
            reply = self._call(self._stub.ListUserSessions, request, seconds, ())
            for message in reply.sessions:
                yield _results.session(message)
            if not reply.next_page_token:
                return
            request.page_token = reply.next_page_token

    def touch(
        self,
        *,
        token: str | None = None,
        session_id: str | None = None,
        extend_by: float | datetime.timedelta | None = None,
        write_through: bool = False,
        timeout: float | None = None,
    ) -> _results.Touch:
        """Slide a live session's expiry to now + ``extend_by`` (seconds; None: the server's
        default TTL). By default a session the server holds in its cache is answered at
        once (``written`` False, the expiry as it stood) and written behind the answer;
        ``write_through``: answered after the write, with the new expiry. NOT_FOUND
        (unknown) and FAILED_PRECONDITION (revoked or expired) raise ``ServerError``."""
        request = _requests.touch(token, session_id, extend_by, write_through)
        seconds = timeout or self._deadlines.touch
        secrets = (token,) if token else ()
        return _results.touch(self._call(self._stub.TouchSession, request, seconds, secrets))

    def watch_revocations(
        self, after: str = "", *, start_timeout: float | None = None, heartbeats: bool = False
    ) -> RevocationWatch:
        """Open a WatchRevocations stream after the cursor ``after`` (empty: from now). Returns
        once the START event arrived (within ``start_timeout``); iterate the watch for events,
        ``close()`` it (or use it in a ``with``) when done. See ``RevocationWatch``.
        ``heartbeats``: ask for HEARTBEAT events too (START's ``heartbeat_interval`` says
        whether the server sends them)."""
        call = self._stub.WatchRevocations(
            _requests.watch(after, heartbeats), metadata=self._metadata
        )
        return RevocationWatch(call, start_timeout or self._deadlines.watch_start)

    def health(self, *, timeout: float | None = None) -> _results.HealthReport:
        """The service's health document (the Health RPC)."""
        seconds = timeout or self._deadlines.health
        reply = self._call(self._stub.Health, _requests.health(), seconds, ())
        return _results.health(reply)

    def _call(
        self,
        method: grpc.UnaryUnaryMultiCallable[Req, Rep],
        request: Req,
        timeout: float,
        secrets: tuple[str, ...],
    ) -> Rep:
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise mapped(exc, secrets) from None
