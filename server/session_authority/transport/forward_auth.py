"""Forward-auth over HTTP, for gateways that ask with a subrequest: nginx
``auth_request``, Traefik ``forwardAuth``, Caddy ``forward_auth``.

``/auth`` (any method) reads the forwarded request's ``Authorization:
Bearer`` header or session cookie (``GatewayPolicy``) and answers:

* **200** with the identity headers (``x-session-user-id``,
  ``x-session-id`` by default), for the gateway to copy to the upstream;
* **401** (``WWW-Authenticate: Bearer``, no body that echoes anything): no
  token, a malformed one, or one that is unknown, expired or revoked;
* **503** (or 429 when the caller's unknown-token budget is spent) when the
  service cannot know: Postgres down and nothing to trust, breakers open,
  the time limit passed. nginx turns any status but 2xx/401/403 into a 500
  for the client: it fails closed, never open.

Its own listener (``FORWARD_AUTH_PORT``), not the admin port: the admin
port is unauthenticated and serves metrics to scrapers, while this one
answers for tokens, so it is reachable only by the gateways that need it,
and with ``AUTH_*`` configured (and no ``AUTH_ANONYMOUS_READS``) a caller
must present an API key in ``x-api-key`` (``Authorization`` carries the
session token here), as a reader of the gRPC port must. The token is never
logged.

Plaintext unless ``ssl_context`` is given (FORWARD_AUTH_TLS_*, built by
``tls.CertificateFiles.ssl_context``, rotated without a restart): then only
TLS is spoken (a plaintext request fails the handshake, no answer), and with
a client CA every gateway must present a certificate from it, which
authenticates it in place of ``x-api-key`` (``bootstrap.security``). Without
TLS keep the port on loopback or a private network (a sidecar or node-local
gateway): the token and the key cross it in clear.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from aiohttp import web

from session_authority.core.errors import InvalidArgument, RateLimited, SessionAuthorityError
from session_authority.core.service import SessionAuthority
from session_authority.transport.auth import ApiKeys
from session_authority.transport.gateway import GatewayPolicy
from session_authority.transport.peers import peer_address

__all__ = ["ForwardAuthServer"]

_log = logging.getLogger("session_authority.forward_auth")
_NO_STORE = {"Cache-Control": "no-store"}


class ForwardAuthServer:
    def __init__(
        self,
        core: SessionAuthority,
        policy: GatewayPolicy,
        *,
        keys: ApiKeys | None,
        timeout: float,
        max_concurrent: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``keys``: the API keys a caller must present one of (``x-api-key``);
        None: any caller may ask. ``timeout``: seconds before an answer that
        cannot be had is given up (503). ``max_concurrent``: checks in
        progress at once; beyond, 503 at once. ``ssl_context``: serve HTTPS
        (its verify mode decides mTLS); None: plaintext."""
        self._core = core
        self._policy = policy
        self._keys = keys
        self._timeout = timeout
        self._limit = max_concurrent
        self._in_flight = 0
        self._ssl = ssl_context
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/auth", self._auth)
        return app

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        """Bind and serve. Raises ``OSError`` when the port cannot be bound."""
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(
                runner, host, port, reuse_port=reuse_port or None, ssl_context=self._ssl
            )
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = runner.addresses
        self.port = int(bound[0][1]) if bound else port
        if self._ssl is None:
            security = "plaintext"
        elif self._ssl.verify_mode == ssl.CERT_REQUIRED:
            security = "mTLS"
        else:
            security = "TLS"
        _log.info("forward-auth HTTP on %s:%d (/auth), %s", host, self.port, security)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _auth(self, request: web.Request) -> web.Response:
        if self._keys is not None:
            key = request.headers.get("x-api-key", "").strip()
            if not key or self._keys.identify(key) is None:
                _log.warning("forward-auth: caller %s has no valid x-api-key", request.remote)
                return web.Response(status=403, text="gateway not authenticated\n")
        if self._in_flight >= self._limit:
            return _cannot_know(503, "busy")
        headers = {
            "authorization": request.headers.get("authorization", ""),
            "cookie": "; ".join(request.headers.getall("cookie", [])),
        }
        token = self._policy.token_from(headers)
        if token is None:
            return _denied()
        self._in_flight += 1
        try:
            async with asyncio.timeout(self._timeout):
                answer = await self._core.validate(token, caller=lambda: _caller(request.remote))
        except InvalidArgument:  # not a token we could have issued: not a session
            return _denied()
        except RateLimited:
            return _cannot_know(429, "too many unknown tokens from this caller")
        except SessionAuthorityError as exc:
            _log.warning("forward-auth cannot answer: %s", type(exc).__name__)
            return _cannot_know(503, "cannot validate now")
        except TimeoutError:
            return _cannot_know(503, "cannot validate now (timeout)")
        finally:
            self._in_flight -= 1
        if not answer.valid or answer.session is None:
            return _denied()
        return web.Response(
            status=200, headers={**_NO_STORE, **dict(self._policy.identity(answer.session))}
        )


def _caller(remote: str | None) -> str:
    """The caller's address as the gRPC port's limits spell it (``peers``)."""
    text = remote or ""
    return peer_address(f"ipv6:[{text}]:0" if ":" in text else f"ipv4:{text}:0")


def _denied() -> web.Response:
    return web.Response(status=401, headers={**_NO_STORE, "WWW-Authenticate": "Bearer"})


def _cannot_know(status: int, why: str) -> web.Response:
    return web.Response(status=status, text=why + "\n", headers=_NO_STORE)
