"""The revocation bus between real ``serve`` processes, on a real Redis, when
something goes wrong: ``propagated: true`` must mean that no process answers
from a copy any more (server/session_authority/adapters/redis_bus.py).

* a replica whose subscriber connection is cut (or its bytes held back, for
  good) without it hearing of it: no valid answer after ``propagated: true``;
* plain load (InvalidateUser at 64 in flight): ``propagated`` stays true;
* a foreign subscriber (an operator's ``PSUBSCRIBE *``): not waited for;
* a malformed message on the revocation channel: logged, counted, ignored;
  the bus stays live.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from session_authority.adapters.redis_bus import CHANNEL
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis, find_free_port
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from .support import NO_PROXY, RedisProxy, spawn_serve, wait_serving

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.asyncio]


@dataclass
class Replica:
    process: subprocess.Popen[bytes]
    stub: pb_grpc.SessionAuthorityAsyncStub
    log: Path

    async def health(self) -> pb.HealthResponse:
        return await self.stub.Health(pb.HealthRequest(), timeout=5)


@contextlib.asynccontextmanager
async def _replicas(
    tmp_path: Path, database_url: str, redis_urls: list[str], **env: str
) -> AsyncIterator[list[Replica]]:
    """One ``serve --workers 1`` per Redis URL, all on one Postgres, once
    every one of them answers from L1 (its bus live)."""
    replicas: list[Replica] = []
    async with contextlib.AsyncExitStack() as stack:
        try:
            for i, url in enumerate(redis_urls):
                port, log = find_free_port(), tmp_path / f"serve-{i}.log"
                process = spawn_serve(
                    port, log, "--workers", "1", DATABASE_URL=database_url, REDIS_URL=url, **env
                )
                channel = await stack.enter_async_context(
                    grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NO_PROXY)
                )
                replicas.append(Replica(process, pb_grpc.SessionAuthorityStub(channel), log))
            for replica in replicas:
                await wait_serving(replica.stub, replica.log)
                await _until(replica, lambda h: h.local_cache.live, within=10)
            yield replicas
        finally:
            for replica in replicas:
                replica.process.send_signal(signal.SIGTERM)
            for replica in replicas:
                try:
                    replica.process.wait(15)
                except subprocess.TimeoutExpired:
                    replica.process.kill()
                    replica.process.wait(10)


async def _until(
    replica: Replica, check: Callable[[pb.HealthResponse], bool], *, within: float
) -> pb.HealthResponse:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        health = await replica.health()
        if check(health):
            return health
        assert asyncio.get_running_loop().time() < deadline, (health, replica.log.read_text())
        await asyncio.sleep(0.05)


async def _valid(replica: Replica, token: str) -> bool:
    answer = await replica.stub.ValidateSession(pb.ValidateSessionRequest(token=token), timeout=5)
    return answer.valid


async def test_no_valid_answer_after_propagated_from_a_replica_whose_subscription_is_cut_off(
    tmp_path: Path, own_postgres: EmbeddedPostgres, own_redis: EmbeddedRedis
) -> None:
    """Replica b reaches Redis through a proxy that cuts b's subscriber
    connection (then, once b has subscribed again, holds its bytes back for
    good), b never hearing of it. Each session is revoked on a, then validated
    on b, which holds a 10 s L1 copy of it: whenever a said ``propagated:
    true``, b must answer "not valid". (Before the fix b counted as subscribed
    because it had *sent* SUBSCRIBE: a cut b was not waited for and kept
    answering from its copies.) And ``propagated`` comes back: b stops being
    waited for once it has stopped answering from L1, and its supervised bus
    subscribes again."""
    proxy = RedisProxy(own_redis.port)
    await proxy.start()
    try:
        async with _replicas(
            tmp_path, own_postgres.url, [own_redis.url, proxy.url], L1_CACHE_TTL_MS="10000"
        ) as (a, b):
            for fault in ("cut", "held"):
                tokens = [
                    (await a.stub.CreateSession(pb.CreateSessionRequest(user_id=fault))).token
                    for _ in range(30)
                ]
                for token in tokens:
                    assert await _valid(b, token) and await _valid(b, token)  # b holds a copy
                stopped = proxy.cut_subscribers() if fault == "cut" else proxy.hold_subscribers()
                assert stopped == 1
                propagated = stale = 0
                for token in tokens:
                    reply = await a.stub.Invalidate(pb.InvalidateRequest(token=token), timeout=5)
                    assert reply.revoked == 1
                    answers = [await _valid(b, token) for _ in range(3)]
                    if reply.propagated:
                        propagated += 1
                        stale += sum(answers)
                assert stale == 0, (fault, propagated, b.log.read_text())
                assert propagated >= 1, fault  # b was given up and is not waited for any more
                # b's bus is supervised: it subscribed again, and serves from L1 again.
                await _until(b, lambda h: h.local_cache.live, within=10)
    finally:
        await proxy.aclose()


async def test_invalidate_user_under_load_is_propagated_every_time(
    tmp_path: Path, own_postgres: EmbeddedPostgres, own_redis: EmbeddedRedis
) -> None:
    """2,000 InvalidateUser at 64 in flight over two replicas (the bus keeps
    its 8 connections): every one ``propagated``. (Before: the bus's pool
    failed with "Too many connections" instead of waiting.)"""
    users, in_flight = 2000, 64
    async with _replicas(tmp_path, own_postgres.url, [own_redis.url, own_redis.url]) as replicas:

        async def run(calls: Callable[[int], object]) -> list[object]:
            queue = iter(range(users))
            results: list[object] = []

            async def worker() -> None:
                for i in queue:
                    results.append(await calls(i))  # type: ignore[misc]

            await asyncio.gather(*(worker() for _ in range(in_flight)))
            return results

        async def create(i: int) -> None:
            stub = replicas[i % 2].stub
            await stub.CreateSession(pb.CreateSessionRequest(user_id=f"load-{i}"), timeout=10)

        async def invalidate(i: int) -> bool:
            stub = replicas[(i + 1) % 2].stub
            reply = await stub.InvalidateUser(
                pb.InvalidateUserRequest(user_id=f"load-{i}"), timeout=10
            )
            assert reply.revoked_count == 1
            return reply.propagated

        await run(create)
        results = await run(invalidate)
        assert (len(results), results.count(False)) == (users, 0)


async def test_a_foreign_subscriber_and_garbage_on_the_channel_leave_propagation_intact(
    tmp_path: Path, own_postgres: EmbeddedPostgres, own_redis: EmbeddedRedis
) -> None:
    """(One pair of replicas for two findings: starting ``serve`` is the
    slow part of these tests.)

    An operator's ``PSUBSCRIBE *`` hears every revocation but never
    acknowledges: Invalidate must not wait for it. (Before: acknowledgements
    were expected from PUBLISH's receiver count, foreign subscribers included:
    ``propagated`` false 10/10, each after the full wait.)

    Garbage on the revocation channel (not UTF-8, wrong shape, not hex): each
    process logs and counts it, drops its copies, and stays subscribed and
    live; revocations still propagate. (Before: one non-UTF-8 message ended
    every process's subscription for good, silently.)"""
    foreign = aioredis.Redis.from_url(own_redis.url)
    pubsub = foreign.pubsub()
    await pubsub.psubscribe("*")
    heard: list[dict[str, object]] = []

    async def listen() -> None:
        async for message in pubsub.listen():
            heard.append(message)

    listener = asyncio.create_task(listen())
    try:
        async with _replicas(
            tmp_path, own_postgres.url, [own_redis.url, own_redis.url]
        ) as replicas:
            a, b = replicas
            propagated = []
            for i in range(10):
                token = (
                    await a.stub.CreateSession(pb.CreateSessionRequest(user_id=f"foreign-{i}"))
                ).token
                assert await _valid(b, token)
                reply = await a.stub.Invalidate(pb.InvalidateRequest(token=token))
                propagated.append(reply.propagated)
                assert not await _valid(b, token)
            assert propagated == [True] * 10
            assert any(m["type"] == "pmessage" for m in heard)  # it was there, and heard them

            garbage = [b"\xff\xfe\x00\x80", b"garbage", b"x|y|not-a-hash"]
            for message in garbage:
                assert await foreign.publish(CHANNEL, message) == 3  # a, b and the foreigner
            for replica in replicas:
                health = await _until(
                    replica,
                    lambda h: (
                        h.local_cache.malformed_messages == len(garbage) and h.local_cache.live
                    ),
                    within=5,
                )
                assert (health.local_cache.bus, health.local_cache.bus_restarts) == ("live", 0)
                assert replica.log.read_text().count("malformed message ignored") == len(garbage)
            assert (await foreign.pubsub_numsub(CHANNEL)) == [(CHANNEL.encode(), 2)]
            token = (await a.stub.CreateSession(pb.CreateSessionRequest(user_id="garbage"))).token
            assert await _valid(b, token)
            reply = await a.stub.Invalidate(pb.InvalidateRequest(token=token))
            assert reply.propagated and not await _valid(b, token)
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        await pubsub.aclose()
        await foreign.aclose()
