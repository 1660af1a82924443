"""The command line as a new user meets it, as real processes: --version, what
each verb's --help says it reads, configuration errors in the environment's
words, and ``dev``'s ports."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from importlib.metadata import version

import pytest

from session_authority.config import Settings
from session_authority.embedded import find_free_port

from .e2e_support import BIN, clean_env

pytestmark = pytest.mark.e2e

_CLI = BIN / "session-authority"
_ARGV = [str(_CLI)] if _CLI.exists() else [sys.executable, "-m", "session_authority.cli"]
_DEV_START_TIMEOUT = 60.0  # backstop: private Postgres and Redis, migrations, serve


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_ARGV, *args],
        env=clean_env(**env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_version() -> None:
    done = _run("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"session-authority {version('session-authority')}"


def test_serve_help_names_every_variable() -> None:
    done = _run("serve", "--help")
    assert done.returncode == 0, done.stderr
    listed = {line.split("=", 1)[0].strip() for line in done.stdout.splitlines() if "=" in line}
    missing = [n.upper() for n in Settings.model_fields if n.upper() not in listed]
    assert not missing, f"not in serve --help: {missing}"


#: What dev sets itself: loopback, --port, text logs, open, its private servers.
_DEV_OWN = {"host", "port", "log_format", "allow_unauthenticated", "database_url", "redis_url"}


def test_dev_and_migrate_help_name_what_they_read() -> None:
    dev = _run("dev", "--help").stdout
    for name in Settings.model_fields:
        assert (f"  {name.upper()}=" in dev) != (name in _DEV_OWN), name
    migrate = _run("migrate", "--help").stdout
    assert "  DATABASE_URL=" in migrate
    assert "  LOG_LEVEL=" in migrate


def test_gc_help_names_its_flags_and_what_it_reads() -> None:
    done = _run("gc", "--help")
    assert done.returncode == 0, done.stderr
    for flag in ("--retention DURATION", "--batch-size N", "--dry-run", "--json"):
        assert flag in done.stdout, flag
    for name in ("DATABASE_URL", "DATABASE_POOLER", "CACHE_TTL_SECONDS", "REVOCATION_SKEW_SECONDS"):
        assert f"  {name}=" in done.stdout, name


@pytest.mark.parametrize("verb", ["serve", "migrate"])
def test_a_setting_that_makes_another_invalid_names_both(verb: str) -> None:
    done = _run(verb, CACHE_TTL_SECONDS="600", DATABASE_URL="postgresql://127.0.0.1:1/x")
    assert done.returncode == 2
    assert "TOMBSTONE_TTL_SECONDS (600) must exceed CACHE_TTL_SECONDS (600)" in done.stderr
    assert "tombstone_ttl" not in done.stderr.lower().replace("tombstone_ttl_seconds", "")
    assert "cache_ttl" not in done.stderr.replace("CACHE_TTL", "")


def test_a_bad_value_is_named_by_its_variable() -> None:
    done = _run("serve", CACHE_EARLY_REFRESH_SECONDS="soon")
    assert done.returncode == 2
    assert "  CACHE_EARLY_REFRESH_SECONDS: Input should be a valid number" in done.stderr
    assert "cache_early_refresh_seconds" not in done.stderr


@contextlib.contextmanager
def _listening() -> Iterator[int]:
    """A port some other process holds (here: this one), listening on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


@pytest.mark.parametrize("which", ["--port", "--admin-port"])
def test_dev_refuses_a_taken_port(which: str) -> None:
    with _listening() as taken:
        ports = {"--port": str(find_free_port()), "--admin-port": "0", which: str(taken)}
        done = _run("dev", *(a for kv in ports.items() for a in kv))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert f"127.0.0.1:{taken} is taken" in done.stderr
    assert f"choose another with {which} PORT" in done.stderr
    assert "starting private Postgres" not in done.stdout  # refused before anything started


def test_dev_serves_admin_on_the_flag_port(tmp_path_factory: pytest.TempPathFactory) -> None:
    port, admin = find_free_port(), find_free_port()
    out = tmp_path_factory.mktemp("dev") / "dev.out"
    with out.open("wb") as sink:
        process = subprocess.Popen(
            [*_ARGV, "dev", "--port", str(port), "--admin-port", str(admin)],
            env=clean_env(ADMIN_PORT=str(find_free_port())),  # the flag wins over the variable
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + _DEV_START_TIMEOUT
        while f"curl -s 127.0.0.1:{admin}/" not in out.read_text(errors="replace"):
            assert process.poll() is None, out.read_text(errors="replace")
            assert time.monotonic() < deadline, out.read_text(errors="replace")
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/livez", timeout=10) as reply:
            assert reply.status == 200
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, out.read_text(errors="replace")
