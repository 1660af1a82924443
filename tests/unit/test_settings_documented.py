"""Every setting ``serve`` reads is documented in the README's Configuration table.

A setting added to ``Settings`` without a row there fails here, so the table
cannot fall behind the code."""

from __future__ import annotations

import re
from pathlib import Path

from session_authority.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def _configuration_table() -> str:
    text = README.read_text()
    start = text.index("## Configuration")
    return text[start : text.index("\n## ", start + 1)]


def test_every_setting_has_a_row_in_the_readme() -> None:
    table = _configuration_table()
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", table))
    settings = {name.upper() for name in Settings.model_fields}
    missing = sorted(settings - documented)
    assert missing == [], f"settings without a row in README's Configuration: {missing}"
