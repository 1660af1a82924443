"""Every setting ``serve`` reads has a row in deploy/configuration.md, and the
README's short Configuration table agrees with it.

A setting added to ``Settings`` without a row there fails here, so the reference
cannot fall behind the code. Only a row's first cell documents a variable: a name
mentioned in another row's text (``BREAKER_TIMEOUT_MS`` in the pool's row) does not."""

from __future__ import annotations

import re
from pathlib import Path

from session_authority.config import Settings

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "deploy" / "configuration.md"
README = ROOT / "README.md"
_NAME = re.compile(r"`([A-Z][A-Z0-9_]+)`")


def rows(markdown: str) -> dict[str, str]:
    """Each variable named in a table row's first cell, with that row's second
    cell (its default)."""
    found: dict[str, str] = {}
    for line in markdown.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        for name in _NAME.findall(cells[0]):
            found[name] = cells[1] if len(cells) > 1 else ""
    return found


def undocumented(settings: set[str], markdown: str) -> list[str]:
    """The settings without a row of their own in ``markdown``."""
    return sorted(settings - set(rows(markdown)))


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_every_setting_has_a_row_in_the_configuration_reference() -> None:
    settings = {name.upper() for name in Settings.model_fields}
    missing = undocumented(settings, REFERENCE.read_text())
    assert missing == [], f"settings without a row in deploy/configuration.md: {missing}"


def test_a_missing_row_is_found() -> None:
    """The check itself: a row taken out, or a name only mentioned in prose or in
    another row's meaning, is reported."""
    reference = REFERENCE.read_text()
    without = "\n".join(
        line for line in reference.splitlines() if not line.startswith("| `WATCH_POLL_MS`")
    )
    without += "\nProse naming `WATCH_POLL_MS` documents nothing.\n"
    assert undocumented({"WATCH_POLL_MS", "DATABASE_URL"}, without) == ["WATCH_POLL_MS"]
    assert undocumented({"WATCH_POLL_MS"}, reference) == []


def test_the_readme_rows_agree_with_the_reference() -> None:
    """The README keeps a few settings; each with the reference's default, and
    the section links to the reference."""
    section = _section(README.read_text(), "## Configuration")
    front = rows(section)
    assert len(front) >= 5, "the README's Configuration lost its table"
    reference = rows(REFERENCE.read_text())
    settings = {name.upper() for name in Settings.model_fields}
    for name, default in front.items():
        assert name in settings, f"README's Configuration names {name}, which is no setting"
        assert reference.get(name) == default, (
            f"README says {name} defaults to {default!r}, "
            f"deploy/configuration.md says {reference.get(name)!r}"
        )
    assert "(deploy/configuration.md)" in section


_VALUE = re.compile(r"`([^`]*)`")


def defaults(markdown: str) -> dict[str, str]:
    """Each variable named in a table row's first cell, with its default as a
    value: the first code span of its part of the second cell (a row naming
    ``A`` / ``B`` gives ``x`` / ``y``, or ``x``, ``y``), else ``unset``."""
    found: dict[str, str] = {}
    for line in markdown.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        names = _NAME.findall(cells[0])
        cell = cells[1] if len(cells) > 1 else ""
        parts = [cell] * len(names)
        for separator in (" / ", ", "):
            if len(names) > 1 and len(cell.split(separator)) == len(names):
                parts = cell.split(separator)
                break
        for name, part in zip(names, parts, strict=True):
            value = _VALUE.search(part)
            found[name] = value.group(1) if value and not part.startswith("unset") else "unset"
    return found


def test_the_runbook_knobs_agree_with_the_reference() -> None:
    """The runbook's "Configuration knobs" table repeats the settings operators
    turn most, in the seed's words: each is a setting (or the OpenTelemetry
    SDK's own ``OTEL_*``), with the reference's default."""
    section = _section((ROOT / "deploy" / "runbook.md").read_text(), "## Configuration knobs")
    knobs = defaults(section)
    assert len(knobs) >= 30, "the runbook's knobs table lost its rows"
    reference = defaults(REFERENCE.read_text())
    settings = {name.upper() for name in Settings.model_fields}
    for name, default in knobs.items():
        if name not in settings:
            assert name.startswith("OTEL_"), f"the runbook's knobs name {name}, which is no setting"
            continue
        assert reference.get(name) == default, (
            f"the runbook says {name} defaults to {default!r}, "
            f"deploy/configuration.md says {reference.get(name)!r}"
        )


def test_a_runbook_default_that_drifted_is_found() -> None:
    rows_ = "| `PG_POOL_MIN` / `PG_POOL_MAX` | `2` / `12` | bounds |\n| `LOG_LEVEL` | `INFO` | x |"
    assert defaults(rows_) == {"PG_POOL_MIN": "2", "PG_POOL_MAX": "12", "LOG_LEVEL": "INFO"}
    assert defaults("| `TLS_CLIENT_CA_FILE` | unset: plaintext | x |") == {
        "TLS_CLIENT_CA_FILE": "unset"
    }
