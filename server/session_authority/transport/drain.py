"""Graceful drain: refuse new calls with UNAVAILABLE and let running ones finish.

grpc.aio's ``server.stop(grace)`` answers calls that reach the server after
shutdown began, but were not yet picked up by a handler, with CANCELLED
(grpc/grpc#41785), which clients must not retry blindly. So shutdown drains
first: while draining, this interceptor answers every new call UNAVAILABLE
(retryable, "try another replica"), waits for the running ones, then waits
until no call has arrived for ``quiet`` seconds (so calls already on the wire
reach a handler and are refused cleanly), and only then is the server stopped.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from session_authority.rpc import WrappingInterceptor

__all__ = ["DrainInterceptor"]

_DRAINING = "server is shutting down; retry on another replica"
#: Seconds between looks at the calls still running while draining.
_POLL = 0.005


class DrainInterceptor(WrappingInterceptor):
    def __init__(self, quiet: float = 0.1) -> None:
        super().__init__()
        self.draining = False
        self.in_flight = 0
        self.refused = 0
        self._quiet = quiet
        self._last_arrival = 0.0

    def _applies(self, handler: grpc.RpcMethodHandler[Any, Any], method: str) -> bool:
        return handler.unary_unary is not None  # streaming (reflection, health Watch): not counted

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        inner = handler.unary_unary
        assert inner is not None

        async def counted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            self._last_arrival = time.monotonic()
            if self.draining:
                self.refused += 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, _DRAINING)
            self.in_flight += 1  # a count, no Event: ``drain`` polls it, calls pay nothing
            try:
                return await inner(request, context)  # type: ignore[arg-type]  # aio handler
            finally:
                self.in_flight -= 1

        return grpc.unary_unary_rpc_method_handler(
            counted,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def drain(self, grace: float) -> bool:
        """Start refusing new calls; True when the running ones finished and
        the wire went quiet within ``grace`` seconds."""
        self.draining = True
        deadline = time.monotonic() + grace
        while self.in_flight:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL)
        while (quiet_for := time.monotonic() - self._last_arrival) < self._quiet:
            if time.monotonic() + self._quiet - quiet_for > deadline:
                return self.in_flight == 0
            await asyncio.sleep(self._quiet - quiet_for)
        return self.in_flight == 0
