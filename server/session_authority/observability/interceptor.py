"""``RpcMetricsInterceptor``: per-RPC duration and status code, nothing else.

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

from session_authority.observability.metrics import Instruments

__all__ = ["RpcMetricsInterceptor"]

# Strings: grpc's classes are generic only in its type stubs.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any] | None"
Behavior: TypeAlias = "Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]"


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return service or "unknown", name or "unknown"


def _code_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    code: object = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN.name


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, instruments: Instruments) -> None:
        self._i = instruments
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
        service, method = _split(handler_call_details.method)
        # The stubs type the behaviour as a sync handler; in grpc.aio it is a coroutine.
        behavior: Behavior = handler.unary_unary  # type: ignore[assignment]
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._wrap(behavior, service, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._wrapped[handler_call_details.method] = (handler, wrapped)
        return wrapped

    def _wrap(self, behavior: Behavior, service: str, method: str) -> Behavior:
        duration = self._i.rpc_duration.labels(service, method)

        async def measured(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK.name
            try:
                return await behavior(request, context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED.name
                raise
            except Exception:
                code = _code_of(context)  # context.abort raised; the code is set
                raise
            finally:
                duration.observe(time.perf_counter() - started)
                self._i.rpc_handled.labels(service, method, code).inc()

        return measured
