"""``session-authority health``: ask a running server whether it is healthy.

The container HEALTHCHECK and operators' scripts call it, so it answers with
an exit code scripts can use, and nothing else is needed in an image (no
downloaded probe binary):

====  ==================================================================
0     ``grpc.health.v1.Health/Check`` answered SERVING
1     it answered, and not SERVING (NOT_SERVING while Postgres is down or
      the server drains; an unknown service; any other status code)
2     usage: a bad flag, an unreadable certificate or key file
3     no answer: refused, timed out, TLS handshake failed (UNAVAILABLE,
      DEADLINE_EXCEEDED): we cannot know, so never "healthy"
====  ==================================================================

grpc.health.v1 is public (README "Security"): no API key is needed for the
verdict. ``--json`` also fetches ``SessionAuthority/Health`` (the runbook's
health document), which needs credentials when authentication is on: the
API key (``SESSION_AUTHORITY_API_KEY``, or the file ``--api-key-file`` names;
never a flag, so it stays out of shell history and ``ps``) and/or the client
certificate. A refused document is reported in the JSON and does not change
the exit code: the verdict is grpc.health.v1's.

Every flag has an environment default (``SESSION_AUTHORITY_*``), so a
container's HEALTHCHECK is just ``session-authority health``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2

from session_authority.probe_args import ENV as _ENV
from session_authority.probe_args import add_health_parser
from session_authority.v1 import session_authority_pb2 as pb

__all__ = [
    "EXIT_HEALTHY",
    "EXIT_UNAVAILABLE",
    "EXIT_UNHEALTHY",
    "EXIT_USAGE",
    "Usage",
    "add_health_parser",
    "api_key",
    "main",
    "read_flag_file",
    "run_health",
]

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

_CHECK = "/grpc.health.v1.Health/Check"
_DOCUMENT = f"/{pb.DESCRIPTOR.services_by_name['SessionAuthority'].full_name}/Health"
#: No answer at all: the exit code that says "cannot know".
_NO_ANSWER = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class _Connection:
    credentials: grpc.ChannelCredentials | None
    options: tuple[tuple[str, Any], ...]
    api_key: str | None


class Usage(Exception):
    """A flag or file that cannot be used: exit 2."""


def run_health(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> int:
    try:
        connection = _connection(args, environ)
    except Usage as exc:
        print(f"session-authority health: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.timeout <= 0:
        print("session-authority health: --timeout must be positive", file=sys.stderr)
        return EXIT_USAGE
    with _channel(args.target, connection) as channel:
        verdict = _check(channel, args.timeout)
        result: dict[str, Any] = {"target": args.target, **verdict.as_json()}
        if args.json and verdict.code != EXIT_UNAVAILABLE:
            result.update(_document(channel, connection, args.timeout))
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(f"{args.target}: {verdict.text}")
    return verdict.code


@dataclass(frozen=True)
class _Verdict:
    code: int
    status: str
    detail: str = ""

    @property
    def text(self) -> str:
        return f"{self.status} ({self.detail})" if self.detail else self.status

    def as_json(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"healthy": self.code == EXIT_HEALTHY, "status": self.status}
        if self.detail:
            shown["detail"] = self.detail
        return shown


def _check(channel: grpc.Channel, timeout: float) -> _Verdict:
    check = channel.unary_unary(
        _CHECK,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    try:
        reply: health_pb2.HealthCheckResponse = check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout
        )
    except grpc.RpcError as exc:
        code = exc.code()
        status = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
        exit_code = EXIT_UNAVAILABLE if code in _NO_ANSWER else EXIT_UNHEALTHY
        return _Verdict(exit_code, status, str(exc.details() or ""))
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    return _Verdict(EXIT_HEALTHY if serving else EXIT_UNHEALTHY, name)


def _document(channel: grpc.Channel, connection: _Connection, timeout: float) -> dict[str, Any]:
    """The Health document, or why not (``document_error``): never fatal."""
    call = channel.unary_unary(
        _DOCUMENT,
        request_serializer=pb.HealthRequest.SerializeToString,
        response_deserializer=pb.HealthResponse.FromString,
    )
    metadata = (("authorization", f"Bearer {connection.api_key}"),) if connection.api_key else None
    try:
        reply: pb.HealthResponse = call(pb.HealthRequest(), timeout=timeout, metadata=metadata)
    except grpc.RpcError as exc:
        code = exc.code()
        name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
        return {"document_error": f"{name}: {exc.details() or ''}"}
    # Proto field names (snake_case): the runbook's jq paths.
    document = MessageToDict(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return {"document": document}


def _connection(args: argparse.Namespace, environ: Mapping[str, str]) -> _Connection:
    host, sep, port = str(args.target).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise Usage(f"--target must be host:port, not {args.target!r}")
    ca, cert, key = (read_flag_file(args, name) for name in ("ca_file", "cert_file", "key_file"))
    if (cert is None) != (key is None):
        raise Usage("--cert-file and --key-file go together")
    credentials = None
    if args.tls or ca is not None or cert is not None:
        credentials = grpc.ssl_channel_credentials(ca, key, cert)
    options: list[tuple[str, Any]] = [("grpc.enable_http_proxy", 0)]
    if args.server_name:
        if credentials is None:
            raise Usage("--server-name needs TLS (--tls or --ca-file)")
        options.append(("grpc.ssl_target_name_override", args.server_name))
    return _Connection(credentials, tuple(options), api_key(args, environ))


def read_flag_file(args: argparse.Namespace, name: str) -> bytes | None:
    path: Path | None = getattr(args, name)
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise Usage(f"--{name.replace('_', '-')}: cannot read {path}: {exc.strerror}") from exc


def api_key(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    """The key from the file, else the environment; stripped of the newline an
    editor or ``echo`` leaves. Never printed."""
    if args.api_key_file is not None:
        raw = read_flag_file(args, "api_key_file")
        key = (raw or b"").decode("utf-8", errors="replace").strip()
        if not key:
            raise Usage(f"--api-key-file: {args.api_key_file} is empty")
        return key
    return environ.get(f"{_ENV}API_KEY", "").strip() or None


def _channel(target: str, connection: _Connection) -> grpc.Channel:
    if connection.credentials is None:
        return grpc.insecure_channel(target, options=connection.options)
    return grpc.secure_channel(target, connection.credentials, options=connection.options)


def main(argv: list[str] | None = None) -> int:
    """``python -m session_authority.probe``: the ``health`` verb alone. It
    loads grpc and the stubs only, not the server (``session-authority``
    loads the server's modules first, seconds on a busy machine): the
    container HEALTHCHECK runs this."""
    parser = argparse.ArgumentParser(prog="python -m session_authority.probe")
    add_health_parser(parser.add_subparsers(dest="command", required=False))
    args = parser.parse_args(["health", *(sys.argv[1:] if argv is None else argv)])
    return run_health(args)


if __name__ == "__main__":
    sys.exit(main())
