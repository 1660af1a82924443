"""The gRPC servicer: decode, call the core, encode, map errors. Nothing else.

The plain unary RPCs are written in ``unary.py``, one method each, which this
class inherits; it writes only those that are not plain: ValidateSession and
ValidateSessions (the hot-path exception, ``handler.py``), Health (it names
this worker) and WatchRevocations (a stream).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

import grpc

from session_authority.core.domain import Validation
from session_authority.core.errors import Unavailable
from session_authority.core.service import SessionAuthority
from session_authority.transport.auth import declared, read, sensitive_read
from session_authority.transport.calls import abort_for, run_call
from session_authority.transport.mapping import health_to_pb, validation_to_pb, watch_item_to_pb
from session_authority.transport.peers import peer_address
from session_authority.transport.unary import UnaryRPCs
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

_log = logging.getLogger("session_authority.watch")

__all__ = ["SessionAuthorityServicer", "caller_of"]


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


_SERVICE = pb.DESCRIPTOR.services_by_name["SessionAuthority"]


class SessionAuthorityServicer(UnaryRPCs, pb_grpc.SessionAuthorityServicer):
    """Each RPC is declared ``@read``, ``@sensitive_read`` or ``@mutation``
    where it is written (here, or in ``unary.py``): that is who may call it
    (``access``); an RPC declared neither is denied to every caller."""

    @classmethod
    def access(cls) -> dict[str, str]:
        """``/session_authority.v1.SessionAuthority/Method`` -> ``read`` or
        ``mutation``, for every RPC of the service this class declares."""
        return dict(declared(cls, _SERVICE.full_name, (m.name for m in _SERVICE.methods)))

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
                    _log.warning(
                        "Watcher cut off (%s): no message taken for %.0f ms; resume after %s",
                        context.peer(),
                        self._watch_stall * 1000,
                        last or "its last cursor",
                    )
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"watcher too slow: no message taken for {self._watch_stall * 1000:.0f} "
                        f"ms; resume after {last or 'the last cursor received'}",
                    )
                last = message.cursor
        except Exception as exc:  # CancelledError is not one: it goes on
            await abort_for(context, exc)

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
