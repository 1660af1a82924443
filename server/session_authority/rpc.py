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

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeAlias, runtime_checkable

import grpc

__all__ = [
    "Behavior",
    "DecoratedGeneric",
    "DecoratingServer",
    "Handler",
    "HandlerDecorator",
    "UnaryDecorator",
    "WrappingInterceptor",
    "split_chain",
    "split_method",
]

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
        (``HandlerDecorator``, ``DecoratingServer``)."""
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


@runtime_checkable
class HandlerDecorator(Protocol):
    """An interceptor that can also wrap a method's handler once, when it is
    registered (``WrappingInterceptor``s: drain, auth; ``RpcMetricsInterceptor``)."""

    def decorate(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]: ...


class DecoratingServer:
    """Stands for the server while the generated ``add_*Servicer_to_server``
    functions register their handlers, and registers each one decorated by
    ``decorators`` (the first outermost). grpc.aio runs every interceptor's
    ``intercept_service`` on every call (measured with h2load: two of them
    cost ~45 us a call, a fifth of what the framework itself takes); a
    handler decorated at registration costs only its wrapper. Registered
    handlers take precedence over the generic ones registered beside them.
    Per-call interceptors (tracing) still run outside the decorated ones."""

    def __init__(self, server: grpc.aio.Server, decorators: list[HandlerDecorator]) -> None:
        self._server = server
        self._decorators = decorators

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        # Decorated too: a method served by a generic handler (reflection, or one
        # grpc matches there) must not skip authorisation or the drain.
        self._server.add_generic_rpc_handlers(
            [DecoratedGeneric(h, self._decorators) for h in handlers]
        )

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        decorated = {}
        for name, handler in handlers.items():
            for decorator in reversed(self._decorators):
                handler = decorator.decorate(f"/{service}/{name}", handler)
            decorated[name] = handler
        self._server.add_registered_method_handlers(service, decorated)


class DecoratedGeneric(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, decorators: list[HandlerDecorator]) -> None:
        self._inner = inner
        self._decorators = decorators
        self._done: dict[str, tuple[object, grpc.RpcMethodHandler[Any, Any]]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        done = self._done.get(method)
        if done is not None and done[0] is handler:
            return done[1]
        decorated = handler
        for decorator in reversed(self._decorators):
            decorated = decorator.decorate(method, decorated)
        self._done[method] = (handler, decorated)
        return decorated


def split_chain(
    chain: list[grpc.aio.ServerInterceptor],
) -> tuple[list[grpc.aio.ServerInterceptor], list[HandlerDecorator]]:
    """The per-call interceptors (run first, outermost) and the handler
    decorators (applied at registration, inside them), keeping ``chain``'s
    order: no per-call interceptor may come after a decorator."""
    per_call = [i for i in chain if not isinstance(i, HandlerDecorator)]
    decorators: list[HandlerDecorator] = [i for i in chain if isinstance(i, HandlerDecorator)]
    if chain != [*per_call, *decorators]:
        raise ValueError("per-call interceptors must come before handler decorators")
    return per_call, decorators
