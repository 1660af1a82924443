"""Helpers shared by the integration tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os

from session_authority.config import Settings
from session_authority.embedded import find_free_port


def server_env(**extra: str) -> dict[str, str]:
    """The environment for a server subprocess: no proxies (loopback only), no
    stray PG* variables, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith("PG")
    }
    return env | extra


#: Tests talk to loopback only; never through a proxy from the environment.
NO_PROXY = [("grpc.enable_http_proxy", 0)]


def app_settings(database_url: str, redis_url: str | None, **overrides: object) -> Settings:
    """Settings for an in-process server on a free loopback port (admin port off)."""
    values: dict[str, object] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "host": "127.0.0.1",
        "port": find_free_port(),
        "admin_port": 0,
        # Load tests drive thousands of unknown tokens from one loopback caller, during
        # outages too (no negative cache): the per-caller limit would refuse them. It has
        # tests of its own (tests/unit/test_miss_limit.py, test_revocation.py).
        "unknown_token_rate": 0,
    }
    return Settings(**(values | overrides))  # type: ignore[arg-type]
