"""Secrets never leak: tokens, passwords and private keys, looked for everywhere they could land.

One server, over TLS to both backends, with a password and a client key for each, runs a
Redis outage and then a full lifecycle of 200 tokens (create, validate from Postgres and
from the cache, refused look-alikes, invalidate by token and by id, invalidate a user);
a second server starts with wrong passwords. Then every place is read in full: every
Redis key and value, a ``pg_dump`` of the database, every log record (DEBUG, every
logger, as the JSON formatter writes it), every exported span (names, attributes,
events, resource), the Health document over gRPC and the admin port, ``/metrics``, and
every error a caller was sent. No token, token body, password or key line may appear.

Callers authenticate with an API key (``authorization: Bearer``); a caller with a wrong key
is refused along the way: neither key may appear either.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import asyncpg
import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import trustme
from google.protobuf import json_format
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from session_authority.adapters.migrate import apply_migrations
from session_authority.bootstrap import App
from session_authority.core.breaker import BreakerState
from session_authority.embedded import EmbeddedPostgres, EmbeddedRedis, find_free_port
from session_authority.embedded.tls import TlsFiles
from session_authority.logs import JsonFormatter
from session_authority.transport.auth import hash_api_key
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from .support import NO_PROXY, app_settings
from .tls_support import tls_postgres, tls_redis, write_tls_files

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.timeout(240)]

PG_PASSWORD = f"pg-pw-{secrets.token_hex(10)}"
REDIS_PASSWORD = f"redis-pw-{secrets.token_hex(10)}"
WRONG_PASSWORD = f"wrong-pw-{secrets.token_hex(10)}"
REDIS_USER = "leakcheck"
TOKENS = 200
API_KEY = f"sa-key-{secrets.token_urlsafe(24)}"
WRONG_KEY = f"sa-wrong-{secrets.token_urlsafe(24)}"
AUTH = (("authorization", f"Bearer {API_KEY}"),)


class Capture(logging.Handler):
    """Every record of every logger, as the JSON formatter writes it, plus its args."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{self.format(record)} {record.args!r}")


@pytest.fixture
def logs() -> Iterator[Capture]:
    capture = Capture()
    root = logging.getLogger()
    saved = root.level, {n: logging.getLogger(n).level for n in ("session_authority", "grpc")}
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    for name in saved[1]:
        logging.getLogger(name).setLevel(logging.DEBUG)
    yield capture
    root.removeHandler(capture)
    root.setLevel(saved[0])
    for name, level in saved[1].items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return write_tls_files(trustme.CA(), tmp_path / "certs", client_cert=True)


@pytest_asyncio.fixture
async def backends(
    tmp_path: Path, tls: TlsFiles
) -> AsyncIterator[tuple[EmbeddedPostgres, EmbeddedRedis]]:
    user = ["--user", REDIS_USER, "on", f">{REDIS_PASSWORD}", "~*", "&*", "+@all"]
    with (
        tls_postgres(tmp_path / "pg", tls, PG_PASSWORD) as postgres,
        tls_redis(tmp_path / "redis", tls, args=user) as redis,
    ):
        conn = await asyncpg.connect(postgres.url)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        yield postgres, redis


def _redis_url(redis: EmbeddedRedis, password: str) -> str:
    # EmbeddedRedis.url names the default user; the service logs in as its own.
    scheme, rest = redis.url.split("://", 1)
    return f"{scheme}://{REDIS_USER}:{quote(password, safe='')}@{rest}"


def _key_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if len(line) >= 40]


def _found(text: str, needles: dict[str, str]) -> list[str]:
    return sorted({label for needle, label in needles.items() if needle in text})


async def _rpc(errors: list[str], call: Any, request: object) -> None:
    try:
        await call(request, timeout=10, metadata=AUTH)
    except grpc.aio.AioRpcError as exc:
        errors.append(f"{exc.code().name}: {exc.details()}")


@pytest.mark.asyncio
async def test_no_secret_in_redis_postgres_logs_spans_health_metrics_or_errors(
    backends: tuple[EmbeddedPostgres, EmbeddedRedis],
    tls: TlsFiles,
    spans: InMemorySpanExporter,
    logs: Capture,
) -> None:
    postgres, redis = backends
    spans.clear()
    errors: list[str] = []  # every error detail a caller was sent
    tokens: list[str] = []
    settings = app_settings(
        postgres.url,
        _redis_url(redis, REDIS_PASSWORD),
        auth_api_keys=f"leakcheck:{hash_api_key(API_KEY)}",
        auth_allowed_identities="apikey:leakcheck",
        admin_port=find_free_port(),
        breaker_timeout_ms=300,
        breaker_reset_timeout_ms=300,
    )
    app = await App.start(settings)
    documents: list[str] = []
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=NO_PROXY) as channel,
            aiohttp.ClientSession() as http,
        ):
            stub = pb_grpc.SessionAuthorityStub(channel)

            async def create(user: str, metadata: dict[str, str] | None = None) -> str:
                request = pb.CreateSessionRequest(user_id=user, metadata=metadata)
                reply = await stub.CreateSession(request, timeout=10, metadata=AUTH)
                tokens.append(reply.token)
                return reply.token

            async def health() -> None:
                reply = await stub.Health(pb.HealthRequest(), timeout=10, metadata=AUTH)
                documents.append(json_format.MessageToJson(reply))
                for path in ("/health", "/api/health/redis", "/metrics"):
                    async with http.get(f"http://127.0.0.1:{app.admin_port}{path}") as r:
                        documents.append(await r.text())

            # --- a Redis outage first: error paths, with connection errors to report ----
            early = [await create("leak-early") for _ in range(10)]
            redis.kill()
            for token in early[:5]:
                await _rpc(errors, stub.ValidateSession, pb.ValidateSessionRequest(token=token))
            await _rpc(errors, stub.Invalidate, pb.InvalidateRequest(token=early[5]))
            await health()
            redis.start()
            deadline = time.monotonic() + 20
            while app.core.breaker.state is not BreakerState.CLOSED:
                assert time.monotonic() < deadline, "the breaker did not close"
                await asyncio.sleep(0.05)

            # --- the lifecycle -------------------------------------------------------
            many = [
                await create(f"leak-{i % 20}", metadata={"device": f"d{i}"}) for i in range(TOKENS)
            ]
            for token in many:  # Postgres, then the cache
                for _ in range(2):
                    await _rpc(errors, stub.ValidateSession, pb.ValidateSessionRequest(token=token))
            for token in many[:20]:  # look-alikes, refused without an echo
                for bad in (token + " ", token + "\x00", token * 12, f"Bearer {token}"):
                    await _rpc(errors, stub.ValidateSession, pb.ValidateSessionRequest(token=bad))
                    await _rpc(errors, stub.Invalidate, pb.InvalidateRequest(token=bad))
                await _rpc(errors, stub.Invalidate, pb.InvalidateRequest(session_id=token))
                await _rpc(errors, stub.InvalidateUser, pb.InvalidateUserRequest(user_id="\x00"))
            for token in many[20:70]:
                await _rpc(errors, stub.Invalidate, pb.InvalidateRequest(token=token))
            for token in many[70:120]:
                live = await stub.ValidateSession(
                    pb.ValidateSessionRequest(token=token), metadata=AUTH
                )
                await _rpc(
                    errors,
                    stub.Invalidate,
                    pb.InvalidateRequest(session_id=live.session.session_id),
                )
            for i in range(5):
                await _rpc(
                    errors, stub.InvalidateUser, pb.InvalidateUserRequest(user_id=f"leak-{i}")
                )
            for key in (WRONG_KEY, f"Bearer {API_KEY}"):  # refused: a wrong key, a doubled scheme
                try:
                    await stub.ValidateSession(
                        pb.ValidateSessionRequest(token=many[0]),
                        timeout=10,
                        metadata=(("authorization", f"Bearer {key}"),),
                    )
                    raise AssertionError("a wrong API key was let in")
                except grpc.aio.AioRpcError as exc:
                    errors.append(f"{exc.code().name}: {exc.details()}")
            for token in many:  # revoked ones from the tombstones now
                await _rpc(errors, stub.ValidateSession, pb.ValidateSessionRequest(token=token))
            await health()
    finally:
        await app.stop(0)

    # --- a server with wrong passwords: its errors, logs and Health --------------------
    wrong = app_settings(
        postgres.url.replace(quote(PG_PASSWORD, safe=""), WRONG_PASSWORD),
        _redis_url(redis, WRONG_PASSWORD),
        auth_api_keys=f"leakcheck:{hash_api_key(API_KEY)}",
        auth_allowed_identities="apikey:leakcheck",
        admin_port=find_free_port(),
    )
    assert WRONG_PASSWORD in wrong.database_url  # type: ignore[operator]
    app = await App.start(wrong)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=NO_PROXY) as ch:
            reply = await pb_grpc.SessionAuthorityStub(ch).Health(
                pb.HealthRequest(), timeout=10, metadata=AUTH
            )
            documents.append(json_format.MessageToJson(reply))
            assert reply.status == "unhealthy"
            assert any("password" in e or "auth" in e.lower() for e in reply.errors), reply.errors
            await _rpc(
                errors,
                pb_grpc.SessionAuthorityStub(ch).ValidateSession,
                pb.ValidateSessionRequest(token=tokens[0]),
            )
    finally:
        await app.stop(0)

    # --- the needles -----------------------------------------------------------------
    assert len(tokens) == TOKENS + 10
    needles = {token: "a token" for token in tokens}
    # Either half of a token's random body (24 characters, 144 bits) is a leak too.
    needles |= {token[4:28]: "half a token" for token in tokens}
    needles |= {token[28:]: "half a token" for token in tokens}
    needles |= {PG_PASSWORD: "the Postgres password", REDIS_PASSWORD: "the Redis password"}
    needles |= {WRONG_PASSWORD: "a wrong password"}
    needles |= {API_KEY: "the API key", WRONG_KEY: "a wrong API key"}
    for path in (tls.key, tls.client_key):
        assert path is not None
        needles |= {line: f"a line of {path.name}" for line in _key_lines(path)}

    # --- the haystacks ---------------------------------------------------------------
    admin = aioredis.Redis.from_url(redis.url, decode_responses=True)
    redis_dump: list[str] = []
    try:
        async for key in admin.scan_iter(count=500):
            kind = await admin.type(key)
            value: object = (
                await admin.hgetall(key)
                if kind == "hash"
                else await admin.get(key)
                if kind == "string"
                else await admin.dump(key)
            )
            redis_dump.append(f"{key!r} {kind!r} {value!r}")
    finally:
        await admin.aclose()
    assert len(redis_dump) >= TOKENS  # live entries and tombstones are there to read

    dump = [str(postgres.bin_dir / "pg_dump"), "--data-only", "--inserts", "-d", postgres.url]
    done = await asyncio.to_thread(subprocess.run, dump, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    dumped = done.stdout.decode()
    assert dumped.count("INSERT INTO public.sessions") >= TOKENS

    span_text = [
        f"{s.name} {dict(s.attributes or {})} {dict(s.resource.attributes)} "
        + " ".join(f"{e.name} {dict(e.attributes or {})}" for e in s.events)
        for s in spans.get_finished_spans()
    ]
    assert len(span_text) > TOKENS
    assert len(logs.lines) > TOKENS  # DEBUG: a HIT or MISS line per validation

    haystacks = {
        "Redis keys and values": "\n".join(redis_dump),
        "the Postgres dump": dumped,
        "the logs": "\n".join(logs.lines),
        "the spans": "\n".join(span_text),
        "Health and /metrics": "\n".join(documents),
        "errors sent to callers": "\n".join(errors),
    }
    assert errors and documents
    leaks = {where: found for where, text in haystacks.items() if (found := _found(text, needles))}
    assert leaks == {}
