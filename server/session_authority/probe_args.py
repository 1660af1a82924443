"""The ``health`` verb's command line (``session_authority.probe`` runs it).

Apart from the probe so that ``session-authority --help`` can list the verb without loading grpc
and the stubs, and the probe can parse its flags without loading the server's settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["ENV", "add_connection_arguments", "add_health_parser"]

#: The prefix of every flag's environment default.
ENV = "SESSION_AUTHORITY_"
_ENV = ENV


def add_health_parser(sub: Any) -> None:
    """The ``health`` sub-command on ``session-authority``'s sub-parsers."""
    health = sub.add_parser(
        "health",
        help="ask a server whether it is healthy (exit 0 healthy, 1 unhealthy, 2 usage, "
        "3 unavailable)",
        description="Call grpc.health.v1.Health/Check on a running server. Exit codes: "
        "0 SERVING, 1 answered but not SERVING, 2 usage, 3 no answer (refused, timeout, "
        "TLS handshake failed). --json also prints the Health document "
        "(SessionAuthority/Health), which needs credentials when authentication is on. "
        "Every flag defaults to $SESSION_AUTHORITY_<FLAG> (e.g. SESSION_AUTHORITY_CA_FILE).",
    )
    add_connection_arguments(health, timeout_default="5")


def add_connection_arguments(verb: Any, *, timeout_default: str | None) -> None:
    """The flags every client verb shares (``health`` and the operator verbs): where the
    server is, ``--json``, ``--timeout``, TLS and the API key's file."""
    env = os.environ
    port = env.get("PORT", "50051")
    verb.add_argument(
        "--target",
        default=env.get(f"{_ENV}TARGET") or f"127.0.0.1:{port}",
        help="host:port, or dns:///host:port for every address of a name "
        "(default: $SESSION_AUTHORITY_TARGET, else 127.0.0.1:$PORT, else 127.0.0.1:50051)",
    )
    verb.add_argument("--json", action="store_true", help="print the answer as JSON")
    shown = timeout_default or "each call's own: 1 for validate, 10 for invalidate-user, ..."
    verb.add_argument(
        "--timeout",
        type=float,
        default=env.get(f"{_ENV}TIMEOUT") or timeout_default,
        help=f"seconds for each call (default: $SESSION_AUTHORITY_TIMEOUT, else {shown})",
    )
    tls = verb.add_argument_group(
        "TLS and credentials",
        "TLS is used when --tls or any of --ca-file/--cert-file/--key-file is given. "
        "The API key comes from $SESSION_AUTHORITY_API_KEY or --api-key-file, never a flag.",
    )
    tls.add_argument(
        "--tls",
        action="store_true",
        default=_truthy(env.get(f"{_ENV}TLS")),
        help="TLS with the system's roots ($SESSION_AUTHORITY_TLS)",
    )
    for flag, what in (
        ("ca-file", "CA that signed the server's certificate"),
        ("cert-file", "client certificate, for mTLS"),
        ("key-file", "its private key"),
        ("api-key-file", "file holding the API key (sent as 'authorization: Bearer')"),
    ):
        name = f"{_ENV}{flag.replace('-', '_').upper()}"
        default = env.get(name) or None
        shown = f"{what} (${name})"
        tls.add_argument(f"--{flag}", type=Path, metavar="PATH", default=default, help=shown)
    tls.add_argument(
        "--server-name",
        default=env.get(f"{_ENV}SERVER_NAME") or None,
        help="the name the server's certificate must carry, when it is not the target's host "
        "($SESSION_AUTHORITY_SERVER_NAME)",
    )


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")
