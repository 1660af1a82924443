"""The core: domain, policy and the cache-aside service. No transport or driver imports."""

from session_authority.core.assembly import assemble_core
from session_authority.core.breaker import Breaker, BreakerPolicy, BreakerState
from session_authority.core.domain import Reason, Revocation, Session, Source, TokenHash, Validation
from session_authority.core.errors import (
    CacheUnavailable,
    CircuitOpen,
    InvalidArgument,
    RateLimited,
    SessionAuthorityError,
    StoreUnavailable,
    Unavailable,
)
from session_authority.core.guarded import PortObserver, guard_cache, guard_store
from session_authority.core.issuance import Issuer
from session_authority.core.miss_limit import MissLimit, MissLimiter
from session_authority.core.policy import CorePolicy
from session_authority.core.reporting import HealthReporter
from session_authority.core.revocation import Revoker
from session_authority.core.service import SessionAuthority
from session_authority.core.validation import Validator

__all__ = [
    "Breaker",
    "BreakerPolicy",
    "BreakerState",
    "CacheUnavailable",
    "CircuitOpen",
    "CorePolicy",
    "HealthReporter",
    "InvalidArgument",
    "Issuer",
    "MissLimit",
    "MissLimiter",
    "PortObserver",
    "RateLimited",
    "Reason",
    "Revocation",
    "Revoker",
    "Session",
    "SessionAuthority",
    "SessionAuthorityError",
    "Source",
    "StoreUnavailable",
    "TokenHash",
    "Unavailable",
    "Validation",
    "Validator",
    "assemble_core",
    "guard_cache",
    "guard_store",
]
