"""The Python client (``session_authority.client``) against a real ``serve``: mTLS and API keys
on the port, Postgres behind it. Every method sync and async, the error tree on real refusals,
a frozen server (deadline), hedging past a stalled replica, and a server replaced mid-call (the
service config's retry reconnects to the replacement). The restart test leaves the
replacement serving (``client_server`` follows it)."""

from __future__ import annotations

import asyncio
import datetime
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from session_authority.client import (
    DeadlineExceeded,
    EventKind,
    Hedging,
    InvalidArgument,
    PermissionDenied,
    Reason,
    Retry,
    RevocationReason,
    ServerError,
    SessionAuthorityClient,
    Source,
    Unauthenticated,
    Unavailable,
    Validation,
)

from .client_support import READER_KEY, FreezableProxy, Serving

pytestmark = pytest.mark.e2e


@pytest.fixture
def server(client_server: Serving) -> Serving:
    return client_server


def _secret_free(token: str, *texts: object) -> None:
    for text in texts:
        assert token not in str(text) and token not in repr(text)


def test_every_method_sync(server: Serving) -> None:
    # dns:/// resolves localhost to every address it has (::1 too, where nothing listens):
    # round robin serves from those that answer.
    with server.client(target=f"dns:///localhost:{server.port}") as client:
        created = client.create("alice", ttl=datetime.timedelta(hours=1), metadata={"ip": "x"})
        assert created.token.startswith("sat_")
        _secret_free(created.token, created, created.session)
        session = created.session
        assert session.user_id == "alice" and session.metadata == {"ip": "x"}
        assert session.expires_at - session.created_at == datetime.timedelta(hours=1)

        answer = client.validate(created.token)
        assert answer.valid and answer.reason is None and answer.session == session
        _secret_free(created.token, answer)

        other = client.create("alice")
        revoked = client.invalidate(token=created.token)
        assert revoked.revoked and revoked.cache_purged and revoked.propagated
        assert client.invalidate(token=created.token).revoked is False  # idempotent
        after = client.validate(created.token)
        assert (after.valid, after.reason, after.session) == (False, Reason.REVOKED, None)

        by_id = client.invalidate(session_id=other.session.session_id)
        assert by_id.revoked
        assert client.validate(other.token).reason == Reason.REVOKED

        client.create("alice")
        client.create("alice")
        assert client.invalidate_user("alice").revoked_count == 2
        assert client.invalidate_user("alice").revoked_count == 0

        malformed = client.validate("not-a-token")
        assert (malformed.valid, malformed.reason, malformed.source) == (
            False, Reason.UNKNOWN, Source.TOKEN_FORMAT,
        )  # fmt: skip
        health = client.health()
        assert health.status == "healthy" and health.healthy
        assert health.document["postgres"]["connected"] is True


def test_every_method_async(server: Serving) -> None:
    async def scenario() -> None:
        async with server.async_client() as client:
            created = await client.create("bob", ttl=600, metadata={"k": "v"})
            assert created.session.user_id == "bob"
            assert (await client.validate(created.token)).valid
            assert (await client.invalidate(token=created.token)).revoked
            assert (await client.validate(created.token)).reason == Reason.REVOKED
            other = await client.create("bob")
            assert (await client.invalidate(session_id=other.session.session_id)).revoked
            await client.create("bob")
            assert (await client.invalidate_user("bob")).revoked_count == 1
            assert (await client.health()).status == "healthy"
            with pytest.raises(InvalidArgument):
                await client.create("")

    asyncio.run(scenario())


def test_the_lifecycle_methods_sync(server: Serving) -> None:
    """validate_many, invalidate_user(except_session_id=), list_sessions across pages, touch,
    and a watch that sees an Invalidate made by another client."""
    user = f"lina-{time.monotonic_ns()}"
    with server.client() as client, server.client() as other:
        created = [client.create(user, ttl=600) for _ in range(5)]
        tokens = [c.token for c in created]
        ids = [c.session.session_id for c in created]

        listed = client.list_sessions(user, page_size=2)  # 3 pages: 2, 2, 1
        assert [s.session_id for s in listed] == ids  # oldest first, none twice, none lost

        watch = client.watch_revocations()
        start = next(watch)
        assert start.kind == EventKind.START and start.cursor and watch.cursor == start.cursor
        assert other.invalidate(session_id=ids[0]).revoked
        event = next(watch)
        assert (event.kind, event.session_id, event.user_id, event.reason) == (
            EventKind.REVOKED, ids[0], user, RevocationReason.EXPLICIT,
        )  # fmt: skip
        assert event.revoked_at is not None and watch.cursor == event.cursor > start.cursor
        watch.close()
        assert list(watch) == []  # closed: the iteration ends, no error

        answers = client.validate_many([tokens[1], "not-a-token", tokens[0], tokens[1]])
        assert [(a.valid, a.reason) for a in answers] == [
            (True, None), (False, Reason.UNKNOWN), (False, Reason.REVOKED), (True, None),
        ]  # fmt: skip
        assert answers[0].session is not None and answers[0].session.session_id == ids[1]
        assert answers[1].source == Source.TOKEN_FORMAT
        assert all(not a.degraded and not a.from_local_cache for a in answers)
        assert len(client.validate_many([tokens[2]] * 250)) == 250  # three calls of <= 100
        _secret_free(tokens[1], answers)

        touched = client.touch(token=tokens[1], extend_by=3000)
        assert touched.written and touched.session.session_id == ids[1]
        assert touched.session.last_seen_at is not None
        assert touched.session.expires_at > created[1].session.expires_at
        with pytest.raises(ServerError) as gone:
            client.touch(session_id=ids[0])  # revoked: never revived
        assert gone.value.code.name == "FAILED_PRECONDITION"

        spared = client.invalidate_user(user, except_session_id=ids[4])
        assert spared.revoked_count == 3  # ids[1..3]; ids[0] was already revoked
        assert [s.session_id for s in client.list_sessions(user)] == [ids[4]]
        everything = list(client.list_sessions(user, include_revoked=True, page_size=2))
        assert len(everything) == 5 and everything[0].revoked_at is not None


def test_the_lifecycle_methods_async(server: Serving) -> None:
    user = f"mona-{time.monotonic_ns()}"

    async def scenario() -> None:
        async with server.async_client() as client, server.async_client() as other:
            created = [await client.create(user, ttl=600) for _ in range(5)]
            ids = [c.session.session_id for c in created]
            listed = [s.session_id async for s in client.list_sessions(user, page_size=2)]
            assert listed == ids

            watch = await client.watch_revocations()
            assert (await anext(watch)).kind == EventKind.START
            assert (await other.invalidate(session_id=ids[0])).revoked
            event = await anext(watch)
            assert (event.kind, event.session_id) == (EventKind.REVOKED, ids[0])
            resumed = await client.watch_revocations(after=watch.cursor)
            watch.close()
            assert [e async for e in watch] == []

            answers = await client.validate_many([created[1].token, created[0].token])
            assert [a.valid for a in answers] == [True, False]
            touched = await client.touch(session_id=ids[2], extend_by=1200)
            assert touched.session.session_id == ids[2] and touched.session.last_seen_at
            assert (await client.invalidate_user(user, except_session_id=ids[4])).revoked_count == 3
            # The resumed watch (after the first event) sees the user-wide revocations only.
            seen = [await anext(resumed) for _ in range(4)]
            resumed.close()
            assert seen[0].kind == EventKind.START
            assert {e.session_id for e in seen[1:]} == set(ids[1:4])
            assert {e.reason for e in seen[1:]} == {RevocationReason.USER_WIDE}

    asyncio.run(scenario())


def test_refusals_are_the_mapped_errors_and_never_carry_the_token(server: Serving) -> None:
    with server.client() as ops:
        token = ops.create("carol").token
    wrong_key = "not-one-of-our-keys-" + "x" * 24
    with server.client(api_key=wrong_key) as wrong, pytest.raises(Unauthenticated) as refused:
        wrong.validate(token)
    assert refused.value.code.name == "UNAUTHENTICATED"
    assert refused.value.details == "invalid API key"
    _secret_free(token, refused.value)
    with server.client(api_key=READER_KEY) as reader:
        assert reader.validate(token).valid  # a read: any authenticated caller
        with pytest.raises(PermissionDenied):
            reader.invalidate(token=token)  # a mutation: the allow-list only
    with server.client() as ops, pytest.raises(InvalidArgument, match="user_id"):
        ops.create("")
    with server.client(api_key=None) as certificate_only:  # mTLS identity, not allowed to mutate
        assert certificate_only.validate(token).valid
        with pytest.raises(PermissionDenied):
            certificate_only.invalidate_user("carol")

    async def wrong_key_async() -> None:
        async with server.async_client(api_key="wrong-" + "y" * 30) as client:
            with pytest.raises(Unauthenticated) as caught:
                await client.validate(token)
            _secret_free(token, caught.value)

    asyncio.run(wrong_key_async())


def test_a_frozen_server_is_deadline_exceeded(server: Serving) -> None:
    with server.client() as client:
        token = client.create("dave").token
        server.freeze()
        try:
            with pytest.raises(DeadlineExceeded):
                client.validate(token, timeout=0.5)

            async def frozen_async() -> None:
                async with server.async_client() as aclient:
                    with pytest.raises(DeadlineExceeded):
                        await aclient.validate(token, timeout=0.5)

            asyncio.run(frozen_async())
        finally:
            server.thaw()
        assert client.validate(token).valid


def test_hedging_answers_past_a_stalled_replica(server: Serving) -> None:
    """Two addresses, round robin: the server itself, and a proxy to it that stalls every call
    once frozen. A hedged validate whose first attempt lands on the stalled proxy is answered
    by its hedge, sent to the other address; without hedging, those calls time out."""
    proxy = FreezableProxy(server.port)
    target = f"ipv4:127.0.0.1:{proxy.port},127.0.0.1:{server.port}"
    hedging = Hedging(max_attempts=2, delay=0.05)
    try:
        with (
            server.client(target=target, hedging=hedging) as hedged,
            server.client(target=target) as plain,
        ):
            token = hedged.create("erin").token
            for client in (hedged, plain):  # both addresses connected and in the rotation
                for _ in range(4):
                    assert client.validate(token).valid
            proxy.frozen.set()
            # The control first, while the plain client's rotation still holds both
            # addresses (run last, after the hedged calls, it once found only the
            # server's): the same calls without hedging.
            outcomes: list[str] = []
            for _ in range(4):
                try:
                    outcomes.append(str(plain.validate(token, timeout=0.5).valid))
                except DeadlineExceeded:
                    outcomes.append("deadline")
            assert "deadline" in outcomes and "True" in outcomes, outcomes
            held = proxy.held
            answers = [hedged.validate(token, timeout=5).valid for _ in range(6)]
            assert answers == [True] * 6
            assert proxy.held > held  # some first attempts did go to the stalled address

            async def hedged_async() -> list[bool]:
                async with server.async_client(target=target, hedging=hedging) as aclient:
                    for _ in range(4):  # the warm-up goes through the stall too: hedged
                        await aclient.validate(token, timeout=5)
                    return [(await aclient.validate(token, timeout=5)).valid for _ in range(6)]

            assert asyncio.run(hedged_async()) == [True] * 6

    finally:
        proxy.close()


def test_a_call_in_flight_when_its_server_dies_is_retried_on_the_replacement(
    server: Serving,
) -> None:
    """A rolling restart in place: a replacement ``serve`` binds the same port (SO_REUSEPORT)
    and is ready; the old one is frozen with a validate in flight on its connection, then
    killed. The reset fails that attempt with UNAVAILABLE; the service config's retry sends it
    again, on a new connection, to the replacement. The control client (retries off) sees the
    UNAVAILABLE: proof that its call was in flight on the old server."""
    with server.client() as retried, server.client(retry=Retry(max_attempts=1)) as control:
        token = retried.create("frank").token
        assert retried.validate(token).valid and control.validate(token).valid  # on the old one
        old = server.process
        assert old is not None
        replacement = server.start()
        server.freeze()
        with ThreadPoolExecutor(2) as pool:
            calls: list[Future[Validation]] = [
                pool.submit(client.validate, token, timeout=20) for client in (retried, control)
            ]
            # Both calls wait, unread, in the frozen server's sockets; then it dies.
            _until_unread(server.port, connections=2)
            old.kill()
            old.wait()
            server.process = replacement
            assert calls[0].result().valid
            with pytest.raises(Unavailable):
                calls[1].result()
        # The control reconnects to the replacement too. Its first reconnect may have
        # raced the old server's exit (refused or reset, then gRPC's 100 ms reconnect
        # backoff), and without retries a call in that backoff fails at once: so the
        # control is asked again until it has reconnected, a few times at most.
        assert _eventually_valid(control, token)
    assert old.returncode is not None


def _eventually_valid(client: SessionAuthorityClient, token: str, attempts: int = 50) -> bool:
    for _ in range(attempts):
        try:
            return client.validate(token).valid
        except Unavailable:
            time.sleep(0.1)
    return False


def _until_unread(port: int, *, connections: int) -> None:
    """Until ``connections`` established connections to ``port`` hold bytes their (frozen)
    server has not read (rx_queue in /proc/net/tcp6: gRPC's sockets are IPv6, 127.0.0.1 mapped,
    and /proc/net/tcp): the calls were sent."""
    deadline = time.monotonic() + 30
    while True:
        unread = 0
        lines = [
            line
            for table in ("tcp", "tcp6")
            for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        ]
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rpartition(":")[2], 16)
            rx_queue = int(fields[4].partition(":")[2], 16)
            if local_port == port and fields[3] == "01" and rx_queue > 0:
                unread += 1
        if unread >= connections:
            return
        assert time.monotonic() < deadline, f"{unread} of {connections} calls reached the server"
        time.sleep(0.05)
