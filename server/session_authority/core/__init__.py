"""The core: domain, policy and the cache-aside service. No transport or driver imports."""

from session_authority.core.breaker import Breaker, BreakerPolicy, BreakerState
from session_authority.core.domain import Reason, Revocation, Session, Source, TokenHash, Validation
from session_authority.core.errors import (
    CacheUnavailable,
    DeadlineExceeded,
    InvalidArgument,
    Overloaded,
    SessionAuthorityError,
    StoreUnavailable,
    Unavailable,
)
from session_authority.core.service import CorePolicy, SessionAuthority

__all__ = [
    "Breaker",
    "BreakerPolicy",
    "BreakerState",
    "CacheUnavailable",
    "CorePolicy",
    "DeadlineExceeded",
    "InvalidArgument",
    "Overloaded",
    "Reason",
    "Revocation",
    "Session",
    "SessionAuthority",
    "SessionAuthorityError",
    "Source",
    "StoreUnavailable",
    "TokenHash",
    "Unavailable",
    "Validation",
]
