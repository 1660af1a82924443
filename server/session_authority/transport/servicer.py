"""The gRPC servicer: decode, call the core, encode, map errors. Nothing else."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from session_authority.core.domain import Validation
from session_authority.core.errors import InvalidArgument, SessionAuthorityError, Unavailable
from session_authority.core.service import SessionAuthority
from session_authority.transport.auth import declared, mutation, read, sensitive_read
from session_authority.transport.mapping import (
    duration_from_pb,
    health_to_pb,
    page_to_pb,
    session_to_pb,
    ttl_from_pb,
    validation_to_pb,
    watch_item_to_pb,
)
from session_authority.transport.peers import peer_address
from session_authority.transport.status import status_for
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

__all__ = ["SessionAuthorityServicer", "caller_of", "run_call"]

_log = logging.getLogger("session_authority.rpc")
T = TypeVar("T")


#: The tag of ValidateSessionRequest's field 1 (token), length-delimited: (1 << 3) | 2.
_TOKEN_ONLY = 0x0A
#: Encoded replies kept for L1 answers (see ``ValidateSession``); cleared when full.
_WIRE_MAX = 10_000
#: The tag of ValidateSessionsResponse's field 1 (results), length-delimited.
_RESULTS = b"\x0a"


def _framed(wire: bytes) -> bytes:
    """``wire`` as one element of ``results``: tag, varint length, bytes."""
    size = len(wire)
    if size < 0x80:
        return _RESULTS + bytes((size,)) + wire
    head = bytearray(_RESULTS)
    while size >= 0x80:
        head.append((size & 0x7F) | 0x80)
        size >>= 7
    head.append(size)
    return bytes(head) + wire


class SessionAuthorityServicer(pb_grpc.SessionAuthorityServicer):
    """Each RPC is declared ``@read`` or ``@mutation`` here, where it is
    written: that is who may call it (``access``); an RPC declared neither is
    denied to every caller."""

    @classmethod
    def access(cls) -> dict[str, str]:
        """``/session_authority.v1.SessionAuthority/Method`` -> ``read`` or
        ``mutation``, for every RPC of the service this class declares."""
        service = pb.DESCRIPTOR.services_by_name["SessionAuthority"]
        return dict(declared(cls, service.full_name, (m.name for m in service.methods)))

    def __init__(
        self,
        core: SessionAuthority,
        *,
        worker: int = 0,
        workers: int = 1,
        watch_stall: float = 10.0,
    ) -> None:
        """``worker`` of ``workers``: which process this is (``serve --workers``),
        named in every Health reply, whose numbers are this process's own.
        ``watch_stall``: seconds a WatchRevocations message may wait to be taken
        by its reader before the stream is ended (``WATCH_STALL_TIMEOUT_MS``)."""
        self._core = core
        self._watch_stall = watch_stall
        self._worker = pb.WorkerInfo(index=worker, count=workers, pid=os.getpid())
        self._validate_local = core.validate_local  # bound once: the hot path's first call
        # id(answer) -> (answer, its encoded reply, the same framed as one of
        # ValidateSessions' results). The core hands out the same Validation
        # for every hit on one L1 copy, so its reply is encoded once; holding
        # the answer keeps its id from being reused while it is here.
        self._wire: dict[int, tuple[Validation, bytes, bytes]] = {}

    @mutation
    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.CreateSessionResponse:
        async def work() -> pb.CreateSessionResponse:
            ttl = ttl_from_pb(request)
            token, session = await self._core.create(request.user_id, ttl, request.metadata)
            return pb.CreateSessionResponse(token=token, session=session_to_pb(session))

        return await run_call(context, work)

    def validate_cached(self, raw: bytes) -> bytes | None:
        """ValidateSession's encoded reply when this process's L1 copy gives the
        answer, at once; None otherwise (then ``ValidateSession``). ``raw`` is the
        request as received: the handler calls this before decoding it and
        before making the coroutine (``handler.py``), so a hit parses nothing,
        awaits nothing (no deadline to bound) and pays for no frame.

        Only the request as every client encodes it is read here: field 1
        (``token``), a one-byte length, nothing else (``_TOKEN_ONLY``). Its
        bytes are hashed as they are: a copy is kept only under the hash of a
        token that was decoded and checked, which no other bytes hash to
        (invalid UTF-8 included). Anything else goes the decoding way."""
        if len(raw) < 2 or raw[0] != _TOKEN_ONLY or raw[1] != len(raw) - 2:
            return None
        answer = self._validate_local(raw[2:])
        if answer is None:
            return None
        memo = self._wire.get(id(answer))
        if memo is not None and memo[0] is answer:
            return memo[1]
        return self._encoded(answer)

    def synchronous_answers(self) -> dict[str, Callable[[Any], bytes | None]]:
        """Per method, what can answer a request without awaiting (or say it
        cannot, with None): the handler tries it first."""
        return {"ValidateSession": self.validate_cached}

    @read
    async def ValidateSession(  # type: ignore[override]  # answers the encoded reply
        self, request: pb.ValidateSessionRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> bytes:
        """Answers the encoded ``ValidateSessionResponse`` (registered without a
        reply serializer, see ``handler.PRE_ENCODED``)."""

        async def work() -> bytes:
            # Only asked on a miss: a cache hit never reads the peer.
            answer = await self._core.validate(request.token, caller=lambda: caller_of(context))
            return self._encoded(answer)

        return await run_call(context, work)

    def _encoded(self, answer: Validation) -> bytes:
        memo = self._wire.get(id(answer))
        if memo is not None and memo[0] is answer:
            return memo[1]
        wire = validation_to_pb(answer).SerializeToString()
        if answer.valid:  # the copies' prepared answers; verdicts are made per call
            if len(self._wire) >= _WIRE_MAX:
                self._wire.clear()
            self._wire[id(answer)] = (answer, wire, _framed(wire))
        return wire

    @mutation
    async def Invalidate(
        self, request: pb.InvalidateRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.InvalidateResponse:
        async def work() -> pb.InvalidateResponse:
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

        return await run_call(context, work)

    @mutation
    async def InvalidateUser(
        self, request: pb.InvalidateUserRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.InvalidateUserResponse:
        async def work() -> pb.InvalidateUserResponse:
            result = await self._core.invalidate_user(
                request.user_id, except_session_id=request.except_session_id or None
            )
            return pb.InvalidateUserResponse(
                revoked_count=result.revoked_count,
                cache_purged=result.cache_purged,
                propagated=result.propagated,
            )

        return await run_call(context, work)

    @read
    async def Health(
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.HealthResponse:
        async def work() -> pb.HealthResponse:
            reply = health_to_pb(await self._core.health())
            reply.worker.CopyFrom(self._worker)
            return reply

        return await run_call(context, work)

    @sensitive_read
    async def ListUserSessions(
        self,
        request: pb.ListUserSessionsRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> pb.ListUserSessionsResponse:
        async def work() -> pb.ListUserSessionsResponse:
            page = await self._core.list_user_sessions(
                request.user_id,
                page_size=request.page_size,
                page_token=request.page_token,
                include_revoked=request.include_revoked,
            )
            return page_to_pb(page)

        return await run_call(context, work)

    @mutation
    async def TouchSession(
        self, request: pb.TouchSessionRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.TouchSessionResponse:
        async def work() -> pb.TouchSessionResponse:
            extend_by = (
                duration_from_pb(request.extend_by, "extend_by")
                if request.HasField("extend_by")
                else None
            )
            target = request.WhichOneof("target")
            if target == "token":
                touch = await self._core.touch(token=request.token, extend_by=extend_by)
            elif target == "session_id":
                touch = await self._core.touch(session_id=request.session_id, extend_by=extend_by)
            else:
                raise InvalidArgument("target", "set one of token or session_id")
            return pb.TouchSessionResponse(
                session=session_to_pb(touch.session), written=touch.written
            )

        return await run_call(context, work)

    @sensitive_read
    async def WatchRevocations(  # type: ignore[override]  # a coroutine writing its replies
        self, request: pb.WatchRevocationsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> None:
        """Writes each item of ``core.watch`` (``core/watch.py``) with
        ``context.write``, each write bounded by ``watch_stall``: a reader that
        stops taking messages is ended with RESOURCE_EXHAUSTED once grpc's
        flow-control window is full, so this process holds at most one page of
        events and that window for it. The status goes behind the messages
        already sent: the reader sees every one of them, then why it was cut."""
        watch = self._core.watch
        last = ""
        try:
            if watch is None:
                raise Unavailable("WatchRevocations is not offered by this server")
            async for item in watch.watch(request.after, heartbeats=request.heartbeats):
                message = watch_item_to_pb(item)
                try:
                    async with asyncio.timeout(self._watch_stall):
                        await context.write(message)
                except TimeoutError:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"watcher too slow: no message taken for {self._watch_stall * 1000:.0f} "
                        f"ms; resume after {last or 'the last cursor received'}",
                    )
                last = message.cursor
        except SessionAuthorityError as exc:
            await context.abort(status_for(exc), str(exc))
        except asyncio.CancelledError:
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            _log.exception("unexpected error")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    @read
    async def ValidateSessions(  # type: ignore[override]  # answers the encoded reply
        self, request: pb.ValidateSessionsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> bytes:
        """Answers the encoded ``ValidateSessionsResponse``: each answer's encoded
        ``ValidateSessionResponse`` (the memo ``ValidateSession`` uses, so an L1
        copy's reply is encoded once) framed as one element of ``results``."""

        async def work() -> bytes:
            answers = await self._core.validate_many(
                request.tokens, caller=lambda: caller_of(context)
            )
            memos, parts = self._wire, []
            for answer in answers:
                memo = memos.get(id(answer))
                if memo is not None and memo[0] is answer:
                    parts.append(memo[2])  # an L1 copy's answer: framed once
                else:
                    parts.append(_framed(self._encoded(answer)))
            return b"".join(parts)

        return await run_call(context, work)


def caller_of(context: grpc.aio.ServicerContext[object, object]) -> str:
    """The caller's address without its port, one spelling per address
    (``peers.peer_address``: an IPv4 caller on a dual-stack socket is its IPv4
    address): what the per-caller limits count by. Behind a proxy that is the proxy."""
    return peer_address(context.peer())


#: Seconds before the caller's deadline at which the work is given up (at most
#: a tenth of the time left, so a short deadline keeps most of it).
_DEADLINE_MARGIN_MAX = 0.005


async def run_call(
    context: grpc.aio.ServicerContext[object, object], work: Callable[[], Awaitable[T]]
) -> T:
    """Bound ``work`` by the caller's deadline and map core errors to statuses.

    The deadline cancels the work, so no Redis or Postgres call outlives it
    (a cancelled asyncpg query is cancelled on the server too)."""
    remaining: float | None = context.time_remaining()  # None: no deadline (the stubs omit it)
    try:
        if remaining is None:  # no deadline: no timer to arm and cancel on every call
            return await work()
        # Answer a little before the caller's deadline: a reply racing the
        # caller's own cancellation makes grpc log an ExecuteBatchError.
        margin = min(_DEADLINE_MARGIN_MAX, remaining / 10)
        async with asyncio.timeout(remaining - margin):
            return await work()
    except TimeoutError:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
    except SessionAuthorityError as exc:
        await context.abort(status_for(exc), str(exc))
    except asyncio.CancelledError:
        raise
    except Exception:
        _log.exception("unexpected error")
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")
    raise AssertionError("unreachable: context.abort raises")
