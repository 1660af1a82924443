"""A private PgBouncer in front of a Postgres, for the transaction-pooling tests and the bench.

Debian's ``pgbouncer`` (``make pgbouncer`` finds or installs it; 1.18 on bookworm, which has
no protocol-level prepared statements). Its configuration and auth file are written into
``base_dir``; it listens on loopback only, on a private port, and refuses root, so as root it
runs as ``nobody`` (``unprivileged``). Clients authenticate to it with a password it holds
(scram-sha-256); it logs in to Postgres as ``postgres``, which the embedded Postgres trusts.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
from pathlib import Path

from session_authority.embedded.process import ServerProcess
from session_authority.embedded.unprivileged import prepare_unprivileged_account

__all__ = ["EmbeddedPgBouncer", "find_pgbouncer"]

#: Where Debian's package puts it (/usr/sbin is not on every user's PATH).
_DEBIAN_PGBOUNCER = Path("/usr/sbin/pgbouncer")


def find_pgbouncer() -> Path | None:
    """``pgbouncer`` on PATH or in /usr/sbin, or None (the one place that decides)."""
    found = shutil.which("pgbouncer")
    if found is not None:
        return Path(found)
    return _DEBIAN_PGBOUNCER if os.access(_DEBIAN_PGBOUNCER, os.X_OK) else None


class EmbeddedPgBouncer(ServerProcess):
    """PgBouncer pooling ``database`` of the Postgres at ``pg_host:pg_port`` in ``pool_mode``
    (transaction by default) with ``pool_size`` server connections (``default_pool_size``)."""

    name = "pgbouncer"

    def __init__(
        self,
        base_dir: Path,
        *,
        pg_port: int,
        pg_host: str = "127.0.0.1",
        database: str = "session_authority",
        port: int | None = None,
        host: str = "127.0.0.1",
        pool_mode: str = "transaction",
        pool_size: int = 2,
        max_client_conn: int = 500,
    ) -> None:
        super().__init__(base_dir, port, host)
        self.pg_host, self.pg_port, self.database = pg_host, pg_port, database
        self.pool_mode, self.pool_size, self.max_client_conn = pool_mode, pool_size, max_client_conn
        self.password = secrets.token_urlsafe(16)
        self._user: pwd.struct_passwd | None = None

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        """Any database of that Postgres, through this PgBouncer (a ``*`` entry)."""
        return f"postgresql://postgres:{self.password}@{self.host}:{self.port}/{database}"

    @property
    def config_path(self) -> Path:
        return self.base_dir / "pgbouncer.ini"

    def _prepare(self, deadline: float) -> None:
        self._user = prepare_unprivileged_account(self.base_dir)
        auth = self.base_dir / "userlist.txt"
        auth.write_text(f'"postgres" "{self.password}"\n')
        server = f"host={self.pg_host} port={self.pg_port} user=postgres"
        self.config_path.write_text(
            "\n".join(
                [
                    "[databases]",
                    f"{self.database} = {server} dbname={self.database}",
                    f"* = {server}",
                    "[pgbouncer]",
                    f"listen_addr = {self.host}",
                    f"listen_port = {self.port}",
                    "unix_socket_dir =",
                    "auth_type = scram-sha-256",
                    f"auth_file = {auth}",
                    f"pool_mode = {self.pool_mode}",
                    f"default_pool_size = {self.pool_size}",
                    "min_pool_size = 0",
                    "reserve_pool_size = 0",
                    f"max_client_conn = {self.max_client_conn}",
                    "server_login_retry = 1",
                    "admin_users = postgres",
                    "log_connections = 0",
                    "log_disconnections = 0",
                    "",
                ]
            )
        )
        for path in (auth, self.config_path):
            path.chmod(0o600)
            if self._user is not None:
                os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _spawn(self) -> subprocess.Popen[bytes]:
        binary = find_pgbouncer()
        if binary is None:
            raise RuntimeError("pgbouncer is not installed: run `make pgbouncer`")
        return self._popen([str(binary), str(self.config_path)], self._user, self.log_path)

    def _ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False
