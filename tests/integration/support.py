"""Helpers shared by the integration tests (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from session_authority.config import Settings
from session_authority.embedded import find_free_port
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc


def metric_total(admin_port: int, name: str, **labels: str) -> float:
    """The sum of a server's ``name`` samples whose labels include ``labels``, read from
    its admin port's /metrics (blocking: call it in a thread from async code)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def server_env(**extra: str) -> dict[str, str]:
    """The environment for a server subprocess: no proxies (loopback only), no
    stray PG* variables, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith("PG")
    }
    return env | extra


#: Tests talk to loopback only; never through a proxy from the environment.
NO_PROXY = [("grpc.enable_http_proxy", 0)]


def app_settings(database_url: str, redis_url: str | None, **overrides: object) -> Settings:
    """Settings for an in-process server on a free loopback port (admin port off)."""
    values: dict[str, object] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "host": "127.0.0.1",
        "port": find_free_port(),
        "admin_port": 0,
        # Load tests drive thousands of unknown tokens from one loopback caller, during
        # outages too (no negative cache): the per-caller limit would refuse them. It has
        # tests of its own (tests/unit/test_miss_limit.py, test_revocation.py).
        "unknown_token_rate": 0,
    }
    return Settings(**(values | overrides))  # type: ignore[arg-type]


def spawn_serve(port: int, log: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    """``session-authority serve --port port *args`` as a process of its own
    (so a test can SIGKILL or SIGSTOP it), its output in ``log``, with
    ``server_env(**env)`` on loopback, no admin port, no authentication
    (unless ``env`` says otherwise)."""
    argv = [str(Path(sys.executable).parent / "session-authority"), "serve", "--port", str(port)]
    with log.open("wb") as out:
        return subprocess.Popen(
            [*argv, *args],
            env=server_env(
                **{"HOST": "127.0.0.1", "ADMIN_PORT": "0", "ALLOW_UNAUTHENTICATED": "true", **env}
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop_serve(process: subprocess.Popen[bytes], grace: float = 20) -> int | None:
    """SIGTERM (``serve`` drains), then wait up to ``grace`` seconds; SIGKILL
    and None when it has not exited by then. Its exit code otherwise."""
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


async def wait_serving(stub: pb_grpc.SessionAuthorityAsyncStub, log: Path) -> None:
    """Until the server answers Health (30 s at most; its log is named if not)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            await stub.Health(pb.HealthRequest(), timeout=1)
            return
        except grpc.aio.AioRpcError:
            assert time.monotonic() < deadline, f"not serving; see {log}"
            await asyncio.sleep(0.1)


class RedisProxy:
    """A TCP proxy in the test's event loop between a ``serve`` process and
    Redis, that can fail one kind of connection on demand: a connection that has
    sent SUBSCRIBE is a *subscriber*.

    * ``cut_subscribers()``: Redis's side is closed (Redis forgets the
      subscription), the process's side stays open and silent: what a cut
      network does to a process that never hears of it.
    * ``hold_subscribers()``: both sides stay open and nothing more is
      forwarded either way (the bytes are dropped for good).

    Every other connection (the process's cache and bus commands) is untouched.
    """

    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self._upstream = (host, upstream_port)
        self._links: list[_Link] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut_subscribers(self) -> int:
        """Cut every subscriber connection now; how many were cut."""
        return self._stop(close_upstream=True)

    def hold_subscribers(self) -> int:
        """Stop forwarding on every subscriber connection now; how many."""
        return self._stop(close_upstream=False)

    def _stop(self, *, close_upstream: bool) -> int:
        stopped = 0
        for link in self._links:
            if link.subscriber and not link.stopped:
                link.stopped = True
                if close_upstream:
                    link.upstream.close()
                stopped += 1
        return stopped

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in self._links:
            link.upstream.close()
            link.downstream.close()
            for task in link.tasks:
                task.cancel()
        tasks = [task for link in self._links for task in link.tasks]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.close()
            return
        link = _Link(up_writer, writer)
        self._links.append(link)
        link.tasks = [
            asyncio.create_task(self._pump(link, reader, up_writer, upward=True)),
            asyncio.create_task(self._pump(link, up_reader, writer, upward=False)),
        ]

    @staticmethod
    async def _pump(
        link: _Link, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, upward: bool
    ) -> None:
        try:
            while data := await source.read(65536):
                if upward and b"SUBSCRIBE" in data.upper():
                    link.subscriber = True
                if link.stopped:
                    continue  # dropped for good
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # The process hanging up is passed on; Redis hanging up on a
            # stopped connection is not (the process must not hear of it).
            if upward or not link.stopped:
                sink.close()


class _Link:
    def __init__(self, upstream: asyncio.StreamWriter, downstream: asyncio.StreamWriter) -> None:
        self.upstream = upstream
        self.downstream = downstream
        self.subscriber = False
        self.stopped = False
        self.tasks: list[asyncio.Task[None]] = []
