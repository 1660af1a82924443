"""``RedisSessionCache``: the session cache on Redis (one hash per session).

Keys
----
``session:<SHA-256 of the token, unpadded base64url>`` (43 characters; never
the token), a hash in the layout of ``redis_codec``: a live session in a
compact form (~190 B a session), anything else as ``state`` plus an integrity
check. Every key has a TTL, set by the script that writes it.

The previous release keyed the same hashes by ``session:<64 hex>``. While
``CACHE_LEGACY_KEYS`` is on (the default, for a rolling upgrade from it), every
script also takes that key: a tombstone found there wins, and tombstones and
creation markers are written there too, in that release's layout. So a
revocation by a replica of either release stops a fill and a lookup by
either, and a previous-release replica never hides a session created by this
one. Live entries are never written there (that release misses, and reads
Postgres). Turn it off once no replica of the previous release is left and a
tombstone TTL has passed. A Redis Cluster never uses it: it has a layout of its
own (``redis_cluster``, ``redis_cluster_cache``), whose scripts take keys of one slot.

``session-authority:epoch`` holds the ``run_id`` of the server this process
adopted (``adopt``); ``verify`` finds it gone after a FLUSHALL or a restore.
``session-authority:watermark`` holds the revocation watermark
(``core/watermark.py``), raised only by ``seal``, in the script that writes the
tombstones it covers: a backup, a reload, a swapped database or a replica
brings back the watermark of the data it brings back, which the marker's
value (a ``run_id``, restored with the data) cannot tell.
Errors: every driver error becomes ``CacheUnavailable`` (``CacheReplaced`` for
another server) in one place, ``_ErrorMap``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from session_authority.adapters.redis_codec import (
    CHECK_HEX,
    IntegrityError,
    age_of,
    decode_entry,
    encode_entry,
    state_of,
)
from session_authority.adapters.redis_pool import (
    CountingPool,
    PoolExhausted,
    ServerIdentity,
    ServerReplaced,
    run_id_of,
)
from session_authority.adapters.redis_sentinel import SentinelCountingPool, counting_pool
from session_authority.core.domain import Reason, TokenHash
from session_authority.core.errors import CacheBusy, CacheReplaced, CacheUnavailable
from session_authority.core.health import CacheHealth, PoolStats
from session_authority.core.ports import Cached, CachedVerdict, CacheEntry
from session_authority.core.watermark import NOTHING

__all__ = [
    "FILL_SCRIPT",
    "GET_MANY_SCRIPT",
    "GET_SCRIPT",
    "KEY_PREFIX",
    "MAPPED_ERRORS",
    "MARKER_KEY",
    "READ_BACKSTOP",
    "SEAL_SCRIPT",
    "STAMP_SCRIPT",
    "WATERMARK_KEY",
    "CountingPool",
    "RedisSessionCache",
    "cache_key",
    "cached_of",
    "describe_error",
    "legacy_key",
    "milliseconds",
    "short_mark",
]

_log = logging.getLogger("session_authority.cache")
T = TypeVar("T")
#: redis-py's read timeout, in breaker timeouts (see ``RedisSessionCache.from_url``).
READ_BACKSTOP = 3.0

KEY_PREFIX = "session:"
_HEALTH_KEY = "session-authority:health-probe"
MARKER_KEY = "session-authority:epoch"
WATERMARK_KEY = "session-authority:watermark"
LEASE_KEY = "session-authority:replay-lease"

# Every script takes the session's key, and with CACHE_LEGACY_KEYS on also the
# key the previous release used for it (KEYS[2]); see "Keys" in the module doc.
# They call only what the runbook's least-privilege ACL allows (HGET, HGETALL,
# HSET, DEL, PEXPIRE, PTTL): no EXISTS, hence PTTL ~= -2.

# Fill: never over a tombstone (under either key); a verdict (unknown, expired,
# a creation marker) only where the key is empty and the previous release's
# key holds nothing, so a slow "unknown" can never hide a session created
# since; a live entry (or a tombstone, mode "live") replaces anything but a
# tombstone, and ends the previous release's creation marker, whose work is
# done. Returns 0 when refused by a tombstone, 1 otherwise.
FILL_SCRIPT = """
if redis.call('HGET', KEYS[1], 'state') == 'revoked' then return 0 end
local old = KEYS[2] and redis.call('HGET', KEYS[2], 'state')
if old == 'revoked' then return 0 end
if ARGV[1] == 'verdict' and (old or redis.call('PTTL', KEYS[1]) ~= -2) then return 1 end
if old == 'created' then redis.call('DEL', KEYS[2]) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# Get: the entry and its remaining lifetime in one round trip ({} when
# absent); a tombstone under the previous release's key wins over anything.
GET_SCRIPT = """
if KEYS[2] and redis.call('HGET', KEYS[2], 'state') == 'revoked' then
  local fields = redis.call('HGETALL', KEYS[2])
  table.insert(fields, 1, redis.call('PTTL', KEYS[2]))
  return fields
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return {} end
local fields = redis.call('HGETALL', KEYS[1])
table.insert(fields, 1, ttl)
return fields
"""

# Get many: ``GET_SCRIPT`` for each hash in one round trip, the answers in KEYS'
# order; ARGV[1] is how many keys each hash has (2 with the previous release's).
GET_MANY_SCRIPT = """
local per = tonumber(ARGV[1])
local out = {}
for i = 0, #KEYS / per - 1 do
  local key, old = KEYS[i * per + 1], nil
  if per == 2 then old = KEYS[i * per + 2] end
  local fields = {}
  if old and redis.call('HGET', old, 'state') == 'revoked' then
    fields = redis.call('HGETALL', old)
    table.insert(fields, 1, redis.call('PTTL', old))
  else
    local ttl = redis.call('PTTL', key)
    if ttl ~= -2 then
      fields = redis.call('HGETALL', key)
      table.insert(fields, 1, ttl)
    end
  end
  out[i + 1] = fields
end
return out
"""

# Stamp: a bare state under both keys, each in its release's layout (``h`` here,
# all 64 hex as ``token_hash`` under the previous release's key, which is all
# that release reads). A tombstone (state "revoked") replaces whatever was
# there, or nothing; a creation marker (state "created") never replaces a
# tombstone under either key (returns 0 then, 1 otherwise).
STAMP_SCRIPT = """
if ARGV[2] ~= 'revoked' then
  for _, key in ipairs(KEYS) do
    if redis.call('HGET', key, 'state') == 'revoked' then return 0 end
  end
end
for i, key in ipairs(KEYS) do
  redis.call('DEL', key)
  if i == 1 then
    redis.call('HSET', key, 'state', ARGV[2], 'h', ARGV[3])
  else
    redis.call('HSET', key, 'state', ARGV[2], 'token_hash', ARGV[4])
  end
  redis.call('PEXPIRE', key, ARGV[1])
end
return 1
"""


# Seal: the tombstones of ``STAMP_SCRIPT`` (KEYS[2..], ARGV[4] keys a hash, ARGV[5..]
# the check and full hex of each hash), then the watermark (KEYS[1]) raised to
# ARGV[3] unless it holds less than the floor ARGV[2]. One script, so atomic:
# no snapshot or replica can have the new watermark without the tombstones.
# Marks compare byte by byte (Lua's ``<`` on strings follows the server's locale).
# Returns {1, held} or {0, held} when below the floor.
SEAL_SCRIPT = """
local function less(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local per = tonumber(ARGV[4])
for i = 0, (#KEYS - 1) / per - 1 do
  for j = 1, per do
    local key = KEYS[2 + i * per + j - 1]
    redis.call('DEL', key)
    if j == 1 then
      redis.call('HSET', key, 'state', 'revoked', 'h', ARGV[5 + 2 * i])
    else
      redis.call('HSET', key, 'state', 'revoked', 'token_hash', ARGV[6 + 2 * i])
    end
    redis.call('PEXPIRE', key, ARGV[1])
  end
end
local held = redis.call('GET', KEYS[1]) or ''
if less(held, ARGV[2]) then return {0, held} end
if less(held, ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[3])
  held = ARGV[3]
end
return {1, held}
"""


def cache_key(token_hash: TokenHash) -> str:
    """``session:`` and the token's SHA-256 in unpadded base64url (43 characters)."""
    raw = bytes.fromhex(token_hash.hex)
    return KEY_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def legacy_key(token_hash: TokenHash) -> str:
    """The previous release's key: ``session:`` and the SHA-256 in 64 hex digits."""
    return KEY_PREFIX + token_hash.hex


class _ErrorMap:
    """The one place driver errors become ours (``with MAPPED_ERRORS:``, no allocation)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        # Anything else (CancelledError included) passes through untouched.
        if isinstance(exc, ServerReplaced):
            raise CacheReplaced(str(exc)) from exc
        if isinstance(exc, PoolExhausted):
            raise CacheBusy(describe_error(exc)) from exc
        if isinstance(exc, (RedisError, OSError)):
            raise CacheUnavailable(describe_error(exc)) from exc


MAPPED_ERRORS = _ErrorMap()


class RedisSessionCache:
    def __init__(
        self,
        client: aioredis.Redis,
        pool: CountingPool,
        identity: ServerIdentity | None = None,
        *,
        legacy_keys: bool = True,
        op_timeout: float | None = None,
    ) -> None:
        self._redis = client
        self._pool = pool
        #: Bounds each health command (the only calls no breaker times).
        self._op_timeout = op_timeout
        self._identity = identity or ServerIdentity()
        #: Whether the previous release's keys are honoured and written too.
        self.legacy_keys = legacy_keys
        self._fill = client.register_script(FILL_SCRIPT)
        self._get = client.register_script(GET_SCRIPT)
        self._get_many = client.register_script(GET_MANY_SCRIPT)
        self._stamp = client.register_script(STAMP_SCRIPT)
        self._seal = client.register_script(SEAL_SCRIPT)

    def _keys(self, token_hash: TokenHash) -> list[str]:
        if self.legacy_keys:
            return [cache_key(token_hash), legacy_key(token_hash)]
        return [cache_key(token_hash)]

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        min_connections: int,
        max_connections: int,
        timeout: float,
        pool_timeout: float,
        legacy_keys: bool = True,
    ) -> RedisSessionCache:
        """Build the client. No retries in redis-py: the breaker decides.

        ``timeout`` is the breaker's per-call timeout, which bounds every call
        (and gives a call whose timer fired late, after a machine stall, a
        grace to read an answer already in its socket). redis-py's own read
        timeout is only a backstop, well past it: at the same value it raced
        the breaker's after a stall and turned every late timer into a Redis
        *error*, which opened the breaker (tests/integration/test_machine_stall.py)."""
        identity = ServerIdentity()
        pool = counting_pool(
            url,
            identity=identity,
            min_size=min_connections,
            max_connections=max_connections,
            timeout=pool_timeout,
            socket_timeout=timeout * READ_BACKSTOP,
            socket_connect_timeout=timeout,
            socket_keepalive=True,
            health_check_interval=30,
            retry=None,
            protocol=2,
            decode_responses=True,
        )
        client = aioredis.Redis(connection_pool=pool)
        return cls(client, pool, identity, legacy_keys=legacy_keys, op_timeout=timeout)

    async def warm(self) -> None:
        """Open the minimum number of connections (best effort)."""
        conns = []
        try:
            for _ in range(self._pool.min_size):
                conns.append(await self._pool.get_connection())
        except (RedisError, OSError) as exc:
            _log.warning("SessionCache connect Error: %s", describe_error(exc))
        finally:
            for conn in conns:
                await self._pool.release(conn)

    def pool_stats(self) -> PoolStats:
        """Connections open / idle / callers waiting; no I/O."""
        return self._pool.stats()

    @property
    def trusted_server(self) -> str | None:
        """The adopted server's ``run_id``, if any."""
        return self._identity.trusted

    async def aclose(self) -> None:
        await self._redis.aclose()
        await self._pool.aclose()

    # --- SessionCache ----------------------------------------------------------

    async def get(self, token_hash: TokenHash) -> Cached | None:
        with MAPPED_ERRORS:
            reply: list[Any] = await self._get(keys=self._keys(token_hash))
        return cached_of(token_hash, reply, time.time())

    async def fill(self, token_hash: TokenHash, entry: CacheEntry, ttl: float) -> bool:
        mode = "verdict" if isinstance(entry, CachedVerdict) else "live"
        if isinstance(entry, CachedVerdict) and entry.reason is Reason.REVOKED:
            mode = "live"  # a tombstone replaces anything that is not one already
        args = [mode, milliseconds(ttl), *encode_entry(token_hash, entry, time.time())]
        with MAPPED_ERRORS:
            result = await self._fill(keys=self._keys(token_hash), args=args)
        return int(result) == 1

    async def ping(self) -> None:
        with MAPPED_ERRORS:
            await self._redis.ping()

    async def adopt(self) -> None:
        self._identity.trusted = None  # accept whichever server answers now
        with MAPPED_ERRORS:
            run_id = run_id_of(await self._redis.info("server"))
            await self._redis.set(MARKER_KEY, run_id)
        self._identity.trusted = run_id
        _log.info("SessionCache trusts redis server %s", run_id[:8])

    async def verify(self) -> None:
        trusted = self._identity.trusted
        if isinstance(self._pool, SentinelCountingPool):
            # Where the sentinels say the master is now: if it moved, the read
            # below runs on a new connection, and the identity check tells.
            await self._pool.follow(None if self._op_timeout is None else self._op_timeout / 2)
        with MAPPED_ERRORS:
            marker = await self._redis.get(MARKER_KEY)
        if trusted is None:
            raise CacheReplaced("no redis server adopted yet")
        if marker != trusted:
            raise CacheReplaced("redis lost its state (marker gone: flushed or replaced)")

    async def mark_created(self, token_hash: TokenHash, ttl: float) -> None:
        args = [milliseconds(ttl), "created", token_hash.hex[:CHECK_HEX], token_hash.hex]
        with MAPPED_ERRORS:
            await self._stamp(keys=self._keys(token_hash), args=args)

    async def tombstone(self, token_hashes: Sequence[TokenHash], ttl: float) -> None:
        ttl_ms = milliseconds(ttl)
        with MAPPED_ERRORS:
            async with self._redis.pipeline(transaction=False) as pipe:
                for token_hash in token_hashes:
                    await self._stamp(
                        keys=self._keys(token_hash),
                        args=[ttl_ms, "revoked", token_hash.hex[:CHECK_HEX], token_hash.hex],
                        client=pipe,
                    )
                await pipe.execute()

    async def watermark(self) -> str:
        with MAPPED_ERRORS:
            held = await self._redis.get(WATERMARK_KEY)
        return str(held or NOTHING)

    async def seal(
        self, token_hashes: Sequence[TokenHash], ttl: float, *, floor: str, mark: str
    ) -> str:
        keys = [WATERMARK_KEY]
        args: list[str] = [milliseconds(ttl), floor, mark, "2" if self.legacy_keys else "1"]
        for token_hash in token_hashes:
            keys += self._keys(token_hash)
            args += [token_hash.hex[:CHECK_HEX], token_hash.hex]
        with MAPPED_ERRORS:
            sealed, held = await self._seal(keys=keys, args=args)
        if not int(sealed):
            raise CacheReplaced(
                f"redis went back in time: it holds revocation watermark {short_mark(held)}, "
                f"below {short_mark(floor)} it was confirmed to hold "
                "(a backup restored, DEBUG RELOAD, SWAPDB or a lagging replica)"
            )
        return str(held)

    async def lease(self, seconds: float) -> bool:
        with MAPPED_ERRORS:
            taken = await self._redis.set(LEASE_KEY, "1", nx=True, px=int(milliseconds(seconds)))
        return bool(taken)

    async def release(self) -> None:
        with MAPPED_ERRORS:
            await self._redis.delete(LEASE_KEY)

    async def get_many(self, token_hashes: Sequence[TokenHash]) -> list[Cached | None]:
        if not token_hashes:
            return []
        keys: list[str] = []
        for token_hash in token_hashes:
            keys += self._keys(token_hash)
        with MAPPED_ERRORS:
            replies: list[Any] = await self._get_many(
                keys=keys, args=["2" if self.legacy_keys else "1"]
            )
        now = time.time()
        return [
            cached_of(token_hash, reply, now)
            for token_hash, reply in zip(token_hashes, replies, strict=True)
        ]

    async def _within(self, call: Awaitable[T]) -> T:
        """``call``, given up after the per-call timeout (a ``TimeoutError``,
        which ``MAPPED_ERRORS`` maps): health is not timed by the breaker, and
        redis-py's own read timeout is only a backstop (``from_url``)."""
        if self._op_timeout is None:
            return await call
        async with asyncio.timeout(self._op_timeout):
            return await call

    async def health(self) -> CacheHealth:
        bound = self._within
        try:
            with MAPPED_ERRORS:
                started = time.perf_counter()
                await bound(self._redis.ping())
                ping = time.perf_counter() - started
                started = time.perf_counter()
                await bound(self._redis.set(_HEALTH_KEY, "1", px=10_000))
                set_ = time.perf_counter() - started
                started = time.perf_counter()
                await bound(self._redis.get(_HEALTH_KEY))
                get = time.perf_counter() - started
                server = await bound(self._redis.info("server"))
                memory = await bound(self._redis.info("memory"))
                keys = await bound(self._redis.dbsize())
        except CacheUnavailable as exc:
            return CacheHealth(connected=False, pool=self._pool.stats(), error=str(exc))
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


def cached_of(token_hash: TokenHash, reply: list[Any], now: float) -> Cached | None:
    """What the lookup script answered for ``token_hash``, checked and decoded."""
    if len(reply) < 3:
        return None
    pttl = int(reply[0])
    fields = dict(zip(reply[1::2], reply[2::2], strict=True))
    try:
        state = state_of(token_hash, fields)
    except IntegrityError:
        _log.warning(
            "Token mismatch: cache entry for %s holds another hash; dropped", token_hash.prefix
        )
        return None
    if state == "created":
        return None  # a creation marker, not an answer
    try:
        entry = decode_entry(token_hash, fields)
    except (KeyError, ValueError) as exc:
        _log.warning(
            "SessionCache decode Error: malformed entry for %s: %s", token_hash.prefix, exc
        )
        return None
    return Cached(entry, pttl / 1000 if pttl >= 0 else math.inf, age_of(fields, now))


def short_mark(mark: str) -> str:
    """A watermark for a log line: its transaction id and hash prefix."""
    return "nothing" if not mark else mark[:29]


def milliseconds(seconds: float) -> str:
    return str(max(1, int(seconds * 1000)))


def describe_error(exc: BaseException) -> str:
    """Error text safe to log and to show in Health: the driver's message
    (redis-py does not put passwords in it) or the type for timeouts."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
