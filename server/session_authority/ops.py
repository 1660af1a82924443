"""The operator verbs, ``session-authority create | validate | invalidate | invalidate-user |
list | touch | watch``, built on the Python client (``session_authority.client``). Flags:
``ops_args``.

Exit codes scripts can use: 0 done / valid, 1 not valid (validate; touch of a session that is
unknown, revoked or expired), 2 usage (including a request or credentials the server refused),
3 no answer (unavailable, timed out, or the server cannot know; a watch whose stream ended).
A token is read from stdin when not given as an argument, so that it stays out of shell
history; no token is ever printed, except the one ``create`` makes. ``watch`` prints as it
goes (a line per event, flushed); the others print one answer at the end.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any, TextIO

from session_authority.client import (
    CreatedSession,
    Deadlines,
    EventKind,
    InvalidArgument,
    PermissionDenied,
    Revocation,
    RevocationEvent,
    ServerError,
    Session,
    SessionAuthorityClient,
    SessionAuthorityError,
    Tls,
    Touch,
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
    if args.json and document is not None:
        print(json.dumps(document, sort_keys=True))
    elif not args.json and text is not None:
        print(text)
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
    return Deadlines(**{f.name: seconds for f in fields(Deadlines)})


#: The exit code, the text answer and the --json one; None: nothing (more) to print.
Result = tuple[int, str | None, dict[str, Any] | None]
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
    kept = args.except_session_id

    def call(client: SessionAuthorityClient) -> Result:
        answer: UserRevocation = client.invalidate_user(args.user_id, except_session_id=kept)
        text = f"revoked {answer.revoked_count} session(s) of user {args.user_id}"
        if kept is not None:
            text += f" (kept {kept})"
        return EXIT_OK, text + _spread(answer.cache_purged, answer.propagated), answer.as_json()

    return call


def _list(args: argparse.Namespace, stdin: TextIO) -> Action:
    if args.page_size < 0:
        raise Usage("--page-size must not be negative")

    def call(client: SessionAuthorityClient) -> Result:
        sessions = list(
            client.list_sessions(
                args.user_id, include_revoked=args.include_revoked, page_size=args.page_size
            )
        )
        text = "\n".join(_session_line(s) for s in sessions) or None
        document = {"user_id": args.user_id, "sessions": [s.as_json() for s in sessions]}
        return EXIT_OK, text, document

    return call


def _session_line(s: Session) -> str:
    line = f"{s.session_id} created {s.created_at.isoformat()} expires {s.expires_at.isoformat()}"
    if s.last_seen_at is not None:
        line += f" last_seen {s.last_seen_at.isoformat()}"
    if s.revoked_at is not None:
        line += f" revoked {s.revoked_at.isoformat()}"
    return line


#: TouchSession's "no such live session" answers: NOT_FOUND (unknown) and FAILED_PRECONDITION
#: (revoked or expired, never revived). An answer, not an outage: exit 1, as validate.
_NOT_TOUCHABLE = {"NOT_FOUND": "unknown", "FAILED_PRECONDITION": "revoked or expired"}


def _touch(args: argparse.Namespace, stdin: TextIO) -> Action:
    if args.session_id is not None and args.token is not None:
        raise Usage("give a token or --session-id, not both")
    if args.extend_by is not None and not args.extend_by > 0:
        raise Usage("--extend-by must be positive")
    session_id = args.session_id
    token = None if session_id is not None else _token(args, stdin, "touch")

    def call(client: SessionAuthorityClient) -> Result:
        try:
            answer: Touch = client.touch(  # an operator's extension: show the new expiry
                token=token, session_id=session_id, extend_by=args.extend_by, write_through=True
            )
        except ServerError as exc:
            why = _NOT_TOUCHABLE.get(exc.code.name)
            if why is None:
                raise
            return EXIT_INVALID, f"not touched: {why}", {"touched": False, "reason": why}
        s = answer.session
        text = f"touched: session {s.session_id} expires {s.expires_at.isoformat()}"
        text += "" if answer.written else " (coalesced with a recent touch: not written)"
        return EXIT_OK, text, {"touched": True, **answer.as_json()}

    return call


def _watch(args: argparse.Namespace, stdin: TextIO) -> Action:
    """Prints each event as it comes (flushed); --count N: done (0) after N revocations (the
    START line is not counted). An error that ends the stream prints the cursor to resume
    after (--after) on stderr and exits as any error does (UNAVAILABLE: 3)."""
    if args.count is not None and args.count < 1:
        raise Usage("--count must be at least 1")

    def call(client: SessionAuthorityClient) -> Result:
        try:
            watch = client.watch_revocations(args.after or "")
        except ServerError as exc:
            if exc.code.name == "FAILED_PRECONDITION":  # the cursor is too old or foreign
                raise Usage(f"{exc}: start again without --after") from None
            raise
        revoked = 0
        try:
            for event in watch:
                _print_event(event, args.json)
                revoked += event.kind == EventKind.REVOKED
                if args.count is not None and revoked >= args.count:
                    return EXIT_OK, None, None
        except SessionAuthorityError:
            print(f"session-authority watch: resume with --after {watch.cursor}", file=sys.stderr)
            raise
        finally:
            watch.close()
        return EXIT_UNAVAILABLE, None, None  # a stream that ends without an error: not expected

    return call


def _print_event(event: RevocationEvent, as_json: bool) -> None:
    if as_json:
        line = json.dumps(event.as_json(), sort_keys=True)
    elif event.kind == EventKind.START:
        line = f"start after {event.cursor}"
    else:
        at = "" if event.revoked_at is None else f" at {event.revoked_at.isoformat()}"
        line = (
            f"{event.kind} session {event.session_id} of user {event.user_id} "
            f"({event.reason}){at} cursor {event.cursor}"
        )
    print(line, flush=True)


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
    "list": _list,
    "touch": _touch,
    "watch": _watch,
}
