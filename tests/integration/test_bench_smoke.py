"""The benchmark must keep running; its numbers are reported, never asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_quick_benchmark_reports_every_key(tmp_path: Path, repo_root: Path) -> None:
    out = tmp_path / "bench.json"
    subprocess.run(
        [
            sys.executable,
            str(repo_root / "tests/benchmarks/bench.py"),
            "--quick",
            "--json",
            str(out),
        ],
        check=True,
        timeout=240,
        capture_output=True,
    )
    import json

    report = json.loads(out.read_text())
    expected = {
        "validate_hit_p50_ms",
        "validate_hit_p99_ms",
        "validate_db_p50_ms",
        "validate_db_p99_ms",
        "validate_hit_speedup_p50",
        "revoke_1000_pipelined_ms",
        "revoke_1000_sequential_ms",
        "revoke_pipeline_speedup",
        "grpc_rps_cached",
        "grpc_rps_uncached",
        "grpc_rps_ratio",
    }
    assert set(report) == expected
    assert all(value > 0 for value in report.values())
