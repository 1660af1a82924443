"""The service under the runbook's least-privilege Redis ACL user, exactly as written there.

The rule (its own keys, its own revocation channels, the commands it sends) is read from
deploy/runbook.md (Security Considerations, "Access control") and given to a private Redis
at start-up, so that it survives the restart in the outage. The
service then runs a full session lifecycle and Health, then a Redis outage in which a
revocation is made and replayed from Postgres by the breaker's probe, with Redis's
scripts gone after the restart (``SCRIPT LOAD`` again). Throughout, the cache reports no
error outside the outage, and Redis's ACL LOG shows no command refused to the service
except redis-py's harmless ``CLIENT SETINFO``.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from session_authority.adapters.redis_cache import cache_key
from session_authority.bootstrap import App
from session_authority.core.breaker import BreakerState
from session_authority.core.domain import TokenHash, new_token
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from .support import NO_PROXY, app_settings

pytestmark = [pytest.mark.integration, pytest.mark.fault]

RUNBOOK = Path(__file__).resolve().parents[2] / "deploy" / "runbook.md"
PASSWORD = "acl-pw-7Hx2q"
#: redis-py sends CLIENT SETINFO on connect and ignores a refusal; nothing else may be refused.
TOLERATED_DENIALS = {"client"}


def runbook_acl() -> tuple[str, list[str]]:
    """The user name and rules of the runbook's ``ACL SETUSER`` line."""
    text = RUNBOOK.read_text()
    section = text[text.index("**3. Access control.**") :]
    block = re.search(r"```redis\n(.*?)```", section, re.DOTALL)
    assert block, "no ```redis block in the runbook's Access control section"
    lines = [line for line in block.group(1).splitlines() if line.startswith("ACL SETUSER ")]
    assert len(lines) == 1, lines
    _, _, user, *rules = shlex.split(lines[0])
    assert ">password" in rules, "the runbook's rule should set a placeholder password"
    return user, [f">{PASSWORD}" if rule == ">password" else rule for rule in rules]


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[tuple[EmbeddedRedis, str]]:
    user, rules = runbook_acl()
    server = EmbeddedRedis(tmp_path / "acl-redis", args=["--user", user, *rules])
    server.start()
    try:
        yield server, f"redis://{user}:{PASSWORD}@{server.host}:{server.port}/0"
    finally:
        server.stop()


def test_the_rule_grants_no_more_than_its_commands() -> None:
    user, rules = runbook_acl()
    assert user == "session-authority"
    assert rules[:2] == ["reset", "on"]
    assert "-@all" in rules and "resetchannels" in rules
    grants = [r for r in rules if r.startswith("+")]
    assert all("@" not in r for r in grants), f"categories grant more than it uses: {grants}"
    assert not [r for r in rules if r in ("allkeys", "allchannels", "allcommands", "nocommands")]
    assert {r for r in rules if r.startswith("~")} == {"~session:*", "~session-authority:*"}
    assert {r for r in rules if r.startswith("&")} == {"&session-authority:revocations*"}


async def _denials(admin: aioredis.Redis, user: str) -> list[str]:
    entries = await admin.acl_log()
    return [
        f"{entry.get('reason')}: {entry.get('object')}"
        for entry in entries
        if entry.get("username") == user and entry.get("object") not in TOLERATED_DENIALS
    ]


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_lifecycle_and_outage_replay_under_the_runbook_acl(
    acl_redis: tuple[EmbeddedRedis, str], own_postgres: EmbeddedPostgres
) -> None:
    redis_server, redis_url = acl_redis
    user, _ = runbook_acl()
    admin = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    settings = app_settings(
        own_postgres.url,
        redis_url,
        breaker_timeout_ms=300,
        breaker_reset_timeout_ms=300,
        revocation_sweep_seconds=0,  # the replay alone must restore the tombstone
    )
    app = await App.start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=NO_PROXY) as ch:
            stub = pb_grpc.SessionAuthorityStub(ch)

            async def valid(token: str) -> tuple[bool, int, int]:
                reply = await stub.ValidateSession(pb.ValidateSessionRequest(token=token))
                return reply.valid, reply.reason, reply.source

            # --- lifecycle --------------------------------------------------------------
            token = (await stub.CreateSession(pb.CreateSessionRequest(user_id="acl"))).token
            assert await valid(token) == (True, 0, pb.SOURCE_DATABASE)
            assert await valid(token) == (True, 0, pb.SOURCE_CACHE)
            unknown = new_token()
            for source in (pb.SOURCE_DATABASE, pb.SOURCE_CACHE):  # negative entry
                assert await valid(unknown) == (False, pb.REASON_UNKNOWN, source)
            done = await stub.Invalidate(pb.InvalidateRequest(token=token))
            assert (done.revoked, done.cache_purged) == (True, True)
            assert await valid(token) == (False, pb.REASON_REVOKED, pb.SOURCE_CACHE)
            for _ in range(3):
                await stub.CreateSession(pb.CreateSessionRequest(user_id="acl-many"))
            many = await stub.InvalidateUser(pb.InvalidateUserRequest(user_id="acl-many"))
            assert (many.revoked_count, many.cache_purged) == (3, True)
            health = await stub.Health(pb.HealthRequest(), timeout=5)
            assert health.status == "healthy", list(health.errors)
            assert health.redis.connected and health.redis.total_keys > 0
            assert health.session_cache.metrics.errors == 0
            assert health.breaker.opened_count == 0
            # The revocation bus registers and publishes through its scripts too.
            assert (health.local_cache.live, health.local_cache.bus) == (True, "live")
            assert await _denials(admin, user) == []

            # --- outage: revoke while Redis is down, replay once it is back --------------
            victim = (await stub.CreateSession(pb.CreateSessionRequest(user_id="acl-out"))).token
            assert (await valid(victim))[0]
            assert (await valid(victim))[2] == pb.SOURCE_CACHE
            redis_server.kill()
            done = await stub.Invalidate(pb.InvalidateRequest(token=victim))
            assert (done.revoked, done.cache_purged) == (True, False)
            opened = app.core.breaker.state  # a snapshot: mypy narrows the property
            assert opened is BreakerState.OPEN
            redis_server.start()  # empty, scripts gone; the same ACL from the command line
            await admin.aclose()
            admin = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
            deadline = time.monotonic() + 20
            while app.core.breaker.state is not BreakerState.CLOSED:
                assert time.monotonic() < deadline, "the breaker did not close"
                await asyncio.sleep(0.05)
            # Nobody validated the victim since: only the replay can have written this.
            key = cache_key(TokenHash.of(victim))
            assert (await admin.hgetall(key)).get("state") == "revoked"
            assert await valid(victim) == (False, pb.REASON_REVOKED, pb.SOURCE_CACHE)
            health = await stub.Health(pb.HealthRequest(), timeout=5)
            assert health.status == "healthy", list(health.errors)
            assert await _denials(admin, user) == []
    finally:
        await admin.aclose()
        await app.stop(0)
