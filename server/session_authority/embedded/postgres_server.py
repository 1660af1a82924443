"""A private Postgres from the pgserver package (as an unprivileged account when root)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import quote, urlencode

import psutil

from session_authority.embedded.process import (
    ServerProcess,
    log_tail,
    require_package,
    server_env,
)
from session_authority.embedded.process_tree import processes_in, wait_gone
from session_authority.embedded.tls import TlsFiles
from session_authority.embedded.unprivileged import prepare_postgres_account

__all__ = ["EmbeddedPostgres"]


class EmbeddedPostgres(ServerProcess):
    """pgserver's Postgres by default, trusting every connection. ``password``: TCP
    connections must give it (scram-sha-256). ``tls``: TCP connections must use TLS
    (``hostssl`` only), which needs a ``bin_dir`` built with OpenSSL
    (``tls.find_tls_postgres_bin_dir``)."""

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: end sessions, checkpoint, exit

    def __init__(
        self,
        base_dir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        database: str = "session_authority",
        *,
        bin_dir: Path | None = None,
        tls: TlsFiles | None = None,
        password: str | None = None,
    ) -> None:
        super().__init__(base_dir, port, host)
        self.database = database
        self.data_dir = self.base_dir / "pgdata"
        self.tls = tls
        self.password = password
        self._bin_dir = bin_dir
        self._user: pwd.struct_passwd | None = None  # who runs initdb and postgres (None: us)

    @property
    def url(self) -> str:
        secret = "" if self.password is None else ":" + quote(self.password, safe="")
        url = f"postgresql://postgres{secret}@{self.host}:{self.port}/{self.database}"
        if self.tls is None:
            return url
        query = {"sslmode": "verify-full", "sslrootcert": str(self.tls.ca)}
        if self.tls.client_cert is not None and self.tls.client_key is not None:
            query |= {"sslcert": str(self.tls.client_cert), "sslkey": str(self.tls.client_key)}
        return f"{url}?{urlencode(query)}"

    @property
    def bin_dir(self) -> Path:
        if self._bin_dir is not None:
            return self._bin_dir
        return require_package("pgserver") / "pginstall" / "bin"

    @property
    def has_pg_stat_statements(self) -> bool:
        return (self.bin_dir.parent / "lib" / "postgresql" / "pg_stat_statements.so").exists()

    def start(self, timeout: float = 30.0) -> None:
        # Retry rather than fail on two transient refusals:
        # * as root, a pytest session starting concurrently resets /tmp/pytest-of-root to 0700,
        #   which can revoke the traversal prepare_postgres_account gave the postgres account
        #   in the middle of initdb or startup (seen with several sessions sharing the
        #   machine); _prepare grants it again. Once running, postgres only uses paths
        #   relative to -D.
        # * "pre-existing shared memory block ... is still in use": a killed backend's memory
        #   can be released a moment after the process is gone.
        for attempt in range(3):
            try:
                return super().start(timeout)
            except RuntimeError as exc:
                transient = ("Permission denied", "is still in use")
                if attempt == 2 or not any(text in str(exc) for text in transient):
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
        user = self._user = prepare_postgres_account(self.bin_dir.parent, self.base_dir)
        if self._socket_dir is not None:
            self._make_owned_dir(self._socket_dir, user)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(user, deadline)
        if self.tls is not None or self.password is not None:
            self._secure(user)
        # After a SIGKILL the pid/lock files name a dead postmaster. Postgres clears those
        # itself unless the pid was reused meanwhile; we know ours is gone, so drop them.
        lock_files = [self.data_dir / "postmaster.pid"]
        if self._socket_dir is not None:
            lock_files.append(self._socket_dir / f".s.PGSQL.{self.port}.lock")
        for lock in lock_files:
            with contextlib.suppress(OSError, ValueError, IndexError):
                lines = lock.read_text().splitlines()
                if int(lines[0]) != self._last_pid and psutil.pid_exists(int(lines[0])):
                    continue  # a live postmaster: leave it to postgres to refuse
                if lock.name == "postmaster.pid":
                    self._end_orphans(deadline)
                lock.unlink()

    def _end_orphans(self, deadline: float) -> None:
        # Backends of a postmaster killed behind our back are not in its group, and may
        # outlive it a little (or for good, if paused): while they hold its shared memory,
        # postgres refuses to start. They are the postgres processes working in our -D.
        orphans = processes_in(self.data_dir, executable=self.bin_dir / "postgres")
        for orphan in orphans:
            with contextlib.suppress(psutil.NoSuchProcess):
                orphan.kill()
        wait_gone(orphans, deadline)

    @staticmethod
    def _make_owned_dir(path: Path, user: pwd.struct_passwd | None) -> None:
        path.mkdir(mode=0o700, exist_ok=True)
        if user is not None:
            os.chown(path, user.pw_uid, user.pw_gid)

    def _secure(self, user: pwd.struct_passwd | None) -> None:
        """TCP only with the password and/or over TLS; local (socket) connections stay
        trusted for our own tools. Files in -D, owned by the server's account: Postgres
        refuses a key file that others can read."""
        method = "trust" if self.password is None else "scram-sha-256"
        lines = ["local all all trust"]
        if self.tls is None:
            lines.append(f"host all all all {method}")
        else:
            for name, source in (("server.crt", self.tls.cert), ("server.key", self.tls.key)):
                self._owned_copy(source, self.data_dir / name, user)
            self._owned_copy(self.tls.ca, self.data_dir / "root.crt", user)
            client = " clientcert=verify-full" if self.tls.require_client_cert else ""
            lines.append(f"hostssl all all all {method}{client}")
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text("\n".join(lines) + "\n")
        if user is not None:
            os.chown(hba, user.pw_uid, user.pw_gid)

    @staticmethod
    def _owned_copy(source: Path, target: Path, user: pwd.struct_passwd | None) -> None:
        shutil.copyfile(source, target)
        target.chmod(0o600)
        if user is not None:
            os.chown(target, user.pw_uid, user.pw_gid)

    def _initdb(self, user: pwd.struct_passwd | None, deadline: float) -> None:
        # initdb into a staging dir, so a crash mid-initdb never leaves a half-made cluster.
        staging = self.base_dir / "pgdata.initdb"
        shutil.rmtree(staging, ignore_errors=True)
        self._make_owned_dir(staging, user)
        log = self.base_dir / "initdb.log"
        argv = [str(self.bin_dir / "initdb"), "-D", str(staging), "-U", "postgres", "--no-sync"]
        argv += ["--auth=trust", "--encoding=UTF8", "--locale=C"]
        pwfile = self.base_dir / "initdb.pw"
        if self.password is not None:  # the superuser's password, for _secure's pg_hba.conf
            pwfile.write_text(self.password + "\n")
            pwfile.chmod(0o600)
            if user is not None:
                os.chown(pwfile, user.pw_uid, user.pw_gid)
            argv += ["--pwfile", str(pwfile)]
        proc = self._popen(argv, user, log)
        try:
            rc: int | str = proc.wait(max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            rc = "timed out"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # only does anything after a timeout
            proc.wait()
            pwfile.unlink(missing_ok=True)
        if rc != 0:
            raise RuntimeError(f"initdb failed ({rc}); tail of {log}:\n{log_tail(log)}")
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
        if self.tls is not None:
            settings += ["ssl=on", "ssl_cert_file=server.crt", "ssl_key_file=server.key"]
            settings += ["ssl_ca_file=root.crt"]
        if self.has_pg_stat_statements:
            settings.append("shared_preload_libraries=pg_stat_statements")
        for setting in settings:
            argv += ["-c", setting]
        return self._popen(argv, self._user, self.log_path)

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
        # pg_isready authenticates nobody: no password needed.
        cmd = self._client("pg_isready", "postgres", "-q", "-t", "1")
        return subprocess.run(cmd, env=server_env(), capture_output=True, timeout=5).returncode == 0

    def _after_start(self, deadline: float) -> None:
        # psql's :'db' quotes the literal and format('%I') the identifier: any name is safe.
        create_db = (
            "SELECT format('CREATE DATABASE %I', :'db') WHERE NOT EXISTS "
            "(SELECT FROM pg_database WHERE datname = :'db')\\gexec\n"
        )
        script = [("postgres", create_db)]
        if self.has_pg_stat_statements:
            script.append((self.database, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;\n"))
        env = server_env()
        if self.password is not None:
            env["PGPASSWORD"] = self.password
        if self.tls is not None and self.tls.client_cert is not None:
            env["PGSSLCERT"], env["PGSSLKEY"] = str(self.tls.client_cert), str(self.tls.client_key)
        for database, sql in script:
            cmd = self._client("psql", database, "-X", "-q", "-v", "ON_ERROR_STOP=1")
            result = subprocess.run(
                [*cmd, "-v", f"db={self.database}"],
                input=sql.encode(),
                env=env,
                capture_output=True,
                timeout=max(deadline - time.monotonic(), 5.0),
            )
            if result.returncode != 0:
                raise RuntimeError(f"psql failed: {result.stderr.decode(errors='replace')}")
