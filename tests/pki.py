"""Certificates made in the test: CAs from ``trustme``, and client certificates
with URI SANs (SPIFFE IDs), which ``trustme`` cannot issue, signed with the
CA's key through ``cryptography`` (trustme's own dependency)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["KeyPair", "issue_client", "issue_server", "write_atomically"]


@dataclass(frozen=True)
class KeyPair:
    cert: bytes  # PEM, the leaf first
    key: bytes  # PEM

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
        write_atomically(cert, self.cert)
        write_atomically(key, self.key)
        return cert, key


def issue_server(ca: trustme.CA, *names: str) -> KeyPair:
    leaf = ca.issue_cert(*(names or ("localhost",)))
    return KeyPair(b"".join(p.bytes() for p in leaf.cert_chain_pems), leaf.private_key_pem.bytes())


def issue_client(
    ca: trustme.CA, *, uris: tuple[str, ...] = (), dns: tuple[str, ...] = ()
) -> KeyPair:
    """A client certificate from ``ca`` with these SAN URIs and DNS names."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [
        *(x509.UniformResourceIdentifier(u) for u in uris),
        *(x509.DNSName(d) for d in dns),
    ]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test client")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return KeyPair(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def write_atomically(path: Path, data: bytes) -> None:
    """As an operator rotates: write beside, then rename over."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
