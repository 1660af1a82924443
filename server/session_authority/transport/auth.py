"""Who may call what: each call's caller is identified (mTLS certificate, API
key) and the ``AuthPolicy`` decides; ``Authoriser`` applies it, asked by the
admission gate before the request message is read.

Invariant: with authentication configured, nothing is open by omission. A
method is answered to a caller without credentials only when its service is
listed in ``public_services`` (grpc.health.v1 and reflection, for probes) or,
with ``anonymous_reads``, when it is one of ``reads`` and not a sensitive read
(one that shows other users' sessions: listings, the revocation stream). A ``mutation`` needs an
identity on the allow-list. A method of ours that is neither (one added to the
service and not yet classified) is denied to every caller. Each method is
classified where it is written, by ``@read``, ``@sensitive_read`` or ``@mutation`` on the servicer's
method (``declared``), not in a list kept elsewhere.

Two kinds of identity, kept apart: a client certificate's SAN URIs
(``spiffe://example.org/ns/prod/sa/login``) and DNS names
(``login.internal``) in ``Caller.identities``, and the names of the API keys
presented in ``Caller.keys``. The allow-list spells a key ``apikey:<name>``;
that entry matches only ``Caller.keys``, never a certificate, so a
certificate whose SAN reads ``apikey:login`` is a certificate identity that
no allow-list entry can name. Certificate identities are trusted only when
the port verifies client certificates (mTLS); API keys are compared as
SHA-256 digests in constant time and are never logged (their names are).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, TypeVar

import grpc

__all__ = [
    "API_KEY_PREFIX",
    "ApiKeys",
    "AuthPolicy",
    "Authoriser",
    "Caller",
    "Refusal",
    "declared",
    "hash_api_key",
    "mutation",
    "read",
    "sensitive_read",
]

_log = logging.getLogger("session_authority.auth")

API_KEY_PREFIX = "apikey:"
"""An API key's identity is this prefix and the key's name (``apikey:login``)."""

Refusal: TypeAlias = Literal["no_credentials", "invalid_credentials", "not_allowed", "unclassified"]
"""Why a call was denied; also the ``reason`` label of the denial counter."""

Access: TypeAlias = Literal["read", "sensitive_read", "mutation"]
_ACCESS = "__session_authority_access__"
F = TypeVar("F", bound=Callable[..., Any])


def read(method: F) -> F:
    """Declares a servicer method a read: any authenticated caller may call it
    (and anyone, with ``AUTH_ANONYMOUS_READS``)."""
    setattr(method, _ACCESS, "read")
    return method


def sensitive_read(method: F) -> F:
    """Declares a servicer method a read that shows more than the caller
    brought (another user's sessions, every revocation): any authenticated
    caller may call it, never a caller without credentials, whatever
    ``AUTH_ANONYMOUS_READS`` says."""
    setattr(method, _ACCESS, "sensitive_read")
    return method


def mutation(method: F) -> F:
    """Declares a servicer method a mutation: only identities on the allow-list
    (``AUTH_ALLOWED_IDENTITIES``) may call it."""
    setattr(method, _ACCESS, "mutation")
    return method


def declared(servicer: type, service: str, methods: Iterable[str]) -> dict[str, Access]:
    """``/service/Method`` -> its declared access, for each of ``methods`` the
    servicer class declares; an undeclared one is left out (and so denied)."""
    found: dict[str, Access] = {}
    for name in methods:
        access = getattr(getattr(servicer, name, None), _ACCESS, None)
        if access is not None:
            found[f"/{service}/{name}"] = access
    return found


#: The one table from a denial to its status and the message the caller sees.
_STATUS: dict[Refusal, tuple[grpc.StatusCode, str]] = {
    "no_credentials": (
        grpc.StatusCode.UNAUTHENTICATED,
        "credentials required: a client certificate or an API key "
        "(metadata 'authorization: Bearer <key>' or 'x-api-key')",
    ),
    "invalid_credentials": (grpc.StatusCode.UNAUTHENTICATED, "invalid API key"),
    "not_allowed": (grpc.StatusCode.PERMISSION_DENIED, "caller not allowed to call {method}"),
    "unclassified": (
        grpc.StatusCode.PERMISSION_DENIED,
        "{method} is not classified as a read or a mutation: nobody may call it",
    ),
}


def hash_api_key(key: str) -> str:
    """What AUTH_API_KEYS holds for ``key``: its SHA-256, in hex."""
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """Service API keys, known only by name and SHA-256 digest."""

    def __init__(self, hashes: Mapping[str, str]) -> None:
        """``hashes``: key name -> SHA-256 of the key, in hex."""
        self._digests = [(name, bytes.fromhex(digest)) for name, digest in hashes.items()]

    def __len__(self) -> int:
        return len(self._digests)

    def identify(self, key: str) -> str | None:
        """The name of the key ``key`` is, or None. Every digest is compared,
        each in constant time, so the answer's timing tells nothing of which
        key came close."""
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for name, expected in self._digests:
            if hmac.compare_digest(digest, expected):
                found = name
        return found


@dataclass(frozen=True)
class Caller:
    """Who called, as far as the credentials show."""

    identities: frozenset[str] = frozenset()
    authenticated: bool = False
    """A verified client certificate (with or without SANs) or a valid API key."""
    invalid_credentials: bool = False
    """An API key was presented that is not one of ours (or not in a form we read)."""
    keys: frozenset[str] = frozenset()
    """Names of the valid API keys presented (``identities`` are certificates' only)."""

    def describe(self) -> str:
        """For log lines: identities only, never a credential."""
        if self.identities or self.keys:
            shown = [*sorted(self.identities), *(API_KEY_PREFIX + k for k in sorted(self.keys))]
            return ",".join(shown)
        if self.invalid_credentials:
            return "invalid credentials"
        return "authenticated, no identity" if self.authenticated else "anonymous"


@dataclass(frozen=True)
class AuthPolicy:
    """Which caller may call which method (methods as gRPC names them:
    ``/package.Service/Method``). Pure: no I/O, no gRPC."""

    enforced: bool
    """False: no authentication configured, every caller may call everything."""
    public_services: frozenset[str] = frozenset()
    reads: frozenset[str] = frozenset()
    """Methods any authenticated caller may call."""
    mutations: frozenset[str] = frozenset()
    """Methods only the allow-list may call. A method outside the public
    services, ``reads`` and ``mutations`` is denied to everyone."""
    allowed: frozenset[str] = frozenset()
    """Who may call the mutations: certificate identities, and API keys as
    ``apikey:<name>``."""
    anonymous_reads: bool = False
    """``reads`` but ``sensitive_reads`` are open to callers without credentials too."""
    sensitive_reads: frozenset[str] = frozenset()
    """Of ``reads``, those never open to callers without credentials."""

    def __post_init__(self) -> None:
        for method in self.reads | self.mutations:
            if not method.startswith("/") or method.count("/") != 2:
                raise ValueError(f"not a full method name: {method!r}")

    def is_public(self, method: str) -> bool:
        """True when no call of ``method`` needs checking."""
        return not self.enforced or self.is_public_service(method)

    def is_public_service(self, method: str) -> bool:
        """True when ``method``'s service is open to every caller (health,
        reflection), whether or not authentication is enforced."""
        return _service_of(method) in self.public_services

    def decide(self, method: str, caller: Caller) -> Refusal | None:
        """None when ``caller`` may call ``method``, else why not."""
        if self.is_public(method):
            return None
        if caller.invalid_credentials:
            return "invalid_credentials"
        if method in self.reads and (
            caller.authenticated or (self.anonymous_reads and method not in self.sensitive_reads)
        ):
            return None
        if not caller.authenticated:
            return "no_credentials"
        if method not in self.mutations:
            return "unclassified"
        if caller.identities & self._allowed_certificates:
            return None
        if caller.keys & self._allowed_keys:
            return None
        return "not_allowed"

    @property
    def _allowed_certificates(self) -> frozenset[str]:
        return frozenset(i for i in self.allowed if not i.startswith(API_KEY_PREFIX))

    @property
    def _allowed_keys(self) -> frozenset[str]:
        return frozenset(
            i.removeprefix(API_KEY_PREFIX) for i in self.allowed if i.startswith(API_KEY_PREFIX)
        )


def _service_of(method: str) -> str:
    return method.lstrip("/").rpartition("/")[0]


class Authoriser:
    """Identifies the caller of a call and applies the policy. The admission
    gate (``transport.admission``) asks it first, from the call's metadata and
    connection, before the call's request message is read."""

    def __init__(
        self,
        policy: AuthPolicy,
        keys: ApiKeys,
        *,
        trust_client_certificates: bool,
        on_denied: Callable[[str, Refusal], None] = lambda method, reason: None,
    ) -> None:
        """``trust_client_certificates``: the port verifies client
        certificates against a CA (mTLS); only then are their SANs identities."""
        self.policy = policy
        self._keys = keys
        self._mtls = trust_client_certificates
        self._on_denied = on_denied

    def identify(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        identities: set[str] = set()
        authenticated = False
        if self._mtls:
            auth = context.auth_context()
            # The port requires and verifies a client certificate, so a
            # subject means a certificate from the configured CA.
            if auth.get("x509_subject"):
                authenticated = True
                for prop in ("peer_uri", "peer_dns"):
                    identities.update(v.decode(errors="replace") for v in auth.get(prop, ()))
        invalid = False
        keys: set[str] = set()
        for key in _presented_keys(context.invocation_metadata() or ()):
            name = None if key is None else self._keys.identify(key)
            if name is None:
                invalid = True
            else:
                authenticated = True
                keys.add(name)
        return Caller(frozenset(identities), authenticated, invalid, frozenset(keys))

    async def authorise(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        """The caller, when it may call ``method``; otherwise the call is
        aborted (``context.abort`` raises), counted and logged."""
        caller = self.identify(context)
        reason = self.policy.decide(method, caller)
        if reason is None:
            return caller
        self._on_denied(method, reason)
        code, message = _STATUS[reason]
        _log.warning(
            "auth denied: %s %s: %s (caller %s, peer %s)",
            code.name,
            method,
            reason,
            caller.describe(),
            context.peer(),
        )
        await context.abort(code, message.format(method=method))
        raise AssertionError("context.abort returned")  # pragma: no cover


def _presented_keys(metadata: Iterable[tuple[str, str | bytes]]) -> Iterable[str | None]:
    """Every API key in the call's metadata; None for a credential in a form
    we do not read (``authorization: Basic ...``), which is refused too."""
    for name, value in metadata:
        if name not in ("authorization", "x-api-key") or not isinstance(value, str):
            continue
        if name == "x-api-key":
            yield value.strip()
            continue
        scheme, _, token = value.strip().partition(" ")
        yield token.strip() if scheme.lower() == "bearer" else None
