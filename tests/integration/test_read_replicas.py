"""Read replicas are refused: every connection must reach a primary (``connect_options``:
``target_session_attrs=read-write``). A database that only allows read-only transactions (what
a replica is to a client, as far as asyncpg can tell without a standby: the same check,
``default_transaction_read_only``; a hot standby fails it on ``in_hot_standby``) is refused at
connect, by the service's pool and by ``migrate``, and the service fails closed on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import uuid4

import asyncpg
import pytest
import pytest_asyncio

from session_authority.adapters.postgres_store import PostgresSessionStore
from session_authority.cli import _migrate
from session_authority.core.domain import TokenHash
from session_authority.core.errors import StoreUnavailable
from session_authority.embedded import EmbeddedPostgres

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


@pytest_asyncio.fixture
async def read_only_url(postgres_server: EmbeddedPostgres) -> AsyncIterator[str]:
    database = f"replica_{uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_server.url)
    await admin.execute(f'CREATE DATABASE "{database}"')
    await admin.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
    try:
        yield postgres_server.url.rsplit("/", 1)[0] + f"/{database}"
    finally:
        await admin.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
        await admin.close()


async def test_the_store_refuses_a_read_only_server(read_only_url: str) -> None:
    store = PostgresSessionStore(
        read_only_url, min_size=1, max_size=2, command_timeout=5, acquire_timeout=5
    )
    try:
        with pytest.raises(StoreUnavailable, match="TargetServerAttributeNotMatched"):
            await store.find(TokenHash.of("sat_" + "A" * 48))
        health = await store.health()
        assert not health.connected
    finally:
        await store.aclose()


async def test_migrate_refuses_a_read_only_server(read_only_url: str) -> None:
    assert await _migrate(read_only_url) == 1
