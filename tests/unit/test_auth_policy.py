"""Who may call what (transport/auth.py's pure parts), the AUTH_* settings
that configure it, and serve's refusal to start open."""

from __future__ import annotations

import argparse
import re
import secrets
from pathlib import Path

import pytest
from pydantic import ValidationError

from session_authority import cli, cli_args
from session_authority.bootstrap import auth_policy, security
from session_authority.config import Settings
from session_authority.transport.auth import (
    ApiKeys,
    AuthPolicy,
    Caller,
    declared,
    hash_api_key,
    mutation,
    sensitive_read,
)
from session_authority.transport.servicer import SessionAuthorityServicer
from session_authority.transport.unary import unary
from session_authority.v1 import session_authority_pb2 as pb

SVC = "/session_authority.v1.SessionAuthority"
VALIDATE, HEALTH = f"{SVC}/ValidateSession", f"{SVC}/Health"
VALIDATE_MANY = f"{SVC}/ValidateSessions"
CREATE, INVALIDATE, INVALIDATE_USER = (
    f"{SVC}/CreateSession",
    f"{SVC}/Invalidate",
    f"{SVC}/InvalidateUser",
)
TOUCH = f"{SVC}/TouchSession"
FUTURE = f"{SVC}/SomeMethodAddedLater"
PROBE = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
LOGIN = "spiffe://example.org/ns/prod/sa/login"

POLICY = AuthPolicy(
    enforced=True,
    public_services=frozenset(
        {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    ),
    reads=frozenset({VALIDATE, HEALTH}),
    mutations=frozenset({CREATE, INVALIDATE, INVALIDATE_USER}),
    allowed=frozenset({LOGIN, "admin.internal", "apikey:login"}),
)
ANONYMOUS = Caller()
WRONG_KEY = Caller(invalid_credentials=True)
READER = Caller(frozenset({"spiffe://example.org/ns/prod/sa/gateway"}), authenticated=True)
NO_SAN = Caller(authenticated=True)
WRITER = Caller(frozenset({LOGIN}), authenticated=True)
WRITER_DNS = Caller(frozenset({"admin.internal"}), authenticated=True)
WRITER_KEY = Caller(authenticated=True, keys=frozenset({"login"}))
READER_KEY = Caller(authenticated=True, keys=frozenset({"gateway"}))
#: A certificate whose SAN spells the key's allow-list entry.
POSING_CERT = Caller(frozenset({"apikey:login"}), authenticated=True)
#: A key named like a certificate identity on the allow-list.
POSING_KEY = Caller(authenticated=True, keys=frozenset({"admin.internal"}))


@pytest.mark.parametrize("method", [PROBE, REFLECTION])
@pytest.mark.parametrize("caller", [ANONYMOUS, WRONG_KEY, READER, WRITER])
def test_probes_and_reflection_are_open_to_everyone(method: str, caller: Caller) -> None:
    assert POLICY.is_public(method)
    assert POLICY.decide(method, caller) is None


@pytest.mark.parametrize("method", [VALIDATE, HEALTH])
def test_reads_need_any_authenticated_caller(method: str) -> None:
    for caller in (READER, NO_SAN, WRITER, WRITER_KEY, READER_KEY):
        assert POLICY.decide(method, caller) is None
    assert POLICY.decide(method, ANONYMOUS) == "no_credentials"
    assert POLICY.decide(method, WRONG_KEY) == "invalid_credentials"


@pytest.mark.parametrize("method", [CREATE, INVALIDATE, INVALIDATE_USER])
def test_mutations_need_the_allow_list(method: str) -> None:
    for caller in (WRITER, WRITER_DNS, WRITER_KEY):
        assert POLICY.decide(method, caller) is None
    for caller in (READER, NO_SAN, READER_KEY, POSING_CERT, POSING_KEY):
        assert POLICY.decide(method, caller) == "not_allowed"
    assert POLICY.decide(method, ANONYMOUS) == "no_credentials"
    assert POLICY.decide(method, WRONG_KEY) == "invalid_credentials"


def test_a_method_nobody_classified_is_denied_to_every_caller() -> None:
    for caller in (WRITER, WRITER_DNS, WRITER_KEY, READER, NO_SAN, READER_KEY):
        assert POLICY.decide(FUTURE, caller) == "unclassified"
    assert POLICY.decide(FUTURE, ANONYMOUS) == "no_credentials"
    assert POLICY.decide(FUTURE, WRONG_KEY) == "invalid_credentials"


def test_every_rpc_of_the_service_is_declared_on_the_servicer() -> None:
    """A new RPC in the proto declared neither ``@read``, ``@sensitive_read`` nor
    ``@mutation`` where it is written (the servicer, or ``unary.py``) fails here
    (and is denied to every caller until it is)."""
    service = pb.DESCRIPTOR.services_by_name["SessionAuthority"]
    access = SessionAuthorityServicer.access()
    assert sorted(access) == sorted(f"{SVC}/{m.name}" for m in service.methods)
    # The reads anonymous callers may reach (AUTH_ANONYMOUS_READS): pinned, so a new
    # one is a decision written here.
    reads = {VALIDATE, HEALTH, VALIDATE_MANY}
    assert {m for m, kind in access.items() if kind == "read"} == reads
    # Reads that show other users' sessions: never anonymous. A new sensitive read
    # opens nothing to anyone, so it needs no line here.
    sensitive = {f"{SVC}/ListUserSessions", f"{SVC}/WatchRevocations"}
    assert sensitive <= {m for m, kind in access.items() if kind == "sensitive_read"}


def test_an_undeclared_servicer_method_is_left_out_of_the_policy() -> None:
    class Grown(SessionAuthorityServicer):
        async def SomeMethodAddedLater(self) -> None:  # declared neither way
            pass

        @mutation
        async def AnotherAddedLater(self) -> None:
            pass

        @unary  # a plain unary RPC (transport/unary.py) declared neither way
        async def UnaryAddedLater(self, request: pb.HealthRequest) -> pb.HealthResponse:
            return pb.HealthResponse()

        @sensitive_read
        @unary
        async def UnaryDeclared(self, request: pb.HealthRequest) -> pb.HealthResponse:
            return pb.HealthResponse()

    names = ["ValidateSession", "SomeMethodAddedLater", "AnotherAddedLater"]
    names += ["UnaryAddedLater", "UnaryDeclared", "CreateSession", "ListUserSessions"]
    access = declared(Grown, SVC.lstrip("/"), names)
    assert access == {
        VALIDATE: "read",
        f"{SVC}/AnotherAddedLater": "mutation",
        f"{SVC}/UnaryDeclared": "sensitive_read",
        CREATE: "mutation",
        f"{SVC}/ListUserSessions": "sensitive_read",
    }


def test_a_wrong_key_is_refused_even_beside_a_good_certificate() -> None:
    caller = Caller(frozenset({LOGIN}), authenticated=True, invalid_credentials=True)
    assert POLICY.decide(CREATE, caller) == "invalid_credentials"
    assert POLICY.decide(VALIDATE, caller) == "invalid_credentials"


def test_anonymous_reads_open_reads_only() -> None:
    policy = AuthPolicy(
        enforced=True,
        reads=POLICY.reads,
        mutations=POLICY.mutations,
        allowed=POLICY.allowed,
        anonymous_reads=True,
    )
    assert policy.decide(VALIDATE, ANONYMOUS) is None
    assert policy.decide(HEALTH, ANONYMOUS) is None
    assert policy.decide(CREATE, ANONYMOUS) == "no_credentials"
    assert policy.decide(VALIDATE, WRONG_KEY) == "invalid_credentials"


def test_anonymous_reads_never_open_sensitive_reads() -> None:
    """AUTH_ANONYMOUS_READS opens ValidateSession and Health, never a listing of
    someone's sessions: the policy built from the servicer says so."""
    settings = Settings(auth_api_keys=f"login:{HASH}", auth_anonymous_reads=True)
    policy = auth_policy(settings)
    listing = f"{SVC}/ListUserSessions"
    assert listing in policy.reads
    assert policy.decide(VALIDATE, ANONYMOUS) is None
    assert policy.decide(listing, ANONYMOUS) == "no_credentials"
    assert policy.decide(listing, READER_KEY) is None


def test_without_authentication_everything_is_open() -> None:
    policy = AuthPolicy(enforced=False)
    for method in (CREATE, INVALIDATE_USER, VALIDATE, FUTURE):
        assert policy.is_public(method)
        assert policy.decide(method, ANONYMOUS) is None


def test_reads_are_full_method_names() -> None:
    with pytest.raises(ValueError, match="full method name"):
        AuthPolicy(enforced=True, reads=frozenset({"ValidateSession"}))


def test_caller_description_shows_identities_never_credentials() -> None:
    assert WRITER_KEY.describe() == "apikey:login"
    assert ANONYMOUS.describe() == "anonymous"
    assert WRONG_KEY.describe() == "invalid credentials"


# --- API keys ------------------------------------------------------------------------------


def test_api_keys_identify_by_hash() -> None:
    login, gateway = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    keys = ApiKeys({"login": hash_api_key(login), "gateway": hash_api_key(gateway)})
    assert keys.identify(login) == "login"
    assert keys.identify(gateway) == "gateway"
    assert keys.identify(login + "x") is None
    assert keys.identify("") is None
    assert ApiKeys({}).identify(login) is None


def test_hash_is_the_documented_one_liner() -> None:
    # README: printf %s "$KEY" | sha256sum
    assert hash_api_key("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


# --- settings ------------------------------------------------------------------------------

HASH = hash_api_key("k1")


def test_policy_from_settings(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    settings = Settings(
        tls_cert_file=tmp_path / "c",
        tls_key_file=tmp_path / "k",
        tls_client_ca_file=ca,
        auth_api_keys=f" login:{HASH.upper()} , gateway:{hash_api_key('k2')}",
        auth_allowed_identities=f"{LOGIN}, apikey:login",
    )
    assert settings.authentication_configured
    assert settings.api_key_hashes() == {"login": HASH, "gateway": hash_api_key("k2")}
    policy = auth_policy(settings)
    assert policy.enforced
    assert policy.allowed == {LOGIN, "apikey:login"}
    sensitive = {f"{SVC}/ListUserSessions", f"{SVC}/WatchRevocations"}
    # The reads open to anonymous callers with AUTH_ANONYMOUS_READS, pinned: ValidateSession,
    # Health, Envoy's ext_authz Check (tests/unit/test_gateway.py). The sensitive reads are
    # reads too, never anonymous; a new one (or a new mutation) opens nothing, so it needs no
    # line here: the policy holds what the servicer declares.
    check = "/envoy.service.auth.v3.Authorization/Check"
    assert policy.reads - policy.sensitive_reads == {VALIDATE, HEALTH, VALIDATE_MANY, check}
    assert sensitive <= policy.sensitive_reads <= policy.reads
    assert {CREATE, INVALIDATE, INVALIDATE_USER, TOUCH} <= policy.mutations
    declared = SessionAuthorityServicer.access()
    assert policy.sensitive_reads == {m for m, kind in declared.items() if kind == "sensitive_read"}
    assert policy.mutations == {m for m, kind in declared.items() if kind == "mutation"}
    assert policy.decide(CREATE, READER_KEY) == "not_allowed"
    assert policy.decide(PROBE, ANONYMOUS) is None


def test_nothing_configured_is_open() -> None:
    settings = Settings()
    assert not settings.authentication_configured
    assert not auth_policy(settings).enforced
    assert Settings(auth_api_keys=f"a:{HASH}").authentication_configured
    assert Settings(
        tls_cert_file=Path("c"), tls_key_file=Path("k"), tls_client_ca_file=Path("ca")
    ).authentication_configured
    assert not Settings(tls_cert_file=Path("c"), tls_key_file=Path("k")).authentication_configured


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tls_cert_file": "c"}, "go together"),
        ({"tls_key_file": "k"}, "go together"),
        ({"tls_client_ca_file": "ca"}, "needs TLS_CERT_FILE"),
        ({"auth_api_keys": "login"}, "entry 1 is not name:sha256hex"),
        ({"auth_api_keys": f"a:{HASH},b:abc"}, "entry 2 is not name:sha256hex"),
        ({"auth_api_keys": f"a b:{HASH}"}, "entry 1"),
        ({"auth_api_keys": f"a:{HASH},a:{hash_api_key('x')}"}, "appears twice"),
        ({"auth_api_keys": f"a:{HASH},b:{HASH}"}, "same key"),
        ({"auth_api_keys": f"a:{HASH}", "auth_allowed_identities": "apikey:b"}, "names no"),
        ({"auth_api_keys": f"a:{HASH}", "auth_allowed_identities": LOGIN}, "needs TLS_CLIENT"),
    ],
)
def test_invalid_security_settings(values: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**values)  # type: ignore[arg-type]


def test_a_raw_key_pasted_for_its_hash_is_not_echoed() -> None:
    raw = "sk-live-" + secrets.token_hex(16)
    with pytest.raises(ValidationError) as caught:
        Settings(auth_api_keys=f"login:{raw}")
    assert raw not in str(caught.value)


def test_empty_tls_variables_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE"):
        monkeypatch.setenv(name, "")
    settings = Settings()
    assert settings.tls_cert_file is None
    assert settings.tls_client_ca_file is None


# --- the command line ---------------------------------------------------------------------


def _serve_args(*argv: str) -> argparse.Namespace:
    return cli_args.parser().parse_args(["serve", *argv])


def test_serve_flags_become_settings(tmp_path: Path) -> None:
    args = _serve_args(
        "--tls-cert",
        "c.pem",
        "--tls-key",
        "k.pem",
        "--tls-client-ca",
        "ca.pem",
        "--allow-unauthenticated",
    )
    settings = Settings(**cli_args.security_overrides(args))  # type: ignore[arg-type]
    assert settings.tls_cert_file == Path("c.pem")
    assert settings.tls_key_file == Path("k.pem")
    assert settings.tls_client_ca_file == Path("ca.pem")
    assert settings.allow_unauthenticated
    assert cli_args.security_overrides(_serve_args()) == {}


def test_serve_refuses_to_start_open(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before any connection is tried: the DSN points nowhere."""
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    for name in ("AUTH_API_KEYS", "TLS_CLIENT_CA_FILE", "ALLOW_UNAUTHENTICATED"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "refusing to start" in err
    assert "--allow-unauthenticated" in err
    assert "CreateSession" in err
    assert cli_args.refuse_open(Settings(allow_unauthenticated=True)) is None
    assert cli_args.refuse_open(Settings(auth_api_keys=f"a:{HASH}")) is None


def test_the_start_up_lines_name_what_the_servicer_declares() -> None:
    """The unauthenticated warning names every mutation, from the declarations (a list
    written by hand once left TouchSession out)."""
    access = SessionAuthorityServicer.access()
    for kind in ("mutation", "read"):
        names = re.split(r", | and ", security._declared(kind))
        assert names == [m.rpartition("/")[2] for m, k in access.items() if k == kind]
    assert "TouchSession" in re.split(r", | and ", security._declared("mutation"))
