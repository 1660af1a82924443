"""The gRPC server's options and its handlers decorated once at registration."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import grpc

from session_authority.config import Settings

__all__ = [
    "DecoratedGeneric",
    "DecoratingServer",
    "HandlerDecorator",
    "listen_address",
    "server_options",
    "split_chain",
]


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


def server_options(settings: Settings, *, reuse_port: bool = False) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments. ``max_connection_age`` sends
    long-lived client connections a GOAWAY now and then: the kernel spreads
    connections, not calls, over workers (and a load balancer over replicas),
    so a client that never reconnects would stay wherever it first landed."""
    options = [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.max_receive_message_length", 64 * 1024),
        # Per connection; the admission gate bounds calls per process and per peer.
        ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
    ]
    if settings.grpc_max_connection_age_ms:
        options += [
            ("grpc.max_connection_age_ms", settings.grpc_max_connection_age_ms),
            ("grpc.max_connection_age_grace_ms", settings.grpc_max_connection_age_grace_ms),
        ]
    if reuse_port:
        options.append(("grpc.so_reuseport", 1))
    return options


def listen_address(host: str, port: int) -> str:
    """``host:port`` as gRPC parses it: an IPv6 literal in brackets
    (``[::]:50051``; ``:::50051`` does not bind)."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"
