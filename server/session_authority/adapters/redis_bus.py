"""``RedisRevocationBus``: revocations pushed to every process over Redis pub/sub,
acknowledged by every process registered as holding L1 copies (the
``RevocationFeed`` port, core/local.py).

Keys and channels:

* ``session-authority:revocations`` carries ``<sender>|<requests>|<hashes>``
  (comma-separated request ids; comma-separated hex token hashes, or ``*`` for
  "drop everything"). Revocations published while the previous message is on
  its way go out together in the next one, their hashes merged (dropping more
  than asked is always safe): one round trip and one acknowledgement for many
  under load;
* ``session-authority:revocations:ack:<process>``: the acknowledgements of the
  requests that process published, ``<acker>|<request>,<request>,…`` (one
  message acknowledges every request an acker has pending for that publisher:
  batched under load);
* ``session-authority:revocations:live:<process>``: that process's
  registration, a key that Redis expires ``REGISTRY_TTL`` (``4 * liveness``)
  after its latest heartbeat (by the Redis server's clock), and
  ``session-authority:revocations:live``, a hash naming the processes that
  registered. The publisher's script keeps the registered processes whose key
  has not expired (forgetting the others), publishes and returns them, in one
  atomic step; it then waits for an acknowledgement from each of those
  (itself excepted). Only commands the runbook's ACL user already has
  (``GET SET HGET HSET HGETALL DEL PEXPIRE PUBLISH``, through ``EVALSHA``).
  Subscribers that are not ours (an operator's ``PSUBSCRIBE *``) are never
  waited for: ``PUBLISH``'s receiver count and ``PUBSUB NUMSUB`` are not read.
* on a Redis Cluster (``redis+cluster://``) the same names with the hash tag
  ``{revocations}`` (``CLUSTER_NAMES``): every key the scripts touch is on one
  slot, and the messages go over sharded pub/sub (``SPUBLISH``, ``SSUBSCRIBE``
  on a connection to that slot's master, ``redis_cluster.ShardSubscriber``).
  The subscription also ends when Redis says the node gave the slot up
  (``sunsubscribe``) or the client's slot map names another master for it;
  then, as after any resubscription, every copy is dropped.

The invariant: **a process answers from L1 only while (a) Redis has confirmed
both its subscriptions on the current connection, (b) data (a message or a
pong) arrived on that connection less than ``liveness`` ago, and (c) its own
registration, written less than ``REGISTRY_TTL / 2`` ago by its own clock
(measured from when the write was sent), was acknowledged.** Hence:

* a registered process must acknowledge: until it does, or until the bounded
  wait (``ack_timeout``) ends, Invalidate is not ``propagated``;
* a publisher ignores a registration only when it is older than
  ``REGISTRY_TTL`` by the Redis clock, and by then its owner has stopped
  answering from L1 for at least ``REGISTRY_TTL / 2`` (c). The margin covers a
  Redis clock stepped forward by less than that;
* a process cut off (connection dead, or its bytes held back) stops answering
  from L1 ``liveness`` after the last data it heard (b) and stops
  heartbeating; it gives the connection up once a ping has also gone
  unanswered for a quarter of the liveness, then un-registers itself. So
  publishers wait for it (``propagated: false``) for at most ``REGISTRY_TTL``,
  usually ``1.25 * liveness`` plus a round trip;
* a process that dies while registered: ``propagated: false`` until its
  registration is older than ``REGISTRY_TTL`` (it answers nothing any more);
* a registration that disappeared while its owner believed in it (expired,
  forgotten by a publisher, flushed: the heartbeat finds it missing) means
  some publisher may not have waited for us: every copy is dropped before the
  renewed registration counts;
* after any (re)subscription every copy is dropped (messages may have been
  missed in between), before the process registers.

Known gap: the registry flushed (FLUSHALL, or a restore without it) while
every process is healthy. Until each process's next heartbeat (at most a
quarter of the liveness) publishers wait for nobody, so ``propagated: true``
may come before another process has read the message from its subscription
(normally under a millisecond; it drops the copy when it does, and every copy
at that heartbeat). A call that passed the ``live`` check just before its
process froze answers when it wakes: that answer was decided before the
revocation it may race.

Silence alone does not give a subscription up: a process frozen for longer
than the liveness (a machine stall) wakes up to silence on a connection that
lost nothing. It answers no L1 hit until its ping is answered (Redis delivers
what was published before the ping first) and keeps its subscription.

Messages are read as bytes. A message that does not parse (not ASCII, wrong
shape, a hash that is not 64 hex digits) is logged, counted (``malformed``)
and makes this process drop every copy: contents are hashes, never tokens, and
a forged message can only ever make processes drop copies. The listener is
supervised: whatever ends it, the process forgets its copies, un-registers,
and subscribes again after a backoff (``restarts``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from session_authority.adapters.redis_bus_wire import (
    ALL,
    PUBLISH_SCRIPT,
    REGISTER_SCRIPT,
    Acks,
    as_bytes,
    as_text,
    batch,
    parse,
    valid_hashes,
)
from session_authority.adapters.redis_cluster import (
    ShardSubscriber,
    cluster_client,
    is_cluster_url,
)
from session_authority.adapters.redis_sentinel import SentinelCountingPool, counting_pool
from session_authority.core.domain import TokenHash

__all__ = [
    "ACK_PREFIX",
    "CHANNEL",
    "CLUSTER_NAMES",
    "POOL_SIZE",
    "REGISTRY",
    "BusNames",
    "RedisRevocationBus",
]

_log = logging.getLogger("session_authority.cache")
#: What Redis failing looks like (redis-py's cluster client raises some
#: ``RedisClusterException``s, which are not ``RedisError``s: no node reachable).
_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)

CHANNEL = "session-authority:revocations"
ACK_PREFIX = "session-authority:revocations:ack:"
REGISTRY = "session-authority:revocations:live"


@dataclass(frozen=True)
class BusNames:
    """The bus's channel, acknowledgement channel prefix and registry key."""

    channel: str
    ack_prefix: str
    registry: str
    #: Sharded pub/sub (``SPUBLISH``/``SSUBSCRIBE``, a Redis Cluster).
    sharded: bool = False


_SINGLE = BusNames(CHANNEL, ACK_PREFIX, REGISTRY)
#: On a Redis Cluster (``redis_cluster``) every name carries one hash tag: the
#: scripts take the registry and the registrations, and publish, on one slot;
#: the messages go over sharded pub/sub, on that slot's master and its replicas.
CLUSTER_NAMES = BusNames(
    "session-authority:{revocations}",
    "session-authority:{revocations}:ack:",
    "session-authority:{revocations}:live",
    sharded=True,
)
#: The bus's connections: the subscription, the acknowledgements, the heartbeat
#: and the publishes. Callers wait for a free one (up to ``ack_timeout``).
POOL_SIZE = 8


class RedisRevocationBus:
    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        *,
        on_revoked: Callable[[list[TokenHash] | None], None],
        ack_timeout: float,
        liveness: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        shards: ShardSubscriber | None = None,
    ) -> None:
        self._client = client
        #: Where to subscribe on a cluster (None: on ``client``'s server).
        self._shards = shards
        names = self.names = CLUSTER_NAMES if shards is not None else _SINGLE
        self._on_revoked = on_revoked
        self._ack_timeout = ack_timeout
        self._liveness = liveness
        self._registry_ttl = 4 * liveness
        self._clock = clock
        self.process_id = uuid.uuid4().hex[:16]
        self._ack_channel = names.ack_prefix + self.process_id
        self._registration = f"{names.registry}:{self.process_id}"
        self._publish_script = client.register_script(
            PUBLISH_SCRIPT.replace("'PUBLISH'", "'SPUBLISH'") if names.sharded else PUBLISH_SCRIPT
        )
        self._register_script = client.register_script(REGISTER_SCRIPT)
        # The current subscription: confirmed by Redis, when last heard from,
        # until when our registration is sure to count, and so until when L1
        # may be trusted (the minimum; -inf: not at all).
        self._subscribed = False
        self._registered = False
        self._last_heard = -math.inf
        self._registered_until = -math.inf
        self._live_until = -math.inf
        self._restarting = False
        self._waiting: dict[str, Acks] = {}
        self._acks_due: dict[str, list[str]] = {}
        self._acks_wake = asyncio.Event()
        self._outbox: list[tuple[str, list[str] | None]] = []
        self._outbox_wake = asyncio.Event()
        self._publisher: asyncio.Task[None] | None = None
        self._register_wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._acker: asyncio.Task[None] | None = None
        self.subscribed_once = asyncio.Event()
        #: Successful (re)subscriptions so far; each one dropped the L1 copies.
        self.subscriptions = 0
        #: Times the listener ended (error, silence, crash) and was started again.
        self.restarts = 0
        #: Messages on our channels that did not parse (each dropped every copy).
        self.malformed = 0
        #: Publishes that ended without every registered process's acknowledgement.
        self.incomplete = 0

    @classmethod
    def from_url(cls, url: str, *, timeout: float, **kwargs: Any) -> RedisRevocationBus:
        ack_timeout = float(kwargs["ack_timeout"])
        if is_cluster_url(url):
            cluster = cluster_client(
                url,
                identity=None,  # every connection still checks it reaches a master
                max_connections=POOL_SIZE,
                socket_connect_timeout=timeout,
                socket_timeout=None,
                protocol=2,
                decode_responses=False,
            )
            shards = ShardSubscriber(
                url,
                cluster,
                CLUSTER_NAMES.channel,
                socket_connect_timeout=timeout,
                socket_timeout=None,
                retry=None,
                protocol=2,
                decode_responses=False,
            )
            return cls(cluster, shards=shards, **kwargs)
        pool = counting_pool(
            url,
            identity=None,  # a Sentinel URL's connections still check they reach the master
            min_size=0,
            max_connections=POOL_SIZE,
            timeout=ack_timeout,  # wait for a connection, as long as an ack may take
            socket_timeout=None,  # the subscription idles; liveness is ours
            socket_connect_timeout=timeout,
            retry=None,
            protocol=2,
            decode_responses=False,  # bytes: a message that is not UTF-8 is ours to refuse
        )
        return cls(aioredis.Redis.from_pool(pool), **kwargs)  # the client owns the pool

    # --- RevocationFeed ---------------------------------------------------------------------

    @property
    def live(self) -> bool:
        return self._clock() < self._live_until

    @property
    def state(self) -> str:
        """``live``, or why not: ``restarting`` (backing off after the listener
        ended), ``subscribing`` (not confirmed by Redis yet), ``silent`` (no
        data within the liveness), ``registering`` (not registered yet, or the
        registration is too old to count on)."""
        if self.live:
            return "live"
        if self._restarting:
            return "restarting"
        if not self._subscribed:
            return "subscribing"
        if self._clock() - self._last_heard >= self._liveness:
            return "silent"
        return "registering"

    async def publish(self, token_hashes: Iterable[TokenHash] | None) -> bool:
        request = uuid.uuid4().hex[:16]
        hashes = None if token_hashes is None else [h.hex for h in token_hashes]
        acks = self._waiting[request] = Acks()
        self._outbox.append((request, hashes))
        self._outbox_wake.set()
        try:
            async with asyncio.timeout(self._ack_timeout):
                await acks.done.wait()
            if acks.error is not None:
                raise acks.error
            return True
        except _FAILURES as exc:
            self.incomplete += 1
            _log.warning(
                "Revocation push incomplete: %d of %s acknowledged (%s)",
                len(acks.heard & acks.expected) if acks.expected is not None else len(acks.heard),
                "?" if acks.expected is None else len(acks.expected),
                type(exc).__name__,
            )
            return False
        finally:
            del self._waiting[request]

    async def _send_revocations(self) -> None:
        """One task publishes: what is asked for while a message is on its way
        goes out together in the next one."""
        while True:
            await self._outbox_wake.wait()
            self._outbox_wake.clear()
            taken, merged = batch(self._outbox)
            if not taken:
                continue
            if self._outbox:
                self._outbox_wake.set()  # the rest: next round
            requests = [r for r in taken if r in self._waiting]  # not given up yet
            if not requests:
                continue
            body = ALL if merged is None else ",".join(merged)
            try:
                async with asyncio.timeout(self._ack_timeout):
                    members = await self._publish_script(
                        keys=[self.names.registry],
                        args=[
                            self.names.channel,
                            f"{self.process_id}|{','.join(requests)}|{body}",
                            self.names.registry + ":",
                            2 * self._ttl_ms(),
                        ],
                    )
            except _FAILURES as exc:
                for request in requests:
                    if (acks := self._waiting.get(request)) is not None:
                        acks.fail(exc)
                continue
            except Exception as exc:
                _log.exception("Revocation push Error")
                for request in requests:
                    if (acks := self._waiting.get(request)) is not None:
                        acks.fail(RedisError(type(exc).__name__))
                continue
            expected = {as_text(m) for m in members} - {self.process_id}
            for request in requests:
                if (acks := self._waiting.get(request)) is not None:
                    acks.expect(expected)

    # --- running ------------------------------------------------------------------------------

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="revocation-bus")
        self._acker = asyncio.create_task(self._send_acks(), name="revocation-bus-acks")
        self._publisher = asyncio.create_task(
            self._send_revocations(), name="revocation-bus-publish"
        )

    async def aclose(self) -> None:
        tasks = [t for t in (self._runner, self._acker, self._publisher) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._lost()
        await self._unregister()
        await self._client.aclose()
        if isinstance(self._client, aioredis.Redis) and isinstance(
            pool := self._client.connection_pool, SentinelCountingPool
        ):
            await pool.aclose()  # its connections to the sentinels too

    async def _run(self) -> None:
        """The supervisor: the listener is started again whatever ended it."""
        backoff = 0.05
        while True:
            subscriptions = self.subscriptions
            try:
                await self._listen()
            except _FAILURES as exc:
                _log.warning("Revocation bus Error: %s (L1 cache off until resubscribed)", exc)
            except Exception:
                _log.exception("Revocation bus crashed (L1 cache off until resubscribed)")
            finally:
                self._lost()
            self.restarts += 1
            self._restarting = True
            try:
                await self._unregister()
                if self.subscriptions != subscriptions:
                    backoff = 0.05  # it had worked: start over quickly
                await asyncio.sleep(backoff)
            finally:
                self._restarting = False
            backoff = min(backoff * 2, 1.0)

    async def _listen(self) -> None:
        names, shards = self.names, self._shards
        shard: tuple[str, int] | None = None  # the master subscribed to, on a cluster
        if shards is not None:
            subscriber, shard = await shards.connect()
        else:
            assert isinstance(self._client, aioredis.Redis)
            subscriber = self._client
        pubsub = subscriber.pubsub()
        registering = asyncio.create_task(self._keep_registered(), name="revocation-bus-register")
        try:
            # Sent: not confirmed yet.
            if names.sharded:
                await pubsub.ssubscribe(names.channel, self._ack_channel)
            else:
                await pubsub.subscribe(names.channel, self._ack_channel)
            confirmed: set[bytes] = set()
            wanted = {names.channel.encode(), self._ack_channel.encode()}
            last_heard = last_ping = last_asked = self._clock()
            pool = subscriber.connection_pool
            sentinel = pool if isinstance(pool, SentinelCountingPool) else None
            # When the oldest ping not answered yet was sent (None: all answered).
            unanswered: float | None = None
            while True:
                message = await pubsub.get_message(timeout=self._liveness / 4)
                now = self._clock()
                if message is not None:
                    last_heard = now
                    unanswered = None
                    kind = as_text(message.get("type"))
                    if kind == "sunsubscribe":
                        # The node gave the slot up (a failover, a resharding).
                        raise RedisConnectionError("the shard channel moved: resubscribing")
                    if kind in ("subscribe", "ssubscribe"):
                        confirmed.add(as_bytes(message.get("channel")))
                        if not self._subscribed and confirmed >= wanted:
                            self._confirmed()
                    self._heard(now)
                    self._handle(message)
                elif (
                    now - last_heard >= self._liveness
                    and unanswered is not None
                    and now - unanswered >= self._liveness / 4
                ):
                    # Silent, and a ping has gone unanswered for a while. Silence
                    # alone is no proof: a process frozen for longer than the
                    # liveness (a machine stall) wakes up to it on a connection
                    # that lost nothing. It is not live until the next message,
                    # and the ping below asks for one.
                    raise TimeoutError("the subscription went silent")
                if sentinel is not None and now - last_asked >= self._liveness:
                    # A coordinated failover leaves the old master running:
                    # publishers moved to the new one would not be heard here.
                    last_asked = now
                    await sentinel.follow(self._liveness / 4)
                    if not sentinel.reaches_master(pubsub.connection):
                        raise RedisConnectionError("the master moved (Sentinel): resubscribing")
                if shards is not None and shard is not None and now - last_asked >= self._liveness:
                    last_asked = now
                    if shards.moved(shard):
                        raise RedisConnectionError(
                            "the slot's master moved (Cluster): resubscribing"
                        )
                if now - last_ping >= self._liveness / 4:
                    await pubsub.ping()
                    last_ping = now
                    if unanswered is None:
                        unanswered = now
        finally:
            registering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await registering
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()
            if subscriber is not self._client:
                with contextlib.suppress(RedisError, OSError):
                    await subscriber.aclose()

    def _confirmed(self) -> None:
        """Both subscriptions confirmed: forget what may have been missed, then register."""
        self._on_revoked(None)
        self._subscribed = True
        self._registered = False
        self.subscriptions += 1
        self.subscribed_once.set()
        self._register_wake.set()

    def _heard(self, now: float) -> None:
        if self._subscribed:
            self._last_heard = now
            self._live_until = min(now + self._liveness, self._registered_until)

    def _lost(self) -> None:
        self._live_until = self._registered_until = self._last_heard = -math.inf
        if self._subscribed:
            self._subscribed = False
            self._on_revoked(None)

    # --- registration -------------------------------------------------------------------------

    def _ttl_ms(self) -> int:
        return int(self._registry_ttl * 1000)

    async def _keep_registered(self) -> None:
        """Renew our registration every quarter of the liveness while the
        subscription is confirmed and heard from; let it lapse otherwise."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._register_wake.wait(), self._liveness / 4)
            self._register_wake.clear()
            if self._subscribed and self._clock() - self._last_heard < self._liveness:
                await self._register()

    async def _register(self) -> None:
        sent = self._clock()
        try:
            async with asyncio.timeout(self._liveness):
                added = await self._register_script(
                    keys=[self.names.registry, self._registration],
                    args=[self.process_id, self._ttl_ms(), 2 * self._ttl_ms()],
                )
        except _FAILURES as exc:
            _log.warning("Revocation bus registration Error: %s", str(exc) or type(exc).__name__)
            return
        if not self._subscribed:
            return
        if int(added) and self._registered:
            # Gone while we counted on it (flushed, or expired and forgotten by
            # a publisher that then did not wait for us): forget everything.
            _log.warning("Revocation bus registration was lost; L1 copies dropped")
            self._on_revoked(None)
        self._registered = True
        self._registered_until = sent + self._registry_ttl / 2
        self._live_until = min(self._last_heard + self._liveness, self._registered_until)

    async def _unregister(self) -> None:
        try:
            async with asyncio.timeout(self._ack_timeout):
                await self._client.delete(self._registration)  # publishers forget it
        except _FAILURES:
            pass  # it lapses within REGISTRY_TTL anyway

    # --- messages -----------------------------------------------------------------------------

    def _handle(self, message: dict[str, Any]) -> None:
        if as_text(message.get("type")) not in ("message", "smessage"):
            return  # subscribe confirmations, pongs: they only prove we are heard
        channel = as_bytes(message.get("channel"))
        data = message.get("data")
        parsed = parse(data)
        if channel == self._ack_channel.encode():
            if parsed is None or len(parsed) != 2:
                self._malformed(channel, data)
                return
            acker, requests = parsed
            for request in requests.split(","):
                acks = self._waiting.get(request)
                if acks is not None:
                    acks.add(acker)
            return
        if parsed is None or len(parsed) != 3:
            self._malformed(channel, data)
            self._on_revoked(None)  # it may have been meant as a revocation
            return
        sender, requests, body = parsed
        hashes = None if body == ALL else body.split(",")
        if hashes is not None and not valid_hashes(hashes):
            self._malformed(channel, data)
            self._on_revoked(None)
            return
        if sender == self.process_id:
            return  # our own: dropped before it was published, and nobody waits for us
        self._on_revoked(None if hashes is None else [TokenHash(h) for h in hashes])
        self._acks_due.setdefault(sender, []).extend(r for r in requests.split(",") if r)
        self._acks_wake.set()

    def _malformed(self, channel: bytes, data: object) -> None:
        self.malformed += 1
        size = len(data) if isinstance(data, bytes | str) else 0
        _log.warning(
            "Revocation bus: malformed message ignored (channel %s, %d bytes); L1 copies dropped",
            channel.decode("ascii", "replace"),
            size,
        )

    async def _send_acks(self) -> None:
        """One task sends every acknowledgement due, one message per publisher:
        what arrives while a batch is on its way goes in the next one."""
        while True:
            await self._acks_wake.wait()
            self._acks_wake.clear()
            due, self._acks_due = self._acks_due, {}
            if not due:
                continue
            # Bounded as the publisher's wait is: an acknowledgement later than
            # that counts for nothing, and a frozen Redis must not hold them.
            try:
                async with asyncio.timeout(self._ack_timeout):
                    pipe = self._client.pipeline(transaction=False)
                    for sender, requests in due.items():
                        ack = f"{self.process_id}|{','.join(requests)}"
                        channel = self.names.ack_prefix + sender
                        if self.names.sharded:
                            pipe.spublish(channel, ack)
                        else:
                            pipe.publish(channel, ack)
                    await pipe.execute()
            except _FAILURES as exc:
                _log.warning("Revocation ack Error: %s", str(exc) or type(exc).__name__)
            except Exception:
                _log.exception("Revocation ack Error")
