"""WatchRevocations on real processes: two ``serve`` replicas sharing private
Postgres and Redis; revocations made on replica A (or in SQL), watched on B.

Each test asserts counts and order, never timings."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil
import pytest
import pytest_asyncio

from session_authority.adapters.migrate import apply_migrations
from session_authority.adapters.postgres_store import PostgresSessionStore
from session_authority.core.domain import TokenHash, new_token
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis, find_free_port
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc
from tests.e2e.e2e_support import tool
from tests.integration.support import NO_PROXY, spawn_serve, stop_serve


def token_hash_bytes(token: str) -> bytes:
    return bytes.fromhex(TokenHash.of(token).hex)


pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

REVOKED = pb.REVOCATION_EVENT_KIND_REVOKED
START = pb.REVOCATION_EVENT_KIND_START


@pytest.fixture(scope="module")
def replicas(
    postgres_server: EmbeddedPostgres, redis_server: EmbeddedRedis, tmp_path_factory: Any
) -> Iterator[dict[str, Any]]:
    """Replica A (revokes) and B (watched; a watcher not reading for 1 s is cut off)."""
    base = tmp_path_factory.mktemp("watch")
    env = {
        "DATABASE_URL": postgres_server.url,
        "REDIS_URL": redis_server.url,
        # Counts are asserted, not times: a loaded machine may take seconds per 5,000 rows.
        "PG_COMMAND_TIMEOUT_MS": "30000",
    }
    ports = {"a": find_free_port(), "b": find_free_port()}
    procs = {
        "a": spawn_serve(ports["a"], base / "a.log", "--workers", "1", "--migrate", **env),
    }
    procs["b"] = spawn_serve(
        ports["b"],
        base / "b.log",
        "--workers",
        "1",
        "--migrate",
        WATCH_STALL_TIMEOUT_MS="1000",
        **env,
    )
    try:
        yield {
            "a": f"127.0.0.1:{ports['a']}",
            "b": f"127.0.0.1:{ports['b']}",
            "b_pid": procs["b"].pid,
            "b_proc": procs["b"],
            "dsn": postgres_server.url,
            "logs": base,
        }
    finally:
        for proc in procs.values():
            stop_serve(proc)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stubs(
    replicas: dict[str, Any],
) -> AsyncIterator[tuple[pb_grpc.SessionAuthorityAsyncStub, pb_grpc.SessionAuthorityAsyncStub]]:
    async with (
        grpc.aio.insecure_channel(replicas["a"], options=NO_PROXY) as a,
        grpc.aio.insecure_channel(replicas["b"], options=NO_PROXY) as b,
    ):
        one: pb_grpc.SessionAuthorityAsyncStub = pb_grpc.SessionAuthorityStub(a)
        other: pb_grpc.SessionAuthorityAsyncStub = pb_grpc.SessionAuthorityStub(b)
        await _until_serving(one, replicas["logs"] / "a.log")
        await _until_serving(other, replicas["logs"] / "b.log")
        yield one, other


async def _until_serving(stub: pb_grpc.SessionAuthorityAsyncStub, log: Path) -> None:
    """Until the server answers Health (the machine may be loaded: 120 s at most)."""
    async with asyncio.timeout(120):
        while True:
            try:
                await stub.Health(pb.HealthRequest(), timeout=1)
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)


async def _insert(dsn: str, user: str, count: int) -> list[str]:
    """``count`` live sessions of ``user`` straight into Postgres; their ids."""
    now = datetime.now(UTC)
    rows = [
        (uuid.uuid4(), token_hash_bytes(new_token()), user, now, now + timedelta(hours=1))
        for _ in range(count)
    ]
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_records_to_table(
            "sessions",
            records=rows,
            columns=["session_id", "token_hash", "user_id", "created_at", "expires_at"],
        )
    finally:
        await conn.close()
    return [str(r[0]) for r in rows]


async def _read(stream: Any) -> pb.RevocationEvent:
    event = await stream.read()
    assert isinstance(event, pb.RevocationEvent), event
    return event


async def _take(stream: Any, count: int, within: float = 20) -> list[pb.RevocationEvent]:
    """The next ``count`` REVOKED events of ``stream``."""
    got: list[pb.RevocationEvent] = []
    async with asyncio.timeout(within):
        while len(got) < count:
            event = await stream.read()
            assert isinstance(event, pb.RevocationEvent), f"stream ended after {len(got)}"
            assert event.kind == REVOKED
            got.append(event)
    return got


async def test_events_through_stubs_and_grpcurl(
    stubs: tuple[pb_grpc.SessionAuthorityAsyncStub, pb_grpc.SessionAuthorityAsyncStub],
    replicas: dict[str, Any],
) -> None:
    one, other = stubs
    stream = other.WatchRevocations(pb.WatchRevocationsRequest())
    start = await _read(stream)
    assert start.kind == START and len(start.cursor) == 41 and not start.session_id
    grpcurl = subprocess.Popen(  # noqa: ASYNC220  (started, then read in a thread)
        [
            tool("grpcurl"),
            "-plaintext",
            "-max-time",
            "15",
            "-d",
            "{}",
            replicas["b"],
            "session_authority.v1.SessionAuthority/WatchRevocations",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert grpcurl.stdout is not None
        first = await asyncio.to_thread(grpcurl.stdout.readline)  # "{" of START
        assert first.strip() == b"{", first
        created = await one.CreateSession(pb.CreateSessionRequest(user_id="watch-e2e"))
        other_created = await one.CreateSession(pb.CreateSessionRequest(user_id="watch-e2e"))
        by_sql = (await _insert(replicas["dsn"], "watch-sql", 1))[0]
        await one.Invalidate(pb.InvalidateRequest(token=created.token))
        await one.InvalidateUser(pb.InvalidateUserRequest(user_id="watch-e2e"))
        conn = await asyncpg.connect(replicas["dsn"])
        try:  # an operator's UPDATE
            await conn.execute(
                "UPDATE sessions SET revoked_at = now() WHERE session_id = $1", uuid.UUID(by_sql)
            )
        finally:
            await conn.close()
        events = await _take(stream, 3)
        assert [(e.session_id, e.user_id, e.reason) for e in events] == [
            (created.session.session_id, "watch-e2e", pb.REVOCATION_REASON_EXPLICIT),
            (other_created.session.session_id, "watch-e2e", pb.REVOCATION_REASON_USER_WIDE),
            (by_sql, "watch-sql", pb.REVOCATION_REASON_ADMIN),
        ]
        assert [e.cursor for e in events] == sorted(e.cursor for e in events)
        assert all(e.cursor > start.cursor and e.sequence > 0 for e in events)
        assert all(e.revoked_at.seconds > 0 for e in events)
        # Never a token or its hash.
        wire = b"".join(e.SerializeToString() for e in events)
        for token in (created.token, other_created.token):
            assert token.encode() not in wire
            assert token_hash_bytes(token) not in wire
            assert token_hash_bytes(token).hex().encode() not in wire
        wanted = {created.session.session_id, other_created.session.session_id, by_sql}

        def read_until_all_seen() -> str:
            assert grpcurl.stdout is not None
            text = first.decode()
            while any(f'"session_id": "{sid}"' not in text for sid in wanted):
                line = grpcurl.stdout.readline()
                if not line:
                    break
                text += line.decode()
            return text

        text = await asyncio.wait_for(asyncio.to_thread(read_until_all_seen), 20)
    finally:
        grpcurl.kill()
        grpcurl.wait()
        if grpcurl.stdout is not None:
            grpcurl.stdout.close()
    for sid in wanted:
        assert f'"session_id": "{sid}"' in text, text
    assert '"kind": "REVOCATION_EVENT_KIND_START"' in text
    assert '"reason": "REVOCATION_REASON_USER_WIDE"' in text
    stream.cancel()


_WATCHER = """
import sys, grpc
from session_authority.v1 import session_authority_pb2 as pb, session_authority_pb2_grpc as g
options = [("grpc.enable_http_proxy", 0)]
if sys.argv[3] == "small-window":  # the transport takes ~16 KB ahead of the application
    options += [("grpc.http2.lookahead_bytes", 16384), ("grpc.http2.bdp_probe", 0)]
ch = grpc.insecure_channel(sys.argv[1], options=options)
try:
    request = pb.WatchRevocationsRequest(after=sys.argv[2])
    for e in g.SessionAuthorityStub(ch).WatchRevocations(request):
        print(e.kind, e.cursor, e.session_id, flush=True)
except grpc.RpcError as exc:
    print("STATUS", exc.code().name, exc.details(), flush=True)
"""


def _watcher(
    target: str, after: str, out: Path, *, window: str = "default"
) -> subprocess.Popen[bytes]:
    """A watcher process printing one line per message (and the final status)."""
    with out.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-c", _WATCHER, target, after, window],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")},
        )


async def _until(check: Callable[[], bool], within: float = 20) -> None:
    for _ in range(round(within / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not true within {within} s")


def _lines(out: Path) -> list[list[str]]:
    """The watcher's complete lines (a SIGKILL may cut the last one)."""
    text = out.read_text()
    return [line.split(" ") for line in text.splitlines(keepends=True) if line.endswith("\n")]


async def test_killed_watcher_resumes_from_its_cursor(
    stubs: tuple[pb_grpc.SessionAuthorityAsyncStub, pb_grpc.SessionAuthorityAsyncStub],
    replicas: dict[str, Any],
    tmp_path: Path,
) -> None:
    """Revocations keep coming from replica A while a watcher process on B is
    SIGKILLed and another resumes from the last cursor it printed: together
    they see every revocation once (nothing missed, nothing twice past the cursor)."""
    one, other = stubs
    ids = await _insert(replicas["dsn"], "watch-kill", 300)
    start_stream = other.WatchRevocations(pb.WatchRevocationsRequest())
    start = (await _read(start_stream)).cursor
    start_stream.cancel()
    out = tmp_path / "first.txt"
    first = _watcher(replicas["b"], start, out)

    async def revoke() -> None:
        for sid in ids:
            await one.Invalidate(pb.InvalidateRequest(session_id=sid))

    writer = asyncio.create_task(revoke())
    try:
        await _until(lambda: sum(1 for line in _lines(out) if line[0] == str(REVOKED)) >= 60)
        first.kill()
        first.wait()
        seen_first = [line for line in _lines(out) if line[0] == str(REVOKED)]
        cursor = seen_first[-1][1]
        stream = other.WatchRevocations(pb.WatchRevocationsRequest(after=cursor))
        assert (await _read(stream)).cursor == cursor  # START: resumed where asked
        ours = set(ids)
        second: list[pb.RevocationEvent] = []
        async with asyncio.timeout(20):
            while len({s[2].strip() for s in seen_first} | {e.session_id for e in second}) < 300:
                [event] = await _take(stream, 1)
                if event.session_id in ours:
                    second.append(event)
        stream.cancel()
    finally:
        await writer
    first_ids = [s[2].strip() for s in seen_first]
    second_ids = [e.session_id for e in second]
    assert len(first_ids) + len(second_ids) == 300  # none twice
    assert sorted(first_ids + second_ids) == sorted(ids)  # none missed
    assert all(e.cursor > cursor for e in second)
    assert second_ids == ids[len(first_ids) :]  # in revocation order


async def test_out_of_order_commits_are_delivered_once_in_order(
    stubs: tuple[pb_grpc.SessionAuthorityAsyncStub, pb_grpc.SessionAuthorityAsyncStub],
    replicas: dict[str, Any],
) -> None:
    """T1 writes its event first (lower seq), T2 second; T2 commits first. A
    watcher that took T2's event while T1 was open would move past T1's and
    never see it: both arrive, once, T1's first."""
    _, other = stubs
    s1, s2 = await _insert(replicas["dsn"], "watch-order", 2)
    stream = other.WatchRevocations(pb.WatchRevocationsRequest())
    await _read(stream)
    t1, t2 = await asyncpg.connect(replicas["dsn"]), await asyncpg.connect(replicas["dsn"])
    try:
        tx1, tx2 = t1.transaction(), t2.transaction()
        await tx1.start()
        await tx2.start()
        revoke = "UPDATE sessions SET revoked_at = now() WHERE session_id = $1"
        await t1.execute(revoke, uuid.UUID(s1))
        await t2.execute(revoke, uuid.UUID(s2))
        seqs = await t2.fetch(
            "SELECT session_id::text, seq FROM revocation_events WHERE session_id = ANY($1)",
            [uuid.UUID(s1), uuid.UUID(s2)],
        )
        assert [r["session_id"] for r in seqs] == [s2]  # T1's is not visible yet
        await tx2.commit()
        await asyncio.sleep(0.5)  # the watch reads (woken by T2's NOTIFY, and polling)
        await tx1.commit()
    finally:
        await t1.close()
        await t2.close()
    events = await _take(stream, 2)
    assert [e.session_id for e in events] == [s1, s2]
    assert events[0].sequence < events[1].sequence
    # The same from a cursor taken before both: a resumed watcher agrees.
    stream.cancel()


async def test_slow_watcher_cut_off_while_a_fast_one_gets_all_5000(
    stubs: tuple[pb_grpc.SessionAuthorityAsyncStub, pb_grpc.SessionAuthorityAsyncStub],
    replicas: dict[str, Any],
    tmp_path: Path,
) -> None:
    """A watcher process frozen (SIGSTOP: it never reads) is cut off with
    RESOURCE_EXHAUSTED, and B's memory stays flat while InvalidateUser of 5,000
    sessions at a time flows; a watcher that keeps up gets all of them in order.

    The frozen process's transport takes what its HTTP/2 window allows: a few
    hundred events with the small window asked for, but some runs (gRPC's
    client grew the window before the freeze) took all 5,000 without the server
    ever waiting. The server can only tell a reader stopped once its writes
    wait; so 5,000 more are revoked while the watcher is frozen, up to 30,000
    in all, until it is cut off."""
    one, other = stubs
    out = tmp_path / "slow.txt"
    # Its HTTP/2 window is small, so that a few hundred events fill what the
    # frozen process's transport would take (the default takes megabytes).
    slow = _watcher(replicas["b"], "", out, window="small-window")
    await _until(lambda: bool(_lines(out)))
    os.kill(slow.pid, signal.SIGSTOP)
    server = psutil.Process(replicas["b_pid"])
    fast = other.WatchRevocations(pb.WatchRevocationsRequest())
    await _read(fast)
    got: list[pb.RevocationEvent] = []
    ids: list[str] = []
    growth = 0.0
    try:
        for wave in range(6):
            user = f"watch-bulk-{wave}"
            wave_ids = await _insert(replicas["dsn"], user, 5000)
            rss_before = server.memory_info().rss
            reply = await one.InvalidateUser(pb.InvalidateUserRequest(user_id=user))
            assert reply.revoked_count == 5000
            taken = await _take(fast, 5000, within=30)
            growth = max(growth, (server.memory_info().rss - rss_before) / 2**20)
            assert sorted(e.session_id for e in taken) == sorted(wave_ids)
            got += taken
            ids += wave_ids
            if _cut_off(replicas["logs"] / "b.log"):
                break
    finally:
        os.kill(slow.pid, signal.SIGCONT)
    fast.cancel()
    assert [e.cursor for e in got] == sorted(e.cursor for e in got)
    await asyncio.to_thread(slow.wait, 30)
    lines = _lines(out)
    status = [line for line in lines if line[0] == "STATUS"]
    assert status and status[0][1] == "RESOURCE_EXHAUSTED", lines[-3:]
    assert "watcher too slow" in " ".join(status[0])
    # What it took before the cut is a prefix of the stream: nothing out of order.
    taken_slow = [line[2].strip() for line in lines if line[0] == str(REVOKED)]
    assert taken_slow == [e.session_id for e in got[: len(taken_slow)]]
    assert len(taken_slow) < len(got)
    print(
        f"B's RSS grew at most {growth:.1f} MiB a wave; the frozen watcher took "
        f"{len(taken_slow)} of {len(got)}"
    )
    assert growth < 40, growth


def _cut_off(log: Path) -> bool:
    """Whether B has cut a watcher off (its log says so; no other test here does)."""
    return "Watcher cut off" in log.read_text(errors="replace")


async def test_resume_past_retention_or_from_elsewhere_is_refused(
    stubs: tuple[pb_grpc.SessionAuthorityAsyncStub, pb_grpc.SessionAuthorityAsyncStub],
    replicas: dict[str, Any],
) -> None:
    one, other = stubs
    stream = other.WatchRevocations(pb.WatchRevocationsRequest())
    old = (await _read(stream)).cursor
    stream.cancel()
    [sid] = await _insert(replicas["dsn"], "watch-retention", 1)
    await one.Invalidate(pb.InvalidateRequest(session_id=sid))
    conn = await asyncpg.connect(replicas["dsn"])
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
    store = PostgresSessionStore(
        replicas["dsn"], min_size=1, max_size=1, command_timeout=5, acquire_timeout=5
    )
    try:  # what the pruning job does once the retention has passed (here: 0 s)
        while await store.prune_revocation_events(0, 5_000):
            pass
    finally:
        await store.aclose()

    async def first_of(after: str) -> pb.RevocationEvent:
        call = other.WatchRevocations(pb.WatchRevocationsRequest(after=after))
        try:
            return await _read(call)
        finally:
            call.cancel()

    with pytest.raises(grpc.aio.AioRpcError) as expired:
        await first_of(old)
    assert expired.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "pruned" in (expired.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as ahead:
        await first_of(f"{2**62:020d}-{0:020d}")
    assert ahead.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await first_of("not-a-cursor")
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (bad.value.details() or "").startswith("after:")
    fresh = await first_of("")  # from now: accepted again, and resumable
    assert (await first_of(fresh.cursor)).cursor == fresh.cursor


async def test_draining_replica_ends_its_watchers_with_their_cursor(
    stubs: tuple[pb_grpc.SessionAuthorityAsyncStub, pb_grpc.SessionAuthorityAsyncStub],
    replicas: dict[str, Any],
) -> None:
    _, other = stubs
    stream = other.WatchRevocations(pb.WatchRevocationsRequest())
    start = await _read(stream)
    replicas["b_proc"].send_signal(signal.SIGTERM)

    async def to_the_end() -> None:
        async with asyncio.timeout(15):
            while True:  # the stream ends with an error: _read raises it
                await _read(stream)

    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await to_the_end()
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"resume after {start.cursor}" in (ended.value.details() or "")
    assert await asyncio.to_thread(replicas["b_proc"].wait, 20) == 0
    print(json.dumps({"drained": ended.value.details()}))
