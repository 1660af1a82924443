"""``RedisSessionCache``: the session cache on Redis (one hash per session).

Key: ``session:<sha256-hex of the token>`` (never the token). Fields:
``state`` (live | revoked | unknown | expired | created), ``token_hash`` (checked on
every read), and for live entries ``session_id``, ``user_id``, ``created_at``,
``expires_at`` (epoch microseconds) and ``metadata`` (JSON). Every script touches one
key only, so the layout is Redis Cluster safe.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from session_authority.core.domain import Reason, Session, TokenHash
from session_authority.core.errors import CacheUnavailable
from session_authority.core.health import CacheHealth, PoolStats
from session_authority.core.ports import Cached, CachedVerdict, CacheEntry

__all__ = ["KEY_PREFIX", "CountingPool", "RedisSessionCache", "cache_key"]

_log = logging.getLogger("session_authority.cache")

KEY_PREFIX = "session:"
_HEALTH_KEY = "session-authority:health-probe"

# Fill: never over a tombstone; a verdict other than "revoked" only where the
# key is empty (so a slow "unknown" can never hide a session created since);
# a live entry replaces anything but a tombstone. Returns 0 when refused by a
# tombstone, 1 otherwise.
_FILL = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'revoked' then return 0 end
if ARGV[1] == 'verdict' and state then return 1 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# Get: the hash and its remaining lifetime in one round trip ({} when absent).
_GET = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return {} end
local fields = redis.call('HGETALL', KEYS[1])
table.insert(fields, 1, ttl)
return fields
"""

# Tombstone: unconditional, replaces whatever was there (or nothing).
_TOMBSTONE = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'revoked', 'token_hash', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""


def cache_key(token_hash: TokenHash) -> str:
    return KEY_PREFIX + token_hash.hex


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


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _us(value: datetime) -> str:
    """Epoch microseconds: exact, so cache and database answers are identical."""
    return str((value - _EPOCH) // timedelta(microseconds=1))


def _from_us(value: str) -> datetime:
    return _EPOCH + timedelta(microseconds=int(value))


class RedisSessionCache:
    def __init__(self, client: aioredis.Redis, pool: CountingPool, ttl: float) -> None:
        self._redis = client
        self._pool = pool
        self._ttl = ttl
        self._fill = client.register_script(_FILL)
        self._get = client.register_script(_GET)
        self._tombstone = client.register_script(_TOMBSTONE)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        ttl: float,
        min_connections: int,
        max_connections: int,
        timeout: float,
        pool_timeout: float,
    ) -> RedisSessionCache:
        """Build the client. No retries in redis-py: the breaker decides."""
        pool = CountingPool.from_url(
            url,
            min_size=min_connections,
            max_connections=max_connections,
            timeout=pool_timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            socket_keepalive=True,
            health_check_interval=30,
            retry=None,
            protocol=2,
            decode_responses=True,
        )
        return cls(aioredis.Redis(connection_pool=pool), pool, ttl)

    async def warm(self) -> None:
        """Open the minimum number of connections (best effort)."""
        conns = []
        try:
            for _ in range(self._pool.min_size):
                conns.append(await self._pool.get_connection())
        except (RedisError, OSError) as exc:
            _log.warning("SessionCache connect Error: %s", _describe(exc))
        finally:
            for conn in conns:
                await self._pool.release(conn)

    def pool_stats(self) -> PoolStats:
        """Connections open / idle / callers waiting; no I/O."""
        return self._pool.stats()

    async def aclose(self) -> None:
        await self._redis.aclose()
        await self._pool.disconnect()

    # --- SessionCache ----------------------------------------------------------

    async def get(self, token_hash: TokenHash) -> Cached | None:
        try:
            reply: list[Any] = await self._get(keys=[cache_key(token_hash)])
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(_describe(exc)) from exc
        if len(reply) < 3:
            return None
        pttl = int(reply[0])
        fields = dict(zip(reply[1::2], reply[2::2], strict=True))
        if fields.get("token_hash") != token_hash.hex:
            _log.warning(
                "Token mismatch: cache entry for %s holds another hash; dropped", token_hash.prefix
            )
            return None
        if fields.get("state") == "created":
            return None  # a creation marker, not an answer
        try:
            entry = _decode(token_hash, fields)
        except (KeyError, ValueError) as exc:
            _log.warning(
                "SessionCache decode Error: malformed entry for %s: %s", token_hash.prefix, exc
            )
            return None
        return Cached(entry, pttl / 1000 if pttl >= 0 else math.inf)

    async def fill(self, token_hash: TokenHash, entry: CacheEntry, ttl: float) -> bool:
        mode = "verdict" if isinstance(entry, CachedVerdict) else "live"
        if isinstance(entry, CachedVerdict) and entry.reason is Reason.REVOKED:
            mode = "live"  # a tombstone replaces anything that is not one already
        args = [mode, str(max(1, int(ttl * 1000))), *_encode(token_hash, entry)]
        try:
            result = await self._fill(keys=[cache_key(token_hash)], args=args)
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(_describe(exc)) from exc
        return int(result) == 1

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(_describe(exc)) from exc

    async def mark_created(self, token_hash: TokenHash, ttl: float) -> None:
        args = [
            "live",
            str(max(1, int(ttl * 1000))),
            "state",
            "created",
            "token_hash",
            token_hash.hex,
        ]
        try:
            await self._fill(keys=[cache_key(token_hash)], args=args)
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(_describe(exc)) from exc

    async def tombstone(self, token_hashes: Sequence[TokenHash], ttl: float) -> None:
        ttl_ms = str(max(1, int(ttl * 1000)))
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for token_hash in token_hashes:
                    await self._tombstone(
                        keys=[cache_key(token_hash)], args=[ttl_ms, token_hash.hex], client=pipe
                    )
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise CacheUnavailable(_describe(exc)) from exc

    async def health(self) -> CacheHealth:
        try:
            started = time.perf_counter()
            await self._redis.ping()
            ping = time.perf_counter() - started
            started = time.perf_counter()
            await self._redis.set(_HEALTH_KEY, "1", px=10_000)
            set_ = time.perf_counter() - started
            started = time.perf_counter()
            await self._redis.get(_HEALTH_KEY)
            get = time.perf_counter() - started
            server = await self._redis.info("server")
            memory = await self._redis.info("memory")
            keys = await self._redis.dbsize()
        except (RedisError, OSError) as exc:
            return CacheHealth(connected=False, pool=self._pool.stats(), error=_describe(exc))
        return CacheHealth(
            connected=True,
            version=str(server.get("redis_version", "")),
            uptime_seconds=int(server.get("uptime_in_seconds", 0)),
            used_memory=str(memory.get("used_memory_human", "")),
            total_keys=int(keys),
            pool=self._pool.stats(),
            ping_ms=round(ping * 1000, 3),
            set_ms=round(set_ * 1000, 3),
            get_ms=round(get * 1000, 3),
        )


def _describe(exc: BaseException) -> str:
    """Error text safe to log and to show in Health: the driver's message
    (redis-py does not put passwords in it) or the type for timeouts."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _encode(token_hash: TokenHash, entry: CacheEntry) -> list[str]:
    if isinstance(entry, CachedVerdict):
        return ["state", entry.reason.value, "token_hash", token_hash.hex]
    return [
        "state",
        "live",
        "token_hash",
        token_hash.hex,
        "session_id",
        entry.session_id,
        "user_id",
        entry.user_id,
        "created_at",
        _us(entry.created_at),
        "expires_at",
        _us(entry.expires_at),
        "metadata",
        json.dumps(dict(entry.metadata), separators=(",", ":")),
    ]


def _decode(token_hash: TokenHash, fields: dict[str, str]) -> CacheEntry:
    state = fields["state"]
    if state != "live":
        return CachedVerdict(Reason(state))
    metadata = json.loads(fields["metadata"])
    if not isinstance(metadata, dict):
        raise ValueError("metadata is not an object")
    return Session(
        session_id=fields["session_id"],
        user_id=fields["user_id"],
        token_hash=token_hash,
        created_at=_from_us(fields["created_at"]),
        expires_at=_from_us(fields["expires_at"]),
        metadata={str(k): str(v) for k, v in metadata.items()},
    )
