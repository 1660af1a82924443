"""``Lister`` and ``PageTokens`` (core/listing.py) on the in-memory store: page
sizes, tokens signed for one listing only, and which key signs them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from session_authority.core.domain import Position, Session, TokenHash, new_token
from session_authority.core.errors import InvalidArgument
from session_authority.core.listing import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    Lister,
    PageTokens,
)

from .fakes import InMemorySessionStore

pytestmark = pytest.mark.asyncio

NOW = datetime(2026, 12, 7, 6, 0, tzinfo=UTC)
KEY = b"k" * 32


def _store(user: str, count: int) -> InMemorySessionStore:
    store = InMemorySessionStore(clock=lambda: NOW)
    for i in range(count):
        created = NOW - timedelta(hours=1) + i * timedelta(microseconds=1)
        store.put(
            Session(str(uuid.uuid4()), user, TokenHash.of(new_token()), created, NOW + timedelta(1))
        )
    return store


async def test_page_size_zero_is_the_default_and_above_the_maximum_is_the_maximum() -> None:
    lister = Lister(_store("u", MAX_PAGE_SIZE + 1), key=KEY)
    assert len((await lister.list("u", include_revoked=False)).sessions) == DEFAULT_PAGE_SIZE
    page = await lister.list("u", page_size=10 * MAX_PAGE_SIZE, include_revoked=False)
    assert len(page.sessions) == MAX_PAGE_SIZE and page.next_page_token
    last = await lister.list("u", page_token=page.next_page_token, include_revoked=False)
    assert (len(last.sessions), last.next_page_token) == (1, "")
    with pytest.raises(InvalidArgument, match=r"^page_size: "):
        await lister.list("u", page_size=-1, include_revoked=False)


async def test_a_token_reads_back_only_for_its_user_flag_and_key() -> None:
    position = Position(NOW - timedelta(microseconds=7), str(uuid.uuid4()))
    tokens = PageTokens(KEY)
    token = tokens.issue("alice", True, position)
    assert tokens.read(token, "alice", True) == position
    for user, flag, reader in (
        ("bob", True, tokens),
        ("alice", False, tokens),
        ("alice", True, PageTokens(b"j" * 32)),
    ):
        with pytest.raises(InvalidArgument, match=r"^page_token: "):
            reader.read(token, user, flag)


async def test_without_a_configured_key_the_stores_secret_signs_once_per_process() -> None:
    store = _store("u", 3)
    first = await Lister(store).list("u", page_size=1, include_revoked=False)
    # Another replica (another Lister) over the same store accepts the token.
    second = await Lister(store).list(
        "u", page_size=1, page_token=first.next_page_token, include_revoked=False
    )
    assert second.sessions[0].session_id != first.sessions[0].session_id
    assert store.calls["page_token_key"] == 2  # once per Lister, not per call
    configured = Lister(store, key=KEY)
    with pytest.raises(InvalidArgument, match=r"^page_token: "):
        await configured.list("u", page_token=first.next_page_token, include_revoked=False)
