"""Finding, signalling and awaiting a server's processes, through psutil.

A server is a process group led by the process we started. Postgres makes that subtle: each
backend calls setsid(), so it leaves the postmaster's group and a group signal misses it. The
processes of a server are therefore its group *and* its leader's descendants. Zombies count as
gone everywhere: they hold no port or memory, and in a container whose init never reaps,
orphaned ones would otherwise be waited for forever.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

__all__ = ["live", "processes_in", "server_processes", "signal_each", "wait_gone"]


def live(process: psutil.Process) -> bool:
    """Whether `process` still runs: neither gone, nor a zombie, nor its pid reused."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def server_processes(leader: int) -> list[psutil.Process]:
    """Live members of process group `leader` and live descendants of process `leader`."""
    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(leader).children(recursive=True):
            found[child.pid] = child
    for process in psutil.process_iter():
        with contextlib.suppress(OSError):  # ProcessLookupError: it exited meanwhile
            if os.getpgid(process.pid) == leader:
                found[process.pid] = process
    return [p for p in found.values() if live(p)]


def processes_in(directory: Path, executable: Path) -> list[psutil.Process]:
    """Live processes running `executable` with `directory` as working directory."""
    wanted = (str(directory.resolve()), str(executable.resolve()))
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):  # gone meanwhile, or not ours to inspect
            if (process.cwd(), process.exe()) == wanted and live(process):
                found.append(process)
    return found


def signal_each(processes: Iterable[psutil.Process], sig: signal.Signals) -> None:
    """Send `sig` to each process still running (psutil checks the pid was not reused)."""
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(sig)


def wait_gone(processes: Iterable[psutil.Process], deadline: float) -> bool:
    """Wait until none of `processes` is live; False if some still are at `deadline`."""
    pending = list(processes)
    while pending := [p for p in pending if live(p)]:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True
