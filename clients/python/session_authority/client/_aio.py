"""``AsyncSessionAuthorityClient``: the asyncio client (grpc.aio). Create it inside the event
loop it will be used on; ``async with`` it, or ``await client.close()``."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from session_authority.client import _config, _requests, _results
from session_authority.client._config import Deadlines, Hedging, Keepalive, Retry, Tls
from session_authority.client._errors import mapped
from session_authority.client._hedging import hedge_async
from session_authority.client._local_cache import (
    AsyncFeed,
    Copies,
    LocalCache,
    LocalCacheStats,
    token_key,
)
from session_authority.client._watch import AsyncRevocationWatch
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

__all__ = ["AsyncSessionAuthorityClient"]

Req = TypeVar("Req")
Rep = TypeVar("Rep")


class AsyncSessionAuthorityClient:
    """The asyncio twin of ``SessionAuthorityClient``: the same arguments, methods, answers
    and errors, each method a coroutine."""

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
        # The local cache's stream's own channel (see the sync client's).
        self._watch_channel: grpc.aio.Channel | None = None
        self._stub = pb_grpc.SessionAuthorityStub(self._channel)
        self._metadata = _config.metadata(api_key)
        self._deadlines = deadlines or Deadlines()
        self._hedging = hedging
        self._cache_settings: LocalCache | None = None
        self._copies: Copies | None = None
        self._feed: AsyncFeed | None = None
        if local_cache:
            self._cache_settings = (
                local_cache if isinstance(local_cache, LocalCache) else LocalCache()
            )
            self._copies = Copies(self._cache_settings)
            self._start_feed()

    def _start_feed(self) -> None:
        """The cache's feed is a task of the running loop: started at once when there is one,
        else by the first ``validate`` (or ``async with``)."""
        if self._feed is not None or self._copies is None or self._cache_settings is None:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self._feed = AsyncFeed(self._copies, self._open_cache_watch, self._cache_settings)

    def _new_channel(self, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
        if self._tls is None:
            return grpc.aio.insecure_channel(self.target, options=options)
        credentials = _config.credentials(self._tls)
        return grpc.aio.secure_channel(self.target, credentials, options=options)

    async def _open_cache_watch(self, after: str, fresh: bool) -> AsyncRevocationWatch:
        """The local cache's stream, on its own channel (a new one when ``fresh``)."""
        if fresh or self._watch_channel is None:
            old = self._watch_channel
            self._watch_channel = self._new_channel(_config.watch_channel_options(self._options))
            if old is not None:
                await old.close()
        stub = pb_grpc.SessionAuthorityStub(self._watch_channel)
        call = stub.WatchRevocations(_requests.watch(after, True), metadata=self._metadata)
        watch = AsyncRevocationWatch(call)
        await watch._start(self._deadlines.watch_start)
        return watch

    def __repr__(self) -> str:
        return f"AsyncSessionAuthorityClient(target={self.target!r})"

    async def __aenter__(self) -> AsyncSessionAuthorityClient:
        self._start_feed()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        if self._feed is not None:
            await self._feed.close()
        if self._watch_channel is not None:
            watch_channel, self._watch_channel = self._watch_channel, None
            await watch_channel.close()
        await self._channel.close()

    @property
    def local_cache_stats(self) -> LocalCacheStats | None:
        """The local cache's counters (None without ``local_cache``)."""
        return None if self._copies is None else self._copies.stats()

    async def validate(self, token: str, *, timeout: float | None = None) -> _results.Validation:
        if self._copies is None:
            return await self._validate(token, timeout)
        self._start_feed()
        key = token_key(token)
        cached = self._copies.get(key)
        if cached is not None:
            return cached
        begun = self._copies.begin()
        answer = await self._validate(token, timeout)
        self._copies.put(key, answer, begun)
        return answer

    async def _validate(self, token: str, timeout: float | None) -> _results.Validation:
        request = _requests.validate(token)
        seconds = timeout or self._deadlines.validate
        if self._hedging is None:
            reply = await self._call(self._stub.ValidateSession, request, seconds, (token,))
            return _results.validation(reply)
        method = self._stub.ValidateSession

        def start(remaining: float) -> Awaitable[pb.ValidateSessionResponse]:
            return method(request, timeout=remaining, metadata=self._metadata)

        try:
            reply = await hedge_async(start, self._hedging, seconds)
        except grpc.RpcError as exc:
            raise mapped(exc, (token,)) from None
        return _results.validation(reply)

    async def create(
        self,
        user_id: str,
        *,
        ttl: float | datetime.timedelta | None = None,
        metadata: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> _results.CreatedSession:
        request = _requests.create(user_id, ttl, metadata)
        seconds = timeout or self._deadlines.create
        return _results.created(await self._call(self._stub.CreateSession, request, seconds, ()))

    async def invalidate(
        self,
        *,
        token: str | None = None,
        session_id: str | None = None,
        timeout: float | None = None,
    ) -> _results.Revocation:
        request = _requests.invalidate(token, session_id)
        seconds = timeout or self._deadlines.invalidate
        secrets = (token,) if token else ()
        reply = await self._call(self._stub.Invalidate, request, seconds, secrets)
        return _results.revocation(reply)

    async def invalidate_user(
        self,
        user_id: str,
        *,
        except_session_id: str | None = None,
        timeout: float | None = None,
    ) -> _results.UserRevocation:
        request = _requests.invalidate_user(user_id, except_session_id)
        seconds = timeout or self._deadlines.invalidate_user
        reply = await self._call(self._stub.InvalidateUser, request, seconds, ())
        return _results.user_revocation(reply)

    async def validate_many(
        self, tokens: Sequence[str], *, timeout: float | None = None
    ) -> list[_results.Validation]:
        seconds = timeout or self._deadlines.validate_many
        answers: list[_results.Validation] = []
        for at in range(0, len(tokens), _requests.MAX_BATCH):
            part = tokens[at : at + _requests.MAX_BATCH]
            request = _requests.validate_many(part)
            reply = await self._call(self._stub.ValidateSessions, request, seconds, tuple(part))
            answers.extend(_results.validations(reply, len(part)))
        return answers

    def list_sessions(
        self,
        user_id: str,
        *,
        include_revoked: bool = False,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[_results.Session]:
        """An async iterator (``async for``; not a coroutine) over the sessions, a page at a
        time."""
        seconds = timeout or self._deadlines.list_sessions
        first = _requests.list_sessions(user_id, include_revoked, page_size, "")
        return self._pages(first, seconds)

    async def _pages(
        self, request: pb.ListUserSessionsRequest, seconds: float
    ) -> AsyncIterator[_results.Session]:
        while True:
            reply = await self._call(self._stub.ListUserSessions, request, seconds, ())
            for message in reply.sessions:
                yield _results.session(message)
            if not reply.next_page_token:
                return
            request.page_token = reply.next_page_token

    async def touch(
        self,
        *,
        token: str | None = None,
        session_id: str | None = None,
        extend_by: float | datetime.timedelta | None = None,
        write_through: bool = False,
        timeout: float | None = None,
    ) -> _results.Touch:
        request = _requests.touch(token, session_id, extend_by, write_through)
        seconds = timeout or self._deadlines.touch
        secrets = (token,) if token else ()
        reply = await self._call(self._stub.TouchSession, request, seconds, secrets)
        return _results.touch(reply)

    async def watch_revocations(
        self, after: str = "", *, start_timeout: float | None = None, heartbeats: bool = False
    ) -> AsyncRevocationWatch:
        """Open a WatchRevocations stream; returns once its START event arrived.
        ``heartbeats``: as the sync client's."""
        call = self._stub.WatchRevocations(
            _requests.watch(after, heartbeats), metadata=self._metadata
        )
        watch = AsyncRevocationWatch(call)
        await watch._start(start_timeout or self._deadlines.watch_start)
        return watch

    async def health(self, *, timeout: float | None = None) -> _results.HealthReport:
        seconds = timeout or self._deadlines.health
        reply = await self._call(self._stub.Health, _requests.health(), seconds, ())
        return _results.health(reply)

    async def _call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Req, Rep],
        request: Req,
        timeout: float,
        secrets: tuple[str, ...],
    ) -> Rep:
        try:
            return await method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise mapped(exc, secrets) from None
