"""The SessionAuthority service as gRPC sees it: every request decoded here.

grpc's generated ``add_SessionAuthorityServicer_to_server`` decodes requests
before any of our code runs, and a request that does not parse (random bytes,
invalid UTF-8 in a string field) then ends as ``UNKNOWN`` "Unexpected
DecodeError": the framework's fallback, not an answer. Here the service is
registered with an identity request deserializer, and ``_decoding`` parses the
bytes inside the call, so that such a request is refused as
``INVALID_ARGUMENT`` "request: not a valid <message>", for every RPC alike.
The method names, and the reply serializers, come from the proto descriptor,
so an RPC added to the proto is covered without a change here.

Unknown fields are ignored (a newer client's fields must not break an older
server); invalid UTF-8 in a ``string`` field is a decode error (proto3).

**The one hot-path exception: raw bytes in, pre-encoded bytes out.** Everything
else is plain grpc.aio (handlers wrapped once by ``session_authority.rpc``),
OpenTelemetry and prometheus_client. ValidateSession alone (``PRE_ENCODED``)
first offers the request's bytes, undecoded, to the servicer's synchronous
answer (``SessionAuthorityServicer.validate_cached``: an L1 hit), which
answers the reply's bytes, encoded once per L1 copy, with no coroutine and
no decoding. Why: inside a loaded server every Python call costs several
times what it does in a loop, and this path is most of the traffic (the
measurements are in the servicer's and ``Validator.validate_local``'s
docstrings). It lives here and in ``validate_cached``, nowhere else, but for
ValidateSessions (also ``PRE_ENCODED``), whose reply is the same encoded
answers, each framed as one element of ``results`` (``servicer._framed``): a
batch of 100 L1 hits then costs 100 dictionary reads, not 100 messages built.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from session_authority.transport.servicer import SessionAuthorityServicer
from session_authority.v1 import session_authority_pb2 as pb

__all__ = ["PRE_ENCODED", "SERVICE_DESCRIPTOR", "SERVICE_NAME", "add_to_server"]

_SERVICE = SERVICE_DESCRIPTOR = pb.DESCRIPTOR.services_by_name["SessionAuthority"]
SERVICE_NAME = _SERVICE.full_name
#: Methods whose servicer answers the reply's bytes (encoded once per L1 copy).
PRE_ENCODED = frozenset({"ValidateSession", "ValidateSessions"})

Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


def _decoding(
    request_type: type[Message],
    method: Behavior,
    at_once: Callable[[Any], bytes | None] | None = None,
) -> Behavior:
    """``method`` on the decoded request; ``at_once`` first, on the bytes as
    received, when the servicer can answer some requests without awaiting (an
    L1 hit): its reply is sent as is, and nothing is decoded or awaited."""
    refusal = f"request: not a valid {request_type.DESCRIPTOR.full_name}"

    async def decoded(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if at_once is not None and (reply := at_once(raw)) is not None:
            return reply
        try:
            request = request_type.FromString(raw)
        except DecodeError:
            # The parser's own message may quote the bytes; ours names the message only.
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)
        return await method(request, context)

    return decoded


def _method_handlers(
    servicer: SessionAuthorityServicer,
) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    at_once = servicer.synchronous_answers()
    for method in _SERVICE.methods:
        request_type: type[Message] = getattr(pb, method.input_type.name)
        reply_type: type[Message] = getattr(pb, method.output_type.name)
        behavior: Behavior = getattr(servicer, method.name)
        # A server-streaming method is a coroutine writing its replies (context.write).
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            _decoding(request_type, behavior, at_once.get(method.name)),
            request_deserializer=None,  # the bytes as received
            response_serializer=(
                None if method.name in PRE_ENCODED else reply_type.SerializeToString
            ),
        )
    return handlers


def add_to_server(servicer: SessionAuthorityServicer, server: grpc.aio.Server) -> None:
    """Register the service as the generated ``add_..._to_server`` does (a generic
    handler, and the same handlers as registered methods, which grpc matches first),
    with our decoding handlers."""
    handlers = _method_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
