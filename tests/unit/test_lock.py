"""The lock is what we test: uv.lock agrees with pyproject.toml; uv's bootstrap pin with the lock.

`make` installs with ``uv sync --locked``, which already refuses a lock that pyproject.toml has
moved away from. This test says the same thing without the network, inside ``make test``, so a
change to pyproject.toml without ``make lock`` fails here with the requirement named, and it
checks the one pin uv cannot check for itself: .ci/uv-bootstrap.txt, which plain pip installs
before uv exists.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]

Key = tuple[str, frozenset[str], str, str]


def _key(name: str, extras: frozenset[str], spec: str, marker: str | None) -> Key:
    return (
        canonicalize_name(name),
        extras,
        str(SpecifierSet(spec)),
        str(Marker(marker)) if marker else "",
    )


def declared(pyproject: dict[str, Any]) -> set[Key]:
    """Every requirement pyproject.toml declares, the optional ones under their extra's marker."""
    project = pyproject["project"]
    groups: list[tuple[str | None, list[str]]] = [(None, project["dependencies"])]
    groups += list(project.get("optional-dependencies", {}).items())
    keys = set()
    for extra, reqs in groups:
        for text in reqs:
            req = Requirement(text)
            marker = str(req.marker) if req.marker else None
            if extra is not None:
                mine = f"extra == '{extra}'"
                marker = f"({marker}) and {mine}" if marker else mine
            keys.add(_key(req.name, frozenset(req.extras), str(req.specifier), marker))
    return keys


def locked(lock: dict[str, Any], project: str) -> set[Key]:
    """What uv.lock recorded as the project's requirements when it was resolved."""
    (entry,) = [p for p in lock["package"] if p["name"] == project]
    return {
        _key(r["name"], frozenset(r.get("extras", ())), r.get("specifier", ""), r.get("marker"))
        for r in entry["metadata"]["requires-dist"]
    }


def drift(pyproject_text: str, lock_text: str) -> set[Key]:
    pyproject = tomllib.loads(pyproject_text)
    return declared(pyproject) ^ locked(tomllib.loads(lock_text), pyproject["project"]["name"])


def test_the_lock_records_exactly_what_pyproject_declares() -> None:
    difference = drift((REPO / "pyproject.toml").read_text(), (REPO / "uv.lock").read_text())
    assert difference == set(), (
        f"pyproject.toml and uv.lock disagree (run `make lock`): {difference}"
    )


def test_a_requirement_changed_without_relocking_is_found() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert '"redis[hiredis]>=5.2,<9",' in text
    moved = text.replace('"redis[hiredis]>=5.2,<9",', '"redis[hiredis]>=5.2,<10",')
    added = text.replace('"aiobreaker==1.2.0",', '"aiobreaker==1.2.0",\n    "attrs>=23",')
    lock = (REPO / "uv.lock").read_text()
    assert {k[0] for k in drift(moved, lock)} == {"redis"}
    assert {k[0] for k in drift(added, lock)} == {"attrs"}


def test_every_locked_package_has_hashes() -> None:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    unhashed = [
        p["name"]
        for p in lock["package"]
        if "registry" in p["source"]
        and not all("hash" in a for a in [*p.get("wheels", []), p.get("sdist", {"hash": ""})])
    ]
    assert unhashed == []


def test_the_uv_bootstrap_pin_is_the_locked_uv() -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / ".ci" / "uv_bootstrap.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr


def test_make_installs_the_lock_and_refuses_a_stale_one() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "--require-hashes -r .ci/uv-bootstrap.txt" in makefile
    assert "uv sync --locked" in makefile
    assert "pip install --quiet -e" not in makefile  # nothing installed around the lock
