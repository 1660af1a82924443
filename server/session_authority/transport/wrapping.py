"""``WrappingInterceptor``: a server interceptor that wraps a method's handler
once and reuses the wrapper on every later call (the hot path builds nothing);
or, registered through ``decorate``, no interceptor at all: the wrapper is the
registered handler."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc

__all__ = ["WrappingInterceptor"]

# A string: grpc's classes are generic only in its type stubs.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class WrappingInterceptor(grpc.aio.ServerInterceptor):
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
        """What ``intercept_service`` answers for ``handler`` of ``method``,
        made once: the composition root registers it so, and the server then
        pays no interception on every call (bootstrap's ``HandlerDecorator``)."""
        return self._wrap(handler, method) if self._applies(handler, method) else handler

    def _applies(self, handler: Handler, method: str) -> bool:
        """Whether this method's calls go through the wrapper at all."""
        return True

    def _wrap(self, handler: Handler, method: str) -> Handler:
        raise NotImplementedError
