"""The docs hold together: the README stays a front door, and every relative link
in the docs points at a file that exists (and at a heading of it, when the link
names one).

Anchors are GitHub's: a heading lower-cased, its punctuation dropped, spaces made
hyphens, and ``-1``, ``-2``… after repeats. Links inside code (fenced blocks,
inline spans) are not links and are skipped; so are URLs with a scheme."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 300
#: The README's sections that make it the front door (issue 21).
FRONT_DOOR = ("## Two commands", "## Walk-through with grpcurl", "## API", "## Configuration")

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def documents() -> list[Path]:
    """The documents whose links are checked."""
    found = [ROOT / "README.md", ROOT / "server" / "ARCHITECTURE.md"]
    found += sorted((ROOT / "deploy").rglob("*.md"))
    found += sorted(
        p for p in (ROOT / "clients").rglob("README.md") if "node_modules" not in p.parts
    )
    found += sorted((ROOT / "tests").rglob("*.md"))
    return found


def _prose(text: str) -> list[tuple[int, str]]:
    """The lines outside fenced code, numbered, with inline code removed."""
    out: list[tuple[int, str]] = []
    fence: str | None = None
    for n, line in enumerate(text.splitlines(), start=1):
        opening = _FENCE.match(line)
        if opening:
            if fence is None:
                fence = opening.group(1)
            elif opening.group(1) == fence:
                fence = None
            continue
        if fence is None:
            out.append((n, _CODE_SPAN.sub("", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """Every anchor of a Markdown file: its headings' and explicit ``<a id>``s."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    fence: str | None = None
    for line in path.read_text().splitlines():
        opening = _FENCE.match(line)
        if opening:
            if fence is None:
                fence = opening.group(1)
            elif opening.group(1) == fence:
                fence = None
            continue
        if fence is not None:
            continue
        found.update(_HTML_ANCHOR.findall(line))
        heading = _HEADING.match(line)
        if heading is None:
            continue
        base = slug(heading.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def links(path: Path) -> list[tuple[int, str]]:
    """The relative link targets of a Markdown file, with their line numbers."""
    found: list[tuple[int, str]] = []
    for n, line in _prose(path.read_text()):
        targets = _LINK.findall(line)
        reference = _REFERENCE.match(line)
        if reference:
            targets.append(reference.group(1))
        found += [(n, t) for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]
    return found


def broken(path: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with each relative link of ``path`` (named relative to ``root``)."""
    problems: list[str] = []
    where = path.relative_to(root).as_posix()
    for n, target in links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{where}:{n}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}:{n}: {target}: no heading #{anchor} there")
    return problems


def test_the_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move the detail next "
        "to what it documents (deploy/, server/ARCHITECTURE.md, clients/*/README.md) and link it"
    )
    missing = [heading for heading in FRONT_DOOR if heading not in lines]
    assert not missing, f"README.md lost its sections {missing}"


@pytest.mark.parametrize("doc", documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(doc: Path) -> None:
    problems = broken(doc)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_checker_finds_broken_links(tmp_path: Path) -> None:
    """A missing file, a missing heading, and what is not a link."""
    other = "# Other\n\n## Its Part: `one` (two)\n\n## Twice\n## Twice\n"
    (tmp_path / "other.md").write_text(other)
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Doc\n"
        "[ok](other.md#its-part-one-two) [ok](other.md#twice-1) [ok](#doc) [web](https://x.y/z)\n"
        "[gone](nowhere.md) [bad anchor](other.md#nope) `[code](nowhere.md)`\n"
        "```\n[in a fence](nowhere.md)\n```\n"
        "[ref]: missing/ref.md\n"
    )
    assert broken(doc, root=tmp_path) == [
        "doc.md:3: nowhere.md: no such file",
        "doc.md:3: other.md#nope: no heading #nope there",
        "doc.md:7: missing/ref.md: no such file",
    ]
