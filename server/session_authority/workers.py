"""``serve --workers N``: N worker processes on one port, and their supervisor.

The invariant: the supervisor forks every worker before any gRPC object, event
loop or thread exists in it (neither gRPC's core nor asyncio survives a fork).
Each worker then builds its own server, pools, breakers, tracer provider and
metrics (``serve_one``), and binds the same port with ``grpc.so_reuseport``:
the kernel spreads *connections* over the workers (``max_connection_age``
makes long-lived ones move now and then).

The supervisor stays small: it holds no pool and serves no gRPC.

* SIGTERM or SIGINT: forwarded to every worker as SIGTERM; each drains as a
  single ``serve`` does. The supervisor exits 0 once all of them exited 0,
  else 1. A worker still running ``SHUTDOWN_GRACE_SECONDS`` + 10 s later is
  killed (exit 1).
* A worker that exits on its own (a crash, a failed start, the OOM killer) is
  logged at ERROR, the others are stopped the same way, and the supervisor
  exits 1. No restarts: the process manager that restarts a crashed ``serve``
  (systemd, Kubernetes) restarts this one, and a replica never runs on fewer
  workers than it says it has.
* The admin port (``ADMIN_PORT``, unless 0) is the supervisor's: each worker
  serves its admin app on a Unix socket in a private directory, and
  ``observability.fleet.FleetAdmin`` answers for all of them.
* Workers ask the kernel for SIGTERM if the supervisor dies (Linux), so none
  is left serving without it.
* The unknown-token limit (UNKNOWN_TOKEN_RATE, UNKNOWN_TOKEN_BURST) is the
  replica's: the supervisor makes one ``SharedMissLimiter`` table before it
  forks and every worker draws on it, so a caller whose connections land on
  several workers still gets one budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from session_authority.config import Settings
from session_authority.observability.fleet import FleetAdmin
from session_authority.shared_limit import SharedMissLimiter

__all__ = ["WorkerSlot", "default_workers", "run_workers", "scope_note", "usable_cores"]

_log = logging.getLogger("session_authority")
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_KILL_AFTER = 10.0  # seconds past the shutdown grace
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """Who a worker is: ``index`` of ``count``, where its admin app listens
    (None: no admin port), and the unknown-token limit its siblings share
    (None: UNKNOWN_TOKEN_RATE is 0, no limit)."""

    index: int
    count: int
    admin_socket: str | None
    miss_limit: SharedMissLimiter | None = None


def scope_note(settings: Settings, count: int) -> str:
    """What each worker has of its own and what that makes for the replica,
    for each worker's start-up line: the settings are per process, so a
    replica of N workers opens up to N times REDIS_POOL_MAX connections."""
    s = settings
    return (
        f"per worker: Redis pool up to REDIS_POOL_MAX={s.redis_pool_max}, Postgres pool up to "
        f"PG_POOL_MAX={s.pg_pool_max}, MAX_CONCURRENT_RPCS={s.max_concurrent_rpcs}, "
        f"L1_CACHE_SIZE={s.l1_cache_size} entries, its own breakers and Health counters; "
        f"per replica ({count} workers): up to {count * s.redis_pool_max} Redis and "
        f"{count * s.pg_pool_max} Postgres connections, {count * s.max_concurrent_rpcs} "
        f"concurrent RPCs, one unknown-token limit (UNKNOWN_TOKEN_RATE="
        f"{s.unknown_token_rate:g}/s, UNKNOWN_TOKEN_BURST={s.unknown_token_burst} per caller, "
        "shared by the workers), one gRPC port and one admin port (the supervisor's, whose "
        "/health sums the workers)"
    )


def default_workers(settings: Settings) -> int:
    """WORKERS, or one per core this process may use when it is 0."""
    return settings.workers or usable_cores()


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may run on (its CPU affinity), no more than its
    cgroup's CPU quota rounded up: in a container ``os.cpu_count()`` is the
    host's, and a pod limited to 2 CPUs on a 64-core node wants 2 workers."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    return max(1, cores)


def run_workers(settings: Settings, count: int, serve_one: Callable[[WorkerSlot], int]) -> int:
    """Fork ``count`` workers that each run ``serve_one`` and supervise them
    until they have all exited. Returns the supervisor's exit code."""
    runtime = Path(tempfile.mkdtemp(prefix="session-authority-"))
    sockets = [str(runtime / f"worker-{i}.sock") for i in range(count)]
    admin = settings.admin_port != 0
    # Blocked until the supervisor's handlers are in place; workers unblock at once.
    blocked = {*_STOP_SIGNALS, signal.SIGCHLD}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    pids: list[int] = []
    # Before any fork: the workers must all inherit the same shared memory and locks.
    miss_limit = (
        SharedMissLimiter(settings.unknown_token_rate, settings.unknown_token_burst)
        if settings.unknown_token_rate > 0
        else None
    )
    try:
        for index in range(count):
            slot = WorkerSlot(index, count, sockets[index] if admin else None, miss_limit)
            pid = os.fork()
            if pid == 0:
                _worker(slot, serve_one, previous)  # never returns
            pids.append(pid)
        _log.info("serving with %d workers (pids %s)", count, ", ".join(map(str, pids)))
        supervisor = _Supervisor(settings, pids, sockets if admin else None, blocked)
        return asyncio.run(supervisor.run())
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        shutil.rmtree(runtime, ignore_errors=True)


def _worker(
    slot: WorkerSlot, serve_one: Callable[[WorkerSlot], int], mask: set[int | signal.Signals]
) -> None:
    """The child's side of the fork: serve, then leave without running the
    supervisor's clean-ups (``os._exit``)."""
    code = 1
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _die_with_parent()
        code = serve_one(slot)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        _log.exception("worker %d (pid %d) failed", slot.index, os.getpid())
    finally:
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _die_with_parent() -> None:
    """SIGTERM this worker when the supervisor dies (Linux's PR_SET_PDEATHSIG)."""
    parent = os.getppid()
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


class _Supervisor:
    def __init__(
        self,
        settings: Settings,
        pids: list[int],
        sockets: list[str] | None,
        blocked: set[signal.Signals],
    ) -> None:
        self._settings = settings
        self._pids = pids
        self._sockets = sockets
        self._blocked = blocked
        self._running = dict.fromkeys(pids, True)
        self._codes: dict[int, int] = {}
        self._stopping = asyncio.Event()
        self._all_exited = asyncio.Event()
        self._failed = False

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in _STOP_SIGNALS:
            loop.add_signal_handler(sig, self._stop, sig)
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self._blocked)
        self._reap()  # any worker that exited before the handler was in place
        admin = await self._start_admin()
        try:
            await self._stopping.wait()
            if admin is not None:
                admin.draining = True
            limit = self._settings.shutdown_grace_seconds + _KILL_AFTER
            try:
                await asyncio.wait_for(self._all_exited.wait(), limit)
            except TimeoutError:
                self._kill_remaining(limit)
                await self._all_exited.wait()
        finally:
            if admin is not None:
                await admin.stop()
        failed = self._failed or any(code != 0 for code in self._codes.values())
        _log.info("all %d workers stopped%s", len(self._pids), " (with errors)" if failed else "")
        return 1 if failed else 0

    async def _start_admin(self) -> FleetAdmin | None:
        """The one admin port, with the rule of a single ``serve``: a port that
        was set and cannot be bound stops everything; the default one being
        taken is only logged."""
        if self._sockets is None:
            return None
        settings = self._settings
        admin = FleetAdmin(self._sockets, self._pids)
        host, port = settings.admin_bind_host, settings.admin_port
        try:
            await admin.start(host, port)
        except OSError as exc:
            if "admin_port" in settings.model_fields_set:
                _log.error("cannot bind admin port %s:%d: %s; stopping", host, port, exc)
                self._failed = True
                self._stop(signal.SIGTERM)
            else:
                _log.warning(
                    "admin port %s:%d unavailable (%s): no /metrics or /health; set ADMIN_PORT",
                    host,
                    port,
                    exc.strerror or exc,
                )
            return None
        return admin

    def _stop(self, sig: int) -> None:
        if not self._stopping.is_set():
            _log.info("%s: stopping %d workers", signal.Signals(sig).name, len(self._pids))
        self._stopping.set()
        self._signal_running(signal.SIGTERM)

    def _signal_running(self, sig: int) -> None:
        for pid, running in self._running.items():
            if running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    def _reap(self) -> None:
        while any(self._running.values()):
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid not in self._running:
                continue
            self._running[pid] = False
            code = os.waitstatus_to_exitcode(status)
            self._codes[pid] = code
            worker = self._pids.index(pid)
            if not self._stopping.is_set():
                _log.error(
                    "worker %d (pid %d) exited with %d; stopping the others", worker, pid, code
                )
                self._failed = True
                self._stop(signal.SIGTERM)
            elif code != 0:
                _log.error("worker %d (pid %d) exited with %d", worker, pid, code)
        if not any(self._running.values()):
            self._all_exited.set()

    def _kill_remaining(self, waited: float) -> None:
        left = [pid for pid, running in self._running.items() if running]
        _log.error("workers %s still running %.0fs after SIGTERM; killing them", left, waited)
        self._failed = True
        self._signal_running(signal.SIGKILL)
