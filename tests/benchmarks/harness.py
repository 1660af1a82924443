"""What the benchmark drives: server processes, h2load (or the Python load
generator), and the servers' own /metrics, read to check what h2load cannot
see (it counts HTTP statuses; a gRPC error is an HTTP 200)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from session_authority.config import Settings
from session_authority.v1 import session_authority_pb2 as pb
from tests.third_party import aio_health_stub

__all__ = [
    "REPO",
    "TOUCH",
    "VALIDATE",
    "VALIDATE_MANY",
    "H2load",
    "Server",
    "clean_env",
    "grpc_frame",
    "h2load_version",
    "run_h2load",
    "run_h2load_paced",
    "run_loadgen",
    "scrape",
    "start",
]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
VALIDATE = "/session_authority.v1.SessionAuthority/ValidateSession"
TOUCH = "/session_authority.v1.SessionAuthority/TouchSession"
VALIDATE_MANY = "/session_authority.v1.SessionAuthority/ValidateSessions"
NO_PROXY = [("grpc.enable_http_proxy", 0)]
_PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy", "no_proxy")


def clean_env(**extra: str) -> dict[str, str]:
    """A child's environment: no proxies, PG*, OTEL_* or server settings from
    the caller's shell (the servers run the default configuration)."""
    settings = {name.upper() for name in Settings.model_fields}
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _PROXY_VARS and not k.startswith(("PG", "OTEL_")) and k.upper() not in settings
    }
    return env | extra


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    admin_port: int | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "<no log>"

    async def stop(self, wait: float = 20.0) -> int | None:
        """SIGTERM, wait; SIGKILL (None) when it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.process.wait, wait)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None


def start(
    name: str, argv: Sequence[str], env: dict[str, str], port: int, logs: Path, **kw: int
) -> Server:
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            list(argv),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    return Server(name, process, port, log, **kw)


async def wait_ready(server: Server, within: float = 60.0, *, health: bool = True) -> None:
    """Until the standard health service says SERVING (``health``), or else
    until a ValidateSession call gets any gRPC answer (the baseline)."""
    deadline = time.monotonic() + within
    async with grpc.aio.insecure_channel(server.target, options=NO_PROXY) as channel:
        validate: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(VALIDATE)
        while True:
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.name} exited early:\n{server.tail()}")
            try:
                if health:
                    reply = await aio_health_stub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                else:
                    await validate(b"", timeout=1)
                    break
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.name} not ready in {within}s:\n{server.tail()}")
            await asyncio.sleep(0.1)
    if server.admin_port:  # every worker, not only the first to answer
        while (await _get(server.admin_port, "/readyz"))[0] != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.name}: /readyz not 200:\n{server.tail()}")
            await asyncio.sleep(0.1)


async def _get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(trust_env=False) as session,
        session.get(f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(10)) as reply,
    ):
        return reply.status, await reply.text()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(server: Server) -> Samples:
    """The server's /metrics, summed over its workers."""
    assert server.admin_port
    status, text = await _get(server.admin_port, "/metrics")
    assert status == 200, text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset((k, v) for k, v in sample.labels.items() if k != "worker")
            key = (sample.name, labels)
            samples[key] = samples.get(key, 0.0) + sample.value
    return samples


def delta(before: Samples, after: Samples, name: str, **match: str) -> dict[str, float]:
    """Increase of ``name`` between two scrapes, by the labels not in ``match``
    (as ``"k=v,..."``), for samples whose labels include ``match``."""
    wanted = set(match.items())
    out: dict[str, float] = {}
    for (sample, labels), value in after.items():
        if sample != name or not wanted <= labels:
            continue
        rest = ",".join(f"{k}={v}" for k, v in sorted(labels - wanted))
        increase = value - before.get((sample, labels), 0.0)
        if increase:
            out[rest] = out.get(rest, 0.0) + increase
    return out


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed, length-prefixed gRPC message: an h2load body."""
    return b"\0" + len(message).to_bytes(4, "big") + message


def h2load_version() -> str | None:
    path = shutil.which("h2load")
    if path is None:
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or "h2load"


@dataclass
class H2load:
    rps: float
    succeeded: int
    failed: int
    errored: int
    status_2xx: int
    latencies_ms: list[float] = field(default_factory=list)


_FINISHED = re.compile(r"finished in [\d.]+\w*, ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx")


#: Calls a second per connection at most when pacing (see ``run_h2load_paced``).
PACED_RPS_PER_CONNECTION = 100


async def run_h2load(
    target: str,
    body: Path,
    *,
    seconds: float,
    warmup: float,
    connections: int,
    streams: int,
    rps_per_client: float | None = None,
    log_file: Path | None = None,
    path: str = VALIDATE,
) -> H2load:
    """h2load's gRPC call: POST of ``body`` with gRPC's headers, over h2c.

    ``rps_per_client`` is h2load's own ``--rps``: it sends on a timer that
    fires every max(10 ms, 1/rps), so above 100 calls/s a connection sends
    its calls in bursts every 10 ms. ``run_h2load_paced`` spreads them."""
    argv = [
        f"--clients={connections}",
        f"--max-concurrent-streams={streams}",
        f"--duration={round(seconds * 1000)}ms",
    ]
    if warmup > 0:
        argv.append(f"--warm-up-time={round(warmup * 1000)}ms")
    if rps_per_client:
        argv.append(f"--rps={rps_per_client:.2f}")
    return await _h2load(target, body, argv, seconds + warmup, log_file, path)


async def run_h2load_paced(
    target: str,
    body: Path,
    *,
    rate: float,
    seconds: float,
    log_file: Path | None,
    method: str = VALIDATE,
) -> H2load:
    """``rate`` calls a second in all, open loop, spread out: as many
    connections as it takes to send at most ``PACED_RPS_PER_CONNECTION``
    each (one call per 10 ms timer tick: no burst), opened 1 ms apart (h2load
    ``--rate``/``--rate-period``; 1 ms is its finest period) so their ticks
    fall in different milliseconds. For 3,000 calls/s: 30 connections, about
    3 calls sent each millisecond, where ``--rps`` on 4 connections sends
    about 30 at once every 10 ms and measures how long a burst takes to drain."""
    connections = max(1, math.ceil(rate / PACED_RPS_PER_CONNECTION))
    argv = [
        f"--clients={connections}",
        "--max-concurrent-streams=16",
        f"--requests={max(connections, round(rate * seconds))}",
        f"--rps={rate / connections:.2f}",
        "--rate=1",
        "--rate-period=1ms",
    ]
    return await _h2load(target, body, argv, seconds, log_file, method)


async def _h2load(
    target: str,
    body: Path,
    options: list[str],
    seconds: float,
    log_file: Path | None,
    path: str = VALIDATE,
) -> H2load:
    argv = [
        "h2load",
        *options,
        f"--data={body}",
        "--header=content-type: application/grpc",
        "--header=te: trailers",
    ]
    if log_file is not None:
        await asyncio.to_thread(log_file.unlink, missing_ok=True)  # h2load appends
        argv.append(f"--log-file={log_file}")
    argv.append(f"http://{target}{path}")
    done = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=seconds + 60
    )
    out = done.stdout
    finished, requests, status = _FINISHED.search(out), _REQUESTS.search(out), _STATUS.search(out)
    if done.returncode != 0 or not (finished and requests and status):
        raise RuntimeError(f"h2load failed ({done.returncode}):\n{out}\n{done.stderr}")
    result = H2load(
        rps=float(finished[1]),
        succeeded=int(requests[4]),
        failed=int(requests[5]),
        errored=int(requests[6]),
        status_2xx=int(status[1]),
    )
    if log_file is not None:
        result.latencies_ms = _latencies(log_file)
    return result


def _latencies(log_file: Path) -> list[float]:
    """h2load's --log-file: start (us since epoch), HTTP status, us to the end."""
    rows = [line.split("\t") for line in log_file.read_text().splitlines() if line]
    return [int(r[2]) / 1000 for r in rows if len(r) >= 3 and r[1] == "200"]


async def run_loadgen(
    target: str,
    tokens: Path,
    *,
    seconds: float,
    connections: int,
    streams: int,
    once: bool = False,
    rate: float = 0.0,
) -> dict[str, object]:
    """tests/benchmarks/loadgen.py in a process of its own; its JSON report."""
    argv = [
        sys.executable,
        "-m",
        "tests.benchmarks.loadgen",
        f"--target={target}",
        f"--tokens={tokens}",
        f"--seconds={seconds}",
        f"--connections={connections}",
        f"--streams={streams}",
        f"--rate={rate}",
        *(["--once"] if once else []),
    ]
    done = await asyncio.to_thread(
        subprocess.run,
        argv,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        cwd=REPO,
        env=clean_env(),
    )
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    report: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def validate_request(token: str) -> bytes:
    return pb.ValidateSessionRequest(token=token).SerializeToString()
