"""The embedded servers are dev and test tooling, kept out of the production import path.

* Outside ``embedded/``, only the ``dev`` command (``cli._dev``) imports
  ``session_authority.embedded``, and only inside that function: ``serve`` never loads it.
* No module imports another module's ``_private`` name: what is shared is public.

Checked on the source with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import session_authority.core

PACKAGE = Path(session_authority.core.__file__).resolve().parent.parent
EMBEDDED = "session_authority.embedded"


def imports(tree: ast.AST, package: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """(origin, imported names, enclosing functions) of every import in `tree`, a module
    of `package` (relative imports resolve against it)."""

    def walk(node: ast.AST, functions: list[str]) -> Iterator[tuple[str, list[str], list[str]]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, [], functions
            elif isinstance(child, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) + 1 - child.level]
                origin = ".".join([*base, child.module] if child.module else base)
                names = [a.name for a in child.names]
                yield (origin if child.level else child.module or ""), names, functions
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield from walk(child, [*functions, child.name])
            else:
                yield from walk(child, functions)

    yield from walk(tree, [])


_PARSED: dict[str, ast.AST] = {}


def parse(source: str) -> ast.AST:
    """``ast.parse``, once per source. Everything this file parses is parsed at
    collection (below), while no other thread runs: CPython 3.11 keeps the AST
    converter's recursion depth in interpreter-wide state, and a parse racing
    another thread's can raise "AST constructor recursion depth mismatch" (seen
    in a full run, after the integration tiers' threads)."""
    tree = _PARSED.get(source)
    if tree is None:
        tree = _PARSED[source] = ast.parse(source)
    return tree


def embedded_imports(source: str, package: str) -> list[str]:
    """Where `source` imports the embedded package: '<module>' at top level, else functions."""
    found = []
    for origin, names, functions in imports(parse(source), package):
        targets = [origin, *(f"{origin}.{name}" for name in names)]
        if any(t == EMBEDDED or t.startswith(EMBEDDED + ".") for t in targets):
            found.append(".".join(functions) or "<module>")
    return found


def private_imports(source: str, package: str) -> list[str]:
    return [
        f"{origin}.{name}"
        for origin, names, _ in imports(parse(source), package)
        if origin.startswith("session_authority")
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]


def modules() -> Iterator[tuple[Path, str, str]]:
    """(path, module name, the package its relative imports start from) of each module."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        package = ".".join(parts[:-1])
        yield path, package if parts[-1] == "__init__" else ".".join(parts), package


_CHECKER_CASES = [
    ("from session_authority.embedded import EmbeddedRedis", ["<module>"]),
    ("import session_authority.embedded.process", ["<module>"]),
    ("from session_authority import embedded", ["<module>"]),
    ("from .embedded import find_free_port", ["<module>"]),
    ("def _dev():\n    from session_authority.embedded import X", ["_dev"]),
    ("from session_authority.embedded_lookalike import X", []),
]
_PRIVATE_CASE = "from .process import ServerProcess, _env\nfrom os import _exit"
_SOURCES = {path: path.read_text(encoding="utf-8") for path, _, _ in modules()}
for _source in [*_SOURCES.values(), *(c[0] for c in _CHECKER_CASES), _PRIVATE_CASE]:
    parse(_source)


@pytest.mark.parametrize(("source", "expected"), _CHECKER_CASES)
def test_the_checker_finds_embedded_imports(source: str, expected: list[str]) -> None:
    assert embedded_imports(source, "session_authority") == expected


def test_the_checker_finds_private_imports() -> None:
    assert private_imports(_PRIVATE_CASE, "session_authority.embedded") == [
        "session_authority.embedded.process._env"
    ]


def test_only_the_dev_command_imports_the_embedded_servers() -> None:
    found = {
        module: where
        for path, module, package in modules()
        if not module.startswith(EMBEDDED) and (where := embedded_imports(_SOURCES[path], package))
    }
    assert found == {"session_authority.cli": ["_dev"]}


def test_no_module_imports_a_private_name_of_another() -> None:
    found = [
        f"{module}: {name}"
        for path, module, package in modules()
        for name in private_imports(_SOURCES[path], package)
    ]
    assert found == []
