"""grpc.aio handler wrapping, once per method: the one copy of that machinery.

Every cross-cutting concern of a call (the drain, authorisation, RPC metrics,
server spans) is a ``WrappingInterceptor``: it wraps a method's handler once
and reuses the wrapper on every later call, so the hot path builds nothing.
Registered through ``decorate`` (bootstrap's ``DecoratingServer``) it is no
interceptor at all: the wrapper is the registered handler, and grpc.aio runs
no ``intercept_service`` per call. ``UnaryDecorator`` is the same for
concerns that wrap only unary-unary behaviours.

This module sits low in the layering (a contract in pyproject.toml): it
imports grpc and nothing of ours, so the transport and observability, which
may not import each other, both build on it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc

__all__ = ["Behavior", "Handler", "UnaryDecorator", "WrappingInterceptor", "split_method"]

# Strings: grpc's classes are generic only in its type stubs.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
#: A unary-unary behaviour as grpc.aio runs it: a coroutine function.
Behavior: TypeAlias = "Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]"


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the handler of each method it ``_applies`` to with ``_wrap``, once."""

    def __init__(self) -> None:
        # method -> (inner handler, our wrapper): built once per method, not per call.
        self._wrapped: dict[str, tuple[object, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self._applies(handler, method):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def decorate(self, method: str, handler: Handler) -> Handler:
        """What ``intercept_service`` answers for ``handler`` of ``method``
        (``/package.Service/Method``), made once: the composition root
        registers it so, and the server then pays no interception per call
        (bootstrap's ``HandlerDecorator``)."""
        return self._wrap(handler, method) if self._applies(handler, method) else handler

    def _applies(self, handler: Handler, method: str) -> bool:
        """Whether this method's calls go through the wrapper at all."""
        return True

    def _wrap(self, handler: Handler, method: str) -> Handler:
        raise NotImplementedError


def split_method(method: str) -> tuple[str, str]:
    """``/package.Service/Method`` as (``package.Service``, ``Method``)."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service or "unknown", name or "unknown"


class UnaryDecorator(WrappingInterceptor):
    """Wraps a unary-unary method's behaviour (``_wrap_unary``), once per
    method; streaming methods (health Watch, reflection) pass through."""

    def _applies(self, handler: Handler, method: str) -> bool:
        return handler.unary_unary is not None

    def _wrap(self, handler: Handler, method: str) -> Handler:
        service, name = split_method(method)
        # The stubs type the behaviour as a sync handler; in grpc.aio it is a coroutine.
        behavior: Behavior = handler.unary_unary  # type: ignore[assignment]
        return grpc.unary_unary_rpc_method_handler(
            self._wrap_unary(behavior, service, name),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap_unary(self, behavior: Behavior, service: str, method: str) -> Behavior:
        raise NotImplementedError
