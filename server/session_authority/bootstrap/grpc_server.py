"""The gRPC server's options. Handlers decorated once at registration
(``DecoratingServer`` and its kin) live in ``session_authority.rpc``, with the
wrap-once machinery they register; they are importable from here too."""

from __future__ import annotations

from session_authority.config import Settings
from session_authority.rpc import DecoratedGeneric, DecoratingServer, HandlerDecorator, split_chain

__all__ = [
    "DecoratedGeneric",
    "DecoratingServer",
    "HandlerDecorator",
    "listen_address",
    "server_options",
    "split_chain",
]


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
