"""The Redis connection pool: bounded, counting its waiters, and checking on
every new connection which server it reached.

Redis restarted (perhaps from an older snapshot), restored from a backup or
failed over to a replica is a different server process with a new ``run_id``,
and redis-py reconnects to it silently. ``ServerIdentity`` asks each new
connection for the server's ``run_id`` before anything else runs on it: once a
server is trusted (``RedisSessionCache.adopt``), a connection to any other one
fails with ``ServerReplaced`` instead of reading state that may predate
revocations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError

from session_authority.core.health import PoolStats


@dataclass(frozen=True)
class MultiHostUrl:
    """A ``redis+sentinel://`` or ``redis+cluster://`` URL split: the plain
    scheme it stands for, its user info (``user:pw`` or empty), its hosts."""

    parts: SplitResult
    plain: str
    userinfo: str
    hosts: tuple[tuple[str, int], ...]

    @classmethod
    def parse(
        cls, url: str, schemes: dict[str, str], *, host: str, default_port: int
    ) -> MultiHostUrl:
        """``schemes``: accepted scheme -> plain scheme. ``host`` names one host in
        errors (``"sentinel"``); ``ValueError`` says what is wrong, never the password."""
        parts = urlsplit(url)
        plain = schemes.get(parts.scheme.lower())
        if plain is None:
            raise ValueError(f"REDIS_URL: not a {' or '.join(f'{s}://' for s in schemes)} URL")
        userinfo, _, hosts = parts.netloc.rpartition("@")
        found = tuple(_host_port(text, host, default_port) for text in hosts.split(",") if text)
        if not found:
            raise ValueError(f"REDIS_URL: the URL names at least one {host}")
        return cls(parts, plain, userinfo, found)


def _host_port(text: str, what: str, default_port: int) -> tuple[str, int]:
    host, port = text, ""
    if text.startswith("["):  # [IPv6]:port
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"REDIS_URL: a {what} is host[:port] or [IPv6][:port]")
    return unquote(host), int(port) if port else default_port


__all__ = [
    "CountingPool",
    "MultiHostUrl",
    "NotMaster",
    "PoolExhausted",
    "ServerIdentity",
    "ServerReplaced",
    "run_id_of",
]


class PoolExhausted(RedisConnectionError):
    """No pooled connection came free within the pool timeout (our own queue)."""


class ServerReplaced(RedisConnectionError):
    """A new connection reached a Redis server other than the trusted one."""


class NotMaster(RedisConnectionError):
    """A new connection reached a server that is not a master (a Sentinel URL
    only: the sentinels named a replica, or a master that has been demoted)."""


def run_id_of(info: object) -> str:
    """The ``run_id`` in an ``INFO server`` reply (raw text or parsed dict)."""
    if isinstance(info, dict):
        return str(info.get("run_id", ""))
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("run_id:"):
            return line.partition(":")[2].strip()
    return ""


class ServerIdentity:
    """The trusted server's ``run_id`` (None until one is adopted: then any
    server is accepted, and nothing reads the cache before adoption anyway).
    With ``require_master`` (a Sentinel URL), a server whose ``ROLE`` is not
    ``master`` is refused first, trusted or not."""

    def __init__(self, *, require_master: bool = False) -> None:
        self.trusted: str | None = None
        self.require_master = require_master

    async def on_connect(self, connection: AbstractConnection) -> None:
        """redis-py's ``redis_connect_func``: the usual handshake, then the checks."""
        await connection.on_connect()
        if self.require_master:
            await connection.send_command("ROLE")
            role = await connection.read_response()
            name = role[0] if isinstance(role, list) and role else b""
            name = name.decode() if isinstance(name, bytes) else str(name)
            if name != "master":
                where = f"{getattr(connection, 'host', '?')}:{getattr(connection, 'port', '?')}"
                raise NotMaster(f"redis server at {where} is a {name or 'replica'}, not the master")
        await connection.send_command("INFO", "server")
        run_id = run_id_of(await connection.read_response())
        trusted = self.trusted
        if trusted is not None and run_id != trusted:
            raise ServerReplaced(
                f"redis server changed (run_id {run_id[:8]}, trusted {trusted[:8]}): "
                "restarted, restored or failed over"
            )


class CountingPool(aioredis.BlockingConnectionPool):
    """A bounded pool that also counts callers waiting for a connection
    (redis-py keeps no public waiter count)."""

    def __init__(self, *, min_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.min_size = min_size
        self.pending = 0

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        self.pending += 1
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except RedisConnectionError as exc:
            # redis-py's "No connection available.": the pool timeout ran out in
            # our own queue, before any byte went to Redis.
            if isinstance(exc.__cause__, TimeoutError):
                raise PoolExhausted(str(exc)) from exc
            raise
        finally:
            self.pending -= 1

    def stats(self) -> PoolStats:
        idle = len(self._available_connections)
        in_use = len(self._in_use_connections)
        return PoolStats(
            size=idle + in_use,
            available=idle,
            pending=self.pending,
            min_size=self.min_size,
            max_size=self.max_connections,
        )
