"""``AdmissionGate``: every call is authorised and given a slot from its
metadata and connection *before* its request message is read.

Invariant: a caller without credentials can never take a slot of the
authenticated budget. Calls are counted in two budgets of this process:
``authenticated`` (calls with a valid API key or client certificate, and on a
server with no authentication configured every non-public call; the
``MAX_CONCURRENT_RPCS`` of old) and ``public`` (calls of the public services,
health and reflection, and anonymous reads, from callers without
credentials; ``MAX_PUBLIC_RPCS`` in all, ``MAX_PUBLIC_RPCS_PER_PEER`` from one
address). A call beyond its budget ends at once with RESOURCE_EXHAUSTED; a
call refused by authorisation ends at once, holding no slot; a call whose
request message has not arrived ``idle`` seconds after it was admitted ends
with UNAVAILABLE, freeing its slot.

Why a gate and not grpc's ``maximum_concurrent_rpcs``: that is one budget for
every call from its arrival, public health streams included, and grpc.aio
reads a unary method's request message before any handler (or decorator)
runs, so authorisation could only follow it: a caller that opens streams and
never sends a message, or holds ``Health/Watch`` streams, held every slot.
The gate registers each request-unary method as request-streaming
(unary-unary as stream-unary, unary-stream as stream-stream; the wire is the
same, clients see no difference): grpc then calls it as soon as the call's
headers arrive, with the context (metadata, peer, certificate) and the unread
request stream. The gate decides, takes a slot, reads the one request message
within the idle bound and calls the method's own behaviour on it. grpc's own
limit is off; each connection is bounded by ``grpc.max_concurrent_streams``
(bootstrap's ``server_options``).

Long-lived reply streams of authenticated callers (WatchRevocations, named in
``stream_methods``) take their slot from a budget of their own, ``streams``
(``WATCH_MAX_WATCHERS``): a thousand watchers must not hold the slots unary
calls need, nor unary load keep a watcher out.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, TypeAlias

import grpc

from session_authority.transport.auth import Authoriser
from session_authority.transport.peers import peer_address
from session_authority.transport.wrapping import Handler, WrappingInterceptor

__all__ = ["AdmissionGate", "Budget", "Shed"]

Shed: TypeAlias = Literal["authenticated_full", "public_full", "peer_full", "streams_full", "idle"]
"""Why the gate ended a call; the ``reason`` label of ``session_authority_rpc_shed_total``."""

#: The one table from a refusal to its status and the message the caller sees.
_STATUS: dict[Shed, tuple[grpc.StatusCode, str]] = {
    "authenticated_full": (grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!"),
    "public_full": (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "too many calls without credentials; present an API key or client certificate",
    ),
    "peer_full": (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "too many calls without credentials from this address",
    ),
    "streams_full": (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "too many WatchRevocations streams on this server process (WATCH_MAX_WATCHERS)",
    ),
    "idle": (grpc.StatusCode.UNAVAILABLE, "request message not received within {idle_ms} ms"),
}
_NO_MESSAGE = "request: no message received"

Ctx: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class Budget:
    """Concurrent calls: at most ``limit`` in all and, when ``per_peer`` is
    given, at most that many from one address."""

    def __init__(
        self, limit: int, per_peer: int | None = None, *, full: Shed | None = None
    ) -> None:
        """``full``: the refusal this budget answers when full (by default
        ``public_full`` with a per-peer bound, else ``authenticated_full``)."""
        self.limit = limit
        self._full: Shed = full or ("public_full" if per_peer is not None else "authenticated_full")
        self.per_peer = per_peer
        self.in_use = 0
        self._peers: dict[str, int] = {}

    def enter(self, peer: str) -> Shed | None:
        """Takes a slot (None), or says why there is none."""
        if self.in_use >= self.limit:
            return self._full
        if self.per_peer is not None:
            held = self._peers.get(peer, 0)
            if held >= self.per_peer:
                return "peer_full"
            self._peers[peer] = held + 1
        self.in_use += 1
        return None

    def leave(self, peer: str) -> None:
        self.in_use -= 1
        if self.per_peer is not None:
            held = self._peers[peer] - 1
            if held:
                self._peers[peer] = held
            else:
                del self._peers[peer]


class AdmissionGate(WrappingInterceptor):
    """Authorisation, budgets and the idle bound, before the request is read.
    Registered as the outermost handler decorator: the handlers it returns are
    the ones grpc calls."""

    def __init__(
        self,
        authoriser: Authoriser,
        *,
        authenticated: Budget,
        public: Budget,
        idle: float,
        streams: Budget | None = None,
        stream_methods: frozenset[str] = frozenset(),
        on_refused: Callable[[str, Shed, grpc.StatusCode], None] = lambda m, r, c: None,
    ) -> None:
        super().__init__()
        self._auth = authoriser
        self.authenticated = authenticated
        self.public = public
        #: Long-lived reply streams (WatchRevocations) of authenticated callers
        #: count here, not in ``authenticated``: they must not hold unary slots.
        self.streams = streams
        self._stream_methods = stream_methods if streams is not None else frozenset()
        self._idle = idle
        self._idle_message = _STATUS["idle"][1].format(idle_ms=round(idle * 1000))
        self._on_refused = on_refused

    async def _admit(self, method: str, context: Ctx) -> tuple[Budget, str]:
        """The budget whose slot the call now holds, and the peer it counts
        under; or the call is aborted (``context.abort`` raises)."""
        policy = self._auth.policy
        if not policy.enforced:
            budget = self.public if policy.is_public_service(method) else self.authenticated
        else:
            caller = await self._auth.authorise(method, context)
            budget = self.authenticated if caller.authenticated else self.public
        if budget is self.authenticated and method in self._stream_methods:
            assert self.streams is not None
            budget = self.streams
        peer = peer_address(context.peer()) if budget is self.public else ""
        refusal = budget.enter(peer)
        if refusal is not None:
            await self._refuse(method, context, refusal)
        return budget, peer

    async def _refuse(self, method: str, context: Ctx, refusal: Shed) -> None:
        code, message = _STATUS[refusal]
        self._on_refused(method, refusal, code)
        await context.abort(code, self._idle_message if refusal == "idle" else message)

    async def _first(self, method: str, requests: AsyncIterator[Any], context: Ctx) -> Any:
        """The call's one request message, within the idle bound."""
        try:
            async with asyncio.timeout(self._idle):
                return await anext(requests)
        except TimeoutError:
            await self._refuse(method, context, "idle")
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _NO_MESSAGE)
        raise AssertionError("context.abort returned")  # pragma: no cover

    def _wrap(self, handler: Handler, method: str) -> Handler:
        # The stubs type the behaviours as sync handlers; in grpc.aio they are
        # coroutines or async generators.
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary), **codec
            )
        if handler.unary_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(method, handler.unary_stream, read_first=True), **codec
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(method, handler.stream_unary, read_first=False), **codec
            )
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(method, handler.stream_stream, read_first=False), **codec
        )

    def _unary(self, method: str, inner: Any, *, read_first: bool = True) -> Any:
        admit, first = self._admit, self._first

        async def admitted(requests: AsyncIterator[Any], context: Ctx) -> Any:
            budget, peer = await admit(method, context)
            try:
                request = await first(method, requests, context) if read_first else requests
                return await inner(request, context)
            finally:
                budget.leave(peer)

        return admitted

    def _streaming(self, method: str, inner: Any, *, read_first: bool) -> Any:
        """A reply stream: an async generator (grpc.aio writes what it yields),
        or a coroutine that writes with ``context.write`` (grpc's health Watch)."""
        admit, first = self._admit, self._first

        if inspect.isasyncgenfunction(inner):

            async def admitted_stream(
                requests: AsyncIterator[Any], context: Ctx
            ) -> AsyncIterator[Any]:
                budget, peer = await admit(method, context)
                try:
                    request = await first(method, requests, context) if read_first else requests
                    async for reply in inner(request, context):
                        yield reply
                finally:
                    budget.leave(peer)

            return admitted_stream

        # A coroutine that writes its replies (grpc's health Watch) is admitted
        # as a unary behaviour is: what it returns is not a reply.
        return self._unary(method, inner, read_first=read_first)
