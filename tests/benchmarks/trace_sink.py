"""A local trace collector for the benchmark: accepts OTLP/gRPC trace exports
and counts them. It keeps the payloads and decodes them only when asked to
stop (SIGTERM), so it takes as little CPU as it can from the server measured.

    python tests/benchmarks/trace_sink.py --port 4317 --report out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class _Sink(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self._handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(
            self._export
        )

    async def _export(self, request: bytes, context: Any) -> bytes:
        self.payloads.append(request)
        return b""  # an empty ExportTraceServiceResponse: everything accepted

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self._handler if handler_call_details.method == EXPORT else None


def _count(payloads: list[bytes]) -> dict[str, int]:
    spans = 0
    names: dict[str, int] = {}
    for payload in payloads:
        request = ExportTraceServiceRequest.FromString(payload)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                spans += len(scope.spans)
                for span in scope.spans:
                    names[span.name] = names.get(span.name, 0) + 1
    return {"exports": len(payloads), "spans": spans, **{f"span:{k}": v for k, v in names.items()}}


async def _main(port: int) -> list[bytes]:
    sink = _Sink()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    server.add_generic_rpc_handlers((sink,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"trace sink listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)
    return sink.payloads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args()
    payloads = asyncio.run(_main(args.port))
    args.report.write_text(json.dumps(_count(payloads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
