"""Every caller and every byte untrusted: a real ``serve`` process under hostile input.

Property-based (hypothesis) over every RPC's fields, invalid UTF-8 and huge values as raw
bytes, raw garbage as gRPC messages and as HTTP/2 frames, slow, stalled and abandoned
streams. The answer is always a clean refusal, never the framework's ``UNKNOWN`` and
never ``INTERNAL``: ``INVALID_ARGUMENT`` naming the field (never echoing a token), or
``RESOURCE_EXHAUSTED`` past the message size limit. Throughout, a bystander on its own
connection keeps validating a real token and must always be answered; at the end the
process is still up, and its DEBUG log holds no traceback, no "unexpected error" and no
token. The number of cases each test tried is printed at the end of the run.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import session_authority
from session_authority.core.domain import (
    MAX_BATCH_TOKENS,
    check_metadata,
    check_session_id,
    check_ttl,
    check_user_id,
    new_token,
    parse_token,
)
from session_authority.core.errors import InvalidArgument
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis, find_free_port
from session_authority.transport.mapping import ttl_from_pb
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc
from tests.third_party import health_stub

from .e2e_support import BIN, ServerProcess, clean_env, stop_process
from .hostile import (
    BYSTANDER,
    CASES,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Bystander,
    RawConnection,
    frame,
    frames_in,
    grpc_headers,
    grpc_message,
    length_delimited,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

SERVICE = "/session_authority.v1.SessionAuthority/"
_DESCRIPTOR = pb.DESCRIPTOR.services_by_name["SessionAuthority"]
#: Every unary RPC, read from the service's descriptor: an RPC added to the proto is
#: covered at once by the cases over any RPC (random bytes, invalid UTF-8 in each of its
#: string fields, the size limit), before it has cases of its own.
METHODS = [m.name for m in _DESCRIPTOR.methods if not m.server_streaming]
MAX_MESSAGE = 64 * 1024  # bootstrap's grpc.max_receive_message_length
FIELDS = (
    "request",
    "token",
    "user_id",
    "metadata",
    "ttl",
    "session_id",
    "target",
    "page_size",
    "page_token",
    "except_session_id",
    "extend_by",
    "tokens",
)
REFUSAL = re.compile(rf"^({'|'.join(FIELDS)}): [\x20-\x7e]+$")
DEFAULT_TTL, MAX_TTL = timedelta(days=1), timedelta(days=30)
OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.max_send_message_length", 1 << 22)]

CASE_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    database=None,  # nothing written into the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Hostile:
    server: ServerProcess
    channel: grpc.Channel
    stub: pb_grpc.SessionAuthorityStub
    bystander: Bystander

    def raw(self, method: str) -> Callable[..., bytes]:
        # No serializers: the bytes go out as they are, the reply comes back as bytes.
        return self.channel.unary_unary(SERVICE + method)

    def still_serving(self) -> None:
        assert self.server.process.poll() is None, f"server exited:\n{self.server.tail()}"
        with grpc.insecure_channel(self.server.target, options=OPTIONS) as channel:
            reply = health_stub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _wait_serving(server: ServerProcess) -> None:
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(server.target, options=OPTIONS) as channel:
        while True:
            assert server.process.poll() is None, f"serve exited:\n{server.tail()}"
            with contextlib.suppress(grpc.RpcError):
                reply = health_stub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            assert time.monotonic() < deadline, f"not SERVING in 30 s:\n{server.tail()}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    workdir = tmp_path_factory.mktemp("hostile")
    password = f"hostile-pw-{secrets.token_hex(8)}"
    with contextlib.ExitStack() as stack:
        postgres = stack.enter_context(EmbeddedPostgres(workdir / "pg", password=password))
        redis = stack.enter_context(EmbeddedRedis(workdir / "redis"))
        env = clean_env(
            DATABASE_URL=postgres.url,
            REDIS_URL=redis.url,
            HOST="127.0.0.1",
            LOG_LEVEL="DEBUG",
            ADMIN_PORT="0",
        )
        cli = BIN / "session-authority"
        argv = [str(cli)] if cli.exists() else [sys.executable, "-m", "session_authority.cli"]
        port = find_free_port()
        log_path = workdir / "server.log"
        with log_path.open("wb") as out:
            process = subprocess.Popen(
                [*argv, "serve", "--migrate", "--port", str(port), "--allow-unauthenticated"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        stack.callback(stop_process, process)
        server = ServerProcess(
            target=f"127.0.0.1:{port}",
            log_path=log_path,
            migrate_log_path=log_path,
            process=process,
            workdir=workdir,
            created_tokens=[],
            password=password,
            resources=contextlib.ExitStack(),
        )
        _wait_serving(server)
        channel = stack.enter_context(grpc.insecure_channel(server.target, options=OPTIONS))
        stub = pb_grpc.SessionAuthorityStub(channel)
        token = stub.CreateSession(pb.CreateSessionRequest(user_id="bystander"), timeout=10).token
        server.record(token)
        bystander = Bystander(server.target, token)
        bystander.start()
        stack.callback(bystander.stop)
        yield Hostile(server, channel, stub, bystander)

        bystander.stop()
        BYSTANDER["answered"] += bystander.answered
        assert bystander.failures == [], bystander.failures[:5]
        assert bystander.answered > 0
        Hostile(server, channel, stub, bystander).still_serving()
        assert stop_process(process) == 0, server.tail()
        log = server.log_text()
        for bad in ("Traceback", "unexpected error", "Unexpected"):
            assert bad not in log, f"{bad!r} in the server log:\n{server.tail(60)}"
        assert server.leaks(log) == []


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _check_refusal(code: grpc.StatusCode, details: str, *secrets_sent: str) -> None:
    if code is grpc.StatusCode.NOT_FOUND:  # TouchSession of a well-formed unknown session
        assert details == "session: no such session", details
        return
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, details)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        assert REFUSAL.match(details), details
        for secret in secrets_sent:
            if len(secret) >= 8:
                assert secret not in details


# --- raw bytes as messages ------------------------------------------------------------


@CASE_SETTINGS
@given(method=st.sampled_from(METHODS), raw=st.binary(max_size=4096))
def test_random_bytes_as_any_rpc_are_refused_cleanly(
    hostile: Hostile, method: str, raw: bytes
) -> None:
    CASES["random bytes as a request"] += 1
    code, details = _code(lambda: hostile.raw(method)(raw, timeout=10))
    _check_refusal(code, details)


def _bad_utf8() -> st.SearchStrategy[bytes]:
    def invalid(data: bytes) -> bool:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return True
        return False

    return st.binary(min_size=1, max_size=300).filter(invalid)


def _top_level_strings() -> dict[str, tuple[str, Callable[[bytes], bytes]]]:
    """Each string field (repeated or not) of each unary RPC's request, from the descriptor."""
    return {
        f"{method}.{field.name}": (method, partial(length_delimited, field.number))
        for method in METHODS
        for field in _DESCRIPTOR.methods_by_name[method].input_type.fields
        if field.type == FieldDescriptor.TYPE_STRING
    }


#: Every string field, as (method, how to wrap the bad bytes into a request): each
#: top-level one from the descriptor, then those nested in maps and the ones written
#: beside another field, by hand.
STRING_FIELDS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    **_top_level_strings(),
    "CreateSession.user_id": ("CreateSession", lambda b: length_delimited(1, b)),
    "CreateSession.metadata key": (
        "CreateSession",
        lambda b: length_delimited(1, b"u") + length_delimited(3, length_delimited(1, b)),
    ),
    "CreateSession.metadata value": (
        "CreateSession",
        lambda b: (
            length_delimited(1, b"u")
            + length_delimited(3, length_delimited(1, b"k") + length_delimited(2, b))
        ),
    ),
    "ValidateSession.token": ("ValidateSession", lambda b: length_delimited(1, b)),
    "ValidateSessions.tokens": (
        "ValidateSessions",
        lambda b: length_delimited(1, b"sat_") + length_delimited(1, b),
    ),
    "Invalidate.token": ("Invalidate", lambda b: length_delimited(1, b)),
    "Invalidate.session_id": ("Invalidate", lambda b: length_delimited(2, b)),
    "InvalidateUser.user_id": ("InvalidateUser", lambda b: length_delimited(1, b)),
    "InvalidateUser.except_session_id": (
        "InvalidateUser",
        lambda b: length_delimited(1, b"u") + length_delimited(2, b),
    ),
    "ListUserSessions.user_id": ("ListUserSessions", lambda b: length_delimited(1, b)),
    "ListUserSessions.page_token": (
        "ListUserSessions",
        lambda b: length_delimited(1, b"u") + length_delimited(3, b),
    ),
    "TouchSession.token": ("TouchSession", lambda b: length_delimited(1, b)),
    "TouchSession.session_id": ("TouchSession", lambda b: length_delimited(2, b)),
}


@CASE_SETTINGS
@given(where=st.sampled_from(sorted(STRING_FIELDS)), bad=_bad_utf8())
def test_invalid_utf8_in_any_string_field_is_invalid_argument(
    hostile: Hostile, where: str, bad: bytes
) -> None:
    CASES["invalid UTF-8 in a string field"] += 1
    method, wrap = STRING_FIELDS[where]
    code, details = _code(lambda: hostile.raw(method)(wrap(bad), timeout=10))
    assert code is grpc.StatusCode.INVALID_ARGUMENT, (where, code, details)
    assert details == f"request: not a valid session_authority.v1.{method}Request"


@pytest.mark.parametrize("method", METHODS)
def test_messages_past_the_size_limit_are_resource_exhausted(hostile: Hostile, method: str) -> None:
    CASES["oversized messages"] += 1
    huge = length_delimited(1, b"x" * (MAX_MESSAGE + 1))
    code, _ = _code(lambda: hostile.raw(method)(huge, timeout=10))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED


# --- field values -----------------------------------------------------------------------

#: Text of every kind (surrogates cannot be encoded: protobuf refuses them client-side),
#: sometimes huge, sometimes token-shaped.
TEXT = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=300),
    st.text(st.characters(codec="ascii"), min_size=400, max_size=600),
    st.integers(1, 60_000).map(lambda n: "é" * (n // 2)),
    st.from_regex(r"sat_[A-Za-z0-9_\-]{48}", fullmatch=True),
)
SMALL_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=80)
DURATIONS = st.builds(
    Duration,
    seconds=st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-10, 40 * 86_400)),
    nanos=st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(0, 999_999_999)),
)


def _first_problem(checks: list[Callable[[], object]]) -> str | None:
    """The field the service must name: the first check that fails, in its order."""
    for check in checks:
        try:
            check()
        except InvalidArgument as exc:
            return exc.field
    return None


def _expect(code: grpc.StatusCode, details: str, field: str | None, size: int) -> None:
    if size > MAX_MESSAGE:
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    elif field is None:
        assert code is grpc.StatusCode.OK, (code, details)
    else:
        assert code is grpc.StatusCode.INVALID_ARGUMENT, (code, details, field)
        assert details.startswith(f"{field}: "), (details, field)


@CASE_SETTINGS
@given(
    user_id=TEXT,
    metadata=st.dictionaries(SMALL_TEXT, SMALL_TEXT, max_size=40),
    ttl=st.none() | DURATIONS,
)
def test_create_session_fields(
    hostile: Hostile, user_id: str, metadata: dict[str, str], ttl: Duration | None
) -> None:
    CASES["CreateSession fields"] += 1
    request = pb.CreateSessionRequest(user_id=user_id, metadata=metadata, ttl=ttl)
    field = _first_problem(
        [
            lambda: ttl_from_pb(request),
            lambda: check_user_id(user_id),
            lambda: check_ttl(ttl_from_pb(request), DEFAULT_TTL, MAX_TTL),
            lambda: check_metadata(metadata),
        ]
    )
    try:
        reply = hostile.stub.CreateSession(request, timeout=10)
        hostile.server.record(reply.token)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
    _expect(code, details, field, request.ByteSize())


@CASE_SETTINGS
@given(token=TEXT)
def test_validate_session_token(hostile: Hostile, token: str) -> None:
    CASES["ValidateSession.token"] += 1
    if _could_be_secret(token):
        hostile.server.presented(token)
    request = pb.ValidateSessionRequest(token=token)
    field = _first_problem([lambda: parse_token(token)])
    code, details = _code(lambda: hostile.stub.ValidateSession(request, timeout=10))
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and request.ByteSize() <= MAX_MESSAGE:
        # The per-caller limit on unknown tokens (forged, well-formed ones), not a crash.
        assert details.startswith("too many unknown tokens"), details
        return
    _expect(code, details, field, request.ByteSize())
    if len(token) >= 8:
        assert token not in details


@settings(CASE_SETTINGS, max_examples=30)
@given(tokens=st.lists(TEXT, max_size=110))
def test_validate_sessions_tokens(hostile: Hostile, tokens: list[str]) -> None:
    """Any batch: refused whole only when over the limit (or the message size);
    otherwise one answer per token, a malformed one failing its own entry."""
    CASES["ValidateSessions.tokens"] += 1
    for token in tokens:
        if _could_be_secret(token):
            hostile.server.presented(token)
    request = pb.ValidateSessionsRequest(tokens=tokens)
    field = "tokens" if len(tokens) > MAX_BATCH_TOKENS else None
    replies: list[pb.ValidateSessionsResponse] = []

    def call() -> None:
        replies.append(hostile.stub.ValidateSessions(request, timeout=10))

    code, details = _code(call)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and request.ByteSize() <= MAX_MESSAGE:
        assert details.startswith("too many unknown tokens"), details
        return
    _expect(code, details, field, request.ByteSize())
    if code is grpc.StatusCode.OK:
        [reply] = replies
        assert len(reply.results) == len(tokens)
        for token, result in zip(tokens, reply.results, strict=True):
            assert not result.valid  # none of these was ever issued
            try:
                parse_token(token)
            except InvalidArgument:  # malformed: its own entry says so
                assert (result.reason, result.source) == (pb.REASON_UNKNOWN, pb.SOURCE_TOKEN_FORMAT)
    for token in tokens:
        if len(token) >= 8:
            assert token not in details


_SERVER_SOURCE = "\n".join(
    path.read_text(errors="replace")
    for path in Path(next(iter(session_authority.__path__))).rglob("*.py")
)


def _could_be_secret(text: str) -> bool:
    """Whether finding ``text`` in the server's log would mean it was echoed:
    shorter strings turn up in any log by chance, and hypothesis also tries
    string literals of the code under test ("CreateSession" once), which the
    log names for reasons of its own."""
    return len(text) >= 8 and text not in _SERVER_SOURCE


def _no_target() -> None:
    raise InvalidArgument("target", "set one of token or session_id")


@CASE_SETTINGS
@given(target=st.sampled_from(["token", "session_id", None]), value=TEXT)
def test_invalidate_target(hostile: Hostile, target: str | None, value: str) -> None:
    CASES["Invalidate target"] += 1
    if target == "token" and _could_be_secret(value):
        hostile.server.presented(value)
    request = pb.InvalidateRequest(**({} if target is None else {target: value}))
    checks: list[Callable[[], object]]
    if target == "token":
        checks = [lambda: parse_token(value)]
    elif target == "session_id":
        checks = [lambda: check_session_id(value)]
    else:
        checks = [_no_target]
    field = _first_problem(checks)
    code, details = _code(lambda: hostile.stub.Invalidate(request, timeout=10))
    _expect(code, details, field, request.ByteSize())
    if len(value) >= 8 and target == "token":
        assert value not in details


@CASE_SETTINGS
@given(user_id=TEXT)
def test_invalidate_user_id(hostile: Hostile, user_id: str) -> None:
    CASES["InvalidateUser.user_id"] += 1
    request = pb.InvalidateUserRequest(user_id=user_id)
    field = _first_problem([lambda: check_user_id(user_id)])
    code, details = _code(lambda: hostile.stub.InvalidateUser(request, timeout=10))
    _expect(code, details, field, request.ByteSize())


@settings(CASE_SETTINGS, max_examples=25)
@given(user_id=TEXT, page_size=st.integers(-(2**31), 2**31 - 1), page_token=SMALL_TEXT)
def test_list_user_sessions_fields(
    hostile: Hostile, user_id: str, page_size: int, page_token: str
) -> None:
    """Any user id, page size and (never issued) page token: answered, or refused
    naming the first bad field; a made-up token is never accepted."""
    CASES["ListUserSessions fields"] += 1
    request = pb.ListUserSessionsRequest(
        user_id=user_id, page_size=page_size, page_token=page_token
    )

    def made_up_token() -> None:
        if page_token:
            raise InvalidArgument("page_token", "made up")

    def page_size_ok() -> None:
        if page_size < 0:
            raise InvalidArgument("page_size", "negative")

    checks: list[Callable[[], object]] = [
        lambda: check_user_id(user_id),
        page_size_ok,
        made_up_token,
    ]
    field = _first_problem(checks)
    code, details = _code(lambda: hostile.stub.ListUserSessions(request, timeout=10))
    _expect(code, details, field, request.ByteSize())


# --- HTTP/2 -----------------------------------------------------------------------------

FRAMES = st.lists(
    st.tuples(
        st.sampled_from(
            [DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, 2, 5, 9, 0xFF]
        ),
        st.integers(0, 255),
        st.sampled_from([0, 1, 2, 3, 0x7FFFFFFF]),
        st.binary(max_size=200),
    ),
    min_size=1,
    max_size=8,
)


@settings(CASE_SETTINGS, max_examples=150)
@given(garbage=st.binary(min_size=1, max_size=2048))
def test_garbage_instead_of_the_http2_preface(hostile: Hostile, garbage: bytes) -> None:
    CASES["HTTP/2: garbage instead of the preface"] += 1
    conn = RawConnection(hostile.server.target)
    try:
        conn.send(garbage)
        conn.drain(0.05)
    finally:
        conn.close()


@settings(CASE_SETTINGS, max_examples=200)
@given(frames=FRAMES)
def test_garbage_frames_after_the_preface(
    hostile: Hostile, frames: list[tuple[int, int, int, bytes]]
) -> None:
    CASES["HTTP/2: random frames"] += 1
    conn = RawConnection(hostile.server.target)
    try:
        conn.start()
        for kind, flags, stream, payload in frames:
            conn.send(frame(kind, flags, stream, payload))
        conn.drain(0.05)
    finally:
        conn.close()


@settings(CASE_SETTINGS, max_examples=30)
@given(
    method=st.sampled_from(METHODS),
    body=st.binary(max_size=300),
    declared=st.integers(0, 2**32 - 1),
    end=st.booleans(),
)
def test_truncated_and_lying_grpc_frames(
    hostile: Hostile, method: str, body: bytes, declared: int, end: bool
) -> None:
    """A gRPC message whose length prefix lies (longer, shorter, 4 GiB), with or without
    the end of the stream: refused or left waiting, never a crash."""
    CASES["HTTP/2: lying gRPC length prefixes"] += 1
    conn = RawConnection(hostile.server.target)
    try:
        conn.start()
        conn.send(frame(HEADERS, END_HEADERS, 1, grpc_headers(SERVICE + method, conn.authority)))
        conn.send(frame(DATA, END_STREAM if end else 0, 1, grpc_message(body, declared)))
        conn.drain(0.05)
    finally:
        conn.close()


def test_truncated_http2_frames_then_silence(hostile: Hostile) -> None:
    """Frames whose header promises more than is ever sent, left open while the
    bystander is served, then abandoned."""
    conns = []
    for length in (1, 100, 16_384, 0xFFFFFF):
        conn = RawConnection(hostile.server.target)
        conn.start()
        conn.send(frame(HEADERS, END_HEADERS, 1, b"\x00\x05", length=length))
        conns.append(conn)
        CASES["HTTP/2: truncated frames"] += 1
    hostile.still_serving()
    for conn in conns:
        conn.close()
    hostile.still_serving()


def test_slow_and_stalled_streams_do_not_hold_up_other_callers(hostile: Hostile) -> None:
    """Fifty calls that send their HEADERS and half a message, then stall: the others
    are answered meanwhile; then they are abandoned (closed without a word)."""
    token = hostile.server.created_tokens[0]
    message = grpc_message(pb.ValidateSessionRequest(token=token).SerializeToString())
    stalled = []
    for _ in range(50):
        conn = RawConnection(hostile.server.target)
        conn.start()
        path = SERVICE + "ValidateSession"
        conn.send(frame(HEADERS, END_HEADERS, 1, grpc_headers(path, conn.authority)))
        conn.send(frame(DATA, 0, 1, message[: len(message) // 2]))
        stalled.append(conn)
        CASES["slow/stalled streams"] += 1
    started = time.monotonic()
    for _ in range(20):
        reply = hostile.stub.ValidateSession(pb.ValidateSessionRequest(token=token), timeout=3)
        assert reply.valid
    assert time.monotonic() - started < 10
    # One stalled caller finally trickles out the rest, a byte at a time: answered.
    slow = stalled.pop()
    for byte in message[len(message) // 2 :]:
        slow.send(frame(DATA, 0, 1, bytes([byte])))
        time.sleep(0.01)
    slow.send(frame(DATA, END_STREAM, 1, b""))
    answered = frames_in(slow.drain(2.0))
    assert (HEADERS, 1) in [(kind, stream) for kind, _, stream in answered], answered
    for conn in [*stalled, slow]:
        conn.close()
    hostile.still_serving()


def test_calls_cancelled_mid_flight(hostile: Hostile) -> None:
    """Calls the client gives up on at once, or after a moment, on every RPC."""
    requests: list[tuple[Any, Any]] = [
        (hostile.stub.CreateSession, pb.CreateSessionRequest(user_id="cancelled")),
        (hostile.stub.ValidateSession, pb.ValidateSessionRequest(token=new_token())),
        (hostile.stub.Invalidate, pb.InvalidateRequest(session_id=str(uuid.uuid4()))),
        (hostile.stub.InvalidateUser, pb.InvalidateUserRequest(user_id="cancelled")),
        (hostile.stub.Health, pb.HealthRequest()),
    ]
    for round_ in range(40):
        futures = []
        for method, request in requests:
            future = method.future(request, timeout=10)
            futures.append(future)
            CASES["cancelled calls"] += 1
        if round_ % 2:
            time.sleep(0.005)
        for future in futures:
            future.cancel()
    # A channel closed with calls in flight (the abandoned client).
    with grpc.insecure_channel(hostile.server.target, options=OPTIONS) as channel:
        stub = pb_grpc.SessionAuthorityStub(channel)
        for _ in range(20):
            stub.Health.future(pb.HealthRequest(), timeout=10)
            CASES["cancelled calls"] += 1
    hostile.still_serving()


def test_the_server_is_still_serving_after_all_of_it(hostile: Hostile) -> None:
    hostile.still_serving()
    assert hostile.bystander.failures == [], hostile.bystander.failures[:5]
    token = hostile.server.created_tokens[0]
    reply = hostile.stub.ValidateSession(pb.ValidateSessionRequest(token=token), timeout=5)
    assert reply.valid
