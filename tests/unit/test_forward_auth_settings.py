"""FORWARD_AUTH_TLS_*: the pairs that go together, and who must present ``x-api-key`` once the
forward-auth port has its own mTLS (the handshake authenticates the gateway)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from session_authority.bootstrap.security import (
    forward_auth_certificate_files,
    forward_auth_keys,
)
from session_authority.config import Settings

_KEYS = "gw:" + "a" * 64
_DB = "postgresql://x/y"


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"forward_auth_tls_cert_file": Path("c.pem")}, "FORWARD_AUTH_TLS_CERT_FILE and"),
        ({"forward_auth_tls_key_file": Path("k.pem")}, "FORWARD_AUTH_TLS_CERT_FILE and"),
        (
            {"forward_auth_tls_client_ca_file": Path("ca.pem")},
            "FORWARD_AUTH_TLS_CLIENT_CA_FILE (mTLS)",
        ),
    ],
)
def test_files_that_go_together(fields: dict[str, Path], said: str) -> None:
    with pytest.raises(ValidationError, match=said.replace("(", r"\(").replace(")", r"\)")):
        Settings(database_url=_DB, **fields)  # type: ignore[arg-type]


def test_empty_is_unset() -> None:
    empty: dict[str, str] = {"forward_auth_tls_cert_file": "", "forward_auth_tls_key_file": ""}
    settings = Settings(database_url=_DB, **empty)  # type: ignore[arg-type]  # as env vars give them
    assert forward_auth_certificate_files(settings) is None


def test_tls_alone_still_asks_for_the_key_mtls_does_not() -> None:
    tls = {"forward_auth_tls_cert_file": Path("c.pem"), "forward_auth_tls_key_file": Path("k.pem")}
    plain = Settings(database_url=_DB, auth_api_keys=_KEYS)
    assert forward_auth_keys(plain) is not None
    assert forward_auth_keys(Settings(database_url=_DB, auth_api_keys=_KEYS, **tls)) is not None  # type: ignore[arg-type]
    mtls = Settings(
        database_url=_DB,
        auth_api_keys=_KEYS,
        forward_auth_tls_client_ca_file=Path("ca.pem"),
        **tls,  # type: ignore[arg-type]
    )
    assert forward_auth_keys(mtls) is None
    files = forward_auth_certificate_files(mtls)
    assert files is not None and files.client_ca == Path("ca.pem")


def test_the_grpc_port_s_tls_does_not_turn_forward_auth_to_tls() -> None:
    settings = Settings(database_url=_DB, tls_cert_file=Path("c.pem"), tls_key_file=Path("k.pem"))
    assert forward_auth_certificate_files(settings) is None
