"""Helpers shared by the integration tests (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc

from session_authority.config import Settings
from session_authority.embedded import find_free_port
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc


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
    ``server_env(**env)`` on loopback, no admin port, no authentication."""
    argv = [str(Path(sys.executable).parent / "session-authority"), "serve", "--port", str(port)]
    with log.open("wb") as out:
        return subprocess.Popen(
            [*argv, *args],
            env=server_env(HOST="127.0.0.1", ADMIN_PORT="0", ALLOW_UNAUTHENTICATED="true", **env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


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
