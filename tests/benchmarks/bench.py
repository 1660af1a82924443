"""Side-by-side benchmark: every number is a ratio of two runs made here, in one
process, against the same private Redis and Postgres (this machine is shared and
noisy, so absolute numbers mean little; ratios measured together do).

    make bench                      # full run (about a minute)
    python tests/benchmarks/bench.py --quick --json out.json

Report keys (stable; other tools read them):
  validate_hit_p50_ms, validate_hit_p99_ms       core validate answered by Redis
  validate_db_p50_ms,  validate_db_p99_ms        core validate with no cache (Postgres)
  validate_hit_speedup_p50                       db p50 / hit p50
  revoke_1000_pipelined_ms, revoke_1000_sequential_ms, revoke_pipeline_speedup
  grpc_rps_cached, grpc_rps_uncached, grpc_rps_ratio
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import asyncpg
import grpc

from session_authority.adapters.migrate import apply_migrations
from session_authority.adapters.postgres_store import PostgresSessionStore
from session_authority.adapters.redis_cache import RedisSessionCache
from session_authority.bootstrap import App, assemble_core
from session_authority.config import Settings
from session_authority.core.breaker import Breaker, BreakerPolicy
from session_authority.core.domain import TokenHash, new_token
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis, find_free_port
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _timed(n: int, op: Callable[[], Awaitable[object]]) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        await op()
        out.append(time.perf_counter() - started)
    return out


async def bench_core(pg: str, redis_url: str, n: int) -> dict[str, float]:
    store = PostgresSessionStore(pg, min_size=2, max_size=10, command_timeout=5, acquire_timeout=5)
    cache = RedisSessionCache.from_url(
        redis_url, ttl=300, min_connections=2, max_connections=10, timeout=1, pool_timeout=1
    )
    cached = assemble_core(store, cache, breaker=Breaker(BreakerPolicy()))
    uncached = assemble_core(store, None, breaker=Breaker(BreakerPolicy()))
    try:
        token, _ = await cached.create("bench-user", timedelta(hours=1), {})
        await cached.validate(token)  # fill
        hit: list[float] = []
        db: list[float] = []
        # Interleave in rounds so drift on a shared machine hits both alike.
        for _ in range(10):
            hit += await _timed(n // 10, lambda: cached.validate(token))
            db += await _timed(n // 10, lambda: uncached.validate(token))

        hashes = [TokenHash.of(new_token()) for _ in range(1000)]
        pipelined: list[float] = []
        sequential: list[float] = []
        for _ in range(3):
            started = time.perf_counter()
            await cache.tombstone(hashes, 60)
            pipelined.append(time.perf_counter() - started)
            started = time.perf_counter()
            for h in hashes:  # one round trip per key: the runbook's "Current: Sequential"
                await cache.tombstone([h], 60)
            sequential.append(time.perf_counter() - started)
    finally:
        await cache.aclose()
        await store.aclose()
    p50_hit, p50_db = _pct(hit, 0.5), _pct(db, 0.5)
    pipe_ms = statistics.median(pipelined) * 1000
    seq_ms = statistics.median(sequential) * 1000
    return {
        "validate_hit_p50_ms": round(p50_hit, 3),
        "validate_hit_p99_ms": round(_pct(hit, 0.99), 3),
        "validate_db_p50_ms": round(p50_db, 3),
        "validate_db_p99_ms": round(_pct(db, 0.99), 3),
        "validate_hit_speedup_p50": round(p50_db / p50_hit, 2),
        "revoke_1000_pipelined_ms": round(pipe_ms, 2),
        "revoke_1000_sequential_ms": round(seq_ms, 2),
        "revoke_pipeline_speedup": round(seq_ms / pipe_ms, 1),
    }


async def _grpc_rps(target: str, token: str, seconds: float, concurrency: int) -> float:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SessionAuthorityStub(channel)
        request = pb.ValidateSessionRequest(token=token)
        await stub.ValidateSession(request)
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                reply = await stub.ValidateSession(request, timeout=5)
                assert reply.valid
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - started)


async def bench_grpc(pg: str, redis_url: str, seconds: float) -> dict[str, float]:
    results: dict[str, float] = {}
    apps = {}
    for label, url in (("cached", redis_url), ("uncached", None)):
        settings = Settings(
            database_url=pg, redis_url=url, host="127.0.0.1", port=find_free_port(), admin_port=0
        )
        apps[label] = await App.start(settings)
    try:
        token, _ = await apps["cached"].core.create("bench-grpc", timedelta(hours=1), {})
        for _ in range(2):  # alternate to share the machine's noise
            for label, app in apps.items():
                rps = await _grpc_rps(f"127.0.0.1:{app.port}", token, seconds / 2, 32)
                results[label] = results.get(label, 0.0) + rps / 2
    finally:
        for app in apps.values():
            await app.stop(0)
    return {
        "grpc_rps_cached": round(results["cached"]),
        "grpc_rps_uncached": round(results["uncached"]),
        "grpc_rps_ratio": round(results["cached"] / results["uncached"], 2),
    }


async def _main(args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="sa-bench-") as tmp:
        base = Path(tmp)
        with EmbeddedPostgres(base / "pg") as pg, EmbeddedRedis(base / "redis") as rd:
            conn = await asyncpg.connect(pg.url)
            await apply_migrations(conn)
            await conn.close()
            report = await bench_core(pg.url, rd.url, 200 if args.quick else 5000)
            report |= await bench_grpc(pg.url, rd.url, 1.0 if args.quick else 10.0)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    report = asyncio.run(_main(args))
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
