"""Envoy's external authorization (``envoy.service.auth.v3.Authorization/Check``),
served on the gRPC port beside SessionAuthority, for Envoy and Istio.

Three answers, and which is which is the point:

* **OK** (``google.rpc.Code.OK``): the token names a live session. The
  upstream request gets the user id and session id headers (``GatewayPolicy``),
  set with ``OVERWRITE_IF_EXISTS_OR_ADD``, so a value the client sent under
  those names is replaced, never passed on. (They are not also listed in
  ``headers_to_remove``: Envoy applies removals after the headers it sets,
  which would drop ours.)
* **Denied** (``PERMISSION_DENIED`` with an HTTP 401): no token, a malformed
  one, or one that is unknown, expired or revoked. The 401 carries a
  ``WWW-Authenticate`` challenge and no body that could echo the token.
* **A gRPC error status** (``UNAVAILABLE``, ``RESOURCE_EXHAUSTED``,
  ``DEADLINE_EXCEEDED``): the service cannot know (Postgres down and no copy
  to trust, breakers open, the caller's unknown-token budget spent). Envoy
  then applies its ``failure_mode_allow``; we never allow silently.

It validates through the same core path as ValidateSession (L1, Redis,
Postgres, revocation rules, the unknown-token limit per caller: here the
caller is the Envoy that asks), bounded by the call's deadline, behind the
same admission gate and authorisation (``Check`` is a ``@read``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as authz_pb
from envoy.type.v3 import http_status_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from session_authority.core.errors import InvalidArgument
from session_authority.core.service import SessionAuthority
from session_authority.transport.auth import declared, read
from session_authority.transport.calls import run_call
from session_authority.transport.gateway import GatewayPolicy
from session_authority.transport.servicer import caller_of

__all__ = ["EXT_AUTHZ_DESCRIPTOR", "EXT_AUTHZ_SERVICE", "ExtAuthzServicer", "add_ext_authz"]

EXT_AUTHZ_DESCRIPTOR = authz_pb.DESCRIPTOR.services_by_name["Authorization"]
EXT_AUTHZ_SERVICE: str = EXT_AUTHZ_DESCRIPTOR.full_name
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_REFUSAL = f"request: not a valid {authz_pb.CheckRequest.DESCRIPTOR.full_name}"


class ExtAuthzServicer:
    """``Check``, declared ``@read`` like ValidateSession: with authentication
    configured, Envoy needs a credential (mTLS, or an API key in its
    ``grpc_service.initial_metadata``) as any reader does."""

    @classmethod
    def access(cls) -> dict[str, str]:
        return dict(
            declared(cls, EXT_AUTHZ_SERVICE, (m.name for m in EXT_AUTHZ_DESCRIPTOR.methods))
        )

    def __init__(self, core: SessionAuthority, policy: GatewayPolicy) -> None:
        self._core = core
        self._policy = policy
        self._denied = _denied()

    @read
    async def Check(self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        """The encoded ``CheckResponse`` for the encoded ``CheckRequest``."""
        try:
            request = authz_pb.CheckRequest.FromString(raw)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _REFUSAL)
        token = self._policy.token_from(_headers(request))

        async def work() -> bytes:
            if token is None:
                return self._denied
            try:
                answer = await self._core.validate(token, caller=lambda: caller_of(context))
            except InvalidArgument:  # not a token we could have issued: not a session
                return self._denied
            if not answer.valid or answer.session is None:
                return self._denied
            return bytes(_ok(self._policy.identity(answer.session)).SerializeToString())

        return await run_call(context, work)


def _headers(request: Any) -> Mapping[str, str]:
    """The forwarded request's headers, lower-case names: Envoy sends
    ``headers`` (repeated ones joined by commas; cookies by ``; ``), or
    ``header_map`` with ``encode_raw_headers`` set."""
    http = request.attributes.request.http
    headers: dict[str, str] = dict(http.headers)
    for entry in http.header_map.headers:
        value = entry.raw_value.decode("latin-1") if entry.raw_value else entry.value
        key = entry.key.lower()
        headers[key] = f"{headers[key]}; {value}" if key == "cookie" and key in headers else value
    return headers


def _ok(identity: list[tuple[str, str]]) -> Any:
    reply = authz_pb.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))
    for name, value in identity:
        reply.ok_response.headers.add(
            header=base_pb2.HeaderValue(key=name, value=value), append_action=_OVERWRITE
        )
    return reply


def _denied() -> bytes:
    reply = authz_pb.CheckResponse(
        status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message="no valid session")
    )
    denied = reply.denied_response
    denied.status.code = http_status_pb2.Unauthorized
    denied.headers.add(header=base_pb2.HeaderValue(key="www-authenticate", value="Bearer"))
    denied.headers.add(header=base_pb2.HeaderValue(key="cache-control", value="no-store"))
    return bytes(reply.SerializeToString())


def add_ext_authz(servicer: ExtAuthzServicer, server: grpc.aio.Server) -> None:
    """Register ``Check`` as the generated ``add_..._to_server`` does, with
    the bytes as received (decoded in the call: garbage is INVALID_ARGUMENT)
    and the reply pre-encoded."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Check": grpc.unary_unary_rpc_method_handler(
            servicer.Check, request_deserializer=None, response_serializer=None
        )
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(EXT_AUTHZ_SERVICE, handlers),)
    )
    server.add_registered_method_handlers(EXT_AUTHZ_SERVICE, handlers)
