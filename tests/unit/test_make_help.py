"""`make help` lists every target a user may type: each .PHONY target, with its comment."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _phony() -> list[str]:
    makefile = (REPO / "Makefile").read_text()
    match = re.search(r"^\.PHONY:(.*)$", makefile, re.MULTILINE)
    assert match, "no .PHONY line in the Makefile"
    return match.group(1).split()


def test_every_phony_target_is_in_make_help() -> None:
    done = subprocess.run(
        ["make", "--no-print-directory", "-s", "help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    described = {}
    for line in done.stdout.splitlines():
        words = line.split(maxsplit=2)
        if len(words) == 3 and words[0] == "make":
            described[words[1]] = words[2]
    targets = _phony()
    assert "e2e" in targets
    assert "h2load" in targets
    missing = [t for t in targets if t not in described]
    assert not missing, f"not in `make help`: {missing}\n{done.stdout}"
    assert all(described[t].strip() for t in targets), done.stdout
