"""TLS for the gRPC port and the forward-auth HTTP port, with certificates
rotated without a restart.

``CertificateFiles.credentials()`` hands gRPC a certificate-configuration
fetcher, which gRPC calls at each new connection's handshake;
``CertificateFiles.ssl_context()`` is the same for an ``asyncio``/aiohttp
listener: its ``sni_callback`` (which OpenSSL calls at every handshake, with
or without SNI) moves the connection to a context with the new files. Either
re-reads the files only when one of them changed (modification time, size or
inode), so replacing them on disk is all a rotation takes: new connections
get the new certificate, open ones keep theirs until they reconnect. One
``CertificateFiles`` serves one port.

A half-written rotation (a new certificate beside the old key) is checked
with Python's ``ssl`` before gRPC sees it, and a certificate that is not valid
now (expired, or not yet valid) is refused too: until the files are usable
again, the certificate in use stays in use, the problem is logged once and
counted (``on_rejected``). At start-up the same checks stop the server.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
from cryptography import x509

__all__ = ["CertificateFiles"]

_log = logging.getLogger("session_authority.tls")

_Stamp = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class _Loaded:
    """One checked read of the files: their bytes (for gRPC) and the ``ssl``
    server context built from them (for an HTTP listener)."""

    cert: bytes
    key: bytes
    client_ca: bytes | None
    context: ssl.SSLContext

    def grpc_configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.cert)], root_certificates=self.client_ca
        )


class CertificateFiles:
    def __init__(
        self,
        cert: Path,
        key: Path,
        client_ca: Path | None = None,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """``client_ca``: when given, every client must present a certificate
        issued by one of the CAs in this PEM bundle (mTLS). ``now``: the
        clock a certificate's validity is judged by."""
        self._now = now
        self.on_rejected: Callable[[], None] = lambda: None
        """Called (on gRPC's thread) once per rotation refused."""
        self.cert = cert
        self.key = key
        self.client_ca = client_ca
        self._paths = [p for p in (cert, key, client_ca) if p is not None]
        self._loaded: _Stamp | None = None
        self._rejected: _Stamp | None = None

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that follow the files. Raises ``OSError``
        (``ssl.SSLError`` included) when they cannot be used now."""
        initial = self._first()
        return grpc.dynamic_ssl_server_credentials(
            initial.grpc_configuration(),
            self._fetch,  # type: ignore[arg-type]  # None means "no change" (grpc's docs)
            require_client_authentication=self.client_ca is not None,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A server context for an ``asyncio`` listener that follows the files:
        at each handshake, once they changed (and check out), the connection
        is moved to a context built from the new ones. With ``client_ca``, a
        client without a certificate from it fails the handshake. Raises
        ``OSError`` like ``credentials()``."""
        listening = self._first().context
        current = listening

        def follow(connection: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _: object) -> None:
            nonlocal current
            fresh = self._reload()
            if fresh is not None:
                current = fresh.context
            if current is not listening:
                connection.context = current

        listening.sni_callback = follow
        return listening

    def _first(self) -> _Loaded:
        try:
            stamp = self._stamp()
            loaded = self._load()
        except (OSError, ValueError) as exc:
            raise OSError(f"TLS: cannot use {self._describe()}: {exc}") from exc
        self._loaded = stamp
        return loaded

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration, or None to keep the current one."""
        fresh = self._reload()
        return None if fresh is None else fresh.grpc_configuration()

    def _reload(self) -> _Loaded | None:
        """The files again when they changed and check out; None: keep the
        current ones. Runs at each handshake (on gRPC's thread, or in ssl's
        callback), so it must not raise."""
        stamp: _Stamp | None = None
        try:
            stamp = self._stamp()
            if stamp in (self._loaded, self._rejected):
                return None
            loaded = self._load()
            if self._stamp() != stamp:  # still being written: next handshake
                return None
        except Exception as exc:  # never into gRPC's C core nor ssl's callback
            if stamp != self._rejected:
                self._rejected = stamp
                self.on_rejected()
                _log.warning(
                    "TLS: cannot reload %s (%s); still serving the previous certificate",
                    self._describe(),
                    exc,
                )
            return None
        self._loaded = stamp
        self._rejected = None
        _log.info("TLS: reloaded %s", self._describe())
        return loaded

    def _stamp(self) -> _Stamp:
        stats = [os.stat(p) for p in self._paths]
        return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in stats)

    def _load(self) -> _Loaded:
        cert, key = self.cert.read_bytes(), self.key.read_bytes()
        client_ca = None if self.client_ca is None else self.client_ca.read_bytes()
        # gRPC would only log a mismatched pair deep in its core; ssl says why. The
        # same context serves an HTTP listener.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        if client_ca is not None:
            context.load_verify_locations(cadata=client_ca.decode())
            context.verify_mode = ssl.CERT_REQUIRED
        self._check_valid_now(cert)
        return _Loaded(cert, key, client_ca, context)

    def _check_valid_now(self, cert: bytes) -> None:
        """Raises ``ValueError`` unless the leaf certificate is valid now: a
        certificate gRPC would serve but every client would refuse."""
        leaf = x509.load_pem_x509_certificates(cert)[0]
        now = self._now()
        if now < leaf.not_valid_before_utc:
            raise ValueError(f"certificate not valid before {leaf.not_valid_before_utc}")
        if now > leaf.not_valid_after_utc:
            raise ValueError(f"certificate expired {leaf.not_valid_after_utc}")

    def _describe(self) -> str:
        shown = f"certificate {self.cert}, key {self.key}"
        return shown if self.client_ca is None else f"{shown}, client CA {self.client_ca}"
