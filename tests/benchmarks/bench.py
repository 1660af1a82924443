"""The benchmark (`make bench`): the service as shipped, driven from outside by
an external load generator, beside a ceiling measured in the same run.

    make bench                                 # full run, 2 to 3 minutes
    make bench BENCH_ARGS=--quick              # smoke run, under a minute
    python -m tests.benchmarks.bench --json out.json [--workers N] [--quick]
    make bench BENCH_ARGS="--only touch,watch"  # those sections alone (see ONLY)

It starts a private Postgres and Redis, then `session-authority serve`
processes in the default configuration (workers: one per core unless
--workers): the replica measured, a second replica (revocation propagation),
one without REDIS_URL (Postgres only), one through a private PgBouncer in transaction mode
(DATABASE_POOLER=pgbouncer; Debian's pgbouncer, `make pgbouncer`), one tracing every call to a local
collector (tests/benchmarks/trace_sink.py) and one tracing 1 % of calls to
another; and the ceiling: a server on the
same proto, framework, options, loop and workers whose handler returns canned
bytes (tests/benchmarks/baseline_server.py).

Load comes from h2load (Debian's nghttp2-client; `make bench` installs it),
4 connections x 16 streams by default, POSTing one length-prefixed
ValidateSession message. h2load sees HTTP statuses only, so each run is
checked against the server's own /metrics (grpc_server_handled_total and
session_validations_total: every call OK and valid; valid answers from
another source than expected, e.g. Postgres while a breaker was open, and
calls that failed closed (UNAVAILABLE), are listed under `warnings`), and the
baseline with real calls. Where h2load is missing, the
Python generator (tests/benchmarks/loadgen.py, a process of its own) drives
everything and `load_generator` says so. Misses always use the Python
generator: h2load sends one body, and a miss needs a token never seen before.

Throughputs are the median of `rounds` runs taken in turn (ceiling, hit,
Postgres only, 1 % traced), so the shared machine's noise falls on all alike; the ratios
are what to compare across machines. This is no test: it asserts no timing.
It exits 1 only when an answer was wrong (a failed check is listed).

Report keys (stable; other tools read them):
  ceiling_rps, hit_rps, miss_rps, pg_only_rps    calls/s (cache hit; miss: new token each call;
                                                 pg_only: no REDIS_URL)
  hit_vs_ceiling, hit_vs_pg_only                 ratios of the above
  batch_tokens_per_s                             tokens/s validated by ValidateSessions calls of
                                                 100 cached tokens (the hit server, h2load, in
                                                 the same rounds as hit_rps)
  batch_vs_hit                                   batch_tokens_per_s / hit_rps (target >= 10)
  hit_rps_traced_all                             cache hits, every call traced and exported
  hit_rps_traced_1pct, traced_1pct_vs_hit        cache hits, parentbased_traceidratio 0.01
                                                 (calls not sampled start no span)
  hit_p50_ms, hit_p99_ms                         cache-hit latency at half of hit_rps (open
                                                 loop, calls spread out: h2load on rate/100
                                                 connections opened 1 ms apart, each sending
                                                 one call per 10 ms tick);
                                                 ceiling_p50/p99_ms_same_rate: control
  invalidate_user_1000_pipelined_ms              1,000 tombstones in one pipeline (the cache's
  invalidate_user_1000_sequential_ms             part of InvalidateUser) vs one round trip each
  invalidate_user_speedup                        sequential / pipelined
  redis_bytes_per_session                        MEMORY USAGE of a cached session's key(s)
  revocation_propagation_p99_ms                  Invalidate sent to one replica until the other
                                                 answers revoked
  touch_hot_session_writes                       Postgres writes of one session (counted by a
                                                 trigger in Postgres) caused by TOUCH_RATE
                                                 TouchSession calls/s on it for the run (10,000
                                                 in 10 s; the measured replica runs
                                                 TOUCH_INTERVAL=1, so the bound is seconds + 1)
  touch_p99_ms, touch_max_ms, touch_hit_p99_ms   those calls' p99 and slowest, and a cache hit's
                                                 p99 at the same rate, paced alike, in the same
                                                 run (the target: touch_max_ms <= 3 x
                                                 touch_hit_p99_ms; touch_max_vs_hit_p99 says it)
  touch_hit_max_ms                               those hits' slowest: the machine's own spread
  touch_ceiling_p99_ms, touch_ceiling_max_ms     the ceiling (canned bytes) at the same rate and
                                                 pacing, right after: the control of the maximum
  touch_server_slowest_le_ms,                    the server's histogram bound holding every
  touch_hit_server_slowest_le_ms                 touch (hit) as its handler timed it: what the
                                                 slowest calls spent in the service, not queued
  watch_propagation_p99_ms                       Invalidate sent to one replica until its
                                                 WatchRevocations event reaches a watcher on the
                                                 other (another process sharing Postgres/Redis)
  client_cached_validate_per_s                   the Python client's local cache (LocalCache() as
                                                 shipped, heartbeats on) answering validate of the
                                                 hit token in process, calls/s on one thread (one
                                                 core), right after each hit run
  client_cache_vs_hit                            that / (hit_rps / workers): calls/s per core,
                                                 in process vs. served (target >= 100)
  client_cache_revocation_p99_ms                 Invalidate sent to one replica (a second client)
                                                 until the cached client, fed by the other
                                                 replica's WatchRevocations, no longer answers
                                                 from its copy (target <= 50); _p50 and _max too
  pgbouncer_miss_rps, pgbouncer_vs_direct        misses through PgBouncer (transaction mode,
                                                 DATABASE_POOLER=pgbouncer, as many server
                                                 connections as the replica's pool), and its
                                                 ratio to misses straight to Postgres, from
                                                 runs taken in turn (direct, PgBouncer, ...)
  workers, load_generator, cores
Extras: direct_miss_runs and pgbouncer_miss_runs (the runs behind pgbouncer_vs_direct),
client_cached_validate_per_s_runs, client_cached_hit_share (the lowest share of a run's calls
answered in process), hit_rps_per_core (hit_rps / workers, behind client_cache_vs_hit),
client_cache_revocation_p50_ms and client_cache_revocation_max_ms,
the runs behind each median, invalidate_user_1000_rpc_ms (the whole RPC),
hit_p99_ms_rps_bursts and ceiling_p99_ms_rps_bursts (the same rate from h2load --rps on
`connections`: it sends each connection's calls in 10 ms bursts, so this is how fast a
burst drains, which is what earlier versions reported as hit_p99_ms),
traced_spans_per_call, traced_1pct_spans_per_call, miss_load_generator, machine,
revocation_subscribers (the worker processes that acknowledged each revocation),
cpu_steal_seconds (CPU the host's hypervisor took while ours was runnable, during the
bench: a noisy host shows here), hit_latency_steal_seconds and
ceiling_latency_steal_seconds (the same during each paced latency run),
hit_vs_ceiling_paired (the median of each round's hit/ceiling ratio: the two runs of
a round are seconds apart, so the machine's slower drifts cancel),
redis_cpu_wait_seconds and postgres_cpu_wait_seconds (how long the stores were
runnable but not running during the throughput runs: a starved store answers late),
and `checks`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import redis.asyncio as aioredis

from session_authority.adapters.migrate import apply_migrations
from session_authority.adapters.redis_bus import CHANNEL, CLUSTER_NAMES
from session_authority.adapters.redis_cache import RedisSessionCache, cache_key, legacy_key
from session_authority.adapters.redis_cluster_cache import RedisClusterSessionCache
from session_authority.client import SessionAuthorityClient
from session_authority.config import Settings
from session_authority.core.domain import TokenHash, new_token
from session_authority.embedded import (
    EmbeddedCluster,
    EmbeddedPostgres,
    EmbeddedRedis,
    find_cluster_redis_server,
    find_free_port,
)
from session_authority.embedded.pgbouncer import EmbeddedPgBouncer
from session_authority.embedded.process_tree import server_processes
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc
from tests.benchmarks.client_cache import cached_client, cached_rate, revocation_times
from tests.benchmarks.harness import (
    BIN,
    NO_PROXY,
    TOUCH,
    VALIDATE_MANY,
    Samples,
    Server,
    clean_env,
    delta,
    grpc_frame,
    h2load_version,
    run_h2load,
    run_h2load_paced,
    run_loadgen,
    scrape,
    start,
    validate_request,
    wait_ready,
)
from tests.sentinel_failover import FailoverLoad, SentinelSet

REQUIRED_KEYS = (
    "ceiling_rps",
    "hit_rps",
    "miss_rps",
    "pg_only_rps",
    "hit_vs_ceiling",
    "hit_vs_pg_only",
    "batch_tokens_per_s",
    "batch_vs_hit",
    "hit_rps_traced_all",
    "hit_rps_traced_1pct",
    "traced_1pct_vs_hit",
    "hit_p50_ms",
    "hit_p99_ms",
    "invalidate_user_1000_pipelined_ms",
    "invalidate_user_1000_sequential_ms",
    "invalidate_user_speedup",
    "redis_bytes_per_session",
    "revocation_propagation_p99_ms",
    "touch_hot_session_writes",
    "touch_p99_ms",
    "touch_max_ms",
    "touch_hit_p99_ms",
    "watch_propagation_p99_ms",
    "client_cached_validate_per_s",
    "client_cache_vs_hit",
    "client_cache_revocation_p99_ms",
    "pgbouncer_miss_rps",
    "pgbouncer_vs_direct",
    "workers",
    "load_generator",
    "cores",
)
PYTHON_GENERATOR = "python grpc.aio client (tests/benchmarks/loadgen.py, own process)"
#: TouchSession calls a second on one session (``touch_hot_session_writes``).
TOUCH_RATE = 1000
#: The measured replica's TOUCH_INTERVAL (seconds): ten intervals in a 10 s run.
TOUCH_INTERVAL = 1
# Counts the writes of the session named in `bench_touch_writes` (one row), in Postgres.
_COUNT_TOUCH_WRITES = """
CREATE TABLE IF NOT EXISTS bench_touch_writes (session_id uuid PRIMARY KEY, n bigint NOT NULL);
CREATE OR REPLACE FUNCTION bench_touch_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE bench_touch_writes SET n = n + 1 WHERE session_id = NEW.session_id;
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS bench_touch_count ON sessions;
CREATE TRIGGER bench_touch_count AFTER UPDATE ON sessions
    FOR EACH ROW EXECUTE FUNCTION bench_touch_count();
"""
#: Tokens per ValidateSessions call in the batch run (the RPC's maximum).
BATCH = 100


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        base: Path,
        pg: str,
        redis_url: str,
        redis_pid: int | None = None,
        pg_pid: int | None = None,
        pgbouncer: str | None = None,
    ) -> None:
        self.args = args
        self.pgbouncer = pgbouncer
        self.redis_pid = redis_pid
        self.pg_pid = pg_pid
        self.base = base
        self.pg = pg
        self.redis_url = redis_url
        self.workers: int = args.workers or os.cpu_count() or 1
        self.h2load = None if args.python_load else h2load_version()
        self.seconds = 1.5 if args.quick else args.seconds
        self.warmup = 0.5 if args.quick else 1.0
        self.rounds = 1 if args.quick else args.rounds
        self.servers: dict[str, Server] = {}
        self.problems: list[str] = []  # wrong answers: the bench exits 1
        self.warnings: list[str] = []  # right answers by an unexpected road
        self.checks: dict[str, Any] = {}
        self.report: dict[str, Any] = {}
        self.batch_tokens: list[str] = []
        self.cached: SessionAuthorityClient | None = None  # the local cache's client

    # --- processes -----------------------------------------------------------------------

    def _serve(self, name: str, **env: str) -> Server:
        port, admin = find_free_port(), find_free_port()
        # Plaintext and open on loopback, as the tests run it: authentication is
        # not what this measures.
        argv = [
            str(BIN / "session-authority"),
            "serve",
            "--allow-unauthenticated",
            "--workers",
            str(self.workers),
        ]
        own = {"DATABASE_URL": self.pg, "HOST": "127.0.0.1", "PORT": str(port)}
        environment = clean_env(**(own | {"ADMIN_PORT": str(admin)} | env))
        return start(
            name, [*argv, "--port", str(port)], environment, port, self.base, admin_port=admin
        )

    def _sink(self, name: str) -> tuple[int, Path]:
        """A local OTLP collector (tests/benchmarks/trace_sink.py): its port and report."""
        port, report = find_free_port(), self.base / f"{name}.json"
        self.servers[name] = start(
            name,
            [
                sys.executable,
                "-m",
                "tests.benchmarks.trace_sink",
                f"--port={port}",
                f"--report={report}",
            ],
            clean_env(),
            port,
            self.base,
        )
        return port, report

    async def start_servers(self) -> None:
        sink_port, self.sink_report = self._sink("sink")
        sampled_port, self.sampled_report = self._sink("sink_1pct")
        cached = {"REDIS_URL": self.redis_url}
        # TOUCH_INTERVAL matters to TouchSession alone (``touch``).
        self.servers["hit"] = self._serve("hit", **cached, TOUCH_INTERVAL=str(TOUCH_INTERVAL))
        self.servers["replica"] = self._serve("replica", **cached)
        self.servers["pg_only"] = self._serve("pg_only")
        self.servers["traced"] = self._serve(
            "traced",
            **cached,
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{sink_port}",
            OTEL_TRACES_SAMPLER="always_on",
        )
        # Tracing as a production fleet may run it: one call in a hundred.
        self.servers["traced_1pct"] = self._serve(
            "traced_1pct",
            **cached,
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{sampled_port}",
            OTEL_TRACES_SAMPLER="parentbased_traceidratio",
            OTEL_TRACES_SAMPLER_ARG="0.01",
        )
        port = find_free_port()
        self.servers["ceiling"] = start(
            "ceiling",
            [
                sys.executable,
                "-m",
                "tests.benchmarks.baseline_server",
                f"--port={port}",
                f"--workers={self.workers}",
            ],
            clean_env(),
            port,
            self.base,
        )
        await asyncio.gather(
            *(
                wait_ready(s, health=name != "ceiling")
                for name, s in self.servers.items()
                if not name.startswith("sink")
            )
        )

    @contextlib.asynccontextmanager
    async def _redis(self) -> AsyncIterator[aioredis.Redis]:
        """A client of the bench's Redis, for reading it directly."""
        client = aioredis.Redis.from_url(self.redis_url, decode_responses=True)
        try:
            yield client
        finally:
            await client.aclose()

    async def stop_servers(self) -> None:
        codes = await asyncio.gather(*(s.stop() for s in self.servers.values()))
        for server, code in zip(self.servers.values(), codes, strict=True):
            if code != 0:
                self.problems.append(f"{server.name} exited {code} on SIGTERM:\n{server.tail()}")

    # --- load ---------------------------------------------------------------------------

    async def throughput(self, name: str, body: Path, tokens: Path) -> float:
        server = self.servers[name]
        before = await scrape(server) if server.admin_port else None
        if self.h2load:
            result = await run_h2load(
                server.target,
                body,
                seconds=self.seconds,
                warmup=self.warmup,
                connections=self.args.connections,
                streams=self.args.streams,
            )
            if result.failed or result.errored or result.status_2xx != result.succeeded:
                self.problems.append(f"{name}: h2load saw failures: {result}")
            rps = result.rps
        else:
            report = await run_loadgen(
                server.target,
                tokens,
                seconds=self.seconds,
                connections=self.args.connections,
                streams=self.args.streams,
            )
            rps = float(report["rps"])  # type: ignore[arg-type]
            self._expect_outcomes(name, report, "cache" if name != "pg_only" else "database")
        if before is not None:
            self._check_server(name, before, await scrape(server))
        return rps

    async def batch_throughput(self, body: Path) -> float:
        """ValidateSessions calls/s of ``BATCH`` cached tokens each, on the hit
        server, driven as the hit run is (h2load, same connections and streams)."""
        server = self.servers["hit"]
        before = await scrape(server)
        if self.h2load:
            result = await run_h2load(
                server.target,
                body,
                seconds=self.seconds,
                warmup=self.warmup,
                connections=self.args.connections,
                streams=self.args.streams,
                path=VALIDATE_MANY,
            )
            if result.failed or result.errored or result.status_2xx != result.succeeded:
                self.problems.append(f"batch: h2load saw failures: {result}")
            rps = result.rps
        else:
            rps = await self._batches_python(server)
        self._check_server("batch", before, await scrape(server), method="ValidateSessions")
        return rps

    async def _batches_python(self, server: Server) -> float:
        """Without h2load: the same load from grpc.aio in this process (slower)."""
        request = pb.ValidateSessionsRequest(tokens=self.batch_tokens)
        done = 0
        async with grpc.aio.insecure_channel(server.target, options=NO_PROXY) as ch:
            stub = pb_grpc.SessionAuthorityStub(ch)
            deadline = time.monotonic() + self.seconds

            async def caller() -> None:
                nonlocal done
                while time.monotonic() < deadline:
                    await stub.ValidateSessions(request)
                    done += 1

            started = time.monotonic()
            await asyncio.gather(*(caller() for _ in range(self.args.streams)))
        return done / (time.monotonic() - started)

    async def prepare_batch(self) -> Path:
        """``BATCH`` live sessions, validated once (cached in Redis), and the
        h2load body of one ValidateSessions of all of them."""
        self.batch_tokens = await self._insert_sessions("bench-batch", BATCH)
        async with grpc.aio.insecure_channel(self.servers["hit"].target, options=NO_PROXY) as ch:
            stub = pb_grpc.SessionAuthorityStub(ch)
            request = pb.ValidateSessionsRequest(tokens=self.batch_tokens)
            for expected in (pb.SOURCE_DATABASE, pb.SOURCE_CACHE):
                reply = await stub.ValidateSessions(request)
                answers = {(r.valid, r.source) for r in reply.results}
                if len(reply.results) != BATCH or answers != {(True, expected)}:
                    self.problems.append(f"batch: not {BATCH} valid from {expected}: {answers}")
        body = self.base / "batch.bin"
        body.write_bytes(grpc_frame(request.SerializeToString()))
        return body

    def _check_server(
        self, name: str, before: Samples, after: Samples, method: str = "ValidateSession"
    ) -> None:
        """Every ``method`` call the server finished was OK (or CANCELLED: in
        flight when the load generator stopped) and a valid session from
        where it should be."""
        codes = delta(before, after, "grpc_server_handled_total", grpc_method=method)
        answers = delta(before, after, "session_validations_total")
        source = "database" if name == "pg_only" else "cache"
        check = self.checks.setdefault(name, {"calls_ok": 0, "other_codes": {}, "answers": {}})
        ok = codes.pop("grpc_code=OK,grpc_service=session_authority.v1.SessionAuthority", 0)
        check["calls_ok"] += int(ok)
        for code, count in codes.items():
            check["other_codes"][code] = check["other_codes"].get(code, 0) + int(count)
        for labels, count in answers.items():
            check["answers"][labels] = check["answers"].get(labels, 0) + int(count)
        if not ok:
            self.problems.append(f"{name}: the server counted no OK call")
        cancelled = sum(v for k, v in codes.items() if "CANCELLED" in k)
        # UNAVAILABLE is the service failing closed (neither Redis nor Postgres
        # answered in time: seen during whole-machine stalls), not a wrong answer.
        unavailable = sum(v for k, v in codes.items() if "UNAVAILABLE" in k)
        if sum(codes.values()) - cancelled - unavailable:
            self.problems.append(f"{name}: calls that were not OK: {codes}")
        if unavailable:
            self.warnings.append(
                f"{name}: {int(unavailable)} calls failed closed (UNAVAILABLE: the answer "
                "could not be known in time; the server's log says why)"
            )
        if cancelled > self.args.connections * self.args.streams:
            self.problems.append(f"{name}: more CANCELLED than calls in flight: {codes}")
        invalid = {k: v for k, v in answers.items() if not k.endswith("valid=true")}
        if invalid:
            self.problems.append(f"{name}: a live session answered invalid: {invalid}")
        elsewhere = {
            k: v
            for k, v in answers.items()
            if k.endswith("valid=true") and k != f"reason=none,source={source},valid=true"
        }
        opened = delta(before, after, "circuit_breaker_transitions_total", to_state="open")
        if opened:
            check["breaker_openings"] = check.get("breaker_openings", 0) + int(sum(opened.values()))
        if elsewhere:
            # Right answers by another road (a breaker opened under the load:
            # Postgres answered): a finding to report, not a wrong answer.
            check["not_from_" + source] = check.get("not_from_" + source, 0) + int(
                sum(elsewhere.values())
            )
            self.warnings.append(
                f"{name}: {int(sum(elsewhere.values()))} valid answers not from {source} "
                f"({elsewhere}; breaker openings: {opened or 'none'})"
            )

    def _expect_outcomes(self, name: str, report: dict[str, Any], source: str) -> None:
        outcomes: dict[str, int] = report["outcomes"]
        self.checks.setdefault(f"{name}_client", {}).update(outcomes)
        # As in ``_check_server``: UNAVAILABLE is failing closed, not a wrong answer.
        unavailable = outcomes.get("error:UNAVAILABLE", 0)
        if set(outcomes) - {f"valid:{source}", "error:UNAVAILABLE"}:
            self.problems.append(f"{name}: the client saw {outcomes}, not only valid:{source}")
        elif unavailable:
            self.warnings.append(
                f"{name}: {unavailable} calls failed closed (UNAVAILABLE: the answer could not "
                "be known in time; the server's log says why)"
            )

    @staticmethod
    def _pids(leader: int | None) -> list[int]:
        """A store's processes: ``leader`` and its children (Postgres's backends)."""
        return [] if leader is None else [p.pid for p in server_processes(leader)]

    # --- phases -------------------------------------------------------------------------

    async def prepare_token(self) -> tuple[Path, Path]:
        async with grpc.aio.insecure_channel(self.servers["hit"].target, options=NO_PROXY) as ch:
            stub = pb_grpc.SessionAuthorityStub(ch)
            reply = await stub.CreateSession(pb.CreateSessionRequest(user_id="bench-hit"))
            first = await stub.ValidateSession(pb.ValidateSessionRequest(token=reply.token))
            again = await stub.ValidateSession(pb.ValidateSessionRequest(token=reply.token))
        if not (first.valid and again.valid and again.source == pb.SOURCE_CACHE):
            self.problems.append(f"hit: the token does not validate from the cache: {again}")
        body, tokens = self.base / "body.bin", self.base / "token.txt"
        body.write_bytes(grpc_frame(validate_request(reply.token)))
        tokens.write_text(reply.token + "\n")
        self.token = reply.token
        return body, tokens

    async def check_ceiling_answers(self) -> None:
        async with grpc.aio.insecure_channel(
            self.servers["ceiling"].target, options=NO_PROXY
        ) as ch:
            stub = pb_grpc.SessionAuthorityStub(ch)
            for _ in range(3):
                reply = await stub.ValidateSession(pb.ValidateSessionRequest(token=self.token))
                if not (reply.valid and reply.session.user_id):
                    self.problems.append(f"ceiling: unexpected canned answer {reply}")

    async def throughputs(self, body: Path, tokens: Path, batch_body: Path) -> None:
        # server -> its report key; the servers are measured in turn, round after round.
        keys = {
            "ceiling": "ceiling_rps",
            "hit": "hit_rps",
            "pg_only": "pg_only_rps",
            "traced_1pct": "hit_rps_traced_1pct",
        }
        runs: dict[str, list[float]] = {name: [] for name in keys}
        batches: list[float] = []
        cached: list[tuple[float, float]] = []
        sampled = self.servers["traced_1pct"]
        before = await scrape(sampled)
        for _ in range(self.rounds):
            for name in runs:
                runs[name].append(await self.throughput(name, body, tokens))
                if name == "hit":  # right after its hit run: the same machine, nearly
                    batches.append(await self.batch_throughput(batch_body))
                    cached.append(await self.client_cached_rate())
        await self.check_ceiling_answers()
        calls = sum(delta(before, await scrape(sampled), "grpc_server_handled_total").values())
        for name, values in runs.items():
            self.report[keys[name]] = round(statistics.median(values))
            self.report[f"{keys[name]}_runs"] = [round(v) for v in values]
        self.report["traced_1pct_vs_hit"] = round(
            self.report["hit_rps_traced_1pct"] / self.report["hit_rps"], 3
        )
        spans = await self._collected("traced_1pct", "sink_1pct", self.sampled_report)
        self.report["traced_1pct_spans_per_call"] = round(spans / max(calls, 1), 4)
        self.report["hit_vs_ceiling"] = round(
            self.report["hit_rps"] / self.report["ceiling_rps"], 3
        )
        # Each round's two runs are a few seconds apart: their ratio cancels
        # the machine's slower drifts, which the medians above do not.
        self.report["hit_vs_ceiling_paired"] = round(
            statistics.median(h / c for h, c in zip(runs["hit"], runs["ceiling"], strict=True)), 3
        )
        self.report["hit_vs_pg_only"] = round(
            self.report["hit_rps"] / self.report["pg_only_rps"], 2
        )
        self.report["batch_tokens_per_s"] = round(statistics.median(batches) * BATCH)
        self.report["batch_tokens_per_s_runs"] = [round(v * BATCH) for v in batches]
        self.report["batch_vs_hit"] = round(
            self.report["batch_tokens_per_s"] / self.report["hit_rps"], 2
        )
        rate = statistics.median(r for r, _ in cached)
        self.report["client_cached_validate_per_s"] = round(rate)
        self.report["client_cached_validate_per_s_runs"] = [round(r) for r, _ in cached]
        self.report["client_cached_hit_share"] = round(min(s for _, s in cached), 5)
        per_core = self.report["hit_rps"] / self.workers
        self.report["hit_rps_per_core"] = round(per_core)
        self.report["client_cache_vs_hit"] = round(rate / per_core, 1)

    async def client_cached_rate(self) -> tuple[float, float]:
        """The Python client's local cache answering the hit token (client_cache.py)."""
        if self.cached is None:
            target = self.servers["replica"].target
            self.cached = await asyncio.to_thread(cached_client, target)
        rate, share = await asyncio.to_thread(cached_rate, self.cached, self.token, self.seconds)
        if share < 0.99:
            self.warnings.append(f"client cache: only {share:.1%} of the calls answered locally")
        return rate, share

    async def client_cache_revocation(self) -> None:
        """Invalidate through the hit server; the cached client (fed by the replica's stream)
        asked until its copy no longer answers (client_cache.py)."""
        samples = 60 if self.args.quick else 300
        assert self.cached is not None  # made by the throughput rounds
        other = SessionAuthorityClient(self.servers["hit"].target, channel_options=NO_PROXY)
        try:
            found = await asyncio.to_thread(revocation_times, self.cached, other, samples)
        finally:
            other.close()
        self.problems += found.problems
        times = sorted(found.times)
        if not times:
            self.problems.append("client cache: no revocation measured")
            return
        self.report["client_cache_revocation_p50_ms"] = round(_pct(times, 0.5), 3)
        self.report["client_cache_revocation_p99_ms"] = round(_pct(times, 0.99), 3)
        self.report["client_cache_revocation_max_ms"] = round(times[-1], 3)

    async def traced(self, body: Path, tokens: Path) -> None:
        server = self.servers["traced"]
        before = await scrape(server)
        self.report["hit_rps_traced_all"] = round(await self.throughput("traced", body, tokens))
        calls = sum(delta(before, await scrape(server), "grpc_server_handled_total").values())
        spans = await self._collected("traced", "sink", self.sink_report)
        self.report["traced_spans_per_call"] = round(spans / max(calls, 1), 2)

    async def _collected(self, name: str, sink: str, report: Path) -> int:
        """Stops ``name`` (which flushes its exporter), then its collector, and
        answers how many spans the collector received."""
        server = self.servers.pop(name)
        if await server.stop() != 0:
            self.problems.append(f"{name} exited non-zero:\n{server.tail()}")
        await self.servers.pop(sink).stop()
        received = json.loads(await asyncio.to_thread(report.read_text))
        self.checks[f"{name}_sink"] = received
        if not received["spans"]:
            self.problems.append(f"{name}: the collector received no span")
        return int(received["spans"])

    async def latency(self, body: Path, tokens: Path) -> None:
        """Open-loop latency at half of ``hit_rps``: cache hits, and the
        ceiling at the same rate as the control (on a shared machine, most of
        a tail can be the machine's). Calls are spread out (``run_h2load_paced``:
        about one every rate/1000 ms), each server's run in two halves taken
        hit, ceiling, ceiling, hit, so a drift of the machine falls on both
        alike. The ``*_rps_bursts`` extras are the same rate sent as h2load's
        ``--rps`` sends it, in 10 ms bursts per connection."""
        rate = self.report["hit_rps"] / 2
        names = ("hit", "ceiling")
        before = await scrape(self.servers["hit"])
        if self.h2load:
            measured = await self._paced_abba(names, rate, body)
        else:
            measured = {name: await self._paced_python(name, rate, tokens) for name in names}
        self._check_server("hit", before, await scrape(self.servers["hit"]))
        hit, ceiling = measured["hit"], measured["ceiling"]
        self.report["hit_latency_rps"] = round(hit.rps)
        self.report["hit_p50_ms"], self.report["hit_p99_ms"] = hit.p50, hit.p99
        self.report["ceiling_p50_ms_same_rate"] = ceiling.p50
        self.report["ceiling_p99_ms_same_rate"] = ceiling.p99
        for name in names:
            if (stolen := measured[name].stolen) is not None:
                # A vCPU the host takes away stalls every call on it: on a
                # noisy host, this, not the server, is most of a p99.
                self.report[f"{name}_latency_steal_seconds"] = round(stolen, 2)
        if self.h2load:
            for name in names:
                bursts = await self._bursts(self.servers[name], rate, body)
                self.report[f"{name}_p99_ms_rps_bursts"] = bursts

    async def _paced_abba(
        self, names: tuple[str, str], rate: float, body: Path
    ) -> dict[str, Paced]:
        """Each server's two half runs, pooled."""
        half = self.seconds / 2
        samples: dict[str, list[float]] = {name: [] for name in names}
        calls = dict.fromkeys(names, 0.0)
        stolen: dict[str, float | None] = dict.fromkeys(names, 0.0)
        for name in (*names, *reversed(names)):
            with _Steal() as steal:
                result = await run_h2load_paced(
                    self.servers[name].target,
                    body,
                    rate=rate,
                    seconds=half,
                    log_file=self.base / f"latency-{name}.log",
                )
            so_far = stolen[name]
            stolen[name] = (
                None if so_far is None or steal.seconds is None else so_far + steal.seconds
            )
            calls[name] += result.rps * half
            samples[name] += result.latencies_ms
        measured = {}
        for name in names:
            ordered = sorted(samples[name])
            measured[name] = Paced(
                rps=calls[name] / self.seconds,
                p50=round(_pct(ordered, 0.5), 3),
                p99=round(_pct(ordered, 0.99), 3),
                stolen=stolen[name],
            )
        return measured

    async def _paced_python(self, name: str, rate: float, tokens: Path) -> Paced:
        """The same from the Python generator (no h2load): one run per server,
        whose p50 and p99 it computes itself."""
        with _Steal() as steal:
            report = await run_loadgen(
                self.servers[name].target,
                tokens,
                seconds=self.seconds,
                connections=self.args.connections,
                streams=self.args.streams,
                rate=rate,
            )
        return Paced(
            rps=float(report["rps"]),  # type: ignore[arg-type]
            p50=float(report["p50_ms"]),  # type: ignore[arg-type]
            p99=float(report["p99_ms"]),  # type: ignore[arg-type]
            stolen=steal.seconds,
        )

    async def _bursts(self, server: Server, rate: float, body: Path) -> float:
        """p99 ms of ``rate`` calls/s sent as h2load's ``--rps`` sends them, for
        half a run's length (an extra: it keeps ``make bench`` under 3 minutes
        on a slow host)."""
        result = await run_h2load(
            server.target,
            body,
            seconds=self.seconds / 2,
            warmup=0,
            connections=self.args.connections,
            streams=self.args.streams,
            rps_per_client=rate / self.args.connections,
            log_file=self.base / f"latency-{server.name}.log",
        )
        return round(_pct(sorted(result.latencies_ms), 0.99), 3)

    async def touch(self) -> None:
        """``TOUCH_RATE`` TouchSession calls a second on one session for a run
        (10 s in a full run: 10,000 calls) on the measured replica, paced as
        the hit latency run is; the session's Postgres writes counted by a
        trigger in Postgres. Beside it, in the same conditions, ValidateSession
        hits of that session: the p99 the slowest touch is compared with."""
        seconds = 3.0 if self.args.quick else 10.0
        server = self.servers["hit"]
        async with grpc.aio.insecure_channel(server.target, options=NO_PROXY) as ch:
            stub = pb_grpc.SessionAuthorityStub(ch)
            created = await stub.CreateSession(pb.CreateSessionRequest(user_id="bench-touch"))
        request = pb.TouchSessionRequest(token=created.token)
        request.extend_by.FromSeconds(3600)
        body = self.base / "touch.bin"
        body.write_bytes(grpc_frame(request.SerializeToString()))
        hit_body = self.base / "touch-hit.bin"
        hit_body.write_bytes(grpc_frame(validate_request(created.token)))
        conn = await asyncpg.connect(self.pg)
        try:
            await conn.execute(_COUNT_TOUCH_WRITES)
            await conn.execute(
                "INSERT INTO bench_touch_writes VALUES ($1, 0)", created.session.session_id
            )
            if self.h2load:
                # A second of hits first, not counted: the first run of new connections
                # on a server that served nothing yet (``--only touch``) starts with calls
                # of 10 ms and more, and the hits are the reference. No touch before.
                await run_h2load_paced(
                    server.target, hit_body, rate=TOUCH_RATE, seconds=1.0, log_file=None
                )
            before = await scrape(server)
            if self.h2load:
                hit_ms = (
                    await run_h2load_paced(
                        server.target,
                        hit_body,
                        rate=TOUCH_RATE,
                        seconds=seconds,
                        log_file=self.base / "touch-hit.log",
                    )
                ).latencies_ms
                between = await scrape(server)
                touch_ms = (
                    await run_h2load_paced(
                        server.target,
                        body,
                        rate=TOUCH_RATE,
                        seconds=seconds,
                        log_file=self.base / "touch.log",
                        method=TOUCH,
                    )
                ).latencies_ms
                # The control: canned bytes and nothing else, the same rate and pacing.
                # Its slowest call is this machine's (scheduling, the load generator),
                # none of the service's: a bound on the maximum below it is below what
                # any server here can show.
                ceiling_ms = (
                    await run_h2load_paced(
                        self.servers["ceiling"].target,
                        hit_body,
                        rate=TOUCH_RATE,
                        seconds=seconds,
                        log_file=self.base / "touch-ceiling.log",
                    )
                ).latencies_ms
            else:
                validate = pb.ValidateSessionRequest(token=created.token)
                hit_ms = await _paced_calls(
                    server.target, "ValidateSession", validate, seconds, self.problems
                )
                between = await scrape(server)
                touch_ms = await _paced_calls(
                    server.target, "TouchSession", request, seconds, self.problems
                )
                ceiling_ms = []
            after = await scrape(server)
            writes = await conn.fetchval(
                "SELECT n FROM bench_touch_writes WHERE session_id = $1",
                created.session.session_id,
            )
        finally:
            await conn.execute("DROP TRIGGER IF EXISTS bench_touch_count ON sessions")
            await conn.close()
        codes = delta(before, after, "grpc_server_handled_total", grpc_method="TouchSession")
        ok = codes.pop("grpc_code=OK,grpc_service=session_authority.v1.SessionAuthority", 0)
        if codes or not ok:
            self.problems.append(f"touch: calls that were not OK: {codes} ({ok} OK)")
        statements = delta(
            before, after, "postgres_query_duration_seconds_count", operation="touch"
        )
        times, hits = sorted(touch_ms), sorted(hit_ms)
        self.report["touch_calls"] = int(ok)
        self.report["touch_seconds"] = seconds
        self.report["touch_hot_session_writes"] = int(writes)
        self.report["touch_write_bound"] = int(seconds / TOUCH_INTERVAL) + 1
        self.report["touch_statements"] = int(sum(statements.values()))
        self.report["touch_p99_ms"] = round(_pct(times, 0.99), 3)
        self.report["touch_max_ms"] = round(times[-1] if times else 0.0, 3)
        self.report["touch_hit_p99_ms"] = round(_pct(hits, 0.99), 3)
        self.report["touch_hit_max_ms"] = round(hits[-1] if hits else 0.0, 3)
        if ceiling_ms:
            ceiling = sorted(ceiling_ms)
            self.report["touch_ceiling_p99_ms"] = round(_pct(ceiling, 0.99), 3)
            self.report["touch_ceiling_max_ms"] = round(ceiling[-1], 3)
        self.report["touch_server_slowest_le_ms"] = _slowest_bound_ms(
            between, after, "TouchSession"
        )
        self.report["touch_hit_server_slowest_le_ms"] = _slowest_bound_ms(
            before, between, "ValidateSession"
        )
        self.report["touch_max_vs_hit_p99"] = round(
            self.report["touch_max_ms"] / max(self.report["touch_hit_p99_ms"], 0.001), 2
        )
        if writes > self.report["touch_write_bound"]:
            self.problems.append(
                f"touch: {writes} Postgres writes, over {self.report['touch_write_bound']}"
            )

    async def misses(self) -> None:
        """Every call a token no cache has seen: Redis miss, Postgres, fill. Straight to
        Postgres (``miss_rps``, the first run) and through PgBouncer, in turn: direct,
        PgBouncer, then (full runs) PgBouncer, direct, so a drift of the machine falls
        on both alike."""
        order = ["hit", "pgbouncer"] if self.args.quick else ["hit", "pgbouncer"] * 2
        if not self.args.quick:
            order[2:] = reversed(order[2:])
        if self.pgbouncer is None:
            order = [name for name in order if name != "pgbouncer"]
        else:
            # Started only now: one server fewer starting (and idling) beside the others.
            self.servers["pgbouncer"] = self._serve(
                "pgbouncer",
                REDIS_URL=self.redis_url,
                DATABASE_URL=self.pgbouncer,
                DATABASE_POOLER="pgbouncer",
            )
            await wait_ready(self.servers["pgbouncer"])
        runs: dict[str, list[float]] = {"hit": [], "pgbouncer": []}
        for name in order:
            runs[name].append(await self._miss_run(name))
        if "pgbouncer" in self.servers:
            # Done with it: its workers would otherwise also subscribe to the revocation feed
            # (revocation_subscribers counts the two replicas' workers) and idle beside the rest.
            server = self.servers.pop("pgbouncer")
            if (code := await server.stop()) != 0:
                self.problems.append(f"pgbouncer: exited {code} on SIGTERM:\n{server.tail()}")
        self.report["miss_rps"] = round(runs["hit"][0])
        self.report["miss_load_generator"] = PYTHON_GENERATOR
        if runs["pgbouncer"]:
            direct, pooled = statistics.mean(runs["hit"]), statistics.mean(runs["pgbouncer"])
            self.report["pgbouncer_miss_rps"] = round(pooled)
            self.report["pgbouncer_vs_direct"] = round(pooled / direct, 3)
            self.report["direct_miss_runs"] = [round(r) for r in runs["hit"]]
            self.report["pgbouncer_miss_runs"] = [round(r) for r in runs["pgbouncer"]]

    async def _miss_run(self, name: str) -> float:
        count = 4000 if self.args.quick else 15000
        tokens = await self._insert_sessions(f"bench-miss-{name}", count)
        path = self.base / f"miss-tokens-{name}.txt"
        path.write_text("\n".join(tokens) + "\n")
        server = self.servers[name]
        before = await scrape(server)
        report = await run_loadgen(
            server.target,
            path,
            seconds=self.seconds,
            connections=self.args.connections,
            streams=self.args.streams,
            once=True,
        )
        label = "miss" if name == "hit" else f"{name}_miss"
        self._expect_outcomes(label, report, "database")
        lookups = delta(before, await scrape(server), "session_cache_lookups_total")
        self.checks.setdefault(f"{label}_lookups", []).append(lookups)
        if lookups.get("result=miss", 0) < int(report["calls"]):  # type: ignore[call-overload]
            # Right answers by another road (the breaker refused Redis under the
            # load): a finding, as for hits; a wrong answer is caught above.
            self.warnings.append(f"{label}: fewer cache misses than calls: {lookups} {report}")
        if report["exhausted"]:
            self.report[f"{label}_tokens_ran_out"] = True
        return float(report["rps"])  # type: ignore[arg-type]

    async def invalidation(self) -> None:
        settings = Settings(redis_url=self.redis_url)
        cache = RedisSessionCache.from_url(
            self.redis_url,
            min_connections=settings.redis_pool_min,
            max_connections=settings.redis_pool_max,
            timeout=settings.breaker_timeout_ms / 1000,
            pool_timeout=settings.redis_pool_timeout_ms / 1000,
        )
        tokens = await self._insert_sessions("bench-revoke", 1000)
        await self._validate_all(tokens)  # cached, as InvalidateUser finds them
        hashes = [TokenHash.of(t) for t in tokens]
        ttl = settings.tombstone_ttl_seconds
        pipelined: list[float] = []
        sequential: list[float] = []
        try:
            for _ in range(3):
                pipelined.append(await _timed(lambda: cache.tombstone(hashes, ttl)))

                async def one_by_one() -> None:
                    for h in hashes:  # the runbook's "Current: Sequential"
                        await cache.tombstone([h], ttl)

                sequential.append(await _timed(one_by_one))
        finally:
            await cache.aclose()
        pipe, seq = statistics.median(pipelined), statistics.median(sequential)
        self.report["invalidate_user_1000_pipelined_ms"] = round(pipe, 2)
        self.report["invalidate_user_1000_sequential_ms"] = round(seq, 2)
        self.report["invalidate_user_speedup"] = round(seq / pipe, 1)

        user = "bench-revoke-rpc"
        await self._validate_all(await self._insert_sessions(user, 1000))
        async with grpc.aio.insecure_channel(self.servers["hit"].target, options=NO_PROXY) as ch:
            stub = pb_grpc.SessionAuthorityStub(ch)
            started = time.perf_counter()
            reply = await stub.InvalidateUser(pb.InvalidateUserRequest(user_id=user), timeout=30)
            self.report["invalidate_user_1000_rpc_ms"] = round(
                (time.perf_counter() - started) * 1000, 2
            )
        if reply.revoked_count != 1000:
            self.problems.append(f"InvalidateUser of 1000 sessions answered {reply}")
        elif not reply.cache_purged:
            # Durable in Postgres and drained later: the breaker was open (see warnings).
            self.warnings.append(f"InvalidateUser of 1000 sessions answered {reply}")

    async def bytes_per_session(self) -> None:
        """MEMORY USAGE of every key that names a cached session's token hash."""
        count = 50
        async with grpc.aio.insecure_channel(self.servers["hit"].target, options=NO_PROXY) as ch:
            stub = pb_grpc.SessionAuthorityStub(ch)
            hashes = []
            for i in range(count):
                reply = await stub.CreateSession(pb.CreateSessionRequest(user_id=f"user-{i:06d}"))
                for _ in range(2):  # the miss fills, the hit proves it
                    answer = await stub.ValidateSession(
                        pb.ValidateSessionRequest(token=reply.token)
                    )
                if answer.source != pb.SOURCE_CACHE:
                    self.problems.append(f"bytes: a session was not cached: {answer}")
                hashes.append(TokenHash.of(reply.token))
        async with self._redis() as client:
            keys = {key async for key in client.scan_iter(count=1000)}
            total, matched = 0, 0
            for h in hashes:
                # Both releases' keys: a session costs whatever is left under either.
                for key in keys & {cache_key(h), legacy_key(h)}:
                    total += int(await client.memory_usage(key, samples=0) or 0)
                    matched += 1
        if matched < count:
            self.problems.append(f"bytes: only {matched} keys name the {count} sessions")
        self.report["redis_bytes_per_session"] = round(total / count)
        self.report["redis_keys_per_session"] = round(matched / count, 2)

    async def propagation(self) -> None:
        samples = 30 if self.args.quick else 200
        stale = 0
        times: list[float] = []
        hit, replica = self.servers["hit"].target, self.servers["replica"].target
        async with (
            grpc.aio.insecure_channel(hit, options=NO_PROXY) as a,
            grpc.aio.insecure_channel(replica, options=NO_PROXY) as b,
        ):
            one, other = pb_grpc.SessionAuthorityStub(a), pb_grpc.SessionAuthorityStub(b)
            for i in range(samples):
                token = (
                    await one.CreateSession(pb.CreateSessionRequest(user_id=f"prop-{i}"))
                ).token
                request = pb.ValidateSessionRequest(token=token)
                for _ in range(2):
                    seen = await other.ValidateSession(request)
                if not (seen.valid and seen.source == pb.SOURCE_CACHE):
                    self.problems.append(f"propagation: the replica did not cache it: {seen}")
                started = time.perf_counter()
                await one.Invalidate(pb.InvalidateRequest(token=token))
                while (answer := await other.ValidateSession(request)).valid:
                    stale += 1
                    if time.perf_counter() - started > 10:
                        self.problems.append("propagation: still valid 10 s after Invalidate")
                        break
                times.append((time.perf_counter() - started) * 1000)
                if answer.reason != pb.REASON_REVOKED and answer.valid is False:
                    self.problems.append(f"propagation: revoked session answered {answer}")
        times.sort()
        # Every one of these had to acknowledge each revocation before Invalidate returned.
        async with self._redis() as client:
            (_, subscribers), *_ = await client.pubsub_numsub(CHANNEL)
        self.report["revocation_subscribers"] = int(subscribers)
        self.report["revocation_propagation_p50_ms"] = round(_pct(times, 0.5), 3)
        self.report["revocation_propagation_p99_ms"] = round(_pct(times, 0.99), 3)
        self.report["revocation_stale_answers"] = stale

    async def sentinel_failover(self) -> None:
        """``sentinel_failover_error_window_ms``: a ``serve`` on a Redis Sentinel set
        (tests/sentinel_failover.py), validated by 8 callers, its master SIGKILLed:
        from the kill to the end of the last call that failed or was not answered
        by the cache (answered from Postgres while there was no master, or until
        the promoted replica was adopted). Full mode only (~10 s)."""
        sentinels = SentinelSet(self.base / "sentinel-set")
        sentinels.start()
        try:
            await sentinels.wait_ready()
            server = self._serve("sentinel", REDIS_URL=sentinels.url)
            try:
                await wait_ready(server)
                async with grpc.aio.insecure_channel(server.target, options=NO_PROXY) as channel:
                    await self._fail_over(sentinels, pb_grpc.SessionAuthorityStub(channel))
            finally:
                if (code := await server.stop()) != 0:
                    self.problems.append(f"sentinel: exited {code} on SIGTERM:\n{server.tail()}")
        finally:
            sentinels.stop()

    async def _fail_over(
        self, sentinels: SentinelSet, stub: pb_grpc.SessionAuthorityAsyncStub
    ) -> None:
        tokens = [
            (await stub.CreateSession(pb.CreateSessionRequest(user_id=f"failover-{i % 4}"))).token
            for i in range(32)
        ]
        for token in tokens[:4]:
            await stub.Invalidate(pb.InvalidateRequest(token=token))
        for _ in range(2):
            for token in tokens:
                await stub.ValidateSession(pb.ValidateSessionRequest(token=token))
        await sentinels.wait_synced()
        load = FailoverLoad(stub, tokens)
        load.revoked_at |= dict.fromkeys(tokens[:4], 0.0)
        load.start()
        try:
            await asyncio.sleep(1.0)
            killed = time.monotonic()
            await asyncio.to_thread(sentinels.master.kill)
            switched = await sentinels.wait_switched(sentinels.replica)
            # Until the last 200 calls, all made after the switch, came from the cache.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                recent = load.calls[-200:]
                if len(recent) == 200 and all(
                    c.started > switched and c.source == "SOURCE_CACHE" for c in recent
                ):
                    break
            else:
                self.problems.append("sentinel: the cache did not answer again after the failover")
        finally:
            await load.stop()
        if wrong := load.wrong():
            self.problems.append(f"sentinel: {len(wrong)} revoked sessions answered valid")
        failed, degraded = load.failed(), load.degraded(killed)
        self.report["sentinel_failover_error_window_ms"] = load.window_ms(degraded, killed)
        self.report["sentinel_failover_failed_calls"] = len(failed)
        self.report["sentinel_failover_failed_window_ms"] = load.window_ms(failed, killed)
        self.report["sentinel_failover_switch_ms"] = round((switched - killed) * 1000, 1)

    async def cluster_failover(self) -> None:
        """``cluster_failover_error_window_ms``: as ``sentinel_failover``, on a
        Redis Cluster of three masters and three replicas (Debian's
        ``redis-server`` 7, ``cluster-node-timeout`` 1 s), the master owning the
        revocation bus's slot SIGKILLed. Full mode only (~10 s)."""
        binary = find_cluster_redis_server()
        if binary is None:
            self.problems.append("cluster: no redis-server 7 (and redis-cli) on PATH")
            return
        cluster = EmbeddedCluster(self.base / "cluster", binary)
        try:
            await asyncio.to_thread(cluster.start)
            await self.sweep_cost(cluster, binary)
            server = self._serve("cluster", REDIS_URL=cluster.url)
            try:
                await wait_ready(server)
                async with grpc.aio.insecure_channel(server.target, options=NO_PROXY) as channel:
                    await self._fail_over_cluster(cluster, pb_grpc.SessionAuthorityStub(channel))
            finally:
                if (code := await server.stop()) != 0:
                    self.problems.append(f"cluster: exited {code} on SIGTERM:\n{server.tail()}")
        finally:
            cluster.stop()

    async def sweep_cost(self, cluster: EmbeddedCluster, binary: Path) -> None:
        """``cluster_sweep_ms`` beside ``single_sweep_ms``: the median time of a
        sweep's Redis calls when nothing is pending (verify, watermark, a seal
        with no tombstone), by the adapter, on the cluster and on one node of
        the same ``redis-server``, alternated. The cluster's watermark is one key
        per hash tag (256). The made-up marks are flushed from the cluster after."""
        single = EmbeddedRedis(self.base / "sweep-redis", binary=binary)
        await asyncio.to_thread(single.start)
        try:
            await self._sweeps(single.url, cluster.url)
        finally:
            single.stop()
            for node in cluster.nodes:
                if cluster.is_master(node):
                    cluster.cli(node, "FLUSHALL")

    async def _sweeps(self, single_url: str, cluster_url: str) -> None:
        adapters: dict[str, RedisSessionCache | RedisClusterSessionCache] = {
            "single": RedisSessionCache.from_url(
                single_url,
                min_connections=1,
                max_connections=4,
                timeout=1.0,
                pool_timeout=1.0,
                legacy_keys=False,
            ),
            "cluster": RedisClusterSessionCache.from_url(
                cluster_url, min_connections=1, max_connections=4, timeout=1.0, pool_timeout=1.0
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in adapters}
        try:
            for cache in adapters.values():
                await cache.adopt()
            for i in range(100):
                for name, cache in adapters.items():
                    started = time.perf_counter()
                    await cache.verify()
                    held = await cache.watermark()
                    await cache.seal([], 60.0, floor=held, mark=f"{i + 1:020d}:~")
                    times[name].append(time.perf_counter() - started)
        finally:
            for cache in adapters.values():
                await cache.aclose()
        for name, samples in times.items():
            self.report[f"{name}_sweep_ms"] = round(statistics.median(samples) * 1000, 3)

    async def _fail_over_cluster(
        self, cluster: EmbeddedCluster, stub: pb_grpc.SessionAuthorityAsyncStub
    ) -> None:
        tokens = [
            (await stub.CreateSession(pb.CreateSessionRequest(user_id=f"failover-{i % 4}"))).token
            for i in range(32)
        ]
        for token in tokens[:4]:
            await stub.Invalidate(pb.InvalidateRequest(token=token))
        for _ in range(2):
            for token in tokens:
                await stub.ValidateSession(pb.ValidateSessionRequest(token=token))
        victim = cluster.master_for(CLUSTER_NAMES.channel)
        (heir,) = cluster.replicas_of(victim)
        load = FailoverLoad(stub, tokens)
        load.revoked_at |= dict.fromkeys(tokens[:4], 0.0)
        load.start()
        switched = math.inf
        try:
            await asyncio.sleep(1.0)
            killed = time.monotonic()
            await asyncio.to_thread(victim.kill)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                if switched == math.inf and await asyncio.to_thread(cluster.is_master, heir):
                    switched = time.monotonic()
                recent = load.calls[-200:]
                if (
                    switched < math.inf
                    and len(recent) == 200
                    and all(c.started > switched and c.source == "SOURCE_CACHE" for c in recent)
                ):
                    break
            else:
                self.problems.append("cluster: the cache did not answer again after the failover")
        finally:
            await load.stop()
        if wrong := load.wrong():
            self.problems.append(f"cluster: {len(wrong)} revoked sessions answered valid")
        failed, degraded = load.failed(), load.degraded(killed)
        self.report["cluster_failover_error_window_ms"] = load.window_ms(degraded, killed)
        self.report["cluster_failover_failed_calls"] = len(failed)
        self.report["cluster_failover_failed_window_ms"] = load.window_ms(failed, killed)
        self.report["cluster_failover_switch_ms"] = round((switched - killed) * 1000, 1)

    async def watch_propagation(self) -> None:
        """Invalidate on one replica; the event at a watcher of the other, one at a time."""
        samples = 60 if self.args.quick else 300
        times: list[float] = []
        hit, replica = self.servers["hit"].target, self.servers["replica"].target
        async with (
            grpc.aio.insecure_channel(hit, options=NO_PROXY) as a,
            grpc.aio.insecure_channel(replica, options=NO_PROXY) as b,
        ):
            one: pb_grpc.SessionAuthorityAsyncStub = pb_grpc.SessionAuthorityStub(a)
            other: pb_grpc.SessionAuthorityAsyncStub = pb_grpc.SessionAuthorityStub(b)
            stream = other.WatchRevocations(pb.WatchRevocationsRequest())
            start = await stream.read()
            assert isinstance(start, pb.RevocationEvent), start
            if start.kind != pb.REVOCATION_EVENT_KIND_START:
                self.problems.append(f"watch: the first message is not START: {start}")
            for i in range(samples):
                created = await one.CreateSession(pb.CreateSessionRequest(user_id=f"watch-{i}"))
                sid = created.session.session_id
                started = time.perf_counter()
                await one.Invalidate(pb.InvalidateRequest(session_id=sid))
                while True:
                    event = await asyncio.wait_for(stream.read(), 10)
                    if event is grpc.aio.EOF:
                        self.problems.append("watch: the stream ended")
                        return
                    assert isinstance(event, pb.RevocationEvent)
                    if event.session_id == sid:
                        break
                times.append((time.perf_counter() - started) * 1000)
                if event.reason != pb.REVOCATION_REASON_EXPLICIT:
                    self.problems.append(f"watch: reason {event.reason} for an Invalidate")
            stream.cancel()
        times.sort()
        self.report["watch_propagation_p50_ms"] = round(_pct(times, 0.5), 3)
        self.report["watch_propagation_p99_ms"] = round(_pct(times, 0.99), 3)

    # --- helpers ------------------------------------------------------------------------

    async def _insert_sessions(self, user: str, count: int) -> list[str]:
        """``count`` live sessions of ``user``, straight into Postgres (fast)."""
        tokens = [new_token() for _ in range(count)]
        now = datetime.now(UTC)
        rows = [
            (
                uuid.uuid4(),
                hashlib.sha256(t.encode()).digest(),
                user,
                now,
                now + timedelta(hours=1),
                None,
                "{}",
            )
            for t in tokens
        ]
        conn = await asyncpg.connect(self.pg)
        try:
            await conn.copy_records_to_table(
                "sessions",
                records=rows,
                columns=[
                    "session_id",
                    "token_hash",
                    "user_id",
                    "created_at",
                    "expires_at",
                    "revoked_at",
                    "metadata",
                ],
            )
        finally:
            await conn.close()
        return tokens

    async def _validate_all(self, tokens: list[str]) -> None:
        async with grpc.aio.insecure_channel(self.servers["hit"].target, options=NO_PROXY) as ch:
            stub = pb_grpc.SessionAuthorityStub(ch)
            queue = list(tokens)

            async def worker() -> None:
                while queue:
                    reply = await stub.ValidateSession(pb.ValidateSessionRequest(token=queue.pop()))
                    if not reply.valid:
                        self.problems.append(f"a fresh session did not validate: {reply}")

            await asyncio.gather(*(worker() for _ in range(32)))

    async def run(self) -> dict[str, Any]:
        started = time.monotonic()
        stolen = _steal_seconds()
        self.report |= {
            "workers": self.workers,
            "load_generator": self.h2load or PYTHON_GENERATOR,
            "cores": os.cpu_count() or 1,
            "machine": _machine(),
            "connections": self.args.connections,
            "streams": self.args.streams,
            "seconds_per_run": self.seconds,
            "rounds": self.rounds,
        }
        try:
            # Inside: servers already started are stopped when another fails to start
            # (left running, they load the machine the next run measures).
            await self.start_servers()
            if self.args.only:
                # Sections that stand alone (each measures its own control in its run).
                for name in self.args.only:
                    await getattr(self, ONLY[name])()
                return self._finish(started, stolen)
            body, tokens = await self.prepare_token()
            batch_body = await self.prepare_batch()
            await self.bytes_per_session()
            # How long the stores were runnable but not running during the
            # throughput runs: a store the machine's scheduler starves answers
            # late (RESULTS.md, "Hits from Postgres under load").
            stores = {"redis": self._pids(self.redis_pid), "postgres": self._pids(self.pg_pid)}
            waited = {name: _waiting(pids) for name, pids in stores.items()}
            await self.throughputs(body, tokens, batch_body)
            for name, pids in stores.items():
                after = _waiting(pids)
                self.report[f"{name}_cpu_wait_seconds"] = round(
                    sum(after[pid] - t for pid, t in waited[name].items() if pid in after), 3
                )
            await self.traced(body, tokens)
            await self.latency(body, tokens)
            await self.touch()
            await self.misses()
            await self.invalidation()
            await self.propagation()
            if not self.args.quick:
                await self.sentinel_failover()
                await self.cluster_failover()
            await self.watch_propagation()
            await self.client_cache_revocation()
        finally:
            if self.cached is not None:
                self.cached.close()
            await self.stop_servers()
        return self._finish(started, stolen)

    def _finish(self, started: float, stolen: float | None) -> dict[str, Any]:
        self.report["bench_seconds"] = round(time.monotonic() - started, 1)
        if stolen is not None and (now := _steal_seconds()) is not None:
            # CPU time the hypervisor gave to others while ours was runnable: a
            # noisy host shows here, not in the ratios' medians.
            self.report["cpu_steal_seconds"] = round(now - stolen, 2)
        self.report["checks"] = self.checks
        self.report["problems"] = self.problems
        self.report["warnings"] = self.warnings
        return self.report


#: ``--only``'s sections: each measures what it compares with in its own run.
ONLY = {
    "touch": "touch",
    "misses": "misses",
    "invalidation": "invalidation",
    "propagation": "propagation",
    "sentinel": "sentinel_failover",
    "watch": "watch_propagation",
}


#: Calls the paced Python client keeps in flight at most: below the server's
#: GRPC_MAX_CONCURRENT_STREAMS (100), beyond which a busy grpc.aio server
#: refuses new streams (RST_STREAM 7, UNAVAILABLE).
PACED_IN_FLIGHT = 64


async def _paced_calls(
    target: str, method: str, request: Any, seconds: float, problems: list[str]
) -> list[float]:
    """Without h2load: ``TOUCH_RATE`` calls a second of ``method`` from this
    process, one due every 1/rate s, at most ``PACED_IN_FLIGHT`` at a time;
    each OK call's milliseconds from when it was due (a call held back by the
    bound counts its wait: no coordinated omission). The channel has made one
    call first; a call that fails is counted into ``problems``, not raised."""
    times: list[float] = []
    failed: Counter[str] = Counter()
    slots = asyncio.Semaphore(PACED_IN_FLIGHT)
    async with grpc.aio.insecure_channel(target, options=NO_PROXY) as ch:
        stub = pb_grpc.SessionAuthorityStub(ch)
        call = getattr(stub, method)
        await call(request, timeout=10)

        async def one(due: float) -> None:
            async with slots:
                try:
                    await call(request, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    failed[exc.code().name] += 1
                    return
            times.append((time.monotonic() - due) * 1000)

        pending = []
        began = time.monotonic()
        for i in range(int(TOUCH_RATE * seconds)):
            due = began + i / TOUCH_RATE
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            pending.append(asyncio.ensure_future(one(due)))
        await asyncio.gather(*pending)
    if failed:
        problems.append(f"{method} (paced, Python client): calls that failed: {dict(failed)}")
    return times


def _slowest_bound_ms(before: Samples, after: Samples, method: str) -> float | None:
    """The smallest bucket bound of the server's ``grpc_server_handling_seconds`` (in
    ms) that holds every call of ``method`` between two scrapes: the slowest call as the
    handler timed it, not counting what the calls waited before and after it (the
    machine's scheduling, the transport, the load generator). None: no call."""
    counts = delta(before, after, "grpc_server_handling_seconds_bucket", grpc_method=method)
    total = delta(before, after, "grpc_server_handling_seconds_count", grpc_method=method)
    calls = sum(total.values())
    if not calls:
        return None
    bounds: dict[float, float] = {}
    for labels, n in counts.items():
        le = dict(part.split("=", 1) for part in labels.split(",") if "=" in part)["le"]
        bounds[float(le)] = bounds.get(float(le), 0.0) + n
    return next((round(le * 1000, 3) for le in sorted(bounds) if bounds[le] >= calls), None)


def _pct(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _timed(op: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await op()
    return (time.perf_counter() - started) * 1000


@dataclass(frozen=True)
class Paced:
    """One server's paced latency run: calls/s, p50 and p99 ms, and the CPU
    seconds the host stole meanwhile (None where /proc/stat does not say)."""

    rps: float
    p50: float
    p99: float
    stolen: float | None


class _Steal:
    """``with _Steal() as s:``: ``s.seconds`` is the CPU the hypervisor took
    from the machine inside the block, or None where /proc/stat does not say."""

    def __enter__(self) -> _Steal:
        self._was = _steal_seconds()
        self.seconds: float | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        now = _steal_seconds()
        if self._was is not None and now is not None:
            self.seconds = now - self._was


def _steal_seconds() -> float | None:
    """Seconds of CPU stolen by the hypervisor so far, all CPUs (``/proc/stat``)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _waiting(pids: list[int]) -> dict[int, float]:
    """Per process, the seconds it has spent runnable but not running
    (``/proc/<pid>/schedstat``, its main thread's); processes gone are left out."""
    found = {}
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            found[pid] = int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    return found


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    if args.keep:
        base = Path(tempfile.mkdtemp(prefix="sa-bench-"))
        print(f"keeping servers' logs and data in {base}", file=sys.stderr)
        return await _bench_in(args, base)
    with tempfile.TemporaryDirectory(prefix="sa-bench-") as tmp:
        return await _bench_in(args, Path(tmp))


async def _bench_in(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    workers = args.workers or os.cpu_count() or 1
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(EmbeddedPostgres(base / "pg"))
        rd = stack.enter_context(EmbeddedRedis(base / "redis"))
        # As many server connections as the replica's workers open (PG_POOL_MAX, 10 each):
        # pgbouncer_vs_direct is the cost of the pooler's protocol, not of a smaller pool.
        bouncer = stack.enter_context(
            EmbeddedPgBouncer(base / "pgbouncer", pg_port=pg.port, pool_size=10 * workers)
        )
        conn = await asyncpg.connect(pg.url)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        bench = Bench(args, base, pg.url, rd.url, rd.pid, pg.pid, pgbouncer=bouncer.url)
        return await bench.run()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (under a minute)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--workers", type=int, default=0, help="serve --workers (0: one per core)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one load run")
    parser.add_argument("--rounds", type=int, default=5, help="runs per throughput (median)")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--streams", type=int, default=16, help="calls in flight per connection")
    parser.add_argument("--python-load", action="store_true", help="do not use h2load")
    parser.add_argument(
        "--only",
        type=lambda text: [name for name in text.split(",") if name],
        default=[],
        help=f"run only these sections, comma-separated ({', '.join(ONLY)}); each measures "
        "its own control in its run",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the servers' logs and data (path on stderr)"
    )
    args = parser.parse_args()
    if unknown := [name for name in args.only if name not in ONLY]:
        parser.error(f"--only: no section {', '.join(unknown)} (sections: {', '.join(ONLY)})")
    report = asyncio.run(_main(args))
    for key, value in report.items():
        if key not in ("checks", "problems", "warnings"):
            print(f"{key:<36} {value}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report: {args.json.resolve()}")
    for warning in report["warnings"]:
        print(f"WARNING: {warning}", file=sys.stderr)
    for problem in report["problems"]:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
