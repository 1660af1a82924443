"""Settings, read once from the environment at start-up (twelve-factor).

Every knob is documented in README.md ("Configuration"); keep the two in step.
"""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from session_authority.core.breaker import BreakerPolicy
from session_authority.core.policy import CorePolicy

__all__ = ["Settings", "redact_url"]

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_EXPORTERS = r"^\s*(otlp|console|none)\s*(,\s*(otlp|console|none)\s*)*$"


class Settings(BaseSettings):
    """Validated, frozen configuration. Environment names are the field names
    upper-cased (``REDIS_URL``, ``CACHE_TTL_SECONDS``...)."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

    database_url: str | None = Field(default=None, repr=False)
    redis_url: str | None = Field(default=None, repr=False)

    host: str = "0.0.0.0"  # noqa: S104  (a service listens on every interface; `dev` binds loopback)
    port: int = Field(default=50051, ge=0, le=65535)

    cache_ttl_seconds: float = Field(default=300.0, gt=0)
    negative_cache_ttl_seconds: float = Field(default=5.0, gt=0)
    tombstone_ttl_seconds: float = Field(default=600.0, gt=0)
    cache_early_refresh_seconds: float = Field(default=3.0, ge=0)
    """XFetch: hot entries are refreshed this close to expiry (0: never)."""
    revocation_sweep_seconds: float = Field(default=1.0, ge=0)
    """Every replica checks Redis still holds its state and drains pending
    revocations into it this often (0: never)."""
    revocation_skew_seconds: float = Field(default=60.0, ge=0)
    """Clock difference allowed between Redis's host and Postgres's when
    revocations are replayed into a replaced Redis."""
    session_ttl_default_seconds: int = Field(default=86_400, gt=0)
    session_ttl_max_seconds: int = Field(default=30 * 86_400, gt=0)

    redis_pool_min: int = Field(default=2, ge=0)
    redis_pool_max: int = Field(default=10, ge=1)
    redis_pool_timeout_ms: int = Field(default=1000, gt=0)
    pg_pool_min: int = Field(default=2, ge=0)
    pg_pool_max: int = Field(default=10, ge=1)
    pg_pool_timeout_ms: int = Field(default=2000, gt=0)
    pg_command_timeout_ms: int = Field(default=5000, gt=0)

    breaker_timeout_ms: int = Field(default=1000, gt=0)
    breaker_error_threshold_percentage: float = Field(default=70.0, gt=0, le=100)
    breaker_volume_threshold: int = Field(default=10, ge=1)
    breaker_reset_timeout_ms: int = Field(default=15_000, gt=0)
    breaker_rolling_window_ms: int = Field(default=10_000, gt=0)
    breaker_consecutive_failures: int = Field(default=5, ge=0)
    """Open after this many failed or slow Redis calls in a row (0: window rule only)."""
    breaker_slow_call_ms: int = Field(default=100, gt=0)
    """A Redis call cut short by the caller's deadline after this long counts as a failure."""

    pg_breaker_enabled: bool = True
    pg_breaker_error_threshold_percentage: float = Field(default=50.0, gt=0, le=100)
    pg_breaker_volume_threshold: int = Field(default=20, ge=1)
    pg_breaker_reset_timeout_ms: int = Field(default=5_000, gt=0)

    l1_cache_ttl_ms: int = Field(default=1000, ge=0, le=60_000)
    """In-process cache in front of Redis: longest an entry is kept (0 disables)."""
    l1_cache_size: int = Field(default=100_000, ge=1)
    """In-process cache: most entries kept (least recently used go first)."""
    l1_ack_timeout_ms: int = Field(default=250, gt=0)
    """How long Invalidate waits for every process to drop its L1 copies."""

    max_concurrent_rpcs: int = Field(default=1000, ge=1)
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    log_level: str = "INFO"
    log_format: str = Field(default="json", pattern="^(json|text)$")

    # Admin HTTP port: /metrics (Prometheus), /health, /api/health/redis, /livez, /readyz.
    admin_host: str = "127.0.0.1"
    """Loopback by default: health and metrics show hosts, versions and error
    texts. Set ``0.0.0.0`` (or a pod IP) for Prometheus to scrape it."""
    admin_port: int = Field(default=9464, ge=0, le=65535)
    """0 disables the admin server."""

    # OpenTelemetry: the standard variables. The SDK reads the sampler
    # (OTEL_TRACES_SAMPLER[_ARG]) and the exporter's own OTEL_EXPORTER_OTLP_*
    # settings itself; these decide whether and where spans are exported.
    otel_sdk_disabled: bool = False
    otel_service_name: str = "session-authority"
    otel_traces_exporter: str | None = Field(default=None, pattern=_EXPORTERS)
    otel_exporter_otlp_endpoint: str | None = Field(default=None, repr=False)
    otel_exporter_otlp_traces_endpoint: str | None = Field(default=None, repr=False)

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in _LOG_LEVELS:
            raise ValueError(f"LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}")
        return level

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.redis_pool_min > self.redis_pool_max:
            raise ValueError("REDIS_POOL_MIN must not exceed REDIS_POOL_MAX")
        if self.pg_pool_min > self.pg_pool_max:
            raise ValueError("PG_POOL_MIN must not exceed PG_POOL_MAX")
        if self.session_ttl_default_seconds > self.session_ttl_max_seconds:
            raise ValueError("SESSION_TTL_DEFAULT_SECONDS must not exceed SESSION_TTL_MAX_SECONDS")
        self.core_policy()  # validates the TTL relations
        return self

    def core_policy(self) -> CorePolicy:
        return CorePolicy(
            cache_ttl=self.cache_ttl_seconds,
            negative_ttl=self.negative_cache_ttl_seconds,
            tombstone_ttl=self.tombstone_ttl_seconds,
            early_refresh=self.cache_early_refresh_seconds,
            revocation_skew=self.revocation_skew_seconds,
            default_session_ttl=timedelta(seconds=self.session_ttl_default_seconds),
            max_session_ttl=timedelta(seconds=self.session_ttl_max_seconds),
        )

    def breaker_policy(self) -> BreakerPolicy:
        return BreakerPolicy(
            timeout=self.breaker_timeout_ms / 1000,
            error_threshold_percentage=self.breaker_error_threshold_percentage,
            volume_threshold=self.breaker_volume_threshold,
            reset_timeout=self.breaker_reset_timeout_ms / 1000,
            rolling_window=self.breaker_rolling_window_ms / 1000,
            consecutive_failures=self.breaker_consecutive_failures,
            slow_call=self.breaker_slow_call_ms / 1000,
        )

    @property
    def admin_bind_host(self) -> str:
        return self.admin_host

    def traces_exporters(self) -> frozenset[str]:
        """Where spans go: OTEL_TRACES_EXPORTER when set, else OTLP when an
        OTLP endpoint is configured, else nowhere (then no SDK is installed)."""
        if self.otel_traces_exporter is not None:
            names = {n.strip() for n in self.otel_traces_exporter.split(",")}
            return frozenset(names - {"none"})
        if self.otel_exporter_otlp_endpoint or self.otel_exporter_otlp_traces_endpoint:
            return frozenset({"otlp"})
        return frozenset()

    def pg_breaker_policy(self) -> BreakerPolicy:
        """Postgres's breaker shares the window; its per-call bound is the
        pool wait plus the statement timeout (no tighter than the driver's).
        It is the source of truth, so it opens less eagerly than Redis's: a run
        as long as its volume threshold, and a caller's deadline never counts
        (a busy database must not be cut off by impatient callers)."""
        timeout = (self.pg_pool_timeout_ms + self.pg_command_timeout_ms) / 1000
        return BreakerPolicy(
            timeout=timeout,
            error_threshold_percentage=self.pg_breaker_error_threshold_percentage,
            volume_threshold=self.pg_breaker_volume_threshold,
            reset_timeout=self.pg_breaker_reset_timeout_ms / 1000,
            rolling_window=self.breaker_rolling_window_ms / 1000,
            consecutive_failures=self.pg_breaker_volume_threshold,
            slow_call=timeout,
        )

    def describe(self) -> dict[str, object]:
        """The settings with credentials redacted, for start-up logs."""
        shown = self.model_dump()
        shown["database_url"] = redact_url(self.database_url)
        shown["redis_url"] = redact_url(self.redis_url)
        for name in ("otel_exporter_otlp_endpoint", "otel_exporter_otlp_traces_endpoint"):
            shown[name] = redact_url(getattr(self, name))
        return shown


def redact_url(url: str | None) -> str | None:
    """``scheme://user:***@host/db``: never print a password."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
    except ValueError:
        return "<unparseable url>"
