"""``RedisRevocationBus``: revocations pushed to every process over Redis pub/sub,
with acknowledgements (the ``RevocationFeed`` port, core/local.py).

Channels: ``session-authority:revocations`` carries ``<sender>|<request>|<hashes>``
(comma-separated hex token hashes, or ``*`` for "drop everything"); each
process also listens on ``session-authority:revocations:ack:<its id>``, where
the subscribers acknowledge the requests it published. ``PUBLISH`` answers how
many subscribers received a message, so the publisher knows how many
acknowledgements to wait for.

A subscriber is *live* while it is subscribed and has heard from Redis within
``liveness`` seconds (it pings every quarter of that). The subscription is
given up (and its owner told to forget everything, ``on_revoked(None)``) once
it has been silent that long *and* a ping has gone unanswered for a quarter of
it: a process that was itself frozen (a machine stall) wakes up to silence on a
connection that lost nothing, is not live until its ping is answered (Redis
delivers what was published before the ping first), and keeps its
subscription. The owner is told again right after any (re)subscription, since
messages may have been missed in between. Message contents are hashes, never
tokens; a forged message can only make processes drop copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from session_authority.core.domain import TokenHash

__all__ = ["ACK_PREFIX", "CHANNEL", "RedisRevocationBus"]

_log = logging.getLogger("session_authority.cache")

CHANNEL = "session-authority:revocations"
ACK_PREFIX = "session-authority:revocations:ack:"
_ALL = "*"


class RedisRevocationBus:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        on_revoked: Callable[[list[TokenHash] | None], None],
        ack_timeout: float,
        liveness: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._on_revoked = on_revoked
        self._ack_timeout = ack_timeout
        self._liveness = liveness
        self._clock = clock
        self.process_id = uuid.uuid4().hex[:16]
        self._ack_channel = ACK_PREFIX + self.process_id
        self._subscribed = False
        self._last_heard = 0.0
        self._waiting: dict[str, _Acks] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self.subscribed_once = asyncio.Event()
        #: Successful (re)subscriptions so far; each one dropped the L1 copies.
        self.subscriptions = 0

    @classmethod
    def from_url(cls, url: str, *, timeout: float, **kwargs: Any) -> RedisRevocationBus:
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=None,  # the subscription idles; liveness is ours
            socket_connect_timeout=timeout,
            retry=None,
            protocol=2,
            decode_responses=True,
            max_connections=8,
        )
        return cls(client, **kwargs)

    # --- RevocationFeed ---------------------------------------------------------------------

    @property
    def live(self) -> bool:
        return self._subscribed and self._clock() - self._last_heard < self._liveness

    async def publish(self, token_hashes: Iterable[TokenHash] | None) -> bool:
        request = uuid.uuid4().hex[:16]
        body = _ALL if token_hashes is None else ",".join(h.hex for h in token_hashes)
        acks = self._waiting[request] = _Acks()
        try:
            async with asyncio.timeout(self._ack_timeout):
                receivers = await self._client.publish(
                    CHANNEL, f"{self.process_id}|{request}|{body}"
                )
                acks.expect(int(receivers))
                await acks.done.wait()
            return True
        except (RedisError, OSError, TimeoutError) as exc:
            _log.warning(
                "Revocation push incomplete: %d of %s acknowledged (%s)",
                acks.count,
                "?" if acks.expected is None else acks.expected,
                type(exc).__name__,
            )
            return False
        finally:
            del self._waiting[request]

    # --- the subscription --------------------------------------------------------------------

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="revocation-bus")

    async def aclose(self) -> None:
        tasks = [t for t in (self._runner, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.aclose()

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                await self._listen()
            except (RedisError, OSError, TimeoutError) as exc:
                _log.warning("Revocation bus Error: %s (L1 cache off until resubscribed)", exc)
            finally:
                self._lost()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _listen(self) -> None:
        pubsub = self._client.pubsub()
        try:
            await pubsub.subscribe(CHANNEL, self._ack_channel)
            self._last_heard = self._clock()
            last_ping = self._clock()
            self._on_revoked(None)  # missed anything while not subscribed: forget it all
            self._subscribed = True
            self.subscriptions += 1
            self.subscribed_once.set()
            # When the oldest ping not answered yet was sent (None: all answered).
            unanswered: float | None = None
            while True:
                message = await pubsub.get_message(timeout=self._liveness / 4)
                now = self._clock()
                if message is not None:
                    self._last_heard = now
                    unanswered = None
                    self._handle(message)
                elif (
                    now - self._last_heard >= self._liveness
                    and unanswered is not None
                    and now - unanswered >= self._liveness / 4
                ):
                    # Silent, and a ping has gone unanswered for a while. Silence
                    # alone is no proof: a process frozen for longer than the
                    # liveness (a machine stall) wakes up to it on a connection
                    # that lost nothing. It is not live until the next message,
                    # and the ping below asks for one.
                    raise TimeoutError("the subscription went silent")
                if now - last_ping >= self._liveness / 4:
                    await pubsub.ping()
                    last_ping = now
                    if unanswered is None:
                        unanswered = now
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    def _lost(self) -> None:
        if self._subscribed:
            self._subscribed = False
            self._on_revoked(None)

    def _handle(self, message: dict[str, Any]) -> None:
        if message.get("type") != "message":
            return  # subscribe confirmations, pongs: they only prove we are heard
        data = str(message.get("data", ""))
        if message.get("channel") == self._ack_channel:
            acks = self._waiting.get(data)
            if acks is not None:
                acks.add()
            return
        sender, _, rest = data.partition("|")
        request, _, body = rest.partition("|")
        if not sender or not request:
            return
        self._on_revoked(None if body == _ALL else [TokenHash(h) for h in body.split(",") if h])
        task = asyncio.create_task(self._ack(sender, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ack(self, sender: str, request: str) -> None:
        # Bounded as the publisher's wait is: an acknowledgement later than
        # that counts for nothing, and a frozen Redis must not keep one task
        # (and one of the client's connections) per revocation heard.
        try:
            async with asyncio.timeout(self._ack_timeout):
                await self._client.publish(ACK_PREFIX + sender, request)
        except (RedisError, OSError, TimeoutError) as exc:
            _log.warning("Revocation ack Error: %s", str(exc) or type(exc).__name__)


class _Acks:
    """Acknowledgements of one published request; ``done`` once all arrived."""

    def __init__(self) -> None:
        self.count = 0
        self.expected: int | None = None
        self.done = asyncio.Event()

    def add(self) -> None:
        self.count += 1
        self._check()

    def expect(self, receivers: int) -> None:
        self.expected = receivers
        self._check()

    def _check(self) -> None:
        if self.expected is not None and self.count >= self.expected:
            self.done.set()
