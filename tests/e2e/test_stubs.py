"""The generated Python stubs against the real server process, over a real channel."""

from __future__ import annotations

import re
import secrets
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2

from session_authority.core.domain import new_token
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc
from tests.third_party import health_stub

from .e2e_support import SERVICE, ServerProcess

pytestmark = pytest.mark.e2e

Create = Callable[..., pb.CreateSessionResponse]


def _user() -> str:
    return f"user-{uuid.uuid4()}"


def _validate(stub: pb_grpc.SessionAuthorityStub, token: str) -> pb.ValidateSessionResponse:
    reply: pb.ValidateSessionResponse = stub.ValidateSession(
        pb.ValidateSessionRequest(token=token), timeout=10
    )
    return reply


def _invalidate(stub: pb_grpc.SessionAuthorityStub, **target: str) -> pb.InvalidateResponse:
    reply: pb.InvalidateResponse = stub.Invalidate(pb.InvalidateRequest(**target), timeout=10)
    return reply


def test_readme_walk_through(stub: pb_grpc.SessionAuthorityStub, create: Create) -> None:
    user = _user()
    created = create(user, ttl=Duration(seconds=3600), metadata={"device": "laptop"})
    token, session = created.token, created.session
    assert re.fullmatch(r"[A-Za-z0-9_-]{40,}", token), "an opaque, URL-safe token"
    assert str(uuid.UUID(session.session_id)) == session.session_id
    assert session.user_id == user
    assert dict(session.metadata) == {"device": "laptop"}
    lifetime = session.expires_at.ToDatetime() - session.created_at.ToDatetime()
    assert lifetime == timedelta(hours=1)

    first = _validate(stub, token)
    assert first.valid
    assert first.source == pb.SOURCE_DATABASE
    assert first.reason == pb.REASON_UNSPECIFIED
    assert first.session == session

    second = _validate(stub, token)
    assert second.valid
    assert second.source == pb.SOURCE_CACHE
    assert second.session == session  # the cache answers exactly what Postgres did

    revoked = _invalidate(stub, token=token)
    assert revoked.revoked
    assert revoked.cache_purged

    after = _validate(stub, token)
    assert not after.valid
    assert after.reason == pb.REASON_REVOKED
    assert not after.HasField("session")

    again = _invalidate(stub, token=token)
    assert not again.revoked  # idempotent: nothing live left to revoke
    assert not _validate(stub, token).valid


def test_invalidate_by_session_id(stub: pb_grpc.SessionAuthorityStub, create: Create) -> None:
    created = create(_user())
    token, session_id = created.token, created.session.session_id
    lifetime = created.session.expires_at.ToDatetime() - created.session.created_at.ToDatetime()
    assert lifetime == timedelta(days=1)  # no ttl: the server's default
    assert _validate(stub, token).valid  # now cached

    revoked = _invalidate(stub, session_id=session_id)
    assert revoked.revoked
    assert revoked.cache_purged

    after = _validate(stub, token)
    assert not after.valid
    assert after.reason == pb.REASON_REVOKED

    assert not _invalidate(stub, session_id=session_id).revoked
    assert not _invalidate(stub, token=token).revoked
    # An unknown (well-formed) session id is a normal answer too.
    assert not _invalidate(stub, session_id=str(uuid.uuid4())).revoked


def test_invalidate_user_revokes_every_session(
    stub: pb_grpc.SessionAuthorityStub, create: Create
) -> None:
    user, bystander = _user(), _user()
    tokens = [create(user).token for _ in range(3)]
    other = create(bystander).token
    assert _validate(stub, tokens[0]).valid  # one cached, two not
    assert _validate(stub, tokens[0]).source == pb.SOURCE_CACHE

    reply: pb.InvalidateUserResponse = stub.InvalidateUser(
        pb.InvalidateUserRequest(user_id=user), timeout=10
    )
    assert reply.revoked_count == 3
    assert reply.cache_purged

    for token in tokens:
        answer = _validate(stub, token)
        assert not answer.valid
        assert answer.reason == pb.REASON_REVOKED
    assert _validate(stub, other).valid

    again: pb.InvalidateUserResponse = stub.InvalidateUser(
        pb.InvalidateUserRequest(user_id=user), timeout=10
    )
    assert again.revoked_count == 0


def test_list_user_sessions_and_invalidate_user_except_session_id(
    stub: pb_grpc.SessionAuthorityStub, create: Create
) -> None:
    user = _user()
    made = [create(user) for _ in range(3)]
    pages: list[str] = []
    token = ""
    while True:
        page: pb.ListUserSessionsResponse = stub.ListUserSessions(
            pb.ListUserSessionsRequest(user_id=user, page_size=1, page_token=token), timeout=10
        )
        pages += [s.session_id for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert pages == [m.session.session_id for m in made]

    kept = made[2]
    reply: pb.InvalidateUserResponse = stub.InvalidateUser(
        pb.InvalidateUserRequest(user_id=user, except_session_id=kept.session.session_id),
        timeout=10,
    )
    assert (reply.revoked_count, reply.cache_purged, reply.propagated) == (2, True, True)
    assert [_validate(stub, m.token).valid for m in made] == [False, False, True]
    with pytest.raises(grpc.RpcError) as caught:
        stub.InvalidateUser(
            pb.InvalidateUserRequest(user_id=_user(), except_session_id=kept.session.session_id),
            timeout=10,
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "except_session_id" in (caught.value.details() or "")
    assert _validate(stub, kept.token).valid


@pytest.mark.parametrize("kind", ["random", "well-formed"])
def test_unknown_token_is_a_normal_answer(
    stub: pb_grpc.SessionAuthorityStub, e2e_server: ServerProcess, kind: str
) -> None:
    # A random string, and one with the shape of the server's own tokens
    # (which must reach Postgres to be found unknown).
    token = secrets.token_urlsafe(32) if kind == "random" else new_token()
    e2e_server.presented(token)
    for _ in range(2):  # a cold answer, then a possibly cached one
        answer, call = stub.ValidateSession.with_call(
            pb.ValidateSessionRequest(token=token), timeout=10
        )
        assert call.code() is grpc.StatusCode.OK
        assert not answer.valid
        assert answer.reason == pb.REASON_UNKNOWN
        assert not answer.HasField("session")


def test_expired_session(stub: pb_grpc.SessionAuthorityStub, create: Create) -> None:
    created = create(_user(), ttl=Duration(seconds=1), metadata={"ü": "✓"})
    token = created.token
    first = _validate(stub, token)
    assert first.valid
    assert dict(first.session.metadata) == {"ü": "✓"}
    assert _validate(stub, token).source == pb.SOURCE_CACHE  # cached, for at most 1 s
    expires_at = created.session.expires_at.ToDatetime(tzinfo=UTC)
    time.sleep(max(0.0, (expires_at - datetime.now(UTC)).total_seconds()) + 0.1)
    for _ in range(2):  # the cache entry does not outlive the session
        answer = _validate(stub, token)
        assert not answer.valid
        assert answer.reason == pb.REASON_EXPIRED
    # Nothing live to revoke.
    assert not _invalidate(stub, token=token).revoked


# --- bad input: INVALID_ARGUMENT naming the field, never echoing a token ---------

_LONG_TOKEN = secrets.token_urlsafe(600)[:600]
_NON_ASCII_TOKEN = f"tökén-{secrets.token_hex(8)}…"
_BAD_TOKENS = {
    "empty": "",
    "600-chars": _LONG_TOKEN,
    "non-ascii": _NON_ASCII_TOKEN,
}


def _invalid_argument(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    return error


def _assert_no_echo(error: grpc.RpcError, token: str) -> None:
    if not token:
        return
    call: Any = error  # the raised RpcError is also the grpc.Call
    texts = [call.details() or "", call.debug_error_string() or ""]
    texts += [f"{item.key}={item.value!r}" for item in call.trailing_metadata() or ()]
    for text in texts:
        assert token not in text
        assert token[6:22] not in text  # nor a recognisable piece of it


@pytest.mark.parametrize("token", list(_BAD_TOKENS.values()), ids=list(_BAD_TOKENS))
def test_validate_rejects_bad_token(
    stub: pb_grpc.SessionAuthorityStub, e2e_server: ServerProcess, token: str
) -> None:
    e2e_server.presented(token)
    error = _invalid_argument(lambda: stub.ValidateSession(pb.ValidateSessionRequest(token=token)))
    assert "token" in (error.details() or "")
    _assert_no_echo(error, token)


@pytest.mark.parametrize("token", list(_BAD_TOKENS.values()), ids=list(_BAD_TOKENS))
def test_invalidate_rejects_bad_token(
    stub: pb_grpc.SessionAuthorityStub, e2e_server: ServerProcess, token: str
) -> None:
    e2e_server.presented(token)
    error = _invalid_argument(lambda: stub.Invalidate(pb.InvalidateRequest(token=token)))
    assert "token" in (error.details() or "")
    _assert_no_echo(error, token)


def test_create_rejects_empty_user_id(stub: pb_grpc.SessionAuthorityStub) -> None:
    error = _invalid_argument(lambda: stub.CreateSession(pb.CreateSessionRequest(user_id="")))
    assert "user_id" in (error.details() or "")


def test_invalidate_user_rejects_empty_user_id(stub: pb_grpc.SessionAuthorityStub) -> None:
    error = _invalid_argument(lambda: stub.InvalidateUser(pb.InvalidateUserRequest(user_id="")))
    assert "user_id" in (error.details() or "")


@pytest.mark.parametrize(
    "ttl",
    [Duration(seconds=0), Duration(seconds=-60), Duration(seconds=10 * 365 * 86_400)],
    ids=["zero", "negative", "ten-years"],
)
def test_create_rejects_bad_ttl(stub: pb_grpc.SessionAuthorityStub, ttl: Duration) -> None:
    request = pb.CreateSessionRequest(user_id=_user(), ttl=ttl)
    assert request.HasField("ttl")
    error = _invalid_argument(lambda: stub.CreateSession(request))
    assert "ttl" in (error.details() or "")


@pytest.mark.parametrize("seconds", [10**14, -(10**14)], ids=["huge", "huge-negative"])
def test_create_rejects_out_of_range_ttl(stub: pb_grpc.SessionAuthorityStub, seconds: int) -> None:
    request = pb.CreateSessionRequest(user_id=_user(), ttl=Duration(seconds=seconds))
    error = _invalid_argument(lambda: stub.CreateSession(request))
    assert "ttl" in (error.details() or "")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"user_id": "u" * 257}, "user_id"),
        ({"user_id": "   "}, "user_id"),
        ({"user_id": "a\x00b"}, "user_id"),
        ({"user_id": "x", "metadata": {str(i): "v" for i in range(33)}}, "metadata"),
        ({"user_id": "x", "metadata": {"k" * 65: "v"}}, "metadata"),
        ({"user_id": "x", "metadata": {"k": "v" * 1025}}, "metadata"),
        ({"user_id": "x", "metadata": {"": "v"}}, "metadata"),
    ],
    ids=[
        "user-257-chars",
        "user-blank",
        "user-nul",
        "33-entries",
        "long-key",
        "long-value",
        "empty-key",
    ],
)
def test_create_rejects_bad_fields(
    stub: pb_grpc.SessionAuthorityStub, fields: dict[str, Any], field: str
) -> None:
    error = _invalid_argument(lambda: stub.CreateSession(pb.CreateSessionRequest(**fields)))
    assert field in (error.details() or "")


def test_invalidate_needs_a_target(stub: pb_grpc.SessionAuthorityStub) -> None:
    error = _invalid_argument(lambda: stub.Invalidate(pb.InvalidateRequest()))
    details = error.details() or ""
    assert "token" in details
    assert "session_id" in details


def test_invalidate_rejects_malformed_session_id(stub: pb_grpc.SessionAuthorityStub) -> None:
    error = _invalid_argument(
        lambda: stub.Invalidate(pb.InvalidateRequest(session_id="not-a-uuid"))
    )
    assert "session_id" in (error.details() or "")


# --- the standard health service and deadlines ---------------------------------------


@pytest.mark.parametrize("service", ["", SERVICE])
def test_standard_health_check_serving(channel: grpc.Channel, service: str) -> None:
    health = health_stub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_standard_health_check_unknown_service(channel: grpc.Channel) -> None:
    health = health_stub(channel)
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


def test_one_millisecond_deadline_is_ok_or_deadline_exceeded(
    stub: pb_grpc.SessionAuthorityStub, create: Create, e2e_server: ServerProcess
) -> None:
    token = create(_user()).token
    calls: dict[str, Callable[[], object]] = {
        "ValidateSession": lambda: stub.ValidateSession(
            pb.ValidateSessionRequest(token=token), timeout=0.001
        ),
        "CreateSession": lambda: e2e_server.record(
            stub.CreateSession(pb.CreateSessionRequest(user_id=_user()), timeout=0.001).token
        ),
        "Invalidate": lambda: stub.Invalidate(
            pb.InvalidateRequest(session_id=str(uuid.uuid4())), timeout=0.001
        ),
        "Health": lambda: stub.Health(pb.HealthRequest(), timeout=0.001),
    }
    seen: dict[str, set[str]] = {name: set() for name in calls}
    for _ in range(10):
        for name, call in calls.items():
            try:
                call()
                seen[name].add("OK")
            except grpc.RpcError as exc:
                seen[name].add(exc.code().name)
    allowed = {"OK", "DEADLINE_EXCEEDED"}
    assert all(codes <= allowed for codes in seen.values()), seen
    # The server is none the worse for it.
    assert _validate(stub, token).valid


def test_validate_sessions_through_the_stubs(
    stub: pb_grpc.SessionAuthorityStub, create: Create, e2e_server: ServerProcess
) -> None:
    user = _user()
    sessions = [create(user, metadata={"n": str(i) * (i * 90)}) for i in range(3)]
    tokens = [s.token for s in sessions]
    bad = e2e_server.presented("not a token")
    request = pb.ValidateSessionsRequest(tokens=[tokens[0], bad, tokens[1], tokens[2], tokens[0]])

    def validate() -> list[pb.ValidateSessionResponse]:
        reply: pb.ValidateSessionsResponse = stub.ValidateSessions(request, timeout=10)
        return list(reply.results)

    first = validate()
    assert [(r.valid, r.source) for r in first] == [
        (True, pb.SOURCE_DATABASE),
        (False, pb.SOURCE_TOKEN_FORMAT),
        (True, pb.SOURCE_DATABASE),
        (True, pb.SOURCE_DATABASE),
        (True, pb.SOURCE_DATABASE),
    ]
    assert [r.session for r in first if r.valid] == [
        sessions[0].session,
        sessions[1].session,
        sessions[2].session,
        sessions[0].session,
    ]
    again = validate()
    assert [(r.valid, r.source, r.degraded) for r in again] == [
        (True, pb.SOURCE_CACHE, False),
        (False, pb.SOURCE_TOKEN_FORMAT, False),
        (True, pb.SOURCE_CACHE, False),
        (True, pb.SOURCE_CACHE, False),
        (True, pb.SOURCE_CACHE, False),
    ]  # from this process's L1 copies (from_local_cache), or Redis once they are 1 s old
    assert all(r.HasField("cache_age") for r in again if r.valid)
    assert _invalidate(stub, session_id=sessions[2].session.session_id).revoked
    assert [(r.valid, r.reason) for r in validate()][3] == (False, pb.REASON_REVOKED)

    with pytest.raises(grpc.RpcError) as refused:
        stub.ValidateSessions(pb.ValidateSessionsRequest(tokens=[tokens[0]] * 101), timeout=10)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "tokens" in (refused.value.details() or "")
