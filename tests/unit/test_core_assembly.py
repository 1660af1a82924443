"""Importing the core's assembly loads no driver, gRPC, Prometheus or OTel SDK.

The unit tier assembles its cores on fakes; the composition root on adapters.
Run in a fresh interpreter, so nothing another test imported can hide a leak.
The check can fail: the same probe run on ``session_authority.bootstrap``
(which builds the gRPC server) finds grpc loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: Top-level packages the core must not load, by any route.
FORBIDDEN = (
    "grpc",
    "redis",
    "asyncpg",
    "aiohttp",
    "prometheus_client",
    "opentelemetry.sdk",
    "opentelemetry.exporter",
    "google.protobuf",
)

PROBE = """
import json, sys
import {module}
print(json.dumps(sorted(sys.modules)))
"""


def loaded_after_importing(module: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(json.loads(result.stdout))


def forbidden_in(modules: set[str]) -> set[str]:
    return {m for m in modules for f in FORBIDDEN if m == f or m.startswith(f + ".")}


@pytest.mark.parametrize("module", ["session_authority.core.assembly", "session_authority.core"])
def test_importing_the_core_assembly_loads_no_outer_package(module: str) -> None:
    modules = loaded_after_importing(module)
    assert module in modules
    assert forbidden_in(modules) == set()


def test_the_probe_can_fail() -> None:
    assert "grpc" in forbidden_in(loaded_after_importing("session_authority.bootstrap"))
