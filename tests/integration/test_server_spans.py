"""``ServerSpans`` on a real grpc.aio server (loopback, a private tracer provider):
the sampler decides each call once, a dropped call runs with nothing attached,
a sampled one has its span current, and the span's attributes and status
follow the RPC conventions. The full server's span trees are in
test_observability.py; this file needs no Redis or Postgres."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import pytest_asyncio
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    DEFAULT_OFF,
    Decision,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanKind, StatusCode

from session_authority.bootstrap.grpc_server import DecoratingServer
from session_authority.observability.server_spans import ServerSpans

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

SERVICE = "test.Echo"
METHOD = f"/{SERVICE}/Call"


class EveryOther(Sampler):
    """A sampler of its own (so not one ``pure_sampler`` trusts): samples
    every other call it is asked about, and counts the questions."""

    def __init__(self) -> None:
        self.asked = 0

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        self.asked += 1
        return SamplingResult(Decision.RECORD_AND_SAMPLE if self.asked % 2 else Decision.DROP)

    def get_description(self) -> str:
        return "EveryOther"


@dataclass
class Echo:
    """The handler: answers what the request asks (b"ok", or an abort with a
    code, or an exception) and notes the span current inside."""

    seen: list[trace.Span] = field(default_factory=list)

    async def call(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        self.seen.append(trace.get_current_span())
        if request.startswith(b"abort:"):
            code = grpc.StatusCode[request[6:].decode()]
            await context.abort(code, f"asked for {code.name}")
        if request == b"raise":
            raise RuntimeError("boom")
        return b"ok"


@dataclass
class Served:
    channel: grpc.aio.Channel
    echo: Echo
    spans: InMemorySpanExporter

    async def call(self, request: bytes = b"", metadata: Sequence[tuple[str, str]] = ()) -> bytes:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(METHOD)
        return await call(request, metadata=tuple(metadata))

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[Any]:
    servers: list[grpc.aio.Server] = []
    channels: list[grpc.aio.Channel] = []

    async def start(sampler: Sampler) -> Served:
        provider = TracerProvider(sampler=sampler)
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        echo = Echo()
        server = grpc.aio.server()
        handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(
            echo.call
        )
        DecoratingServer(server, [ServerSpans(provider)]).add_registered_method_handlers(
            SERVICE, {"Call": handler}
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)]
        )
        channels.append(channel)
        return Served(channel, echo, exporter)

    yield start
    for channel in channels:
        await channel.close()
    for server in servers:
        await server.stop(None)


def _traceparent(sampled: bool) -> tuple[str, str, tuple[str, str]]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    flags = "01" if sampled else "00"
    return trace_id, parent_id, ("traceparent", f"00-{trace_id}-{parent_id}-{flags}")


async def test_a_dropped_call_runs_with_nothing_attached(serve: Any) -> None:
    """parentbased_always_off: a call without a sampled parent gets no span
    and none is current inside (the core then starts no child span); a
    caller's sampled trace is continued."""
    served: Served = await serve(DEFAULT_OFF)
    assert await served.call() == b"ok"
    _, _, unsampled = _traceparent(sampled=False)
    assert await served.call(metadata=[unsampled]) == b"ok"
    assert served.finished() == []
    assert [s.get_span_context().is_valid for s in served.echo.seen] == [False, False]

    trace_id, parent_id, sampled = _traceparent(sampled=True)
    assert await served.call(metadata=[sampled]) == b"ok"
    [span] = served.finished()
    assert span.name == METHOD and span.kind is SpanKind.SERVER
    assert span.context is not None and span.parent is not None
    assert trace.format_trace_id(span.context.trace_id) == trace_id
    assert trace.format_span_id(span.parent.span_id) == parent_id and span.parent.is_remote
    # Current inside the handler, and detached after it.
    inside = served.echo.seen[-1].get_span_context()
    assert (inside.trace_id, inside.span_id) == (span.context.trace_id, span.context.span_id)
    assert not trace.get_current_span(context_api.get_current()).get_span_context().is_valid


async def test_a_malformed_traceparent_starts_a_new_trace(serve: Any) -> None:
    """A caller's broken header is no parent and no error: the call is a root."""
    served: Served = await serve(ALWAYS_ON)
    for header in ("00-zz-yy-01", "garbage", "00-" + "0" * 32 + "-" + "0" * 16 + "-01", "x" * 4000):
        assert await served.call(metadata=[("traceparent", header)]) == b"ok"
    spans = served.finished()
    assert len(spans) == 4
    assert all(s.parent is None for s in spans)
    assert len({s.context.trace_id for s in spans if s.context is not None}) == 4


async def test_a_sampler_of_its_own_is_asked_once_per_call(serve: Any) -> None:
    """A sampler the decorator cannot reason about is asked by the tracer,
    exactly once a call: its decisions are the spans exported."""
    sampler = EveryOther()
    served: Served = await serve(sampler)
    for _ in range(20):
        assert await served.call() == b"ok"
    assert sampler.asked == 20
    assert len(served.finished()) == 10
    # A span current inside only when sampled (a dropped call: nothing attached).
    current = [s.get_span_context().is_valid for s in served.echo.seen]
    assert current == [True, False] * 10


async def test_a_ratio_is_sampled_once_not_twice(serve: Any) -> None:
    """traceidratio 0.5 over 400 root calls: about 200 spans. Asking the
    sampler with one trace id and starting the span with another would
    sample 0.25 (~100). Outside [150, 250] at 0.5: p < 1e-6."""
    served: Served = await serve(TraceIdRatioBased(0.5))
    for _ in range(400):
        await served.call()
    assert 150 <= len(served.finished()) <= 250


async def test_attributes_and_status_follow_the_rpc_conventions(serve: Any) -> None:
    served: Served = await serve(ALWAYS_ON)
    assert await served.call(metadata=[("x-other", "1")]) == b"ok"
    for code in ("INVALID_ARGUMENT", "UNAVAILABLE"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await served.call(f"abort:{code}".encode())
        assert caught.value.code() is grpc.StatusCode[code]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.call(b"raise")
    assert caught.value.code() is grpc.StatusCode.UNKNOWN

    ok, invalid, unavailable, raised = served.finished()
    attributes = dict(ok.attributes or {})
    assert str(attributes.pop("rpc.user_agent")).startswith("grpc-python")
    assert isinstance(port := attributes.pop("net.peer.port"), int) and port > 0
    assert attributes == {
        "rpc.system": "grpc",
        "rpc.service": SERVICE,
        "rpc.method": "Call",
        "rpc.grpc.status_code": 0,
        "net.peer.ip": "127.0.0.1",
        "net.peer.name": "localhost",
    }
    assert ok.status.status_code is StatusCode.UNSET
    # A caller's mistake is not the server's error.
    assert (invalid.attributes or {})["rpc.grpc.status_code"] == 3
    assert invalid.status.status_code is StatusCode.UNSET
    assert (unavailable.attributes or {})["rpc.grpc.status_code"] == 14
    assert unavailable.status.status_code is StatusCode.ERROR
    assert unavailable.status.description == "StatusCode.UNAVAILABLE:asked for UNAVAILABLE"
    assert (raised.attributes or {})["rpc.grpc.status_code"] == 2
    assert raised.status.status_code is StatusCode.ERROR
    # The exception's type only: its message ("boom") could have quoted a token.
    assert [(e.name, dict(e.attributes or {})) for e in raised.events] == [
        ("exception", {"exception.type": "RuntimeError"})
    ]
    assert not [*invalid.events, *unavailable.events]
