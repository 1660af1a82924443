"""``RedisClusterSessionCache``: the session cache on a Redis Cluster.

The entries, their scripts and their rules are ``redis_cache``'s; what differs
is where the keys live (``redis_cluster``: one hash tag per 256th of the token
hashes) and so how a call that spans sessions runs:

* ``get``, ``fill``, ``mark_created``, ``lease``: one key, one slot, as on one node;
* ``tombstone`` and ``get_many``: one script per tag, sent in one pipeline that
  redis-py splits by node (one round trip per master, concurrently). Each tag's
  script is atomic; a batch spanning tags is not one atomic read (each answer
  still follows ``get``'s rules);
* ``seal``: per tag, the tombstones of that tag and that tag's watermark in one
  script, for every tag (a tag with no tombstone still has its watermark
  raised): the watermark held is the lowest of the 256;
* ``adopt``: trust the masters that answer now (``ClusterIdentity``), load the
  scripts into each (a promoted replica has none) and leave the marker (a digest
  of the adopted masters) under every tag; ``verify`` reads one back from each
  master (a flushed node loses every marker it holds).

Errors: driver errors become ``CacheUnavailable`` (``CacheReplaced`` for
another server, ``CacheBusy`` for a node whose connections are all in use) in
one place, ``_MAPPED_CLUSTER``; ``redis_cache``'s map does the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import MaxConnectionsError, NoScriptError, RedisClusterException, RedisError

from session_authority.adapters.redis_cache import (
    FILL_SCRIPT,
    GET_MANY_SCRIPT,
    GET_SCRIPT,
    KEY_PREFIX,
    LEASE_KEY,
    MAPPED_ERRORS,
    MARKER_KEY,
    READ_BACKSTOP,
    STAMP_SCRIPT,
    WATERMARK_KEY,
    cache_key,
    cached_of,
    describe_error,
    milliseconds,
    short_mark,
)
from session_authority.adapters.redis_cluster import (
    TAGS,
    ClusterIdentity,
    cluster_client,
    cluster_pool_stats,
    tag_of,
    tagged,
)
from session_authority.adapters.redis_codec import CHECK_HEX, encode_entry
from session_authority.adapters.redis_pool import run_id_of
from session_authority.core.domain import Reason, TokenHash
from session_authority.core.errors import CacheBusy, CacheReplaced, CacheUnavailable
from session_authority.core.health import CacheHealth, PoolStats
from session_authority.core.ports import Cached, CachedVerdict, CacheEntry
from session_authority.core.watermark import NOTHING

__all__ = ["MARKER_PREFIX", "WATERMARK_PREFIX", "RedisClusterSessionCache", "cluster_key"]

_log = logging.getLogger("session_authority.cache")
MARKER_PREFIX = MARKER_KEY + ":"
WATERMARK_PREFIX = WATERMARK_KEY + ":"
_HEALTH_PREFIX = "session-authority:health-probe:"

# Tombstones of one tag: ARGV[1] the TTL (ms), ARGV[1 + i] the check of KEYS[i].
# No DEL first (``redis_cache``'s scripts empty the hash, then write it): while
# its slot migrates, a key deleted in a script cannot be written again on that
# node ("non local key"), and the revocation would fail for the migration's
# length. Fields a live entry left beside ``state`` are never read: a tombstone
# is read by its state, and nothing is written over one.
_TOMBSTONES = """
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, 'state', 'revoked', 'h', ARGV[i + 1])
  redis.call('PEXPIRE', key, ARGV[1])
end
return #KEYS
"""

# Seal of one tag: ``redis_cache``'s ``SEAL_SCRIPT`` for one key per hash (no
# previous release's keys on a cluster), its tombstones written as
# ``_TOMBSTONES`` writes them. KEYS[1] the tag's watermark, KEYS[2..] the
# sessions; ARGV: TTL, floor, mark, then the check of each session's hash.
_SEAL_TAG = """
local function less(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
for i = 2, #KEYS do
  redis.call('HSET', KEYS[i], 'state', 'revoked', 'h', ARGV[i + 2])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
local held = redis.call('GET', KEYS[1]) or ''
if less(held, ARGV[2]) then return {0, held} end
if less(held, ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[3])
  held = ARGV[3]
end
return {1, held}
"""


def cluster_key(token_hash: TokenHash) -> str:
    """``session:{<tag>}`` and the token's SHA-256 in unpadded base64url."""
    return tagged(KEY_PREFIX, tag_of(token_hash)) + cache_key(token_hash)[len(KEY_PREFIX) :]


class _ClusterErrorMap:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, MaxConnectionsError):
            raise CacheBusy(describe_error(exc)) from exc
        if isinstance(exc, RedisClusterException):  # not a RedisError
            raise CacheUnavailable(describe_error(exc)) from exc
        MAPPED_ERRORS.__exit__(kind, exc, tb)


_MAPPED_CLUSTER = _ClusterErrorMap()


class RedisClusterSessionCache:
    def __init__(
        self,
        client: RedisCluster,
        identity: ClusterIdentity,
        *,
        min_connections: int = 0,
        op_timeout: float | None = None,
    ) -> None:
        self._redis = client
        self._identity = identity
        self._min_connections = min_connections
        self._op_timeout = op_timeout
        #: Never on a cluster (see ``redis_cluster``); read by the tests.
        self.legacy_keys = False
        self._fill = client.register_script(FILL_SCRIPT)
        self._get = client.register_script(GET_SCRIPT)
        self._get_many = client.register_script(GET_MANY_SCRIPT)
        self._stamp = client.register_script(STAMP_SCRIPT)
        self._seal = client.register_script(_SEAL_TAG)
        self._tombstones = client.register_script(_TOMBSTONES)
        self._scripts = [
            self._fill,
            self._get,
            self._get_many,
            self._stamp,
            self._seal,
            self._tombstones,
        ]

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        min_connections: int,
        max_connections: int,
        timeout: float,
        pool_timeout: float,  # a cluster node's pool does not queue
        legacy_keys: bool = False,  # no previous release on a cluster
    ) -> RedisClusterSessionCache:
        """As ``RedisSessionCache.from_url``: no retries, redis-py's read timeout
        a backstop past the breaker's. ``max_connections`` is per master."""
        identity = ClusterIdentity()
        client = cluster_client(
            url,
            identity=identity,
            max_connections=max_connections,
            socket_connect_timeout=timeout,
            socket_timeout=timeout * READ_BACKSTOP,
            socket_keepalive=True,
            health_check_interval=30,
            protocol=2,
            decode_responses=True,
        )
        return cls(client, identity, min_connections=min_connections, op_timeout=timeout)

    async def warm(self) -> None:
        """Learn the slot map and open a connection to each master (best effort)."""
        try:
            await self._redis.initialize()
            await asyncio.gather(
                *(self._redis.ping(target_nodes=node) for node in self._redis.get_primaries())
            )
        except (RedisError, RedisClusterException, OSError) as exc:
            _log.warning("SessionCache connect Error: %s", describe_error(exc))

    def pool_stats(self) -> PoolStats:
        return cluster_pool_stats(self._redis)

    @property
    def trusted_server(self) -> str | None:
        """The adopted masters' digest (what the markers hold), if adopted."""
        return None if self._identity.trusted is None else self._identity.token

    @property
    def trusted_masters(self) -> frozenset[str]:
        return self._identity.trusted or frozenset()

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def _each(self, calls: list[tuple[AsyncScript, list[str], list[str]]]) -> list[Any]:
        """Run scripts (each on keys of one slot) in one pipeline, split by
        node; once more after loading the scripts if a node had lost them."""
        for attempt in (0, 1):
            pipe = self._redis.pipeline(transaction=False)
            for script, keys, args in calls:
                await script(keys=keys, args=args, client=pipe)  # type: ignore[arg-type]
            try:
                return await pipe.execute()
            except NoScriptError:
                if attempt:
                    raise
                await self._load_scripts()
        raise AssertionError("unreachable")

    async def _load_scripts(self) -> None:
        for script in self._scripts:
            await self._redis.script_load(script.script)

    # --- SessionCache ----------------------------------------------------------

    async def get(self, token_hash: TokenHash) -> Cached | None:
        with _MAPPED_CLUSTER:
            reply: list[Any] = await self._get(keys=[cluster_key(token_hash)])
        return cached_of(token_hash, reply, time.time())

    async def fill(self, token_hash: TokenHash, entry: CacheEntry, ttl: float) -> bool:
        mode = "verdict" if isinstance(entry, CachedVerdict) else "live"
        if isinstance(entry, CachedVerdict) and entry.reason is Reason.REVOKED:
            mode = "live"
        args = [mode, milliseconds(ttl), *encode_entry(token_hash, entry, time.time())]
        with _MAPPED_CLUSTER:
            result = await self._fill(keys=[cluster_key(token_hash)], args=args)
        return int(result) == 1

    async def ping(self) -> None:
        with _MAPPED_CLUSTER:
            await self._redis.ping()

    async def adopt(self) -> None:
        self._identity.trusted = None  # accept whichever masters answer now
        with _MAPPED_CLUSTER:
            await self._redis.nodes_manager.initialize()  # the slot map as it is now
            run_ids = frozenset(
                [
                    run_id_of(await self._redis.info("server", target_nodes=node))
                    for node in self._redis.get_primaries()
                ]
            )
            self._identity.trusted = run_ids
            await self._load_scripts()
            pipe = self._redis.pipeline(transaction=False)
            for tag in TAGS:
                pipe.set(tagged(MARKER_PREFIX, tag), self._identity.token)
            await pipe.execute()
        _log.info(
            "SessionCache trusts redis cluster %s (%d masters)",
            self._identity.token[:8],
            len(run_ids),
        )

    def _one_tag_per_master(self) -> list[str]:
        """A tag on each master of the slot map (every tag while it is unknown):
        a node flushed or replaced loses all its tags' markers, so one of them
        tells, and the sweep reads 3 keys instead of 256 (a master that is not in
        the map yet is another server, which the ``run_id`` check refuses)."""
        chosen: dict[str, str] = {}
        try:
            for tag in TAGS:
                node = self._redis.get_node_from_key(tagged(MARKER_PREFIX, tag))
                if node is not None:
                    chosen.setdefault(node.name, tag)
        except RedisClusterException:  # no slot map yet: the pipeline learns it
            return list(TAGS)
        return list(chosen.values()) or list(TAGS)

    async def verify(self) -> None:
        trusted = self._identity.trusted
        with _MAPPED_CLUSTER:
            pipe = self._redis.pipeline(transaction=False)
            for tag in self._one_tag_per_master():
                pipe.get(tagged(MARKER_PREFIX, tag))
            markers = await pipe.execute()
        if trusted is None:
            raise CacheReplaced("no redis cluster adopted yet")
        token = self._identity.token
        lost = sum(1 for marker in markers if marker != token)
        if lost:
            raise CacheReplaced(
                f"redis cluster lost its state on {lost} of {len(markers)} masters "
                "(markers gone: a node flushed or replaced, or the cluster adopted anew)"
            )

    async def mark_created(self, token_hash: TokenHash, ttl: float) -> None:
        args = [milliseconds(ttl), "created", token_hash.hex[:CHECK_HEX], token_hash.hex]
        with _MAPPED_CLUSTER:
            await self._stamp(keys=[cluster_key(token_hash)], args=args)

    async def tombstone(self, token_hashes: Sequence[TokenHash], ttl: float) -> None:
        ttl_ms = milliseconds(ttl)
        calls: list[tuple[AsyncScript, list[str], list[str]]] = []
        for hashes in _by_tag(token_hashes).values():
            keys = [cluster_key(h) for h in hashes]
            calls.append((self._tombstones, keys, [ttl_ms, *(h.hex[:CHECK_HEX] for h in hashes)]))
        if not calls:
            return
        with _MAPPED_CLUSTER:
            await self._each(calls)

    async def watermark(self) -> str:
        with _MAPPED_CLUSTER:
            pipe = self._redis.pipeline(transaction=False)
            for tag in TAGS:
                pipe.get(tagged(WATERMARK_PREFIX, tag))
            held = await pipe.execute()
        return min(str(mark or NOTHING) for mark in held)

    async def seal(
        self, token_hashes: Sequence[TokenHash], ttl: float, *, floor: str, mark: str
    ) -> str:
        ttl_ms = milliseconds(ttl)
        by_tag = _by_tag(token_hashes)
        calls: list[tuple[AsyncScript, list[str], list[str]]] = []
        for tag in TAGS:
            hashes = by_tag.get(tag, [])
            keys = [tagged(WATERMARK_PREFIX, tag), *(cluster_key(h) for h in hashes)]
            args = [ttl_ms, floor, mark]
            args += [token_hash.hex[:CHECK_HEX] for token_hash in hashes]
            calls.append((self._seal, keys, args))
        with _MAPPED_CLUSTER:
            replies = await self._each(calls)
        below = [str(held) for sealed, held in replies if not int(sealed)]
        held = min(str(held) for _, held in replies)
        if below:
            raise CacheReplaced(
                f"redis cluster went back in time under {len(below)} of {len(TAGS)} tags: "
                f"watermark {short_mark(min(below))}, below {short_mark(floor)} it was "
                "confirmed to hold (a lagging replica promoted, a backup restored into a node)"
            )
        return held

    async def lease(self, seconds: float) -> bool:
        with _MAPPED_CLUSTER:
            taken = await self._redis.set(LEASE_KEY, "1", nx=True, px=int(milliseconds(seconds)))
        return bool(taken)

    async def release(self) -> None:
        with _MAPPED_CLUSTER:
            await self._redis.delete(LEASE_KEY)

    async def get_many(self, token_hashes: Sequence[TokenHash]) -> list[Cached | None]:
        if not token_hashes:
            return []
        by_tag = _by_tag(token_hashes)
        calls = [
            (self._get_many, [cluster_key(h) for h in hashes], ["1"]) for hashes in by_tag.values()
        ]
        with _MAPPED_CLUSTER:
            replies = await self._each(calls)
        now, found = time.time(), {}
        for hashes, answers in zip(by_tag.values(), replies, strict=True):
            for token_hash, reply in zip(hashes, answers, strict=True):
                found[token_hash] = cached_of(token_hash, reply, now)
        return [found[h] for h in token_hashes]

    async def health(self) -> CacheHealth:
        bound = self._op_timeout

        async def within(call: Any) -> Any:
            async with asyncio.timeout(bound):
                return await call

        probe = _HEALTH_PREFIX + TAGS[0]
        try:
            with _MAPPED_CLUSTER:
                started = time.perf_counter()
                await within(self._redis.ping())
                ping = time.perf_counter() - started
                started = time.perf_counter()
                await within(self._redis.set(probe, "1", px=10_000))
                set_ = time.perf_counter() - started
                started = time.perf_counter()
                await within(self._redis.get(probe))
                get = time.perf_counter() - started
                node = self._redis.get_node_from_key(probe)
                server = await within(self._redis.info("server", target_nodes=node))
                memory = await within(self._redis.info("memory", target_nodes=node))
                keys = 0
                for primary in self._redis.get_primaries():
                    keys += int(await within(self._redis.dbsize(target_nodes=primary)))
        except CacheUnavailable as exc:
            return CacheHealth(connected=False, pool=self.pool_stats(), error=str(exc))
        return CacheHealth(
            connected=True,
            version=str(server.get("redis_version", "")),
            uptime_seconds=int(server.get("uptime_in_seconds", 0)),
            used_memory=str(memory.get("used_memory_human", "")),
            total_keys=int(keys),
            pool=self.pool_stats(),
            ping_ms=round(ping * 1000, 3),
            set_ms=round(set_ * 1000, 3),
            get_ms=round(get * 1000, 3),
        )


def _by_tag(token_hashes: Sequence[TokenHash]) -> dict[str, list[TokenHash]]:
    """The hashes grouped by hash tag, each group in the order given (once each)."""
    groups: dict[str, list[TokenHash]] = {}
    for token_hash in dict.fromkeys(token_hashes):
        groups.setdefault(tag_of(token_hash), []).append(token_hash)
    return groups
