"""Proto ↔ domain mapping. Generated ``*_pb2`` types stop here."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from session_authority.core.domain import Reason, Session, SessionSummary, Source, Validation
from session_authority.core.errors import InvalidArgument
from session_authority.core.health import BreakerReport, HealthReport, PoolStats
from session_authority.core.listing import SessionPage
from session_authority.core.watch import Heartbeat, RevocationEvent, Start, format_cursor
from session_authority.v1 import session_authority_pb2 as pb

__all__ = [
    "duration_from_pb",
    "health_to_pb",
    "page_to_pb",
    "session_to_pb",
    "ttl_from_pb",
    "validation_to_pb",
    "watch_item_to_pb",
]

_REASON = {
    Reason.UNKNOWN: pb.REASON_UNKNOWN,
    Reason.EXPIRED: pb.REASON_EXPIRED,
    Reason.REVOKED: pb.REASON_REVOKED,
}
_SOURCE = {
    Source.CACHE: pb.SOURCE_CACHE,
    Source.DATABASE: pb.SOURCE_DATABASE,
    Source.TOKEN_FORMAT: pb.SOURCE_TOKEN_FORMAT,
}


#: google.protobuf.Duration's own range (about 10,000 years).
_DURATION_MAX_SECONDS = 315_576_000_000


def ttl_from_pb(request: pb.CreateSessionRequest) -> timedelta | None:
    if not request.HasField("ttl"):
        return None
    return duration_from_pb(request.ttl, "ttl")


def duration_from_pb(duration: Duration, field_name: str) -> timedelta:
    """A Duration field as a timedelta; INVALID_ARGUMENT naming the field
    when it is outside Duration's own range."""
    if abs(duration.seconds) > _DURATION_MAX_SECONDS or abs(duration.nanos) >= 1_000_000_000:
        raise InvalidArgument(field_name, "is outside google.protobuf.Duration's range")
    return timedelta(seconds=duration.seconds, microseconds=duration.nanos // 1000)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _set_ts(out: Timestamp, value: datetime) -> None:
    """``out.FromDatetime(value)``, in a fifth of the time: ValidateSession
    sets two per answer (FromDatetime goes through a time tuple and
    calendar.timegm). Naive datetimes are UTC, as FromDatetime takes them."""
    since = (value if value.tzinfo is not None else value.replace(tzinfo=UTC)) - _EPOCH
    out.seconds = since.days * 86_400 + since.seconds
    out.nanos = since.microseconds * 1000


def _fill_session(out: pb.Session, session: Session) -> None:
    out.session_id = session.session_id
    out.user_id = session.user_id
    _set_ts(out.created_at, session.created_at)
    _set_ts(out.expires_at, session.expires_at)
    if session.metadata:
        out.metadata.update(session.metadata)


def session_to_pb(session: Session) -> pb.Session:
    message = pb.Session()
    _fill_session(message, session)
    if session.last_seen_at is not None:  # not on ValidateSession's path
        _set_ts(message.last_seen_at, session.last_seen_at)
    return message


def page_to_pb(page: SessionPage) -> pb.ListUserSessionsResponse:
    """A listing's page. ``SessionSummary`` has no token or hash to leak."""
    reply = pb.ListUserSessionsResponse(next_page_token=page.next_page_token)
    for session in page.sessions:
        _fill_summary(reply.sessions.add(), session)
    return reply


def _fill_summary(out: pb.Session, session: SessionSummary) -> None:
    out.session_id = session.session_id
    out.user_id = session.user_id
    _set_ts(out.created_at, session.created_at)
    _set_ts(out.expires_at, session.expires_at)
    if session.metadata:
        out.metadata.update(session.metadata)
    if session.last_seen_at is not None:
        _set_ts(out.last_seen_at, session.last_seen_at)
    if session.revoked_at is not None:
        _set_ts(out.revoked_at, session.revoked_at)


def validation_to_pb(result: Validation) -> pb.ValidateSessionResponse:
    reply = pb.ValidateSessionResponse(valid=result.valid, source=_SOURCE[result.source])
    if result.session is not None and result.valid:
        _fill_session(reply.session, result.session)  # in place: no copy
    if result.reason is not None:
        reply.reason = _REASON[result.reason]
    if result.cache_age is not None:
        # Milliseconds are all the age means (clocks of two replicas, a TTL in ms).
        milliseconds = round(result.cache_age * 1000)
        reply.cache_age.seconds, rest = divmod(milliseconds, 1000)
        reply.cache_age.nanos = rest * 1_000_000
    if result.degraded:
        reply.degraded = True
    if result.local:
        reply.from_local_cache = True
    return reply


def _pool(stats: PoolStats) -> pb.PoolStats:
    return pb.PoolStats(
        size=stats.size,
        available=stats.available,
        pending=stats.pending,
        min_size=stats.min_size,
        max_size=stats.max_size,
    )


def health_to_pb(report: HealthReport) -> pb.HealthResponse:
    cache, stats, store, breaker = report.cache, report.stats, report.store, report.breaker
    reply = pb.HealthResponse(
        status=report.status,
        redis=pb.RedisHealth(
            connected=cache.connected,
            version=cache.version,
            uptime=cache.uptime_seconds,
            used_memory=cache.used_memory,
            total_keys=cache.total_keys,
        ),
        session_cache=pb.SessionCacheHealth(
            enabled=report.cache_enabled,
            healthy=report.cache_healthy,
            metrics=pb.CacheMetrics(
                hits=stats.hits,
                misses=stats.misses,
                errors=stats.errors,
                total=stats.total,
                hit_rate=stats.hit_rate,
                ttl=report.cache_ttl_seconds,
            ),
            pool=_pool(cache.pool),
        ),
        performance=pb.Performance(ping=cache.ping_ms, set=cache.set_ms, get=cache.get_ms),
        errors=list(report.errors),
        postgres=pb.PostgresHealth(
            connected=store.connected,
            version=store.version,
            pool=_pool(store.pool),
            ping=store.ping_ms,
        ),
        breaker=_breaker(breaker),
    )
    if report.store_breaker is not None:
        reply.postgres_breaker.CopyFrom(_breaker(report.store_breaker))
    local = report.local_cache
    if local is not None:
        reply.local_cache.CopyFrom(
            pb.LocalCacheHealth(
                enabled=local.enabled,
                live=local.live,
                entries=local.entries,
                ttl_ms=local.ttl_ms,
                bus=local.bus,
                bus_restarts=local.bus_restarts,
                malformed_messages=local.malformed_messages,
            )
        )
    reply.timestamp.GetCurrentTime()
    return reply


def _breaker(report: BreakerReport) -> pb.BreakerHealth:
    return pb.BreakerHealth(
        state=report.state,
        timeout_ms=report.timeout_ms,
        error_threshold_percentage=report.error_threshold_percentage,
        reset_timeout_ms=report.reset_timeout_ms,
        seconds_until_half_open=report.seconds_until_half_open,
        opened_count=report.opened_count,
        volume_threshold=report.volume_threshold,
        rolling_window_ms=report.rolling_window_ms,
        consecutive_failures=report.consecutive_failures,
        slow_call_ms=report.slow_call_ms,
    )


_REVOCATION_REASONS = {
    "explicit": pb.REVOCATION_REASON_EXPLICIT,
    "user_wide": pb.REVOCATION_REASON_USER_WIDE,
    "expired": pb.REVOCATION_REASON_EXPIRED,
}


def watch_item_to_pb(item: Start | RevocationEvent | Heartbeat) -> pb.RevocationEvent:
    """One message of WatchRevocations. A reason this release does not know
    (an operator's setting) is ``ADMIN``: it was not one of our RPCs."""
    if isinstance(item, Start):
        start = pb.RevocationEvent(
            kind=pb.REVOCATION_EVENT_KIND_START, cursor=format_cursor(item.cursor)
        )
        if item.heartbeat is not None:
            start.heartbeat_interval.FromNanoseconds(round(item.heartbeat * 1e9))
        return start
    if isinstance(item, Heartbeat):
        beat = pb.RevocationEvent(
            kind=pb.REVOCATION_EVENT_KIND_HEARTBEAT, cursor=format_cursor(item.cursor)
        )
        # Rounded down: the point it names may be earlier than it was, never later.
        beat.covered.FromNanoseconds(math.floor(item.covered * 1e9))
        return beat
    out = pb.RevocationEvent(
        kind=pb.REVOCATION_EVENT_KIND_REVOKED,
        cursor=format_cursor(item.cursor),
        session_id=item.session_id,
        user_id=item.user_id,
        reason=_REVOCATION_REASONS.get(item.reason, pb.REVOCATION_REASON_ADMIN),
        sequence=item.sequence,
    )
    _set_ts(out.revoked_at, item.revoked_at)
    return out
