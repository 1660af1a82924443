"""What gateways ask (Envoy's ext_authz, nginx/Traefik/Caddy forward-auth):
the session token of a forwarded HTTP request, and the identity headers the
upstream receives when it is valid. Shared by ``ext_authz`` (gRPC) and
``forward_auth`` (HTTP), so both read the same request the same way.

Where the token is: an ``Authorization: Bearer <token>`` header first (API
callers), else the configured cookie (browsers). An ``Authorization`` header
of another scheme (Basic) is not ours and is ignored, so the cookie is still
read. Nothing here logs or echoes a token.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

from session_authority.core.domain import Session

__all__ = ["GatewayPolicy", "cookie_value"]

#: Printable ASCII but ``%``: kept as is in an identity header (the rest is
#: percent-encoded UTF-8, so a header value never holds a byte a proxy refuses).
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
#: Bounds on what is parsed: a hostile request costs no more than this.
_MAX_COOKIE_HEADER = 16 * 1024


@dataclass(frozen=True)
class GatewayPolicy:
    """Names a gateway and its upstream agree on (settings ``GATEWAY_*``)."""

    cookie: str = "session"
    """The cookie that holds the session token."""
    user_id_header: str = "x-session-user-id"
    session_id_header: str = "x-session-id"

    def __post_init__(self) -> None:
        for name in (self.user_id_header, self.session_id_header):
            if not name or name != name.lower() or not name.isascii() or ":" in name:
                raise ValueError(f"identity header names are lower-case ASCII: {name!r}")

    @property
    def identity_header_names(self) -> tuple[str, str]:
        return (self.user_id_header, self.session_id_header)

    def token_from(self, headers: Mapping[str, str]) -> str | None:
        """The session token a request carries, or None. ``headers``: its
        headers with lower-case names (Envoy's ``attributes.request.http.headers``
        joins repeated ones; aiohttp's multidict is read through ``get_all``
        by the caller and joined the same way)."""
        authorization = headers.get("authorization", "").strip()
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() == "bearer" and credential.strip():
            return credential.strip()
        return cookie_value(headers.get("cookie", ""), self.cookie)

    def identity(self, session: Session) -> list[tuple[str, str]]:
        """The headers the upstream receives for a valid ``session``."""
        return [
            (self.user_id_header, quote(session.user_id, safe=_HEADER_SAFE)),
            (self.session_id_header, session.session_id),
        ]


def cookie_value(header: str, name: str) -> str | None:
    """The first non-empty value of cookie ``name`` in a ``Cookie`` header
    (several headers joined by ``;`` or ``,`` are read alike), or None.

    Parsed by hand, leniently, as browsers send it (RFC 6265 section 5.4), not
    with ``http.cookies``, which gives up on the whole header at the first
    cookie it dislikes: another site's odd cookie must not hide ours. A value
    in double quotes is unquoted. A browser sends the most specific path
    first, so the first match is the one the application set for this path."""
    if not header or len(header) > _MAX_COOKIE_HEADER:
        return None
    for part in _pairs(header):
        key, sep, value = part.partition("=")
        if not sep or key.strip() != name:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if value:
            return value
    return None


def _pairs(header: str) -> Iterable[str]:
    for chunk in header.split(";"):
        # "a=1, b=2": how some proxies join two Cookie headers. A comma is
        # not a valid character of a token or of our cookie's value.
        yield from chunk.split(",")
