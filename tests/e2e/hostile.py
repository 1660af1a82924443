"""Tools for the hostile-input tests: a raw HTTP/2 speaker, protobuf wire encoding by
hand (for bytes no protobuf library would write), a bystander that keeps calling, and
the case counts that the run reports (``pytest_terminal_summary`` in conftest.py)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

#: Cases tried per test, printed at the end of the run.
CASES: Counter[str] = Counter()
#: Validations the bystander had answered (all of them right) while the cases ran.
BYSTANDER: Counter[str] = Counter()

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def frame(kind: int, flags: int, stream: int, payload: bytes, length: int | None = None) -> bytes:
    """An HTTP/2 frame; ``length`` may lie about the payload (truncated frames)."""
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def frames_in(data: bytes) -> list[tuple[int, int, int]]:
    """(type, flags, stream) of each whole frame the server sent."""
    found = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        kind, flags = data[3], data[4]
        stream = int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
        if len(data) < 9 + length:
            break
        found.append((kind, flags, stream))
        data = data[9 + length :]
    return found


def _hpack_literal(name: str, value: str) -> bytes:
    # "Literal Header Field without Indexing, new name", no Huffman (RFC 7541 §6.2.2).
    out = b"\x00"
    for text in (name.encode(), value.encode()):
        assert len(text) < 127
        out += bytes([len(text)]) + text
    return out


def grpc_headers(path: str, authority: str) -> bytes:
    """The HEADERS block of a gRPC call to ``path``."""
    fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    return b"".join(_hpack_literal(n, v) for n, v in fields)


def grpc_message(body: bytes, declared: int | None = None) -> bytes:
    """A length-prefixed gRPC message (uncompressed); ``declared`` may lie."""
    return b"\x00" + struct.pack(">I", len(body) if declared is None else declared) + body


class RawConnection:
    """A TCP connection that speaks whatever bytes it is given."""

    def __init__(self, target: str, timeout: float = 2.0) -> None:
        host, port = target.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.authority = target

    def send(self, data: bytes) -> None:
        # The server may already have closed on us: that is an answer too.
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def start(self) -> None:
        """The client preface, empty SETTINGS, and an ACK of the server's."""
        self.send(PREFACE + frame(SETTINGS, 0, 0, b"") + frame(SETTINGS, ACK, 0, b""))

    def drain(self, seconds: float = 0.2) -> bytes:
        """What the server sent within ``seconds`` (b"" once it closed)."""
        self.sock.settimeout(seconds)
        got = b""
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                got += chunk
        except OSError:
            pass
        return got

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# --- protobuf wire format by hand ---------------------------------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    return varint(field_number << 3 | 2) + varint(len(payload)) + payload


@dataclass
class Bystander:
    """Another caller, validating a real token every ``interval`` on its own channel for
    as long as the hostile tests run; every answer must come, and be right."""

    target: str
    token: str
    interval: float = 0.05
    answered: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bystander", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        options = [("grpc.enable_http_proxy", 0)]
        with grpc.insecure_channel(self.target, options=options) as channel:
            stub = pb_grpc.SessionAuthorityStub(channel)
            while not self._stop.wait(self.interval):
                try:
                    reply = stub.ValidateSession(
                        pb.ValidateSessionRequest(token=self.token), timeout=3
                    )
                    if reply.valid:
                        self.answered += 1
                    else:
                        self.failures.append(f"answered invalid: {reply.reason}")
                except grpc.RpcError as exc:
                    self.failures.append(f"{exc.code().name}: {exc.details()}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
