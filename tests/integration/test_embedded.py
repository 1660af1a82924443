"""The embedded Postgres/Redis servers: start, answer, survive kill/restart, pause/resume."""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest
import redis
import redis.exceptions

from session_authority.embedded import (
    EmbeddedPostgres,
    EmbeddedRedis,
    embedded_available,
    find_free_port,
)
from session_authority.embedded.unprivileged import prepare_postgres_account

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not embedded_available(), reason="needs session-authority[embedded]"),
]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres(tmp_path / "pg") as server:
        yield server


def fetch(url: str, sql: str, timeout: float = 5.0) -> list[Any]:
    async def run() -> list[Any]:
        conn = await asyncpg.connect(url, timeout=timeout)
        try:
            return [tuple(row) for row in await conn.fetch(sql)]
        finally:
            await conn.close()

    return asyncio.run(run())


def client(server: EmbeddedRedis, timeout: float = 2.0) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=timeout, socket_connect_timeout=timeout)


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_redis_starts_and_answers(redis_server: EmbeddedRedis) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.pid is not None
    with client(redis_server) as r:
        assert r.ping() is True
        r.set("k", "v")
        assert r.get("k") == b"v"
    assert (redis_server.base_dir / "redis.log").exists()


def test_postgres_starts_and_answers(pg: EmbeddedPostgres) -> None:
    assert pg.url == f"postgresql://postgres@127.0.0.1:{pg.port}/session_authority"
    assert pg.pid is not None
    assert fetch(pg.url, "select 1, current_database()") == [(1, "session_authority")]
    # a second start (e.g. the dev command reusing a data dir) is a no-op
    pg.start()
    assert fetch(pg.url, "select 1") == [(1,)]


def test_postgres_data_survives_kill_and_restart_on_same_port(pg: EmbeddedPostgres) -> None:
    fetch(pg.url, "create table t (v text)")
    fetch(pg.url, "insert into t values ('kept')")
    port, old_pid = pg.port, pg.pid
    pg.kill()
    assert (pg.pid, port_open(port)) == (None, False)
    pg.restart()
    assert pg.port == port
    assert pg.pid not in (None, old_pid)
    assert fetch(pg.url, "select v from t") == [("kept",)]


def test_postgres_restart_after_postmaster_killed_behind_our_back(pg: EmbeddedPostgres) -> None:
    # A live session means a backend that the SIGKILLed postmaster leaves orphaned.
    psql = [str(pg.bin_dir / "psql"), pg.url, "-XAtc", "select pg_sleep(60)"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    with subprocess.Popen(psql, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as sess:
        count = "select count(*) from pg_stat_activity where query like '%pg_sleep(60)%'"
        for _ in range(100):
            if fetch(pg.url, count)[0][0] >= 2:  # the psql session and this query itself
                break
        assert pg.pid is not None
        os.kill(pg.pid, signal.SIGKILL)
        pg.restart()
        assert sess.wait(10) != 0  # the orphaned backend died with the group
    assert fetch(pg.url, "select 1") == [(1,)]


def test_redis_kill_and_restart_on_same_port(redis_server: EmbeddedRedis) -> None:
    port = redis_server.port
    redis_server.kill()
    assert redis_server.pid is None
    assert not port_open(port)
    redis_server.restart()
    assert redis_server.port == port
    with client(redis_server) as r:
        assert r.ping() is True
        assert r.get("k") is None  # no persistence: a restart is a cold cache


def test_redis_pause_times_out_calls_and_resume_recovers(redis_server: EmbeddedRedis) -> None:
    with client(redis_server, timeout=0.5) as r:
        assert r.ping() is True
        redis_server.pause()
        try:
            with pytest.raises(redis.exceptions.TimeoutError):
                r.ping()
        finally:
            redis_server.resume()
        assert r.ping() is True


def test_postgres_pause_and_resume(pg: EmbeddedPostgres) -> None:
    pg.pause()
    try:
        with pytest.raises(TimeoutError):
            fetch(pg.url, "select 1", timeout=0.5)
    finally:
        pg.resume()
    assert fetch(pg.url, "select 1") == [(1,)]


def test_postgres_pause_freezes_open_connections(pg: EmbeddedPostgres) -> None:
    # Backends call setsid(): a pause that only stopped the postmaster's group would leave
    # this already-open connection answering.
    async def run() -> None:
        conn = await asyncpg.connect(pg.url, timeout=5)
        try:
            pg.pause()
            try:
                query = asyncio.ensure_future(conn.fetchval("select 1"))
                done, _ = await asyncio.wait({query}, timeout=0.5)
                assert not done, "a paused backend answered"
            finally:
                pg.resume()
            assert await asyncio.wait_for(query, 5) == 1  # the same query, answered late
        finally:
            await conn.close()

    asyncio.run(run())


def test_postgres_kill_ends_backends(pg: EmbeddedPostgres) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(pg.url, timeout=5)
        backend = await conn.fetchval("select pg_backend_pid()")
        pg.kill()
        conn.terminate()
        assert not running(backend)  # gone when kill() returns, not merely dying

    asyncio.run(run())


def test_postgres_stop_while_paused_shuts_down_cleanly(pg: EmbeddedPostgres) -> None:
    # The postmaster waits for its backends and auxiliary processes to exit: all of them
    # must be continued, or stop() only ends at its timeout, by SIGKILL.
    pg.pause()
    pg.stop(timeout=20)
    assert pg.pid is None
    assert "database system is shut down" in pg.log_path.read_text()


def test_postgres_restart_after_paused_postmaster_killed_behind_our_back(
    pg: EmbeddedPostgres,
) -> None:
    # The frozen backends, orphaned, never notice their postmaster died and keep its shared
    # memory: the restart must end them.
    fetch(pg.url, "create table t (v text)")
    pg.pause()
    assert pg.pid is not None
    os.kill(pg.pid, signal.SIGKILL)
    pg.restart()
    assert fetch(pg.url, "select count(*) from t") == [(0,)]


def test_postgres_runs_unprivileged(pg: EmbeddedPostgres) -> None:
    assert pg.pid is not None
    uid = psutil.Process(pg.pid).uids().real
    # Postgres refuses root: as root, it runs as `nobody` (no account is created).
    assert uid == (pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid())


def test_stop_is_idempotent(tmp_path: Path) -> None:
    servers = [EmbeddedRedis(tmp_path / "r"), EmbeddedPostgres(tmp_path / "p")]
    for server in servers:
        server.stop()  # never started
        server.start()
        port = server.port
        server.stop()
        server.stop()
        assert server.pid is None
        assert not port_open(port)
        server.start()
        server.kill()
        server.stop()  # after kill
        assert server.pid is None


def test_stop_while_paused(redis_server: EmbeddedRedis) -> None:
    redis_server.pause()
    redis_server.stop(timeout=5)
    assert redis_server.pid is None


def test_start_failure_raises_with_log_tail(tmp_path: Path) -> None:
    port = find_free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        server = EmbeddedRedis(tmp_path / "r", port=port)
        with pytest.raises(RuntimeError, match=r"(?s)exited with code.*Address already in use"):
            server.start(timeout=5)
    assert server.pid is None


@pytest.mark.skipif(os.geteuid() != 0, reason="as any other user, nothing is granted")
def test_root_grants_only_the_missing_other_bits(tmp_path: Path) -> None:
    # A pgserver install unpacked under umask 077, in a 0700 directory.
    install, base = tmp_path / "private" / "pginstall", tmp_path / "base"
    (install / "bin").mkdir(parents=True)
    (install / "bin" / "postgres").write_text("")
    (install / "bin" / "postgres").chmod(0o700)
    (install / "share.txt").write_text("")
    (install / "share.txt").chmod(0o640)
    base.mkdir(mode=0o750)
    for path in (tmp_path / "private", install, install / "bin"):
        path.chmod(0o700)
    tmp_path.chmod(0o755)
    account = prepare_postgres_account(install, base)
    assert account is not None
    assert account.pw_uid != 0
    modes = {
        p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777)
        for p in (tmp_path / "private", install, install / "bin", install / "bin" / "postgres")
    }
    assert modes == {
        "private": "0o701",  # traverse only: its other entries stay unlisted
        "private/pginstall": "0o705",
        "private/pginstall/bin": "0o705",
        "private/pginstall/bin/postgres": "0o705",
    }
    assert oct((install / "share.txt").stat().st_mode & 0o777) == "0o644"
    assert oct(base.stat().st_mode & 0o777) == "0o751"
    assert oct(tmp_path.stat().st_mode & 0o777) == "0o755"  # already enough: untouched


@pytest.mark.parametrize("server", ["redis_server", "pg"])
def test_servers_share_the_callers_session_in_a_group_of_their_own(
    server: str, request: pytest.FixtureRequest
) -> None:
    """Each server leads a process group of its own (so it can be frozen and
    killed as one, and a terminal's Ctrl-C does not reach it), in the caller's
    session. In a session of its own it was a scheduling group of its own
    (``kernel.sched_autogroup_enabled``), and on a busy 2-core machine the
    kernel let a mostly idle Redis wait up to a second for a CPU
    (tests/benchmarks/RESULTS.md, "Hits from Postgres under load")."""
    embedded: EmbeddedRedis | EmbeddedPostgres = request.getfixturevalue(server)
    pid = embedded.pid
    assert pid is not None
    assert os.getpgid(pid) == pid
    assert os.getsid(pid) == os.getsid(0)
