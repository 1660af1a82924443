"""``SessionAuthority``: the core's one entry point, a facade over collaborators.

Each job lives in its own collaborator, all sharing the same ports and
breakers, wired by the composition root (``bootstrap.assemble_core``):

=================  ===========================================================
``store``          the guarded ``SessionStore``, for use cases that are one read
``Issuer``         create: token, Postgres row, creation marker (issuance.py)
``Validator``      cache-aside validation, single-flight, early refresh
``Revoker``        invalidate / invalidate_user, breaker probe replay, drain
``HealthReporter`` the health document (reporting.py)
``Lister``         a user's sessions, in signed keyset pages (listing.py)
``Toucher``        sliding expiry, writes coalesced (touch.py)
=================  ===========================================================

The revocation invariant that all of them keep is stated in ``revocation.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

from session_authority.core.breaker import Breaker
from session_authority.core.domain import Revocation, Session, Validation
from session_authority.core.health import CacheStats, HealthReport, StoreHealth
from session_authority.core.issuance import Issuer
from session_authority.core.listing import Lister, SessionPage
from session_authority.core.policy import CorePolicy
from session_authority.core.ports import SessionStore
from session_authority.core.reporting import HealthReporter
from session_authority.core.revocation import Revoker
from session_authority.core.touch import Touch, Toucher
from session_authority.core.validation import CallerKey, Validator
from session_authority.core.watch import RevocationWatch

__all__ = ["CorePolicy", "SessionAuthority"]


@dataclass(frozen=True, slots=True)
class SessionAuthority:
    issuer: Issuer
    validator: Validator
    revoker: Revoker
    reporter: HealthReporter
    lister: Lister
    #: Counters shared by the collaborators (the runbook's cache metrics).
    stats: CacheStats
    #: The Redis breaker, and the Postgres one when enabled.
    breaker: Breaker
    #: The store behind its breaker and timing (``GuardedStore``): a use case
    #: that is one store read (no cache, no revocation rule) is a method here
    #: over it, with no collaborator of its own.
    store: SessionStore
    toucher: Toucher
    store_breaker: Breaker | None = None
    #: WatchRevocations' reader and watchers (``watch.py``); None: not offered.
    watch: RevocationWatch | None = None

    async def create(
        self, user_id: str, ttl: timedelta | None, metadata: Mapping[str, str]
    ) -> tuple[str, Session]:
        return await self.issuer.create(user_id, ttl, metadata)

    async def validate(self, token: str, caller: CallerKey = "") -> Validation:
        """``caller``: who asks, for the per-caller limit on unknown tokens."""
        return await self.validator.validate(token, caller)

    @property
    def validate_local(self) -> Callable[[str | bytes], Validation | None]:
        """``validate``'s answer when this process's L1 copy can give it, without
        awaiting anything; None otherwise (then ``validate``). The validator's
        own method, so a caller that binds it once adds no frame per call."""
        return self.validator.validate_local

    async def invalidate(
        self, *, token: str | None = None, session_id: str | None = None
    ) -> Revocation:
        return await self.revoker.invalidate(token=token, session_id=session_id)

    async def invalidate_user(
        self, user_id: str, *, except_session_id: str | None = None
    ) -> Revocation:
        return await self.revoker.invalidate_user(user_id, except_session_id=except_session_id)

    async def list_user_sessions(
        self, user_id: str, *, page_size: int = 0, page_token: str = "", include_revoked: bool
    ) -> SessionPage:
        return await self.lister.list(
            user_id, page_size=page_size, page_token=page_token, include_revoked=include_revoked
        )

    async def replay_revocations(self) -> None:
        await self.revoker.replay_revocations()

    async def drain_revocations(self) -> int:
        return await self.revoker.drain()

    async def run_drain(self, interval: float) -> None:
        await self.revoker.run_drain(interval)

    async def health(self) -> HealthReport:
        return await self.reporter.health()

    async def store_health(self) -> StoreHealth:
        return await self.reporter.store_health()

    async def touch(
        self,
        *,
        token: str | None = None,
        session_id: str | None = None,
        extend_by: timedelta | None = None,
        write_through: bool = False,
    ) -> Touch:
        return await self.toucher.touch(
            token=token, session_id=session_id, extend_by=extend_by, write_through=write_through
        )

    async def aclose(self) -> None:
        """Stop background work: refreshes, the breakers' timers and probes."""
        if self.watch is not None:
            self.watch.close()
        await self.validator.aclose()
        await self.toucher.aclose()
        await self.breaker.aclose()
        if self.store_breaker is not None:
            await self.store_breaker.aclose()

    async def validate_many(
        self, tokens: Sequence[str], caller: CallerKey = ""
    ) -> list[Validation]:
        """``validate`` for up to ``MAX_BATCH_TOKENS`` tokens, answers in order."""
        return await self.validator.validate_many(tokens, caller)
