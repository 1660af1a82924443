"""The operator verbs' command line: ``session-authority create | validate | invalidate |
invalidate-user | list | touch | watch`` (``session_authority.ops`` runs them on the Python
client).

Apart from ``ops`` so that ``session-authority --help`` lists the verbs without loading grpc.
Each verb takes the flags ``health`` takes (``--target``, ``--json``, ``--timeout``, TLS, the
API key from ``$SESSION_AUTHORITY_API_KEY`` or ``--api-key-file``, never a flag).
"""

from __future__ import annotations

import argparse
from typing import Any

from session_authority.probe_args import add_connection_arguments

__all__ = ["EXIT_CODES", "VERBS", "add_ops_parsers"]

VERBS = ("create", "validate", "invalidate", "invalidate-user", "list", "touch", "watch")

EXIT_CODES = """exit codes:
  0  done (validate: the session is valid; watch: --count events seen)
  1  validate, touch: the session is not valid (unknown, expired or revoked)
  2  usage: a bad flag or file, no token on stdin, a request the server refused
     (INVALID_ARGUMENT), credentials it refused (UNAUTHENTICATED, PERMISSION_DENIED)
  3  no answer: unavailable, timed out, TLS failed, or the server cannot know
     (never read as "invalid" or "done"); watch: the stream ended (the cursor to
     resume with --after is printed on stderr)
"""

_TOKEN_STDIN = (
    'Tokens are secrets: give the token on stdin (echo "$TOKEN" | session-authority {verb}), '
    "not as an argument, which shell history and ps keep."
)


def add_ops_parsers(sub: Any) -> None:
    """The operator verbs on ``session-authority``'s sub-parsers."""

    def verb(name: str, help: str, description: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(
            name,
            help=help,
            description=description,
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        return parser

    create = verb(
        "create",
        "create a session for a user; prints its token",
        "Call CreateSession. Prints the new session's token alone on stdout (TOKEN=$(...)) "
        "and the session on stderr; --json prints both as one document. Needs an identity "
        "allowed to mutate (AUTH_ALLOWED_IDENTITIES). Never retried.",
    )
    create.add_argument("user_id", metavar="USER_ID")
    create.add_argument("--ttl", type=float, metavar="SECONDS", help="default: the server's")
    create.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a metadata entry (repeat for more)",
    )
    add_connection_arguments(create, timeout_default=None)

    validate = verb(
        "validate",
        "is a token's session valid? (exit 0 valid, 1 not valid)",
        "Call ValidateSession. " + _TOKEN_STDIN.format(verb="validate"),
    )
    validate.add_argument("token", nargs="?", metavar="TOKEN", help="'-' or absent: stdin")
    add_connection_arguments(validate, timeout_default=None)

    invalidate = verb(
        "invalidate",
        "revoke one session, by token (stdin) or --session-id",
        "Call Invalidate. Idempotent: a session already revoked, expired or unknown is "
        "answered 'not revoked' and exit 0. " + _TOKEN_STDIN.format(verb="invalidate"),
    )
    invalidate.add_argument("token", nargs="?", metavar="TOKEN", help="'-' or absent: stdin")
    invalidate.add_argument("--session-id", metavar="ID", help="the session's id, not its token")
    add_connection_arguments(invalidate, timeout_default=None)

    invalidate_user = verb(
        "invalidate-user",
        "revoke every live session of a user",
        "Call InvalidateUser: every live session of USER_ID stops validating, on every "
        "replica, before the answer.",
    )
    invalidate_user.add_argument("user_id", metavar="USER_ID")
    invalidate_user.add_argument(
        "--except-session-id",
        metavar="ID",
        help="keep this session of the user (log out everywhere else)",
    )
    add_connection_arguments(invalidate_user, timeout_default=None)

    listing = verb(
        "list",
        "list a user's sessions (one line each)",
        "Call ListUserSessions, every page, oldest first: one line per session "
        "(id, created, expires, last seen, revoked); --json prints one document. Never a token.",
    )
    listing.add_argument("user_id", metavar="USER_ID")
    listing.add_argument(
        "--include-revoked", action="store_true", help="also revoked and expired sessions"
    )
    listing.add_argument(
        "--page-size", type=int, default=0, metavar="N", help="per call (default: the server's)"
    )
    add_connection_arguments(listing, timeout_default=None)

    touch = verb(
        "touch",
        "slide a session's expiry forward, by token (stdin) or --session-id",
        "Call TouchSession: the expiry becomes now + --extend-by (default: the server's "
        "session TTL), never earlier, never past the session's maximum lifetime; answered "
        "after the write (write_through), with the new expiry. Exit 1 when "
        "the session is unknown, revoked or expired (never revived). "
        + _TOKEN_STDIN.format(verb="touch"),
    )
    touch.add_argument("token", nargs="?", metavar="TOKEN", help="'-' or absent: stdin")
    touch.add_argument("--session-id", metavar="ID", help="the session's id, not its token")
    touch.add_argument("--extend-by", type=float, metavar="SECONDS")
    add_connection_arguments(touch, timeout_default=None)

    watch = verb(
        "watch",
        "print revocations as they happen (one line each)",
        "Call WatchRevocations: a 'start after CURSOR' line, then one line per revoked "
        "session, flushed as it comes (--json: one JSON document per line). Runs until "
        "interrupted, or until --count revocations were printed (exit 0). When the stream "
        "ends with an error, the cursor to resume from is printed on stderr: pass it as "
        "--after (exit 3 when unavailable; 2 when the cursor is too old: start from now).",
    )
    watch.add_argument(
        "--after", metavar="CURSOR", help="resume after this cursor (default: from now)"
    )
    watch.add_argument("--count", type=int, metavar="N", help="exit 0 after N revocations")
    add_connection_arguments(watch, timeout_default=None)
