"""The Python client's channel configuration against the server's own (no I/O): keepalive that
the server's ping policy accepts, retries only where a call is idempotent, round robin; and the
client's redaction of tokens in results and errors."""

from __future__ import annotations

import datetime
import json
from typing import Any

import grpc
import pytest

from session_authority.bootstrap.grpc_server import server_options
from session_authority.client import (
    CreatedSession,
    DeadlineExceeded,
    InvalidArgument,
    Keepalive,
    Retry,
    ServerError,
    Session,
    SessionAuthorityClient,
    Tls,
    Unavailable,
)
from session_authority.client._config import IDEMPOTENT, SERVICE, channel_options
from session_authority.client._errors import mapped
from session_authority.config import Settings
from session_authority.v1 import session_authority_pb2 as pb

TOKEN = "sat_" + "A" * 48


def _options(**kw: Any) -> dict[str, Any]:
    return dict(channel_options(kw.pop("retry", Retry()), kw.pop("keepalive", Keepalive()), None))


def test_keepalive_stays_within_the_server_s_ping_policy() -> None:
    """A ping more often than the server's min_ping_interval_without_data_ms, or on a connection
    without calls when the server does not permit that, is a strike; two strikes and the server
    closes the connection (GOAWAY too_many_pings)."""
    server = dict(server_options(Settings(database_url="postgresql://x/y")))
    client = _options()
    assert (
        client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
    )
    if not server.get("grpc.keepalive_permit_without_calls"):
        assert client["grpc.keepalive_permit_without_calls"] == 0


def test_retries_only_the_idempotent_rpcs_on_unavailable_with_round_robin() -> None:
    config = json.loads(_options()["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    retried, plain = config["methodConfig"]
    assert {n["method"] for n in retried["name"]} == set(IDEMPOTENT)
    assert retried["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert [n["method"] for n in plain["name"]] == ["CreateSession", "WatchRevocations"]
    assert "retryPolicy" not in plain
    # Every RPC of the service is classified: a new one cannot slip in unconsidered.
    methods = set(pb.DESCRIPTOR.services_by_name["SessionAuthority"].methods_by_name)
    assert methods == set(IDEMPOTENT) | {"CreateSession", "WatchRevocations"}
    assert {n["service"] for n in retried["name"] + plain["name"]} == {SERVICE}
    no_retry = json.loads(_options(retry=Retry(max_attempts=1))["grpc.service_config"])
    assert "retryPolicy" not in no_retry["methodConfig"][0]


def test_results_and_errors_never_show_a_token() -> None:
    now = datetime.datetime.now(datetime.UTC)
    created = CreatedSession(TOKEN, Session("id-1", "alice", now, now))
    assert TOKEN not in repr(created) and "<redacted>" in repr(created)

    class Failed(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode, details: str) -> None:
            self._code, self._details = code, details

        def code(self) -> grpc.StatusCode:
            return self._code

        def details(self) -> str:
            return self._details

    error = mapped(Failed(grpc.StatusCode.INVALID_ARGUMENT, f"bad token {TOKEN}"), (TOKEN,))
    assert isinstance(error, InvalidArgument)
    assert TOKEN not in str(error) + repr(error) + error.details
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(mapped(Failed(grpc.StatusCode.UNAVAILABLE, "")), Unavailable)
    assert isinstance(mapped(Failed(grpc.StatusCode.DEADLINE_EXCEEDED, "")), DeadlineExceeded)
    assert isinstance(mapped(Failed(grpc.StatusCode.INTERNAL, "")), ServerError)
    with SessionAuthorityClient("127.0.0.1:1", api_key=TOKEN) as client:
        assert TOKEN not in repr(client)


@pytest.mark.parametrize(
    "kw",
    [
        {"certificate_chain": b"cert"},
        {"root_certificates": b"  \n"},
        {"certificate_chain": b"", "private_key": b"key"},
    ],
)
def test_tls_refuses_what_would_abort_grpc(kw: dict[str, bytes]) -> None:
    with pytest.raises(ValueError, match="Tls"):
        Tls(kw.get("root_certificates"), kw.get("certificate_chain"), kw.get("private_key"))
