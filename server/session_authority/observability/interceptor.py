"""``RpcMetricsInterceptor``: per-RPC duration and status code, nothing else;
and ``UnaryDecorator``, its base (and the server spans').

It never reads requests or replies (what ValidateSession answered is
reported by the core, through ``CoreMetrics.validated``). Only unary-unary
methods are measured (every SessionAuthority RPC and grpc.health.v1 Check);
streaming ones (health Watch, reflection) pass through untouched.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from session_authority.observability.metrics import Cell, Instruments

__all__ = ["RpcMetricsInterceptor", "UnaryDecorator"]

# Strings: grpc's classes are generic only in its type stubs.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any] | None"
Behavior: TypeAlias = "Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]"


def _split(method: str) -> tuple[str, str]:
    """``/package.Service/Method`` as (``package.Service``, ``Method``)."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service or "unknown", name or "unknown"


def _code_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    code: object = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN.name


class UnaryDecorator(grpc.aio.ServerInterceptor):
    """Wraps a unary-unary method's behaviour, once per method: as a handler
    decorator at registration (``decorate``; bootstrap's ``DecoratingServer``),
    or, in a server that takes only interceptors, on the first call (the
    wrapper is reused on every later one). Streaming methods pass through."""

    def __init__(self) -> None:
        # method -> (inner handler, our wrapper): built once per method, not per call.
        self._wrapped: dict[str, tuple[object, grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        cached = self._wrapped.get(handler_call_details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.decorate(handler_call_details.method, handler)
        self._wrapped[handler_call_details.method] = (handler, wrapped)
        return wrapped

    def decorate(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """What ``intercept_service`` answers for ``handler`` of ``method``
        (``/package.Service/Method``), made once: the composition root
        registers it so, and the server then pays no interception per call."""
        if handler.unary_unary is None:
            return handler
        service, name = _split(method)
        # The stubs type the behaviour as a sync handler; in grpc.aio it is a coroutine.
        behavior: Behavior = handler.unary_unary  # type: ignore[assignment]
        return grpc.unary_unary_rpc_method_handler(
            self._wrap(behavior, service, name),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap(self, behavior: Behavior, service: str, method: str) -> Behavior:
        raise NotImplementedError


class RpcMetricsInterceptor(UnaryDecorator):
    def __init__(self, instruments: Instruments) -> None:
        super().__init__()
        self._i = instruments

    def _wrap(self, behavior: Behavior, service: str, method: str) -> Behavior:
        # Labelled children looked up once per method (and status code), not per call.
        observe = self._i.rpc_duration.labels(service, method).observe
        handled = self._i.rpc_handled
        ok = handled.labels(service, method, grpc.StatusCode.OK.name)
        failed: dict[str, Cell] = {}

        def count_failed(code: str) -> None:
            child = failed.get(code)
            if child is None:
                child = failed[code] = handled.labels(service, method, code)
            child.inc()

        async def measured(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            try:
                reply = await behavior(request, context)
            except asyncio.CancelledError:
                observe(time.perf_counter() - started)
                count_failed(grpc.StatusCode.CANCELLED.name)
                raise
            except Exception:
                observe(time.perf_counter() - started)
                count_failed(_code_of(context))  # context.abort raised; the code is set
                raise
            observe(time.perf_counter() - started)
            ok.value += 1  # Cell.inc without the call
            return reply

        return measured
