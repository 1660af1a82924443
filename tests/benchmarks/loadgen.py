"""The benchmark's Python load generator, run as a process of its own: for
what h2load cannot send (a different token on every call, so every call is a
cache miss) and as the fallback where h2load is not installed.

ValidateSession over ``--connections`` channels (each its own TCP connection)
with ``--streams`` calls in flight on each, for ``--seconds`` or until the
tokens run out (``--once``: each token is sent once), at most ``--rate`` calls
a second in all when given. Requests are encoded before the clock starts;
every reply is decoded and checked. Prints one JSON object: calls, rps,
latency percentiles and what the replies said.

    python tests/benchmarks/loadgen.py --target 127.0.0.1:50051 --tokens t.txt --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import grpc

from session_authority.v1 import session_authority_pb2 as pb

METHOD = "/session_authority.v1.SessionAuthority/ValidateSession"


async def _drive(args: argparse.Namespace, tokens: list[str]) -> dict[str, object]:
    requests = [pb.ValidateSessionRequest(token=t).SerializeToString() for t in tokens]
    options = [("grpc.enable_http_proxy", 0), ("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(args.target, options=options) for _ in range(args.connections)
    ]
    calls: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = [
        channel.unary_unary(METHOD) for channel in channels
    ]
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    next_request = 0
    done = 0
    interval = 1 / args.rate if args.rate else 0.0
    next_slot = 0.0

    def take() -> bytes | None:
        nonlocal next_request
        if next_request >= len(requests):
            if args.once:
                return None
            next_request = 0
        request = requests[next_request]
        next_request += 1
        return request

    async def paced() -> None:
        """Wait for this call's slot (open loop: a late call does not push the others)."""
        nonlocal next_slot
        now = time.perf_counter()
        next_slot = max(next_slot + interval, now)
        if next_slot > now:
            await asyncio.sleep(next_slot - now)

    async def stream(call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes], deadline: float) -> None:
        nonlocal done
        while time.perf_counter() < deadline and (request := take()) is not None:
            if interval:
                await paced()
            sent = time.perf_counter()
            try:
                raw = await call(request, timeout=10)
            except grpc.aio.AioRpcError as exc:
                outcomes[f"error:{exc.code().name}"] += 1
                continue
            latencies.append(time.perf_counter() - sent)
            reply = pb.ValidateSessionResponse.FromString(raw)
            source = pb.Source.Name(reply.source).removeprefix("SOURCE_").lower()
            outcomes[f"{'valid' if reply.valid else 'invalid'}:{source}"] += 1
            done += 1

    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 10)
        started = time.perf_counter()
        deadline = started + args.seconds
        await asyncio.gather(
            *(
                stream(calls[i % len(calls)], deadline)
                for i in range(args.connections * args.streams)
            )
        )
        elapsed = time.perf_counter() - started
    finally:
        for channel in channels:
            await channel.close()
    latencies.sort()

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 3)

    return {
        "calls": done,
        "seconds": round(elapsed, 3),
        "rps": round(done / elapsed, 1),
        "p50_ms": pct(0.5) if latencies else 0.0,
        "p99_ms": pct(0.99) if latencies else 0.0,
        "exhausted": args.once and next_request >= len(requests),
        "outcomes": dict(outcomes),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--tokens", required=True, help="a file of tokens, one per line")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--once", action="store_true", help="send each token once at most")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="calls per second in all (0: no limit)"
    )
    args = parser.parse_args()
    factory = None
    try:
        import uvloop
    except ImportError:
        pass
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        report = runner.run(_drive(args, Path(args.tokens).read_text().split()))
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
