"""The plain unary RPCs: each one's request decoding, use case and reply
encoding in one method, in this one class.

A new unary RPC over the core is one method here, named after the RPC and
declared where it is written: who may call it (``@read``, ``@sensitive_read``
or ``@mutation``, ``transport/auth.py``; none: denied to every caller) and
that it is a plain unary RPC (``@unary``), which runs it within the caller's
deadline and maps its errors through the one status table (``run_call``)::

    @read
    @unary
    async def GetThing(self, request: pb.GetThingRequest) -> pb.GetThingResponse:
        thing = await self._core.get_thing(request.thing_id)
        return pb.GetThingResponse(thing=thing_to_pb(thing))

A method reaches the core through its facade (``core/service.py``) only,
raises the core's errors (``InvalidArgument`` naming the field for a bad
request) and nothing else, and sees neither the call's context nor a
status. mypy checks each one against the generated servicer's signature of
its RPC (``SessionAuthorityServicer`` inherits both). Encoding that only one
RPC uses is written in its method; ``mapping.py`` keeps what several share
(sessions, durations, timestamps, health).

Not here, on purpose: ``ValidateSession`` and ``ValidateSessions`` (the one
hot-path exception, raw bytes in and pre-encoded bytes out, ``handler.py``),
``Health`` (it names the servicer's worker) and ``WatchRevocations`` (a
stream). Those are written on the servicer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from functools import update_wrapper
from typing import Any, TypeVar

import grpc

from session_authority.core.errors import InvalidArgument
from session_authority.core.service import SessionAuthority
from session_authority.transport.auth import mutation, sensitive_read
from session_authority.transport.calls import run_call
from session_authority.transport.mapping import (
    duration_from_pb,
    page_to_pb,
    session_to_pb,
    ttl_from_pb,
)
from session_authority.v1 import session_authority_pb2 as pb

__all__ = ["UnaryRPCs", "unary"]

S = TypeVar("S", bound="UnaryRPCs")
Req = TypeVar("Req")
Rep = TypeVar("Rep")
Context = grpc.aio.ServicerContext[Any, Any]


def unary(
    handler: Callable[[S, Req], Awaitable[Rep]],
) -> Callable[[S, Req, Context], Coroutine[Any, Any, Rep]]:
    """``handler(self, request)`` as the servicer method grpc calls with the
    call's context: run by ``run_call`` (the deadline, the status table). It
    keeps the handler's name and its declared access."""

    async def method(self: S, request: Req, context: Context) -> Rep:
        return await run_call(context, lambda: handler(self, request))

    return update_wrapper(method, handler)


class UnaryRPCs:
    """The plain unary RPCs of ``SessionAuthority``, over ``_core`` (the facade)."""

    _core: SessionAuthority

    @mutation
    @unary
    async def CreateSession(self, request: pb.CreateSessionRequest) -> pb.CreateSessionResponse:
        ttl = ttl_from_pb(request)
        token, session = await self._core.create(request.user_id, ttl, request.metadata)
        return pb.CreateSessionResponse(token=token, session=session_to_pb(session))

    @mutation
    @unary
    async def Invalidate(self, request: pb.InvalidateRequest) -> pb.InvalidateResponse:
        target = request.WhichOneof("target")
        if target == "token":
            result = await self._core.invalidate(token=request.token)
        elif target == "session_id":
            result = await self._core.invalidate(session_id=request.session_id)
        else:
            raise InvalidArgument("target", "set one of token or session_id")
        return pb.InvalidateResponse(
            revoked=result.revoked_count > 0,
            cache_purged=result.cache_purged,
            propagated=result.propagated,
        )

    @mutation
    @unary
    async def InvalidateUser(self, request: pb.InvalidateUserRequest) -> pb.InvalidateUserResponse:
        result = await self._core.invalidate_user(
            request.user_id, except_session_id=request.except_session_id or None
        )
        return pb.InvalidateUserResponse(
            revoked_count=result.revoked_count,
            cache_purged=result.cache_purged,
            propagated=result.propagated,
        )

    @sensitive_read
    @unary
    async def ListUserSessions(
        self, request: pb.ListUserSessionsRequest
    ) -> pb.ListUserSessionsResponse:
        page = await self._core.list_user_sessions(
            request.user_id,
            page_size=request.page_size,
            page_token=request.page_token,
            include_revoked=request.include_revoked,
        )
        return page_to_pb(page)

    @mutation
    @unary
    async def TouchSession(self, request: pb.TouchSessionRequest) -> pb.TouchSessionResponse:
        extend_by = (
            duration_from_pb(request.extend_by, "extend_by")
            if request.HasField("extend_by")
            else None
        )
        target = request.WhichOneof("target")
        if target == "token":
            touch = await self._core.touch(
                token=request.token, extend_by=extend_by, write_through=request.write_through
            )
        elif target == "session_id":
            touch = await self._core.touch(
                session_id=request.session_id,
                extend_by=extend_by,
                write_through=request.write_through,
            )
        else:
            raise InvalidArgument("target", "set one of token or session_id")
        return pb.TouchSessionResponse(session=session_to_pb(touch.session), written=touch.written)
