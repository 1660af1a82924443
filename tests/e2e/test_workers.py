"""``serve --workers 2``: two worker processes answer on one port, the admin
port speaks for both, and SIGTERM drains both and exits 0.

A server of its own (the tier's shared one runs ``--workers 1``: grpcurl opens
a connection per call, and its Health counters checks need one process)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis, find_free_port
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc
from tests.third_party import health_stub

from .e2e_support import BIN, camel, check_health_document, clean_env, stop_process

pytestmark = pytest.mark.e2e

CALLS = 24  # each on a connection of its own: all on one worker once in 2**23 runs
_NO_PROXY = ("grpc.enable_http_proxy", 0)
# A channel of its own subchannel pool opens its own TCP connection.
_OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy


class _Served:
    def __init__(self, process: subprocess.Popen[bytes], target: str, admin: str, log: Path):
        self.process, self.target, self.admin, self.log = process, target, admin, log

    def get(self, path: str) -> tuple[int, str]:
        try:
            with _DIRECT.open(f"http://{self.admin}{path}", timeout=10) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def entries(self) -> list[dict[str, Any]]:
        text = self.log.read_text(errors="replace")
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[_Served]:
    with (
        EmbeddedPostgres(tmp_path / "postgres") as postgres,
        EmbeddedRedis(tmp_path / "redis") as redis,
    ):
        port, admin = find_free_port(), find_free_port()
        env = clean_env(
            DATABASE_URL=postgres.url,
            REDIS_URL=redis.url,
            HOST="127.0.0.1",
            ADMIN_PORT=str(admin),
            LOG_FORMAT="json",
            SHUTDOWN_GRACE_SECONDS="5",
        )
        cli = BIN / "session-authority"
        argv = [str(cli)] if cli.exists() else [sys.executable, "-m", "session_authority.cli"]
        argv += ["serve", "--workers", "2", "--migrate", "--allow-unauthenticated"]
        log = tmp_path / "server.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [*argv, "--port", str(port)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            yield _Served(process, f"127.0.0.1:{port}", f"127.0.0.1:{admin}", log)
        finally:
            stop_process(process)


def _wait_serving(served: _Served) -> None:
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(served.target, options=[_NO_PROXY]) as channel:
        while True:
            assert served.process.poll() is None, served.log.read_text()
            try:
                reply = health_stub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, served.log.read_text()
            time.sleep(0.1)
    while served.get("/readyz")[0] != 200:  # both workers, not only the first to answer
        assert time.monotonic() < deadline, served.log.read_text()
        time.sleep(0.1)


def _handled_by_worker(exposition: str) -> dict[str, float]:
    return {
        sample.labels["worker"]: sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == "grpc_server_handled_total"
        and sample.labels["grpc_method"] == "ValidateSession"
        and sample.labels["grpc_code"] == "OK"
    }


def test_two_workers_share_the_port_and_drain_on_sigterm(served: _Served) -> None:
    _wait_serving(served)
    with grpc.insecure_channel(served.target, options=[_NO_PROXY]) as channel:
        token = (
            pb_grpc.SessionAuthorityStub(channel)
            .CreateSession(pb.CreateSessionRequest(user_id="workers"), timeout=10)
            .token
        )
    for _ in range(CALLS):
        with grpc.insecure_channel(served.target, options=[_NO_PROXY, _OWN_CONNECTION]) as ch:
            reply = pb_grpc.SessionAuthorityStub(ch).ValidateSession(
                pb.ValidateSessionRequest(token=token), timeout=10
            )
            assert reply.valid

    status, exposition = served.get("/metrics")
    assert status == 200
    handled = _handled_by_worker(exposition)
    assert set(handled) == {"0", "1"}, handled
    assert all(count > 0 for count in handled.values()), handled
    assert sum(handled.values()) == CALLS

    status, body = served.get("/health")
    assert status == 200
    doc = json.loads(body)
    check_health_document(
        {**doc, "sessionCache": {**doc["sessionCache"], "metrics": _as_proto_json(doc)}}, camel
    )
    assert int(doc["sessionCache"]["metrics"]["total"]) == CALLS
    pids = [worker["pid"] for worker in doc["workers"]]
    assert len(set(pids)) == 2
    assert served.process.pid not in pids
    starts = [e for e in served.entries() if "of 2 starting" in str(e["message"])]
    started = {e["pid"] for e in starts}
    listening = {e["pid"] for e in served.entries() if "listening on" in str(e["message"])}
    assert started == listening == set(pids)
    # Each worker says what it has of its own, and what that makes for the replica.
    for entry in starts:
        assert "per worker: Redis pool up to REDIS_POOL_MAX=10" in entry["message"]
        assert "per replica (2 workers): up to 20 Redis and 20 Postgres" in entry["message"]

    # A Health call names the worker that answered: its numbers are that worker's.
    seen: dict[int, int] = {}
    for _ in range(CALLS):
        with grpc.insecure_channel(served.target, options=[_NO_PROXY, _OWN_CONNECTION]) as ch:
            health = pb_grpc.SessionAuthorityStub(ch).Health(pb.HealthRequest(), timeout=10)
        assert health.worker.count == 2
        seen[health.worker.pid] = health.worker.index
    assert set(seen) == set(pids)
    assert sorted(seen.values()) == [0, 1]

    code = stop_process(served.process)  # SIGTERM; None if it had to be killed
    assert code == 0, served.log.read_text()
    stopped = [e["pid"] for e in served.entries() if e["message"] == "session-authority stopped"]
    assert sorted(stopped) == sorted(pids)
    assert any(e["message"] == "all 2 workers stopped" for e in served.entries())


def _as_proto_json(doc: dict[str, Any]) -> dict[str, Any]:
    """The admin document's counters are JSON numbers; ``check_health_document``
    checks proto3 JSON (uint64 as decimal strings)."""
    metrics = dict(doc["sessionCache"]["metrics"])
    for name in ("hits", "misses", "errors", "total"):
        metrics[name] = str(metrics[name])
    return metrics
