#!/usr/bin/env python3
"""Writes (or, with --check, verifies) .ci/uv-bootstrap.txt from uv.lock.

`make` installs the lock with uv, so uv itself must come first, from plain pip. That first
install is pinned by the lock too: this file pins uv's version and every wheel hash exactly as
uv.lock records them, and pip installs it with --require-hashes. `make lock` rewrites it;
tests/unit/test_lock.py runs --check, so the bootstrap pin and the lock cannot drift apart.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "uv.lock"
OUT = ROOT / ".ci" / "uv-bootstrap.txt"


def render() -> str:
    lock = tomllib.loads(LOCK.read_text())
    (uv,) = [p for p in lock["package"] if p["name"] == "uv"]
    hashes = [w["hash"] for w in uv["wheels"]] + [uv["sdist"]["hash"]]
    pins = [f"uv=={uv['version']}", *(f"    --hash={h}" for h in hashes)]
    header = "# Generated from uv.lock by .ci/uv_bootstrap.py (`make lock`); do not edit.\n"
    return header + " \\\n".join(pins) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        if not OUT.exists() or OUT.read_text() != text:
            print(
                f"{OUT.relative_to(ROOT)} disagrees with uv.lock: run `make lock`", file=sys.stderr
            )
            return 1
        return 0
    if not OUT.exists() or OUT.read_text() != text:  # unchanged: keep its mtime (make's uv stamp)
        OUT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
