"""Who may call what, and the gRPC port's credentials, from Settings."""

from __future__ import annotations

import logging

from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from session_authority.config import Settings
from session_authority.transport.auth import ApiKeys, AuthPolicy
from session_authority.transport.ext_authz import ExtAuthzServicer
from session_authority.transport.gateway import GatewayPolicy
from session_authority.transport.servicer import SessionAuthorityServicer
from session_authority.transport.tls import CertificateFiles

__all__ = [
    "auth_policy",
    "certificate_files",
    "forward_auth_certificate_files",
    "forward_auth_keys",
    "gateway_policy",
    "log_security",
]

_log = logging.getLogger("session_authority")


_HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
#: Open to every caller, so that probes and grpcurl need no credentials.
_PUBLIC_SERVICES = frozenset(
    {_HEALTH_SERVICE, reflection.SERVICE_NAME, "grpc.reflection.v1.ServerReflection"}
)


def auth_policy(settings: Settings) -> AuthPolicy:
    """Who may call what, from AUTH_* and TLS_CLIENT_CA_FILE (README "Security"),
    and each RPC's ``@read`` / ``@mutation`` on the servicers (ours, and
    Envoy's ext_authz ``Check``, a read)."""
    access = {**SessionAuthorityServicer.access(), **ExtAuthzServicer.access()}
    return AuthPolicy(
        enforced=settings.authentication_configured,
        public_services=_PUBLIC_SERVICES,
        reads=frozenset(m for m, kind in access.items() if kind in ("read", "sensitive_read")),
        sensitive_reads=frozenset(m for m, kind in access.items() if kind == "sensitive_read"),
        mutations=frozenset(m for m, kind in access.items() if kind == "mutation"),
        allowed=settings.allowed_identities(),
        anonymous_reads=settings.auth_anonymous_reads,
    )


def gateway_policy(settings: Settings) -> GatewayPolicy:
    """Where gateways' requests carry the token, and the identity headers' names."""
    return GatewayPolicy(
        cookie=settings.gateway_cookie,
        user_id_header=settings.gateway_user_id_header,
        session_id_header=settings.gateway_session_id_header,
    )


def forward_auth_keys(settings: Settings) -> ApiKeys | None:
    """The API keys a forward-auth caller must present (``x-api-key``); None
    when any caller may ask: as a read on the gRPC port, so with no
    authentication configured, or with AUTH_ANONYMOUS_READS; and None when
    the port's own mTLS (FORWARD_AUTH_TLS_CLIENT_CA_FILE) has authenticated
    every caller in the handshake, as a client certificate does a reader on
    the gRPC port. With gRPC client certificates only (no AUTH_API_KEYS and
    no forward-auth mTLS) nobody may ask: nothing could authenticate them."""
    if not settings.authentication_configured or settings.auth_anonymous_reads:
        return None
    if settings.forward_auth_tls_client_ca_file is not None:
        return None
    return ApiKeys(settings.api_key_hashes())


def certificate_files(settings: Settings) -> CertificateFiles | None:
    """The gRPC port's TLS (and mTLS) files; None: plaintext. Their
    ``credentials()`` follow the files (rotation without a restart)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    return CertificateFiles(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    )


def forward_auth_certificate_files(settings: Settings) -> CertificateFiles | None:
    """Forward-auth's TLS (and mTLS) files (FORWARD_AUTH_TLS_*); None:
    plaintext. Their ``ssl_context()`` follows the files like the gRPC port's."""
    if settings.forward_auth_tls_cert_file is None or settings.forward_auth_tls_key_file is None:
        return None
    return CertificateFiles(
        settings.forward_auth_tls_cert_file,
        settings.forward_auth_tls_key_file,
        settings.forward_auth_tls_client_ca_file,
    )


def log_security(settings: Settings, port: int, admin_port: int | None) -> None:
    """Start-up lines that say who can reach what."""
    if settings.tls_cert_file is None:
        _log.warning("gRPC port is PLAINTEXT (no TLS_CERT_FILE / --tls-cert)")
    elif settings.tls_client_ca_file is None:
        _log.info(
            "gRPC port: TLS (certificate %s, reloaded when it changes)", settings.tls_cert_file
        )
    else:
        _log.info(
            "gRPC port: mTLS, client certificates from %s required (reloaded when they change)",
            settings.tls_client_ca_file,
        )
    mutating, reading = _declared("mutation"), _declared("read")
    if not settings.authentication_configured:
        _log.warning(
            "NO AUTHENTICATION (ALLOW_UNAUTHENTICATED / --allow-unauthenticated): every caller "
            "that reaches %s:%d may call %s (mint or revoke any user's sessions); "
            "for local and test set-ups only",
            settings.host,
            port,
            mutating,
        )
    else:
        means = [
            *(["client certificate"] if settings.tls_client_ca_file is not None else []),
            *([f"{len(settings.api_key_hashes())} API key(s)"] if settings.auth_api_keys else []),
        ]
        allowed = sorted(settings.allowed_identities())
        _log.info(
            "authentication: %s; %s: %s; %s: %s",
            " or ".join(means),
            reading,
            "any caller" if settings.auth_anonymous_reads else "authenticated callers",
            mutating,
            ", ".join(allowed) if allowed else "nobody (AUTH_ALLOWED_IDENTITIES is empty)",
        )
        if settings.auth_api_keys and settings.tls_cert_file is None:
            _log.warning("API keys over a PLAINTEXT port: anyone on the path can read them")
    if settings.forward_auth_port:
        if settings.forward_auth_tls_cert_file is None:
            security = "plaintext"
        elif settings.forward_auth_tls_client_ca_file is None:
            security = f"TLS (certificate {settings.forward_auth_tls_cert_file})"
        else:
            security = (
                f"mTLS (gateway certificates from {settings.forward_auth_tls_client_ca_file})"
            )
        keys = forward_auth_keys(settings)
        if settings.forward_auth_tls_client_ca_file is not None:
            callers = "gateways with a client certificate"
        else:
            callers = "any caller" if keys is None else "callers with an x-api-key"
        _log.info(
            "forward-auth HTTP (/auth) on %s:%d, %s; %s",
            settings.forward_auth_host,
            settings.forward_auth_port,
            security,
            callers,
        )
        if keys is not None and settings.forward_auth_tls_cert_file is None:
            _log.warning(
                "forward-auth: x-api-key over PLAINTEXT HTTP: anyone on the path can read it"
            )
    if admin_port is not None:
        loopback = settings.admin_host in ("127.0.0.1", "::1", "localhost")
        _log.info(
            "admin HTTP (/metrics, /health) on %s:%d, plaintext and unauthenticated%s",
            settings.admin_host,
            admin_port,
            "; loopback only (set ADMIN_HOST to expose it)" if loopback else "",
        )


def _declared(kind: str) -> str:
    """The RPCs declared ``kind`` on the servicer, for a log line: "A, B and C"."""
    access = SessionAuthorityServicer.access()
    names = [method.rpartition("/")[2] for method, declared in access.items() if declared == kind]
    return " and ".join(filter(None, (", ".join(names[:-1]), names[-1] if names else "")))
