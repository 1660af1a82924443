"""Listing a user's sessions: keyset pages under signed, opaque page tokens.

A listing walks one user's sessions in ``Position`` order (``created_at``,
then ``session_id``) straight from the store, the source of truth: a page is
"the next ``page_size`` sessions after the last one returned", never an
offset. So a session created or revoked between two pages shifts nothing: no
session that existed throughout is skipped or repeated, and one created
meanwhile shows up on a later page when it sorts after the position reached
(sessions are stamped with their creation time, so normally it does).

A page token carries that position, signed: ``HMAC-SHA256(key, user_id,
include_revoked, position)`` (the first 16 bytes), so a token that was made
up, altered, cut short, or issued for another user or the other
``include_revoked`` is refused, as ``InvalidArgument("page_token")`` with one
message for every case. The key is ``PAGE_TOKEN_KEY`` when set, else a secret
the store keeps for every replica (``SessionStore.page_token_key``): a token
issued by one replica is good on every other, and after restarts. Tokens do
not expire: a position stays meaningful; a token signed with a key since
replaced is refused like a forged one (the caller lists again from the start).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from session_authority.core.domain import Position, SessionSummary, check_user_id
from session_authority.core.errors import InvalidArgument
from session_authority.core.ports import SessionStore

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "Lister", "PageTokens", "SessionPage"]

#: Sessions per page when the caller asks for 0 (proto3's default).
DEFAULT_PAGE_SIZE = 50
#: The most sessions per page; a larger ``page_size`` is lowered to it (AIP-158).
MAX_PAGE_SIZE = 500

_VERSION = 1
#: version, include_revoked, created_at (µs since the epoch), session id.
_BODY = struct.Struct(">BBq16s")
_MAC_BYTES = 16
_DOMAIN = b"session-authority/page-token\x00"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_REFUSED = "is not a page token of this listing (same user_id and include_revoked)"


@dataclass(frozen=True, slots=True)
class SessionPage:
    """One page of a listing; ``next_page_token`` is empty on the last."""

    sessions: tuple[SessionSummary, ...]
    next_page_token: str


class PageTokens:
    """Issues and reads signed page tokens (see the module doc)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a page token key needs at least 16 bytes")
        self._key = key

    def _mac(self, user_id: str, body: bytes) -> bytes:
        user = user_id.encode()
        message = _DOMAIN + struct.pack(">I", len(user)) + user + body
        return hmac.new(self._key, message, hashlib.sha256).digest()[:_MAC_BYTES]

    def issue(self, user_id: str, include_revoked: bool, position: Position) -> str:
        micros = (position.created_at - _EPOCH) // _MICROSECOND
        body = _BODY.pack(
            _VERSION, int(include_revoked), micros, uuid.UUID(position.session_id).bytes
        )
        raw = body + self._mac(user_id, body)
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    def read(self, token: str, user_id: str, include_revoked: bool) -> Position:
        """The position ``token`` carries; ``InvalidArgument("page_token")`` if
        it was not issued by this key for this ``user_id`` and ``include_revoked``."""
        expected = _BODY.size + _MAC_BYTES
        if len(token) != (expected * 4 + 2) // 3:
            raise InvalidArgument("page_token", _REFUSED)
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise InvalidArgument("page_token", _REFUSED) from None
        body, mac = raw[: _BODY.size], raw[_BODY.size :]
        if len(raw) != expected or not hmac.compare_digest(mac, self._mac(user_id, body)):
            raise InvalidArgument("page_token", _REFUSED)
        version, revoked, micros, session = _BODY.unpack(body)
        if version != _VERSION or revoked != int(include_revoked):
            raise InvalidArgument("page_token", _REFUSED)
        try:
            created_at = _EPOCH + micros * _MICROSECOND
        except OverflowError:  # only a token this key signed gets here: never
            raise InvalidArgument("page_token", _REFUSED) from None
        return Position(created_at, str(uuid.UUID(bytes=session)))


class Lister:
    """``ListUserSessions``: one store read per page, behind the store's breaker."""

    def __init__(self, store: SessionStore, *, key: bytes | None = None) -> None:
        self._store = store
        self._tokens = None if key is None else PageTokens(key)

    async def _page_tokens(self) -> PageTokens:
        # Read once per process; concurrent first calls read the same secret.
        if self._tokens is None:
            self._tokens = PageTokens(await self._store.page_token_key())
        return self._tokens

    async def list(
        self, user_id: str, *, page_size: int = 0, page_token: str = "", include_revoked: bool
    ) -> SessionPage:
        user = check_user_id(user_id)
        if page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        tokens = await self._page_tokens()
        after = tokens.read(page_token, user, include_revoked) if page_token else None
        found = await self._store.list_user_sessions(
            user, include_revoked=include_revoked, after=after, limit=size + 1
        )
        if len(found) <= size:
            return SessionPage(tuple(found), "")
        last = found[size - 1]
        position = Position(last.created_at, last.session_id)
        return SessionPage(tuple(found[:size]), tokens.issue(user, include_revoked, position))
