"""The benchmark must keep running and report every key; its numbers are
reported, never asserted. It exits non-zero when an answer was wrong (a call
not OK, a session not valid or not from where it should be), and that fails
here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.bench import REQUIRED_KEYS

pytestmark = pytest.mark.integration


def test_quick_benchmark_reports_every_key(tmp_path: Path, repo_root: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.bench", "--quick", "--json", str(out)],
        cwd=repo_root,
        timeout=240,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert set(REQUIRED_KEYS) <= set(report), set(REQUIRED_KEYS) - set(report)
    assert report["problems"] == []
    assert isinstance(report["load_generator"], str)
    assert report["load_generator"]
    numbers = {key: report[key] for key in REQUIRED_KEYS if key != "load_generator"}
    assert all(isinstance(v, int | float) and v > 0 for v in numbers.values()), numbers
    assert report["workers"] >= 1
    # ValidateSessions of 100 cached tokens, beside hit_rps in the same run.
    assert report["batch_vs_hit"] == round(report["batch_tokens_per_s"] / report["hit_rps"], 2)
    assert report["checks"]["batch"]["calls_ok"] > 0
    assert report["cores"] >= 1
    # Read from /proc: how long the stores waited for a CPU during the throughput runs.
    assert report["redis_cpu_wait_seconds"] >= 0
    assert report["postgres_cpu_wait_seconds"] >= 0
    # Read from /proc/stat: what the host took from our vCPUs during each paced latency run.
    assert report["hit_latency_steal_seconds"] >= 0
    assert report["ceiling_latency_steal_seconds"] >= 0
    # TouchSession on one hot session: at most one Postgres write per TOUCH_INTERVAL.
    assert report["touch_calls"] > 0
    assert 1 <= report["touch_hot_session_writes"] <= report["touch_write_bound"]
    # A watcher on the replica saw each Invalidate made on the other server.
    assert 0 < report["watch_propagation_p50_ms"] <= report["watch_propagation_p99_ms"]
    # The Python client's local cache, beside hit_rps in the same run; its copies dropped.
    per_core = report["hit_rps"] / report["workers"]
    assert report["client_cache_vs_hit"] == round(
        report["client_cached_validate_per_s"] / per_core, 1
    )
    assert report["client_cached_hit_share"] > 0.9
    assert (
        0
        < report["client_cache_revocation_p50_ms"]
        <= report["client_cache_revocation_p99_ms"]
        <= report["client_cache_revocation_max_ms"]
    )
    # Revocations were acknowledged by the two replicas' workers, and by nothing else.
    assert report["revocation_subscribers"] == 2 * report["workers"]
