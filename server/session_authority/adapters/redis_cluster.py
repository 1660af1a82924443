"""``REDIS_URL`` naming a Redis Cluster, its client, and the cluster's key layout.

Scheme::

    redis+cluster://[[user]:password@]host[:port][,host[:port]...][/0][?...]
    rediss+cluster://...   (TLS to every node)

* the hosts are startup nodes (port 6379 when left out; IPv6 as ``[::1]:6379``),
  masters or replicas: the client asks them in turn for the slot map
  (``CLUSTER SLOTS``) and then talks to every master it names; one that does not
  answer is skipped. Naming every master (or a few of each shard) keeps a
  restart working while some are down;
* the database is 0 (a cluster has no other), and the path may be left out;
* the user and password are every node's ``AUTH``; every query parameter is
  redis-py's, as in ``redis://`` (``ssl_ca_certs``, ``ssl_certfile``...).

Keys (see also ``redis_cache``): a cluster runs a script only on keys of one
slot, and the revocation watermark must be written in the same script as the
tombstones it covers (``core/watermark.py``). So each session key carries one
of ``TAGS`` hash tags, the first two hex digits of its token hash::

    session:{3f}<SHA-256 of the token, unpadded base64url>
    session-authority:watermark:{3f}    the watermark of the sessions tagged 3f
    session-authority:epoch:{3f}        the adoption marker, one per tag

A session's keys are one key, on one slot; every script takes keys of one tag;
a revocation's tombstones and the watermark of their tag are written by one
script. The watermark the cluster holds is the lowest of its tags'. A tag's
keys move together when a slot is resharded, and fail over together (a
replica holds a prefix of its master's writes): a master replaced by a replica
that missed a seal holds a lower watermark for its tags, which the sweep sees.
256 tags land on (at most) 256 slots: sessions spread over as many masters as
those slots' owners, evenly enough up to about 64 masters. This layout is the
cluster's only: a single node (``redis://``, Sentinel) keeps ``session:<hash>``
and one watermark, and its previous-release keys (``CACHE_LEGACY_KEYS``) do
not apply (no previous release ran on a cluster).

Every new connection checks that the node it reached is a master (``ROLE``)
and, once the cluster is adopted, one of the masters adopted (``run_id``,
``ClusterIdentity``): a replica promoted by a failover is another server, and
nothing reads it before the breaker's probe has adopted it and replayed the
revocations it may lack (as for Sentinel, ``redis_sentinel``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import redis.asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

from session_authority.adapters.redis_pool import MultiHostUrl, NotMaster, ServerReplaced, run_id_of
from session_authority.core.domain import TokenHash
from session_authority.core.health import PoolStats

__all__ = [
    "DEFAULT_PORT",
    "TAGS",
    "ClusterIdentity",
    "ClusterTarget",
    "ShardSubscriber",
    "cluster_client",
    "cluster_pool_stats",
    "is_cluster_url",
    "parse_cluster_url",
    "tag_of",
    "tagged",
]

DEFAULT_PORT = 6379
_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
#: Every hash tag of the cluster layout, in order.
TAGS = tuple(f"{n:02x}" for n in range(256))


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].lower() in _SCHEMES


def tag_of(token_hash: TokenHash) -> str:
    """The hash tag of a session's keys: its hash's first two hex digits."""
    return token_hash.hex[:2]


def tagged(prefix: str, tag: str) -> str:
    """``prefix`` with the hash tag ``tag`` appended: ``<prefix>{<tag>}``."""
    return f"{prefix}{{{tag}}}"


@dataclass(frozen=True)
class ClusterTarget:
    """A parsed ``redis+cluster://`` URL."""

    nodes: tuple[tuple[str, int], ...]
    tls: bool
    #: redis-py connection keywords for every node (auth, TLS files...).
    options: dict[str, Any]


def parse_cluster_url(url: str) -> ClusterTarget:
    """Raises ``ValueError`` naming what is wrong (never the password)."""
    split = MultiHostUrl.parse(url, _SCHEMES, host="cluster node", default_port=DEFAULT_PORT)
    parts, plain, userinfo, nodes = split.parts, split.plain, split.userinfo, split.hosts
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError("REDIS_URL: a Cluster URL's database is 0 (or left out)")
    auth = f"{userinfo}@" if userinfo else ""
    options = dict(parse_url(f"{plain}://{auth}cluster/0?{parts.query}"))
    for key in ("host", "port", "db", "connection_class"):
        options.pop(key, None)
    if plain == "rediss":
        options["ssl"] = True
    return ClusterTarget(nodes, plain == "rediss", options)


class ClusterIdentity:
    """The masters adopted (their ``run_id``s; None until adopted: any master
    is accepted). Every new connection must reach a master, and once adopted
    one of these: a replica (a startup node that is one, a master demoted) is
    refused (``NotMaster``), a master that is not adopted (a promoted replica,
    a restarted node) is another server (``ServerReplaced``)."""

    def __init__(self) -> None:
        self.trusted: frozenset[str] | None = None

    @property
    def token(self) -> str:
        """What the adoption markers hold: a digest of the adopted masters."""
        return _token(self.trusted or frozenset())

    async def on_connect(self, connection: AbstractConnection) -> None:
        """redis-py's ``redis_connect_func``: the usual handshake, then the checks."""
        await connection.on_connect()
        where = f"{getattr(connection, 'host', '?')}:{getattr(connection, 'port', '?')}"
        await connection.send_command("ROLE")
        role = await connection.read_response()
        name = role[0] if isinstance(role, list) and role else b""
        name = name.decode() if isinstance(name, bytes) else str(name)
        if name != "master":
            raise NotMaster(f"redis cluster node {where} is a {name or 'replica'}, not a master")
        await connection.send_command("INFO", "server")
        run_id = run_id_of(await connection.read_response())
        trusted = self.trusted
        if trusted is not None and run_id not in trusted:
            raise ServerReplaced(
                f"redis cluster master {where} is another server (run_id {run_id[:8]}): "
                "a replica promoted, a node restarted or added"
            )


def _token(run_ids: frozenset[str]) -> str:
    return hashlib.sha256(",".join(sorted(run_ids)).encode()).hexdigest()[:40]


def cluster_client(
    url: str,
    *,
    identity: ClusterIdentity | None,
    max_connections: int,
    socket_connect_timeout: float | None,
    **kwargs: Any,
) -> RedisCluster:
    """A ``RedisCluster`` for ``url``, without retries (the breaker decides),
    reading masters only, each new connection checked by ``identity`` (the
    master check alone when None). ``max_connections`` is per node."""
    target = parse_cluster_url(url)
    check = (identity or ClusterIdentity()).on_connect
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        max_connections=max_connections,
        socket_connect_timeout=socket_connect_timeout,
        retry=Retry(NoBackoff(), 0),
        **(target.options | kwargs),
    )
    # redis-py's cluster client takes no ``redis_connect_func`` of ours: every
    # node it builds (now and on each slot-map refresh) copies these keywords.
    client.connection_kwargs["redis_connect_func"] = check
    for node in client.nodes_manager.startup_nodes.values():
        node.connection_kwargs["redis_connect_func"] = check
    return client


def cluster_pool_stats(client: RedisCluster) -> PoolStats:
    """Connections open / idle over every node the client knows; no I/O."""
    nodes = list(client.nodes_manager.nodes_cache.values())
    size = sum(len(node._connections) for node in nodes)
    idle = sum(len(node._free) for node in nodes)
    per_node = int(client.connection_kwargs.get("max_connections") or 0)
    return PoolStats(
        size=size,
        available=idle,
        pending=0,
        min_size=0,
        max_size=per_node * max(1, len(client.get_primaries())),
    )


class ShardSubscriber:
    """Where the revocation bus subscribes on a cluster (``redis_bus``): every
    bus key and channel carries one hash tag, so they live on one slot, and
    ``SSUBSCRIBE`` runs on a plain connection to the master that owns it (as
    the cluster client last learnt the slot map). ``moved`` tells, without I/O,
    when that master no longer owns the slot (a failover the client has seen
    since, through the bus's own commands): the bus then subscribes again.
    Redis also ends a shard subscription itself (``sunsubscribe``) when its node
    loses the slot."""

    def __init__(self, url: str, client: RedisCluster, channel: str, **kwargs: Any) -> None:
        self._client = client
        self._channel = channel
        self._options = parse_cluster_url(url).options | kwargs

    async def connect(self) -> tuple[redis.asyncio.Redis, tuple[str, int]]:
        """A client of the slot's master, as it is now (the slot map refreshed)."""
        try:
            await self._client.nodes_manager.initialize()
            node = self._client.get_node_from_key(self._channel)
        except RedisClusterException as exc:  # not a RedisError: no node answered
            raise RedisConnectionError(f"redis cluster unreachable: {exc}") from exc
        if node is None:
            raise RedisConnectionError("no master owns the revocation bus's slot")
        address = (str(node.host), int(node.port))
        plain = redis.asyncio.Redis(
            host=address[0],
            port=address[1],
            redis_connect_func=ClusterIdentity().on_connect,
            **self._options,
        )
        return plain, address

    def moved(self, address: tuple[str, int]) -> bool:
        try:
            node = self._client.get_node_from_key(self._channel)
        except RedisClusterException:  # the slot map is gone: a refresh found no node
            return True
        return node is None or (str(node.host), int(node.port)) != address
