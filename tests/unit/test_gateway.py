"""Gateways' pure parts: where a forwarded request carries the token
(``transport.gateway``), and that Envoy's ``Check`` is a read in the policy
(``bootstrap.auth_policy``): with AUTH configured it needs a credential."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from session_authority.bootstrap import auth_policy
from session_authority.config import Settings
from session_authority.core.domain import Session, TokenHash
from session_authority.transport.auth import Caller, hash_api_key
from session_authority.transport.gateway import GatewayPolicy, cookie_value

CHECK = "/envoy.service.auth.v3.Authorization/Check"
POLICY = GatewayPolicy()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("session=abc", "abc"),
        ("a=1; session=abc; b=2", "abc"),
        ("  session = abc ;", "abc"),
        ('session="abc"', "abc"),
        ("session=first; session=second", "first"),  # the most specific path comes first
        ("session=; session=abc", "abc"),
        ('weird="x;y; session=abc', "abc"),  # another cookie's junk hides nothing
        ("a=1, session=abc", "abc"),  # two Cookie headers joined with a comma
        ("sessionx=abc; xsession=abc", None),
        ("session", None),
        ("", None),
        ("session=" + "a" * 20_000, None),  # beyond the bound: not parsed
    ],
)
def test_cookie_value(header: str, expected: str | None) -> None:
    assert cookie_value(header, "session") == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"authorization": "Bearer tok"}, "tok"),
        ({"authorization": "bearer  tok "}, "tok"),
        ({"authorization": "Bearer tok", "cookie": "session=other"}, "tok"),
        ({"authorization": "Basic dXNlcg==", "cookie": "session=c"}, "c"),
        ({"authorization": "Bearer ", "cookie": "session=c"}, "c"),
        ({}, None),
    ],
)
def test_token_from(headers: dict[str, str], expected: str | None) -> None:
    assert POLICY.token_from(headers) == expected


def test_identity_headers_keep_ascii_and_encode_the_rest() -> None:
    now = datetime.now(UTC)
    session = Session(
        "8a1f0c4e-0000-4000-8000-000000000000", "Zoë 100%", TokenHash.of("t"), now, now
    )
    assert POLICY.identity(session) == [
        ("x-session-user-id", "Zo%C3%AB 100%25"),
        ("x-session-id", "8a1f0c4e-0000-4000-8000-000000000000"),
    ]


def test_header_names_must_be_lower_case() -> None:
    with pytest.raises(ValueError, match="lower-case"):
        GatewayPolicy(user_id_header="X-User")


def test_check_is_a_read_that_needs_credentials_once_auth_is_configured() -> None:
    settings = Settings(auth_api_keys=f"envoy:{hash_api_key('k' * 32)}")
    policy = auth_policy(settings)
    assert CHECK in policy.reads
    assert policy.decide(CHECK, Caller()) == "no_credentials"
    assert policy.decide(CHECK, Caller(authenticated=True, keys=frozenset({"envoy"}))) is None
