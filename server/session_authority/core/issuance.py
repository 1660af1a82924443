"""Issuing sessions: a fresh token, the row in Postgres, a creation marker in Redis."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from uuid import uuid4

from session_authority.core.domain import (
    Session,
    TokenHash,
    check_metadata,
    check_ttl,
    check_user_id,
)
from session_authority.core.errors import CacheUnavailable
from session_authority.core.policy import CorePolicy
from session_authority.core.ports import SessionCache, SessionStore

__all__ = ["Issuer"]


class Issuer:
    def __init__(
        self,
        store: SessionStore,
        cache: SessionCache | None,
        policy: CorePolicy,
        *,
        clock: Callable[[], datetime],
        token_factory: Callable[[], str],
    ) -> None:
        self._store = store
        self._cache = cache
        self._policy = policy
        self._now = clock
        self._new_token = token_factory

    async def create(
        self, user_id: str, ttl: timedelta | None, metadata: Mapping[str, str]
    ) -> tuple[str, Session]:
        """Issue a token for ``user_id``. Returns the token (shown once) and the session."""
        user_id = check_user_id(user_id)
        lifetime = check_ttl(ttl, self._policy.default_session_ttl, self._policy.max_session_ttl)
        meta = check_metadata(metadata)
        token = self._new_token()
        now = self._now()
        session = Session(
            session_id=str(uuid4()),
            user_id=user_id,
            token_hash=TokenHash.of(token),
            created_at=now,
            expires_at=now + lifetime,
            metadata=meta,
        )
        await self._store.create(session)
        await self._mark_created(session.token_hash)
        return token, session

    async def _mark_created(self, token_hash: TokenHash) -> None:
        """Shield the new session from a racing "unknown" fill (see the port).
        Best effort: with Redis unreachable there are no fills to race."""
        if self._cache is None:
            return
        ttl = self._policy.max_fill_lag + self._policy.negative_ttl
        # A failure is counted and logged by the guard; an open breaker is none.
        with contextlib.suppress(CacheUnavailable):
            await self._cache.mark_created(token_hash, ttl)
