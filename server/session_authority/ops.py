"""The operator verbs, ``session-authority create | validate | invalidate | invalidate-user``,
built on the Python client (``session_authority.client``). Flags: ``ops_args``.

Exit codes scripts can use: 0 done / valid, 1 not valid (validate), 2 usage (including a
request or credentials the server refused), 3 no answer (unavailable, timed out, or the server
cannot know). A token is read from stdin when not given as an argument, so that it stays out of
shell history; no token is ever printed, except the one ``create`` makes.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from session_authority.client import (
    CreatedSession,
    Deadlines,
    InvalidArgument,
    PermissionDenied,
    Revocation,
    SessionAuthorityClient,
    SessionAuthorityError,
    Tls,
    Unauthenticated,
    UserRevocation,
    Validation,
)
from session_authority.probe import (
    EXIT_HEALTHY,
    EXIT_UNAVAILABLE,
    EXIT_UNHEALTHY,
    EXIT_USAGE,
    Usage,
    api_key,
    read_flag_file,
)

__all__ = ["run_verb"]

EXIT_OK = EXIT_HEALTHY
EXIT_INVALID = EXIT_UNHEALTHY
#: Errors that asking again will not cure: the invocation (or its credentials) must change.
_USAGE_ERRORS = (InvalidArgument, Unauthenticated, PermissionDenied)


def run_verb(
    args: argparse.Namespace,
    environ: Mapping[str, str] = os.environ,
    stdin: TextIO | None = None,
) -> int:
    verb: str = args.command
    stdin = sys.stdin if stdin is None else stdin
    try:
        if args.timeout is not None and args.timeout <= 0:
            raise Usage("--timeout must be positive")
        action = _ACTIONS[verb](args, stdin)
        with _client(args, environ) as client:
            code, text, document = action(client)
    except Usage as exc:
        print(f"session-authority {verb}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:  # a request the client refuses to build
        print(f"session-authority {verb}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SessionAuthorityError as exc:
        print(f"session-authority {verb}: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, _USAGE_ERRORS) else EXIT_UNAVAILABLE
    print(json.dumps(document, sort_keys=True) if args.json else text)
    return code


def _client(args: argparse.Namespace, environ: Mapping[str, str]) -> SessionAuthorityClient:
    ca, cert, key = (read_flag_file(args, name) for name in ("ca_file", "cert_file", "key_file"))
    for name, pem in (("ca-file", ca), ("cert-file", cert), ("key-file", key)):
        if pem is not None and not pem.strip():
            raise Usage(f"--{name}: {getattr(args, name.replace('-', '_'))} is empty")
    if (cert is None) != (key is None):
        raise Usage("--cert-file and --key-file go together")
    tls = None
    if args.tls or ca is not None or cert is not None:
        tls = Tls(ca, cert, key, args.server_name)
    elif args.server_name:
        raise Usage("--server-name needs TLS (--tls or --ca-file)")
    deadlines = Deadlines() if args.timeout is None else _every(args.timeout)
    return SessionAuthorityClient(
        args.target,
        tls=tls,
        api_key=api_key(args, environ),
        deadlines=deadlines,
        channel_options=[("grpc.enable_http_proxy", 0)],
    )


def _every(seconds: float) -> Deadlines:
    return Deadlines(seconds, seconds, seconds, seconds, seconds)


Result = tuple[int, str, dict[str, Any]]
Action = Callable[[SessionAuthorityClient], Result]


def _token(args: argparse.Namespace, stdin: TextIO, verb: str) -> str:
    """The token argument, else the first line of stdin (asked for without echo on a
    terminal)."""
    if args.token not in (None, "-"):
        return str(args.token)
    token = (getpass.getpass("token: ") if stdin.isatty() else stdin.readline()).strip()
    if not token:
        raise Usage(f'no token: give it on stdin (echo "$TOKEN" | session-authority {verb})')
    return token


def _create(args: argparse.Namespace, stdin: TextIO) -> Action:
    metadata = {}
    for entry in args.metadata:
        name, sep, value = str(entry).partition("=")
        if not sep or not name:
            raise Usage(f"--metadata takes KEY=VALUE, not {entry!r}")
        metadata[name] = value

    def call(client: SessionAuthorityClient) -> Result:
        created: CreatedSession = client.create(args.user_id, ttl=args.ttl, metadata=metadata)
        session = created.session
        if not args.json:
            print(
                f"session {session.session_id} for user {session.user_id}, "
                f"expires {session.expires_at.isoformat()}",
                file=sys.stderr,
            )
        return EXIT_OK, created.token, {"token": created.token, "session": session.as_json()}

    return call


def _validate(args: argparse.Namespace, stdin: TextIO) -> Action:
    token = _token(args, stdin, "validate")

    def call(client: SessionAuthorityClient) -> Result:
        answer: Validation = client.validate(token)
        if answer.valid and answer.session is not None:
            s = answer.session
            text = (
                f"valid: session {s.session_id} of user {s.user_id}, "
                f"expires {s.expires_at.isoformat()} (source: {answer.source})"
            )
            return EXIT_OK, text, answer.as_json()
        text = f"not valid: {answer.reason} (source: {answer.source})"
        return EXIT_INVALID, text, answer.as_json()

    return call


def _invalidate(args: argparse.Namespace, stdin: TextIO) -> Action:
    if args.session_id is not None and args.token is not None:
        raise Usage("give a token or --session-id, not both")
    session_id = args.session_id
    token = None if session_id is not None else _token(args, stdin, "invalidate")

    def call(client: SessionAuthorityClient) -> Result:
        answer: Revocation = client.invalidate(token=token, session_id=session_id)
        text = "revoked" if answer.revoked else "not revoked: no live session (already done)"
        return EXIT_OK, text + _spread(answer.cache_purged, answer.propagated), answer.as_json()

    return call


def _invalidate_user(args: argparse.Namespace, stdin: TextIO) -> Action:
    def call(client: SessionAuthorityClient) -> Result:
        answer: UserRevocation = client.invalidate_user(args.user_id)
        text = f"revoked {answer.revoked_count} session(s) of user {args.user_id}"
        return EXIT_OK, text + _spread(answer.cache_purged, answer.propagated), answer.as_json()

    return call


def _spread(cache_purged: bool, propagated: bool) -> str:
    """What a revocation's answer says beyond Postgres (InvalidateResponse's fields)."""
    notes = []
    if not cache_purged:
        notes.append("cache purge pending: re-applied when Redis is back")
    if not propagated:
        notes.append("not every replica acknowledged: their copies expire within L1_CACHE_TTL_MS")
    return f" ({'; '.join(notes)})" if notes else ""


_ACTIONS: dict[str, Callable[[argparse.Namespace, TextIO], Action]] = {
    "create": _create,
    "validate": _validate,
    "invalidate": _invalidate,
    "invalidate-user": _invalidate_user,
}
