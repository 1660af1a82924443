"""``REDIS_URL`` naming a Redis Sentinel set, and the pool that follows its master.

Scheme::

    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/<master-name>[/<db>][?...]
    rediss+sentinel://...   (TLS to the sentinels and to the master)

* the hosts are the sentinels (port 26379 when left out; IPv6 as ``[::1]:26379``);
  one that does not answer is skipped;
* ``<master-name>`` is the name the sentinels monitor (``sentinel monitor <name> ...``),
  ``<db>`` the database number (0);
* the user and password are the *master's* (and its replicas') ``AUTH``, as in
  ``redis://``; the sentinels' own (their ``requirepass`` or ACL user) are the query
  parameters ``sentinel_username`` and ``sentinel_password`` (none by default);
* every other query parameter is redis-py's, as in ``redis://`` (``ssl_ca_certs``,
  ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``...), for the master and, its
  ``ssl_*`` ones, for the sentinels too.

Every new connection asks a sentinel where the master is, then checks that the
server it reached says it is a master (``ROLE``) before anything runs on it: a
sentinel that has not heard of a failover yet, or a demoted master, is refused
(``NotMaster``), and the caller's breaker decides when to try again. A
connection already open to a master that was demoted answers ``READONLY`` on
its next write: redis-py's ``SentinelManagedConnection`` then drops it, and a
pooled connection to an address that is no longer the master's is dropped
before it is handed out. The server check of ``redis_pool.ServerIdentity``
(``run_id``) runs after the role check: a promoted replica is another server.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.exceptions import RedisError

from session_authority.adapters.redis_pool import CountingPool, MultiHostUrl, ServerIdentity

__all__ = [
    "DEFAULT_PORT",
    "SentinelCountingPool",
    "SentinelTarget",
    "counting_pool",
    "is_sentinel_url",
    "parse_sentinel_url",
]

DEFAULT_PORT = 26379
_SCHEMES = {"redis+sentinel": "redis", "rediss+sentinel": "rediss"}
#: What the sentinels' own connections take from the URL's query.
_SENTINEL_AUTH = {"sentinel_username": "username", "sentinel_password": "password"}


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() in _SCHEMES


@dataclass(frozen=True)
class SentinelTarget:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    #: The master's name, as the sentinels monitor it.
    service: str
    tls: bool
    #: redis-py connection keywords for the master (db, auth, TLS files...).
    master: dict[str, Any]
    #: redis-py connection keywords for the sentinels (their auth, TLS).
    sentinel: dict[str, Any]


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Raises ``ValueError`` naming what is wrong (never the password)."""
    split = MultiHostUrl.parse(url, _SCHEMES, host="sentinel", default_port=DEFAULT_PORT)
    parts, plain, userinfo, sentinels = split.parts, split.plain, split.userinfo, split.hosts
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError("REDIS_URL: a Sentinel URL's path is /<master-name>[/<db>]")
    query = parse_qsl(parts.query, keep_blank_values=True)
    sentinel_auth = {_SENTINEL_AUTH[k]: v for k, v in query if k in _SENTINEL_AUTH}
    rest = urlencode([(k, v) for k, v in query if k not in _SENTINEL_AUTH])
    db = path[1] if len(path) == 2 else "0"
    if not db.isdigit():
        raise ValueError("REDIS_URL: a Sentinel URL's database is a number")
    auth = f"{userinfo}@" if userinfo else ""
    master = dict(parse_url(f"{plain}://{auth}sentinel/{db}?{rest}"))
    for key in ("host", "port", "connection_class"):
        master.pop(key, None)
    sentinel: dict[str, Any] = {k: v for k, v in master.items() if k.startswith("ssl_")}
    if plain == "rediss":
        sentinel["ssl"] = True
    return SentinelTarget(sentinels, path[0], plain == "rediss", master, sentinel | sentinel_auth)


class SentinelCountingPool(CountingPool, SentinelConnectionPool):
    """``CountingPool`` (bounded, counting its waiters) whose connections go to
    whichever server the sentinels name as the master."""

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        # redis-py's asyncio pool never calls ``owns_connection`` (its sync pool
        # does): drop a pooled connection to an address that is no longer the
        # master's before it is used (the master moved while it was in use).
        if connection.is_connected and not self.reaches_master(connection):
            await connection.disconnect()
        await super().ensure_connection(connection)

    async def follow(self, bound: float | None) -> bool:
        """Ask the sentinels where the master is now (within ``bound`` seconds);
        True when it moved: idle connections are closed then, and those in use
        are dropped before their next use. A coordinated failover leaves the
        old master a master (taking writes nobody else reads) until the
        sentinels reconfigure it, seconds later: without asking, a process
        with enough open connections would keep using it. No answer: False
        (nothing is known to have moved; new connections ask anyway)."""
        before = self.master_address
        try:
            async with asyncio.timeout(bound):
                address = await self.get_master_address()  # type: ignore[no-untyped-call]
        except (RedisError, OSError, TimeoutError):
            return False
        return before is not None and bool(address != before)

    def reaches_master(self, connection: AbstractConnection | None) -> bool:
        """Whether ``connection`` goes to the master as last named (True when unknown)."""
        address = self.master_address
        if connection is None or address is None:
            return True
        return bool(
            (getattr(connection, "host", None), getattr(connection, "port", None)) == address
        )

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            await self.sentinel_manager.aclose()


def counting_pool(
    url: str,
    *,
    identity: ServerIdentity | None,
    timeout: float | None,
    min_size: int,
    max_connections: int,
    socket_connect_timeout: float | None,
    **kwargs: Any,
) -> CountingPool:
    """The pool for ``url``: a plain ``CountingPool`` for ``redis://``,
    ``rediss://`` and ``unix://``, a ``SentinelCountingPool`` for a Sentinel URL.
    ``identity``'s check runs on every new connection (a Sentinel pool's
    connections must also reach a master, identity or not)."""
    if not is_sentinel_url(url):
        return CountingPool.from_url(
            url,
            min_size=min_size,
            max_connections=max_connections,
            timeout=timeout,
            socket_connect_timeout=socket_connect_timeout,
            redis_connect_func=None if identity is None else identity.on_connect,
            **kwargs,
        )
    target = parse_sentinel_url(url)
    identity = identity or ServerIdentity()
    identity.require_master = True
    # Each new connection asks the sentinels in turn: one that does not answer
    # within the connect timeout is skipped (redis-py moves it to the back).
    sentinels = Sentinel(
        target.sentinels,
        sentinel_kwargs=target.sentinel
        | {
            "socket_timeout": socket_connect_timeout,
            "socket_connect_timeout": socket_connect_timeout,
            "protocol": 2,
        },
    )
    return SentinelCountingPool(
        service_name=target.service,
        sentinel_manager=sentinels,
        min_size=min_size,
        max_connections=max_connections,
        timeout=timeout,
        connection_class=SentinelManagedSSLConnection if target.tls else SentinelManagedConnection,
        socket_connect_timeout=socket_connect_timeout,
        redis_connect_func=identity.on_connect,
        **(target.master | kwargs),
    )
