"""How a client connects: TLS, the API key, deadlines, retries, hedging, keepalive; and the
gRPC channel options and service config they become (shared by the sync and asyncio clients).

Safe defaults, and why:

* A deadline on every call (``Deadlines``): a caller never waits on a frozen server forever.
* Retries of the idempotent RPCs on UNAVAILABLE, by gRPC itself (the service config's
  ``retryPolicy``): a call whose connection broke (a replica restarting, a GOAWAY) is sent again
  within its deadline. CreateSession is never retried: a lost reply may have created a session.
  ``retryThrottling`` stops retries when most calls fail, so retries cannot multiply an outage.
* Hedging of ``validate`` (``Hedging``), off by default: gRPC's C core does not hedge, so the
  client does (``_hedging``).
* Keepalive matched to the server's ping policy (bootstrap/grpc_server.py): the server accepts a
  ping every ``grpc.http2.min_ping_interval_without_data_ms`` (10 s) and only while a call is
  open (it does not set ``grpc.keepalive_permit_without_calls``); more often, or on an idle
  connection, is a strike, and two strikes close the connection (GOAWAY ``too_many_pings``). So:
  a ping every 30 s, only during calls.
* ``round_robin`` load balancing: with ``dns:///host:port``, calls spread over every address the
  name resolves to (every replica), and a replica that goes away is left out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

__all__ = [
    "SERVICE",
    "Deadlines",
    "Hedging",
    "Keepalive",
    "Retry",
    "Tls",
    "channel_options",
    "credentials",
    "metadata",
    "service_config",
    "watch_channel_options",
]

SERVICE = "session_authority.v1.SessionAuthority"

#: RPCs that may be sent twice with the effect of once: retried on UNAVAILABLE.
IDEMPOTENT = (
    "ValidateSession",
    "ValidateSessions",
    "Invalidate",
    "InvalidateUser",
    "Health",
    "ListUserSessions",
    # A touch sets the expiry from the server's now, never backwards: a repeat is harmless.
    "TouchSession",
)
#: RPCs gRPC never retries: CreateSession (a lost reply may have done the work) and
#: WatchRevocations (a stream: the watcher resumes from its last cursor itself).
NOT_RETRIED = ("CreateSession", "WatchRevocations")


@dataclass(frozen=True)
class Tls:
    """TLS to the server: ``root_certificates`` (PEM; None: the system's roots), and for mTLS
    ``certificate_chain`` and ``private_key`` (PEM). ``server_name``: the name the server's
    certificate must carry when it is not the target's host."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("Tls: certificate_chain and private_key go together (mTLS)")
        # gRPC's C core aborts the whole process on an empty PEM: refuse it here.
        for name in ("root_certificates", "certificate_chain", "private_key"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"Tls.{name} is empty")

    @classmethod
    def from_files(
        cls,
        *,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        server_name: str | None = None,
    ) -> Tls:
        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return cls(read(ca_file), read(cert_file), read(key_file), server_name)


@dataclass(frozen=True)
class Deadlines:
    """Seconds each call may take, retries and hedges included (a call's ``timeout=``
    overrides). InvalidateUser waits for every replica's acknowledgement and may revoke
    thousands of sessions: it gets longer."""

    validate: float = 1.0
    create: float = 2.0
    invalidate: float = 5.0
    invalidate_user: float = 10.0
    health: float = 2.0
    validate_many: float = 2.0
    """Per ValidateSessions call (each slice of up to 100 tokens)."""
    list_sessions: float = 5.0
    """Per page."""
    touch: float = 2.0
    watch_start: float = 10.0
    """Until a watch's START event arrives; after it, a watch runs until closed (no
    deadline: keepalive notices a dead connection)."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"Deadlines.{name} must be positive, not {value!r}")


@dataclass(frozen=True)
class Retry:
    """gRPC's retryPolicy for the idempotent RPCs (on UNAVAILABLE only). ``max_attempts``
    counts the first (gRPC caps it at 5); between attempts a random wait of up to
    ``initial_backoff * multiplier**n`` seconds, at most ``max_backoff``. ``max_attempts=1``:
    no retries."""

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 1.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 5:
            raise ValueError("Retry.max_attempts must be 1 to 5 (gRPC caps it at 5)")
        if self.initial_backoff <= 0 or self.max_backoff <= 0 or self.multiplier <= 0:
            raise ValueError("Retry backoffs and multiplier must be positive")


@dataclass(frozen=True)
class Hedging:
    """Hedged ``validate``: when an attempt has not answered within ``delay`` seconds, send the
    same request again (up to ``max_attempts`` in flight), take the first answer and cancel the
    rest. An attempt failing with a code in ``non_fatal`` sends the next one at once; any other
    failure is the answer. All attempts share the call's one deadline."""

    max_attempts: int = 2
    delay: float = 0.1
    non_fatal: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("Hedging.max_attempts must be at least 1")
        if self.delay < 0:
            raise ValueError("Hedging.delay must not be negative")


@dataclass(frozen=True)
class Keepalive:
    """HTTP/2 keepalive pings: one after ``time_ms`` without activity, the connection closed
    when none is answered within ``timeout_ms``. Only while calls are open
    (``permit_without_calls=False``), as the server's ping policy requires."""

    time_ms: int = 30_000
    timeout_ms: int = 10_000
    permit_without_calls: bool = False


def service_config(retry: Retry) -> str:
    """The channel's service config (JSON): round_robin, and the retry policy per method."""
    retried: dict[str, Any] = {
        "name": [{"service": SERVICE, "method": m} for m in IDEMPOTENT],
    }
    if retry.max_attempts > 1:
        retried["retryPolicy"] = {
            "maxAttempts": retry.max_attempts,
            "initialBackoff": f"{retry.initial_backoff}s",
            "maxBackoff": f"{retry.max_backoff}s",
            "backoffMultiplier": retry.multiplier,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            retried,
            {"name": [{"service": SERVICE, "method": m} for m in NOT_RETRIED]},
        ],
        # Retries stop while more than half of the token bucket is spent (each failure takes
        # one token, each success gives 0.1 back): no retry storm during an outage.
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }
    return json.dumps(config, separators=(",", ":"))


def channel_options(
    retry: Retry,
    keepalive: Keepalive,
    tls: Tls | None,
    extra: Sequence[tuple[str, Any]] = (),
) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", service_config(retry)),
        # Ours, not one a DNS TXT record could replace.
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", keepalive.time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(keepalive.permit_without_calls)),
        # Keep pinging on a long call that sends no data of its own (a server stream): gRPC
        # stops after 2 such pings by default. 30 s apart, they never count as strikes.
        ("grpc.http2.max_pings_without_data", 0),
        # A replica restarting: gRPC waits 1 s (then longer) before reconnecting after a failed
        # attempt and fails calls at once meanwhile, longer than the retries' own backoff.
        # Reconnect after 100 ms instead, so that a retry finds the replacement.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    options.extend(extra)
    return options


def watch_channel_options(options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The local cache's stream's channel: the client's options, and subchannels of its own.
    gRPC's C core may share a subchannel (one connection) between channels of the same target
    and arguments (its global subchannel pool); a channel made to leave a black-holed
    connection must not get it back. (grpcio 1.85 was not seen sharing one: a guard.)"""
    return [*options, ("grpc.use_local_subchannel_pool", 1)]


def credentials(tls: Tls) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        tls.root_certificates, tls.private_key, tls.certificate_chain
    )


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata the server reads an API key from (transport/auth.py)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()
