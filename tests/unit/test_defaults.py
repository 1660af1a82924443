"""Each default is written once: the settings that feed the core's policies
default to what ``CorePolicy`` and ``BreakerPolicy`` say, read from them, not
written again as numbers in config.py."""

from __future__ import annotations

import ast
from pathlib import Path

from session_authority import config
from session_authority.core.breaker import BreakerPolicy
from session_authority.core.policy import CorePolicy

#: The settings ``core_policy`` and ``breaker_policy`` read (the Postgres
#: breaker's own knobs have no default in the core).
POLICY_SETTINGS = {
    "cache_ttl_seconds",
    "negative_cache_ttl_seconds",
    "tombstone_ttl_seconds",
    "cache_early_refresh_seconds",
    "revocation_skew_seconds",
    "unknown_token_rate",
    "unknown_token_burst",
    "session_ttl_default_seconds",
    "session_ttl_max_seconds",
    "touch_interval",
    "session_max_lifetime",
    "breaker_timeout_ms",
    "breaker_error_threshold_percentage",
    "breaker_volume_threshold",
    "breaker_reset_timeout_ms",
    "breaker_rolling_window_ms",
    "breaker_consecutive_failures",
    "breaker_slow_call_ms",
}


def test_default_settings_build_the_default_policies() -> None:
    settings = config.Settings()
    assert settings.core_policy() == CorePolicy()
    assert settings.breaker_policy() == BreakerPolicy()


def literal_defaults(source: str) -> set[str]:
    """Settings fields whose ``Field(default=...)`` is a number written out."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        call = node.value
        if not isinstance(call, ast.Call):
            continue
        for keyword in call.keywords:
            value = keyword.value
            if keyword.arg == "default" and not any(
                isinstance(n, ast.Name | ast.Attribute) for n in ast.walk(value)
            ):
                found.add(node.target.id)
    return found


def test_the_policy_settings_read_their_defaults_from_the_core() -> None:
    source = Path(config.__file__).read_text(encoding="utf-8")
    assert literal_defaults(source) & POLICY_SETTINGS == set()
    assert "port" in literal_defaults(source)  # the check sees literals


def test_every_policy_setting_exists() -> None:
    assert set(config.Settings.model_fields) >= POLICY_SETTINGS
