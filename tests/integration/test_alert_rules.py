"""deploy/observability/prometheus-rules.yml under Prometheus's own promtool:
`promtool check rules` accepts it, and `promtool test rules` runs every scenario
in deploy/observability/tests/ (a Redis outage and its recovery, slow Redis, a
flapping breaker, a Postgres outage, the hit rate, total keys) against it.

promtool comes from Debian's ``prometheus`` package; `make test` (and `make
integration`, `make rules`) puts the binary in the venv. Without it these
tests fail: an alert rule that nobody ran is not known to work."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .test_observability_deploy import metric_names

pytestmark = pytest.mark.promtool

RULES = "deploy/observability/prometheus-rules.yml"
SCENARIOS = "deploy/observability/tests"


@pytest.fixture(scope="module")
def promtool() -> str:
    beside_python = Path(sys.executable).parent / "promtool"
    found = str(beside_python) if beside_python.exists() else shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool not found (neither beside the venv's python nor on PATH): run "
            "`make .venv/bin/promtool`, or install Debian's `prometheus` package"
        )
    return found


def _scenarios(repo_root: Path) -> list[Path]:
    found = sorted((repo_root / SCENARIOS).glob("*.yml"))
    assert found, f"no promtool test files in {SCENARIOS}"
    return found


def _run(promtool: str, *args: str, cwd: Path) -> str:
    done = subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def _alert_names(repo_root: Path) -> set[str]:
    rules: dict[str, Any] = yaml.safe_load((repo_root / RULES).read_text())
    return {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}


def test_promtool_checks_the_rules(promtool: str, repo_root: Path) -> None:
    output = _run(promtool, "check", "rules", RULES, cwd=repo_root)
    assert "SUCCESS: 8 rules found" in output


def test_promtool_runs_every_scenario(promtool: str, repo_root: Path) -> None:
    files = [str(path.relative_to(repo_root)) for path in _scenarios(repo_root)]
    output = _run(promtool, "test", "rules", *files, cwd=repo_root)
    assert output.count("SUCCESS") == len(files), output


def test_every_alert_fires_in_some_scenario(repo_root: Path) -> None:
    fired = set()
    for path in _scenarios(repo_root):
        text = path.read_text()
        fired |= set(re.findall(r'alertname="(\w+)", alertstate="firing"', text))
        fired |= set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- ", text))
    assert fired == _alert_names(repo_root)


def test_scenarios_feed_only_series_the_rules_read(repo_root: Path) -> None:
    """Their input is what the rules read, which test_observability_deploy.py
    checks a running server exports: a scenario cannot invent a series."""
    rules: dict[str, Any] = yaml.safe_load((repo_root / RULES).read_text())
    read = set().union(*(metric_names(r["expr"]) for g in rules["groups"] for r in g["rules"]))
    for path in _scenarios(repo_root):
        scenario: dict[str, Any] = yaml.safe_load(path.read_text())
        assert scenario["rule_files"] == ["../prometheus-rules.yml"]
        for test in scenario["tests"]:
            fed = {series["series"].split("{")[0] for series in test["input_series"]}
            assert fed <= read, f"{path.name}: {sorted(fed - read)} not read by any rule"
