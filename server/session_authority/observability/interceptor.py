"""``RpcMetricsInterceptor``: per-RPC duration and status code, nothing else.
A ``UnaryDecorator`` (``session_authority.rpc``): wrapped once per method.

It never reads requests or replies (what ValidateSession answered is
reported by the core, through ``CoreMetrics.validated``). Only unary-unary
methods are measured (every SessionAuthority RPC and grpc.health.v1 Check);
streaming ones (health Watch, reflection) pass through untouched.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from session_authority.observability.metrics import Cell, Instruments
from session_authority.rpc import Behavior, UnaryDecorator

__all__ = ["RpcMetricsInterceptor"]


def _code_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    code: object = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN.name


class RpcMetricsInterceptor(UnaryDecorator):
    def __init__(self, instruments: Instruments) -> None:
        super().__init__()
        self._i = instruments

    def _wrap_unary(self, behavior: Behavior, service: str, method: str) -> Behavior:
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
