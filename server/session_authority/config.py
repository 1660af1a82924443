"""Settings, read once from the environment at start-up (twelve-factor).

Every knob is documented in deploy/configuration.md; keep the two in step
(tests/unit/test_settings_documented.py fails on a field without a row there).
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from session_authority.core.breaker import BreakerPolicy
from session_authority.core.policy import CorePolicy

#: The core's defaults are written once, in ``CorePolicy`` and ``BreakerPolicy``:
#: the settings that feed them default to them (in the settings' units).
_CORE = CorePolicy()
_BREAKER = BreakerPolicy()


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


__all__ = ["Settings", "redact_url"]

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_EXPORTERS = r"^\s*(otlp|console|none)\s*(,\s*(otlp|console|none)\s*)*$"
_KEY_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_API_KEY_IDENTITY = "apikey:"


class Settings(BaseSettings):
    """Validated, frozen configuration. Environment names are the field names
    upper-cased (``REDIS_URL``, ``CACHE_TTL_SECONDS``...)."""

    # hide_input_in_errors: a rejected value may be a secret (a raw API key
    # pasted where its hash belongs, a URL with its password).
    # use_attribute_docstrings: each field's docstring is its description,
    # which every verb's --help prints beside the variable (cli_args.env_help).
    model_config = SettingsConfigDict(
        frozen=True,
        extra="ignore",
        case_sensitive=False,
        hide_input_in_errors=True,
        use_attribute_docstrings=True,
    )

    database_url: str | None = Field(default=None, repr=False)
    """Postgres DSN, the source of truth (required by serve, migrate and gc)."""
    database_pooler: str = Field(default="none", pattern="^(none|pgbouncer)$")
    """What DATABASE_URL points at: none (Postgres itself) or pgbouncer (a pooler in
    transaction mode, PgBouncer or another): then no prepared-statement cache, each
    query parsed as the unnamed statement (deploy/README.md, "PgBouncer" and "Scaling")."""
    redis_url: str | None = Field(default=None, repr=False)
    """Redis URL for the cache (unset: no cache, every validation reads Postgres):
    redis://, rediss://, unix://, or a Sentinel set,
    redis+sentinel://[user:pass@]host:26379,host:26379/<master-name>[/db] (rediss+sentinel: TLS),
    or a Redis Cluster, redis+cluster://[user:pass@]host:6379,host:6379 (rediss+cluster: TLS)."""
    database_listen_url: str | None = Field(default=None, repr=False)
    """Postgres DSN of the one LISTEN connection per process that wakes
    WatchRevocations (default: DATABASE_URL). Must reach Postgres or a
    session-mode pool: PgBouncer's transaction pooling cannot LISTEN."""

    host: str = "0.0.0.0"  # noqa: S104  (a service listens on every interface; `dev` binds loopback)
    """gRPC listen address."""
    port: int = Field(default=50051, ge=0, le=65535)
    """gRPC listen port."""

    cache_ttl_seconds: float = Field(default=_CORE.cache_ttl, gt=0)
    """Seconds a live session stays cached (below TOMBSTONE_TTL_SECONDS)."""
    negative_cache_ttl_seconds: float = Field(default=_CORE.negative_ttl, gt=0)
    tombstone_ttl_seconds: float = Field(default=_CORE.tombstone_ttl, gt=0)
    cache_early_refresh_seconds: float = Field(default=_CORE.early_refresh, ge=0)
    """XFetch: hot entries are refreshed this close to expiry (0: never)."""
    revocation_sweep_seconds: float = Field(default=1.0, ge=0)
    """Every replica checks Redis still holds its state and drains pending
    revocations into it this often (0: never)."""
    revocation_skew_seconds: float = Field(default=_CORE.revocation_skew, ge=0)
    """Clock difference allowed between Redis's host and Postgres's when
    revocations are replayed into a replaced Redis."""
    revocation_event_retention_seconds: float = Field(default=86_400.0, gt=0)
    """WatchRevocations: events are kept this long (Postgres's clock); a watcher
    resuming from an older cursor is refused (FAILED_PRECONDITION)."""
    revocation_event_prune_seconds: float = Field(default=60.0, ge=0)
    """How often each process deletes events past the retention, in batches of
    10,000 (at most 100 a pass; 0: this process never prunes)."""
    watch_max_watchers: int = Field(default=1000, ge=1)
    """Concurrent WatchRevocations streams of authenticated callers per process,
    counted apart from MAX_CONCURRENT_RPCS; beyond: RESOURCE_EXHAUSTED."""
    watch_stall_timeout_ms: int = Field(default=10_000, gt=0)
    """A watcher whose stream takes no message for this long (it stopped
    reading) is ended with RESOURCE_EXHAUSTED; it resumes from its cursor."""
    watch_poll_ms: int = Field(default=1000, gt=0)
    """WatchRevocations reads the event record at least this often, should a
    NOTIFY be lost (the bound on an event's delay without one)."""
    watch_heartbeat_ms: int = Field(default=250, ge=0, le=60_000)
    """WatchRevocations: a watcher that asks for heartbeats gets one at most
    this often, each time the reader has caught up with Postgres further; while
    watched, the record is read at least this often (0: no heartbeats)."""
    unknown_token_rate: float = Field(default=_CORE.unknown_token_rate, ge=0)
    """Per caller (peer address), unknown tokens per second that may reach Postgres (0: off)."""
    unknown_token_burst: int = Field(default=_CORE.unknown_token_burst, ge=1)
    session_ttl_default_seconds: int = Field(
        default=int(_CORE.default_session_ttl.total_seconds()), gt=0
    )
    session_ttl_max_seconds: int = Field(default=int(_CORE.max_session_ttl.total_seconds()), gt=0)
    touch_interval: float = Field(default=_CORE.touch_interval, ge=0)
    """Seconds: TouchSession writes a session to Postgres at most once per
    interval; touches in between answer its current expiry (0: every touch writes)."""
    session_max_lifetime: float = Field(default=_CORE.session_max_lifetime.total_seconds(), gt=0)
    """Seconds: TouchSession never moves a session's expiry past its creation
    plus this (default 30 days)."""

    redis_pool_min: int = Field(default=2, ge=0)
    redis_pool_max: int = Field(default=10, ge=1)
    redis_pool_timeout_ms: int = Field(default=1000, gt=0)
    cache_legacy_keys: bool = True
    """Also honour and write the previous release's ``session:<64 hex>`` keys for
    tombstones and creation markers (a rolling upgrade); see ``redis_cache``."""
    pg_pool_min: int = Field(default=2, ge=0)
    pg_pool_max: int = Field(default=10, ge=1)
    pg_pool_timeout_ms: int = Field(default=2000, gt=0)
    pg_command_timeout_ms: int = Field(default=5000, gt=0)

    breaker_timeout_ms: int = Field(default=_ms(_BREAKER.timeout), gt=0)
    breaker_error_threshold_percentage: float = Field(
        default=_BREAKER.error_threshold_percentage, gt=0, le=100
    )
    breaker_volume_threshold: int = Field(default=_BREAKER.volume_threshold, ge=1)
    breaker_reset_timeout_ms: int = Field(default=_ms(_BREAKER.reset_timeout), gt=0)
    breaker_rolling_window_ms: int = Field(default=_ms(_BREAKER.rolling_window), gt=0)
    breaker_consecutive_failures: int = Field(default=_BREAKER.consecutive_failures, ge=0)
    """Open after this many failed or slow Redis calls in a row (0: window rule only)."""
    breaker_slow_call_ms: int = Field(default=_ms(_BREAKER.slow_call), gt=0)
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
    l1_bus_liveness_ms: int = Field(default=500, ge=50, le=10_000)
    """The revocation bus: a process answers from L1 only while its subscription
    delivered data (a message or a pong) within this long; it pings every quarter
    of it. Its registration counts for publishers 4x this long (see redis_bus.py)."""

    max_concurrent_rpcs: int = Field(default=1000, ge=1)
    """Concurrent calls of authenticated callers (with no authentication
    configured: every non-public call) per process; beyond: RESOURCE_EXHAUSTED."""
    max_public_rpcs: int = Field(default=100, ge=1)
    """Concurrent calls from callers without credentials (health, reflection,
    anonymous reads) per process; never counted against MAX_CONCURRENT_RPCS."""
    max_public_rpcs_per_peer: int = Field(default=20, ge=1)
    """Of those, at most this many from one address."""
    request_idle_timeout_ms: int = Field(default=2000, gt=0)
    """A call whose request message has not arrived this long after its
    headers is ended (UNAVAILABLE), freeing its slot."""
    grpc_max_concurrent_streams: int = Field(default=100, ge=1)
    """Concurrent calls on one client connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS)."""
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    workers: int = Field(default=0, ge=0)
    """``serve`` worker processes sharing the port (0: one per core; ``--workers`` overrides)."""
    grpc_max_connection_age_ms: int = Field(default=300_000, ge=0)
    """A client connection is sent GOAWAY after about this long (±10 %), so
    long-lived clients reconnect and spread over workers and replicas (0: never)."""
    grpc_max_connection_age_grace_ms: int = Field(default=30_000, ge=0)
    """How long calls still running on a connection past its age may finish."""
    event_loop: str = Field(default="auto", pattern="^(auto|uvloop|asyncio)$")
    """``serve``'s event loop: ``auto`` is uvloop when installed, else asyncio's."""
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

    # Transport security and authorisation (README "Security"; serve's --tls-cert,
    # --tls-key, --tls-client-ca and --allow-unauthenticated set the first four).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    """Clients must present a certificate from this CA (mTLS); its SANs identify them."""
    allow_unauthenticated: bool = False
    """``serve`` starts with no authentication configured (every RPC open to everyone)."""
    auth_api_keys: str = Field(default="", repr=False)
    """``name:sha256hex`` entries, comma-separated: the service API keys, by hash."""
    auth_allowed_identities: str = ""
    """Who may call the mutating RPCs: SAN URIs or DNS names of client
    certificates, and ``apikey:<name>``; comma-separated."""
    auth_anonymous_reads: bool = False
    """ValidateSession and Health answer callers without credentials too."""
    grpc_reflection: bool = True
    page_token_key: str = Field(default="", repr=False)
    """Signs ListUserSessions' page tokens (at least 32 characters; every replica
    the same). Unset: a random secret made once in Postgres by ``migrate``."""

    # Gateways (deploy/gateways.md): Envoy's ext_authz on the gRPC port, and forward-auth over HTTP.
    gateway_cookie: str = Field(default="session", pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
    """The cookie that carries the session token (else ``Authorization: Bearer``)."""
    gateway_user_id_header: str = Field(default="x-session-user-id", pattern="^[a-z0-9-]+$")
    """The header the upstream receives the session's user id in (percent-encoded
    UTF-8 beyond printable ASCII); a client's own value under this name is replaced."""
    gateway_session_id_header: str = Field(default="x-session-id", pattern="^[a-z0-9-]+$")
    """The header the upstream receives the session id in; likewise replaced."""
    forward_auth_host: str = "127.0.0.1"
    """Forward-auth's listener: loopback by default, for a gateway on the same
    host or pod; set a private address for one elsewhere (with its TLS below)."""
    forward_auth_port: int = Field(default=0, ge=0, le=65535)
    """Forward-auth HTTP port (``/auth``, for nginx auth_request, Traefik
    forwardAuth, Caddy forward_auth); 0: off."""
    forward_auth_timeout_ms: int = Field(default=1000, gt=0)
    """A forward-auth check that has no answer after this long is a 503."""
    # Forward-auth's own TLS, not TLS_*: turning TLS on for the gRPC port must not
    # switch a gateway's http:// to https:// under it, and its client CA is the
    # gateways', not the service callers' whose SANs the allow-list names.
    forward_auth_tls_cert_file: Path | None = None
    """Forward-auth serves HTTPS with this certificate chain (PEM); re-read when it changes."""
    forward_auth_tls_key_file: Path | None = None
    forward_auth_tls_client_ca_file: Path | None = None
    """Gateways must present a certificate from this CA (mTLS); that authenticates
    them in place of ``x-api-key``."""

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
        if self.page_token_key and len(self.page_token_key.encode()) < 32:
            raise ValueError("PAGE_TOKEN_KEY must be at least 32 bytes (or unset)")
        self._check_cache_ttls()
        self.core_policy()  # validates the TTL relations
        return self

    def _check_cache_ttls(self) -> None:
        """The relations between the cache's TTLs, said with the variables to
        change (CorePolicy checks them again, in its own words)."""
        limit = CorePolicy().max_fill_lag  # not a setting: the core's own bound
        if self.tombstone_ttl_seconds <= max(self.cache_ttl_seconds, limit):
            raise ValueError(
                f"TOMBSTONE_TTL_SECONDS ({self.tombstone_ttl_seconds:g}) must exceed "
                f"CACHE_TTL_SECONDS ({self.cache_ttl_seconds:g}) and {limit:g} s (the longest "
                "fill), so that a revocation outlives every cached copy: raise "
                "TOMBSTONE_TTL_SECONDS (e.g. to twice CACHE_TTL_SECONDS) or lower "
                "CACHE_TTL_SECONDS"
            )
        if self.cache_early_refresh_seconds >= self.cache_ttl_seconds:
            raise ValueError(
                f"CACHE_EARLY_REFRESH_SECONDS ({self.cache_early_refresh_seconds:g}) must be "
                f"below CACHE_TTL_SECONDS ({self.cache_ttl_seconds:g}): lower "
                "CACHE_EARLY_REFRESH_SECONDS (0 turns early refresh off) or raise CACHE_TTL_SECONDS"
            )

    def core_policy(self) -> CorePolicy:
        return CorePolicy(
            cache_ttl=self.cache_ttl_seconds,
            negative_ttl=self.negative_cache_ttl_seconds,
            tombstone_ttl=self.tombstone_ttl_seconds,
            early_refresh=self.cache_early_refresh_seconds,
            revocation_skew=self.revocation_skew_seconds,
            unknown_token_rate=self.unknown_token_rate,
            unknown_token_burst=self.unknown_token_burst,
            default_session_ttl=timedelta(seconds=self.session_ttl_default_seconds),
            max_session_ttl=timedelta(seconds=self.session_ttl_max_seconds),
            page_token_key=self.page_token_key.encode() or None,
            touch_interval=self.touch_interval,
            session_max_lifetime=timedelta(seconds=self.session_max_lifetime),
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

    # Transport security and authorisation.

    @field_validator(
        "tls_cert_file",
        "tls_key_file",
        "tls_client_ca_file",
        "forward_auth_tls_cert_file",
        "forward_auth_tls_key_file",
        "forward_auth_tls_client_ca_file",
        mode="before",
    )
    @classmethod
    def _unset_when_empty(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _check_security(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS_CERT_FILE and TLS_KEY_FILE go together: set both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("TLS_CLIENT_CA_FILE (mTLS) needs TLS_CERT_FILE and TLS_KEY_FILE")
        if (self.forward_auth_tls_cert_file is None) != (self.forward_auth_tls_key_file is None):
            raise ValueError(
                "FORWARD_AUTH_TLS_CERT_FILE and FORWARD_AUTH_TLS_KEY_FILE go together: "
                "set both or neither"
            )
        if (
            self.forward_auth_tls_client_ca_file is not None
            and self.forward_auth_tls_cert_file is None
        ):
            raise ValueError(
                "FORWARD_AUTH_TLS_CLIENT_CA_FILE (mTLS) needs FORWARD_AUTH_TLS_CERT_FILE "
                "and FORWARD_AUTH_TLS_KEY_FILE"
            )
        keys = self.api_key_hashes()  # validates AUTH_API_KEYS
        for identity in self.allowed_identities():
            if identity.startswith(_API_KEY_IDENTITY):
                if identity.removeprefix(_API_KEY_IDENTITY) not in keys:
                    raise ValueError(
                        f"AUTH_ALLOWED_IDENTITIES: {identity} names no AUTH_API_KEYS key"
                    )
            elif self.tls_client_ca_file is None:
                raise ValueError(
                    f"AUTH_ALLOWED_IDENTITIES: {identity} is a certificate identity, "
                    "which needs TLS_CLIENT_CA_FILE (mTLS)"
                )
        return self

    @property
    def authentication_configured(self) -> bool:
        """Callers must authenticate: by client certificate (mTLS) or API key."""
        return self.tls_client_ca_file is not None or bool(self.auth_api_keys.strip())

    def api_key_hashes(self) -> dict[str, str]:
        """AUTH_API_KEYS as name -> SHA-256 hex (lower case). Raises
        ``ValueError`` naming the entry, never showing a hash or key."""
        hashes: dict[str, str] = {}
        for position, entry in enumerate(_split_list(self.auth_api_keys), start=1):
            name, _, digest = entry.partition(":")
            if not _KEY_NAME.fullmatch(name) or not _SHA256_HEX.fullmatch(digest):
                raise ValueError(
                    f"AUTH_API_KEYS entry {position} is not name:sha256hex (a name of letters, "
                    "digits, '.', '_' or '-', and the key's SHA-256 in 64 hex digits)"
                )
            if name in hashes:
                raise ValueError(f"AUTH_API_KEYS: the name {name} appears twice")
            if digest.lower() in hashes.values():
                raise ValueError(f"AUTH_API_KEYS: {name} has the same key as another entry")
            hashes[name] = digest.lower()
        return hashes

    def allowed_identities(self) -> frozenset[str]:
        return frozenset(_split_list(self.auth_allowed_identities))


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


#: Query parameters that carry secrets: libpq's/asyncpg's ``password`` and ``sslpassword``
#: (a client key's passphrase), redis-py's ``password`` and ``ssl_password``, and a
#: Sentinel URL's ``sentinel_password`` (adapters/redis_sentinel.py).
_SECRET_PARAMS = frozenset({"password", "sslpassword", "ssl_password", "sentinel_password"})


def redact_url(url: str | None) -> str | None:
    """``scheme://user:***@host/db?sslpassword=***``: never print a password.
    Certificate and key *paths* stay: they are not secrets, and they help."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        if parts.password is not None:
            netloc = parts.netloc.rsplit("@", 1)[1]
            parts = parts._replace(netloc=f"{parts.username or ''}:***@{netloc}")
        if parts.query:
            query = [
                (name, "***" if name.lower() in _SECRET_PARAMS else value)
                for name, value in parse_qsl(parts.query, keep_blank_values=True)
            ]
            parts = parts._replace(query=urlencode(query, safe="/*"))
        return urlunsplit(parts)
    except ValueError:
        return "<unparseable url>"
