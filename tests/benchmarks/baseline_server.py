"""The benchmark's ceiling: a gRPC server on the same proto whose
ValidateSession handler only returns canned response bytes.

Same framework as ``serve``: grpc.aio with the same server options, the same
event loop (EVENT_LOOP) and the same workers (``session_authority.workers``:
forked before any gRPC object, one port with ``so_reuseport``). A generic
handler with no (de)serializers: grpc hands it the request's bytes and sends
the canned bytes back, so it does no protobuf work the framework would not.
No interceptors, no core, no Redis.

    python tests/benchmarks/baseline_server.py --port 50099 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from session_authority.bootstrap import server_options
from session_authority.config import Settings
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.workers import WorkerSlot, run_workers

METHOD = "/session_authority.v1.SessionAuthority/ValidateSession"


def canned_reply() -> bytes:
    """What a cache hit answers: a valid session, as the real server encodes it."""
    created = datetime.now(UTC)
    reply = pb.ValidateSessionResponse(valid=True, source=pb.SOURCE_CACHE)
    reply.session.session_id = "6f1c1f8e-2f0b-4c56-9a43-0f4a1e7b9d21"
    reply.session.user_id = "bench-user"
    reply.session.created_at.FromDatetime(created)
    reply.session.expires_at.FromDatetime(created + timedelta(hours=1))
    return reply.SerializeToString()


class _Canned(grpc.GenericRpcHandler):
    def __init__(self, reply: bytes) -> None:
        self._handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(
            self._answer
        )
        self._reply = reply

    async def _answer(self, request: bytes, context: Any) -> bytes:
        return self._reply

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self._handler if handler_call_details.method == METHOD else None


async def _serve(settings: Settings, reuse_port: bool) -> int:
    server = grpc.aio.server(
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        options=server_options(settings, reuse_port=reuse_port),
    )
    server.add_generic_rpc_handlers((_Canned(canned_reply()),))
    if server.add_insecure_port(f"{settings.host}:{settings.port}") == 0:
        print(f"cannot bind {settings.host}:{settings.port}", file=sys.stderr)
        return 1
    await server.start()
    print(f"baseline listening on {settings.host}:{settings.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)
    return 0


def _run(settings: Settings, reuse_port: bool) -> int:
    factory = None
    if settings.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_serve(settings, reuse_port))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    settings = Settings(host="127.0.0.1", port=args.port, admin_port=0, shutdown_grace_seconds=1)
    if args.workers == 1:
        return _run(settings, reuse_port=False)

    def one(slot: WorkerSlot) -> int:
        return _run(settings, reuse_port=True)

    return run_workers(settings, args.workers, one)


if __name__ == "__main__":
    sys.exit(main())
