"""What the Python client's and the operator verbs' tests share: a real ``serve`` with mTLS and
API keys that a test may freeze, kill and replace (``Serving``), and a TCP proxy that can be
frozen (``FreezableProxy``: a replica that accepted a call and never answers it)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

from session_authority.client import AsyncSessionAuthorityClient, SessionAuthorityClient, Tls
from session_authority.embedded import EmbeddedPostgres, find_free_port
from session_authority.transport.auth import hash_api_key
from tests.pki import issue_client, issue_server, write_atomically

from .e2e_support import BIN, clean_env, stop_process

SERVER_NAME = "session-authority.internal"
OPS_KEY = "client-ops-key-0123456789abcdef0123456789"  # allowed to mutate
READER_KEY = "client-reader-key-0123456789abcdef01234567"  # reads only
CALLER = "spiffe://example.org/ns/test/sa/client"  # the client certificate's identity
READY_TIMEOUT = 60.0
_TOKEN = re.compile(r"sat_[A-Za-z0-9_-]{48}")


def cli_argv() -> list[str]:
    cli = BIN / "session-authority"
    return [str(cli)] if cli.exists() else [sys.executable, "-m", "session_authority.cli"]


@dataclass
class Serving:
    """One ``serve`` on ``port`` (mTLS required, API keys), Postgres behind it."""

    dir: Path
    port: int
    database_url: str
    ca_file: Path
    cert_file: Path  # the client's certificate and key
    key_file: Path
    server_flags: list[str]
    process: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def tls(self) -> Tls:
        return Tls.from_files(
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
            server_name=SERVER_NAME,
        )

    def tls_flags(self) -> list[str]:
        return ["--ca-file", str(self.ca_file), "--cert-file", str(self.cert_file),
                "--key-file", str(self.key_file), "--server-name", SERVER_NAME]  # fmt: skip

    def client(self, api_key: str | None = OPS_KEY, **kw: Any) -> SessionAuthorityClient:
        kw.setdefault("channel_options", [("grpc.enable_http_proxy", 0)])
        return SessionAuthorityClient(
            kw.pop("target", self.target), tls=self.tls, api_key=api_key, **kw
        )

    def async_client(self, api_key: str | None = OPS_KEY, **kw: Any) -> AsyncSessionAuthorityClient:
        kw.setdefault("channel_options", [("grpc.enable_http_proxy", 0)])
        return AsyncSessionAuthorityClient(
            kw.pop("target", self.target), tls=self.tls, api_key=api_key, **kw
        )

    def start(self, *, migrate: bool = False) -> subprocess.Popen[bytes]:
        """Start a ``serve`` on the port, and wait until it (this process: its own admin
        port's /readyz) is serving. gRPC binds with SO_REUSEPORT: a second ``serve`` may bind
        the port while the first still holds it, as a replacement does in a rolling restart."""
        admin = find_free_port()
        log = self.dir / f"server-{len(self.logs)}.log"
        self.logs.append(log)
        env = clean_env(
            DATABASE_URL=self.database_url,
            AUTH_API_KEYS=f"ops:{hash_api_key(OPS_KEY)},reader:{hash_api_key(READER_KEY)}",
            AUTH_ALLOWED_IDENTITIES="apikey:ops",
            ADMIN_HOST="127.0.0.1",
            ADMIN_PORT=str(admin),
            LOG_FORMAT="json",
        )
        argv = [*cli_argv(), "serve", "--workers", "1", "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), *self.server_flags]
        with log.open("wb") as out:
            process = subprocess.Popen(
                [*argv, *(["--migrate"] if migrate else [])],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            assert process.poll() is None, log.read_text()
            ready = f"http://127.0.0.1:{admin}/readyz"
            with contextlib.suppress(OSError), urllib.request.urlopen(ready, timeout=2) as r:
                if r.status == 200:
                    return process
            assert time.monotonic() < deadline, f"not ready in {READY_TIMEOUT}s:\n{log.read_text()}"
            time.sleep(0.1)

    def freeze(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())


@contextlib.contextmanager
def serving(workdir: Path) -> Iterator[Serving]:
    ca = trustme.CA()
    ca_file = workdir / "ca.pem"
    write_atomically(ca_file, ca.cert_pem.bytes())
    cert, key = issue_server(ca, SERVER_NAME).write(workdir, "server")
    client_cert, client_key = issue_client(ca, uris=(CALLER,)).write(workdir, "client")
    flags = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(ca_file)]
    with EmbeddedPostgres(workdir / "postgres") as postgres:
        server = Serving(
            workdir, find_free_port(), postgres.url, ca_file, client_cert, client_key, flags
        )
        server.process = server.start(migrate=True)
        try:
            yield server
        finally:
            if server.process is not None:
                server.thaw()
                code = stop_process(server.process)
                assert code == 0, server.log_text()[-3000:]
        # Every serve's log (the killed one's too): no token, no API key.
        text = server.log_text()
        assert not _TOKEN.search(text), _TOKEN.sub("sat_<redacted>", text)[-2000:]
        assert OPS_KEY not in text and READER_KEY not in text


class FreezableProxy:
    """A TCP proxy to ``upstream`` on a port of its own. While ``frozen``, what clients send is
    read and held, not forwarded (``held`` counts it): a replica that took a call and stalls.
    ``hold()`` black-holes every connection both ways (no RST, no FIN: what a partitioned
    network does) but keeps the bytes; ``hold(connections=[i])`` only those (numbered in the
    order accepted; ``accepted`` counts them), while new ones flow; ``release()`` delivers
    the bytes, late, in order."""

    def __init__(self, upstream: int) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.frozen = threading.Event()
        self.held = 0
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._holding = False
        self._held: set[int] = set()  # connections held by number
        self.accepted = 0
        self._hold_lock = threading.Lock()
        self._backlog: list[tuple[socket.socket, list[bytes]]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._upstream))
            self._sockets += [downstream, upstream]
            number, self.accepted = self.accepted, self.accepted + 1
            threading.Thread(
                target=self._pump, args=(downstream, upstream, True, number), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(upstream, downstream, False, number), daemon=True
            ).start()

    def _pump(
        self, source: socket.socket, sink: socket.socket, from_client: bool, number: int
    ) -> None:
        waiting: list[bytes] = []
        with self._hold_lock:
            self._backlog.append((sink, waiting))
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if from_client and self.frozen.is_set():
                    self.held += len(data)
                    continue
                with self._hold_lock:
                    if self._holding or number in self._held:
                        waiting.append(data)
                        continue
                sink.sendall(data)
        with self._hold_lock:
            if self._holding or number in self._held:
                waiting.append(b"")  # the FIN too is held, as a black hole drops it
                return
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def hold(self, connections: list[int] | None = None) -> None:
        with self._hold_lock:
            if connections is None:
                self._holding = True
            else:
                self._held.update(connections)

    def release(self) -> None:
        with self._hold_lock:
            self._holding = False
            self._held.clear()
            for sink, waiting in self._backlog:
                with contextlib.suppress(OSError):
                    for data in waiting:
                        if data:
                            sink.sendall(data)
                        else:
                            sink.shutdown(socket.SHUT_WR)
                waiting.clear()

    def close(self) -> None:
        """Cut every connection: shutdown first, since a close alone neither wakes a pump
        blocked in recv on that socket nor sends the peer a FIN while that recv holds it."""
        self._closed = True
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
