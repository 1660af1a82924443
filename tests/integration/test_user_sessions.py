"""ListUserSessions and InvalidateUser's except_session_id ("log out everywhere
else") on two replicas (in-process Apps, each with its L1 cache) sharing a real
Postgres and a Redis of this module's own, through the generated stubs."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import asyncpg
import grpc
import pytest
import pytest_asyncio

from session_authority.adapters.migrate import apply_migrations
from session_authority.bootstrap import App
from session_authority.core.domain import Position
from session_authority.core.listing import PageTokens
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from .support import NO_PROXY, app_settings

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


class Replicas:
    def __init__(self, stubs: list[pb_grpc.SessionAuthorityAsyncStub], dsn: str) -> None:
        self.a, self.b = stubs
        self.dsn = dsn

    async def create(
        self, user: str, stub: pb_grpc.SessionAuthorityAsyncStub | None = None
    ) -> pb.CreateSessionResponse:
        request = pb.CreateSessionRequest(user_id=user, metadata={"device": "phone"})
        return await (stub or self.a).CreateSession(request, timeout=10)

    async def page(
        self, user: str, stub: pb_grpc.SessionAuthorityAsyncStub | None = None, **fields: object
    ) -> pb.ListUserSessionsResponse:
        request = pb.ListUserSessionsRequest(user_id=user, **fields)  # type: ignore[arg-type]
        return await (stub or self.a).ListUserSessions(request, timeout=10)

    async def valid(self, token: str, stub: pb_grpc.SessionAuthorityAsyncStub) -> bool:
        reply = await stub.ValidateSession(pb.ValidateSessionRequest(token=token), timeout=10)
        return reply.valid


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A Redis of this module's own: no other test's bus registration in it."""
    with EmbeddedRedis(tmp_path_factory.mktemp("user-sessions-redis")) as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def replicas(
    postgres_server: EmbeddedPostgres, module_redis: EmbeddedRedis
) -> AsyncIterator[Replicas]:
    conn = await asyncpg.connect(postgres_server.url)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
    apps: list[App] = []
    channels: list[grpc.aio.Channel] = []
    try:
        for _ in range(2):
            app = await App.start(app_settings(postgres_server.url, module_redis.url))
            apps.append(app)
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=NO_PROXY))
        yield Replicas([pb_grpc.SessionAuthorityStub(c) for c in channels], postgres_server.url)
    finally:
        for channel in channels:
            await channel.close()
        for app in apps:
            await app.stop(0)


def _user(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def _ids(reply: pb.ListUserSessionsResponse) -> list[str]:
    return [s.session_id for s in reply.sessions]


async def _refused(call: asyncio.Future[object] | object, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith(f"{field}: ")


async def test_pages_have_no_duplicates_or_gaps_while_sessions_come_and_go(
    replicas: Replicas,
) -> None:
    """Seven sessions, pages of three, each page from the other replica (one
    key for all): sessions created between pages appear at the end, one
    revoked before its page is reached does not appear, every other one that
    existed throughout appears exactly once, in creation order."""
    user = _user("pages")
    made = [(await replicas.create(user)).session.session_id for _ in range(7)]
    stubs = [replicas.a, replicas.b]
    seen: list[str] = []
    token, pages, added = "", 0, []
    while True:
        reply = await replicas.page(user, stubs[pages % 2], page_size=3, page_token=token)
        seen += _ids(reply)
        pages += 1
        assert len(reply.sessions) <= 3
        if pages == 1:  # between pages: two created, one not yet listed revoked
            added = [(await replicas.create(user, replicas.b)).session.session_id for _ in "ab"]
            revoked = await replicas.a.Invalidate(pb.InvalidateRequest(session_id=made[5]))
            assert revoked.revoked
        token = reply.next_page_token
        if not token:
            break
        assert pages < 10, "pages that never end: each one restarts the listing"
    assert pages >= 3
    assert len(seen) == len(set(seen))
    assert seen == [*made[:5], made[6], *added]


async def test_include_revoked_lists_revocations_and_last_seen_when_known(
    replicas: Replicas,
) -> None:
    user = _user("history")
    sessions = [(await replicas.create(user)).session for _ in range(3)]
    await replicas.b.Invalidate(pb.InvalidateRequest(session_id=sessions[1].session_id))
    seen = datetime(2026, 12, 1, 8, 30, tzinfo=UTC)
    conn = await asyncpg.connect(replicas.dsn)
    try:
        await conn.execute(
            "UPDATE sessions SET last_seen_at = $1 WHERE session_id = $2",
            seen,
            sessions[2].session_id,
        )
    finally:
        await conn.close()

    live = await replicas.page(user)
    assert _ids(live) == [sessions[0].session_id, sessions[2].session_id]
    assert not any(s.HasField("revoked_at") for s in live.sessions)
    assert live.next_page_token == ""
    everything = await replicas.page(user, include_revoked=True)
    assert _ids(everything) == [s.session_id for s in sessions]
    assert [s.HasField("revoked_at") for s in everything.sessions] == [False, True, False]
    assert [s.HasField("last_seen_at") for s in everything.sessions] == [False, False, True]
    assert everything.sessions[2].last_seen_at.ToDatetime(UTC) == seen
    first = everything.sessions[0]
    assert (first.user_id, dict(first.metadata)) == (user, {"device": "phone"})
    assert first.created_at == sessions[0].created_at
    assert first.expires_at == sessions[0].expires_at


async def test_forged_garbled_and_foreign_page_tokens_are_invalid_arguments(
    replicas: Replicas,
) -> None:
    user, other = _user("owner"), _user("other")
    for name in (user, user, other, other):
        await replicas.create(name)
    good = (await replicas.page(user, page_size=1)).next_page_token
    assert good and (await replicas.page(user, page_size=1, page_token=good)).sessions
    raw = bytearray(base64.urlsafe_b64decode(good + "=" * (-len(good) % 4)))
    raw[5] ^= 0x01  # one bit of the position
    flipped = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    position = Position(datetime.now(UTC), str(uuid.uuid4()))
    other_key = PageTokens(b"k" * 32).issue(user, False, position)
    for bad in (flipped, good[:-2], good + "AA", "x" * len(good), "not a token!", other_key):
        await _refused(replicas.page(user, page_token=bad), "page_token")
    # Genuine, but for another user or the other include_revoked: refused too.
    await _refused(replicas.page(other, page_size=1, page_token=good), "page_token")
    await _refused(replicas.page(user, page_token=good, include_revoked=True), "page_token")
    await _refused(replicas.page(user, page_size=-1), "page_size")
    await _refused(replicas.page(""), "user_id")


async def test_log_out_everywhere_else_on_every_replica_and_its_l1_cache(
    replicas: Replicas,
) -> None:
    user = _user("elsewhere")
    created = [await replicas.create(user) for _ in range(4)]
    kept, others = created[0], created[1:]
    for reply in created:  # copies in Redis and in both replicas' L1 caches
        for stub in (replicas.a, replicas.b, replicas.b):
            assert await replicas.valid(reply.token, stub)

    request = pb.InvalidateUserRequest(user_id=user, except_session_id=kept.session.session_id)
    result = await replicas.a.InvalidateUser(request, timeout=10)

    assert (result.revoked_count, result.cache_purged, result.propagated) == (3, True, True)
    for stub in (replicas.b, replicas.a):
        assert await replicas.valid(kept.token, stub)
        for reply in others:
            answer = await stub.ValidateSession(pb.ValidateSessionRequest(token=reply.token))
            assert (answer.valid, answer.reason) == (False, pb.REASON_REVOKED)
    assert _ids(await replicas.page(user)) == [kept.session.session_id]
    again = await replicas.b.InvalidateUser(request, timeout=10)
    assert again.revoked_count == 0


async def test_a_kept_session_that_is_not_the_users_revokes_nothing(replicas: Replicas) -> None:
    user, stranger = _user("victim"), _user("stranger")
    mine = [await replicas.create(user) for _ in range(2)]
    theirs = await replicas.create(stranger)
    for except_id in (theirs.session.session_id, str(uuid.uuid4())):
        request = pb.InvalidateUserRequest(user_id=user, except_session_id=except_id)
        await _refused(replicas.a.InvalidateUser(request), "except_session_id")
    malformed = pb.InvalidateUserRequest(user_id=user, except_session_id="not-a-uuid")
    await _refused(replicas.b.InvalidateUser(malformed), "except_session_id")
    for reply in [*mine, theirs]:
        assert await replicas.valid(reply.token, replicas.b)
    assert len((await replicas.page(user)).sessions) == 2


async def test_a_session_created_while_log_out_everywhere_else_runs_is_not_revoked(
    replicas: Replicas,
) -> None:
    """The revocation is one statement; what it revokes is what was committed
    when it began. Held on a row lock after it began, it lets a new session
    commit, then revokes exactly the sessions that existed before: the new one
    stays valid (log out everywhere else again to end it), as with InvalidateUser."""
    user = _user("racing")
    kept, before, locked = [await replicas.create(user) for _ in range(3)]
    lock = await asyncpg.connect(replicas.dsn)
    watch = await asyncpg.connect(replicas.dsn)
    try:
        transaction = lock.transaction()
        await transaction.start()
        await lock.execute(
            "SELECT 1 FROM sessions WHERE session_id = $1 FOR UPDATE", locked.session.session_id
        )
        request = pb.InvalidateUserRequest(user_id=user, except_session_id=kept.session.session_id)
        call = asyncio.ensure_future(replicas.a.InvalidateUser(request, timeout=30))
        waiting = 0
        for _ in range(3000):  # until the statement has begun and waits on the lock
            waiting = await watch.fetchval(
                """SELECT count(*) FROM pg_stat_activity
                   WHERE wait_event_type = 'Lock' AND query LIKE '%WITH kept AS%'"""
            )
            if waiting or call.done():
                break
            await asyncio.sleep(0.01)
        assert waiting == 1 and not call.done()
        during = await replicas.create(user, replicas.b)  # not blocked: an insert
        await transaction.rollback()
        result = await call
    finally:
        await lock.close()
        await watch.close()

    assert (result.revoked_count, result.cache_purged, result.propagated) == (2, True, True)
    for reply, valid in ((kept, True), (before, False), (locked, False), (during, True)):
        for stub in (replicas.a, replicas.b):
            assert await replicas.valid(reply.token, stub) is valid
    listed = _ids(await replicas.page(user))
    assert listed == [kept.session.session_id, during.session.session_id]


async def test_first_page_of_a_user_without_sessions_is_empty_and_last(
    replicas: Replicas,
) -> None:
    reply = await replicas.page(_user("nobody"), page_size=10_000)
    assert (list(reply.sessions), reply.next_page_token) == ([], "")
