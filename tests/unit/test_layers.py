"""The layer contract can fail: plant a forbidden import, and ``lint-imports`` goes red.

The contracts live in pyproject.toml ``[tool.importlinter]`` and ``make check`` runs them
(``make layers``). Here each case copies the source tree to a temporary directory, appends one
forbidden import to one module, and runs ``lint-imports`` on the copy in a subprocess
(``PYTHONPATH`` pointing at the copy, the copied pyproject.toml as configuration). The run must
fail, report the case's contract broken and name the planted import, at its line, in that
contract's section. An unmodified copy passes, so the failures come from the plants.

The plants include an import inside a function, one under ``if TYPE_CHECKING:`` and a relative
one: import-linter counts all three, which is why the ``ast`` checker that used to live in
test_architecture.py is gone.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVER = REPO / "server" / "session_authority"
STUBS = REPO / "clients" / "python" / "session_authority"
LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"

#: Contract id -> name, as configured.
CONTRACTS: dict[str, str] = {
    c["id"]: c["name"]
    for c in tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"][
        "importlinter"
    ]["contracts"]
}


@dataclass(frozen=True)
class Plant:
    contract: str
    path: str  # relative to server/session_authority
    code: str  # appended to the module; its last line is the forbidden import
    imported: str  # as import-linter names it (an external package by its top-level name)

    @property
    def importer(self) -> str:
        parts = ["session_authority", *Path(self.path).with_suffix("").parts]
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    @property
    def id(self) -> str:
        return f"{self.contract}:{self.path}:{self.imported}"


CORE = "core-is-pure"
INDEPENDENT = "adapters-transport-independent"
EDGES = "edges-below-the-root"
GENERATED = "generated-stops-at-transport"
OBSERVABILITY = "observability-at-the-edge"
EMBEDDED = "embedded-is-dev-tooling"
RPC = "rpc-is-low"

PLANTS = [
    # --- the core is pure
    Plant(CORE, "core/__init__.py", "from grpc import aio", "grpc"),
    Plant(CORE, "core/domain.py", "import redis", "redis"),
    Plant(CORE, "core/errors.py", "def _planted() -> None:\n    import asyncpg", "asyncpg"),
    Plant(CORE, "core/breaker.py", "import prometheus_client", "prometheus_client"),
    Plant(
        CORE,
        "core/ports.py",
        "import typing\n\nif typing.TYPE_CHECKING:\n    from google.protobuf import message",
        "google",
    ),
    Plant(
        CORE,
        "core/telemetry.py",
        "from opentelemetry.sdk.trace import TracerProvider",
        "opentelemetry.sdk.trace",
    ),
    Plant(
        CORE,
        "core/policy.py",
        "from session_authority.config import Settings",
        "session_authority.config",
    ),
    Plant(
        CORE,
        "core/health.py",
        "from ..transport import status",
        "session_authority.transport.status",
    ),
    Plant(
        CORE,
        "core/domain.py",
        "from session_authority.v1 import session_authority_pb2",
        "session_authority.v1.session_authority_pb2",
    ),
    # --- adapters and transport are independent
    Plant(
        INDEPENDENT,
        "adapters/redis_cache.py",
        "from session_authority.transport import status",
        "session_authority.transport.status",
    ),
    Plant(
        INDEPENDENT,
        "transport/servicer.py",
        "from session_authority.adapters import redis_cache",
        "session_authority.adapters.redis_cache",
    ),
    # --- ... and below the composition root
    Plant(
        EDGES,
        "adapters/migrate.py",
        "import session_authority.observability",
        "session_authority.observability",
    ),
    Plant(
        EDGES,
        "transport/status.py",
        "import session_authority.bootstrap",
        "session_authority.bootstrap",
    ),
    # --- generated types stop at the transport
    Plant(
        GENERATED,
        "adapters/postgres_store.py",
        "from session_authority.v1 import session_authority_pb2",
        "session_authority.v1.session_authority_pb2",
    ),
    Plant(
        GENERATED,
        "config.py",
        "from session_authority.v1 import session_authority_pb2_grpc",
        "session_authority.v1.session_authority_pb2_grpc",
    ),
    # --- observability stays at the edge
    Plant(
        OBSERVABILITY,
        "observability/__init__.py",
        "from session_authority.transport import status",
        "session_authority.transport.status",
    ),
    Plant(
        OBSERVABILITY,
        "observability/__init__.py",
        "import session_authority.bootstrap",
        "session_authority.bootstrap",
    ),
    # --- the wrapping machinery sits below the transport and observability
    Plant(
        RPC,
        "rpc.py",
        "from session_authority.observability import metrics",
        "session_authority.observability.metrics",
    ),
    Plant(
        RPC,
        "rpc.py",
        "def _planted() -> None:\n    from session_authority.transport import status",
        "session_authority.transport.status",
    ),
    # --- embedded is dev/test tooling
    Plant(
        EMBEDDED,
        "bootstrap/app.py",
        "import session_authority.embedded",
        "session_authority.embedded",
    ),
    Plant(
        EMBEDDED,
        "logs.py",
        "from session_authority.embedded import process",
        "session_authority.embedded.process",
    ),
]


def copy_tree(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(SERVER, dest / "server" / "session_authority", ignore=ignore)
    shutil.copytree(STUBS, dest / "clients" / "python" / "session_authority", ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def plant(tree: Path, case: Plant) -> int:
    """Append ``case.code`` to its module; return the line of the forbidden import."""
    module = tree / "server" / "session_authority" / case.path
    source = module.read_text(encoding="utf-8")
    if not source.endswith("\n"):
        source += "\n"
    source += "\n\n" + case.code + "\n"
    module.write_text(source, encoding="utf-8")
    ast.parse(source)  # a plant that is not Python would prove nothing
    return len(source.splitlines())


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    # `-S`: no site processing, so no .pth files, so not this checkout's editable install,
    # whose finder would add its own server/session_authority to the namespace and let grimp
    # read some modules from there instead of the copy. The installed packages come back
    # through PYTHONPATH, after the copy.
    installed = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(tree / "server"), str(tree / "clients" / "python"), *installed]
        ),
        "COLUMNS": "300",  # rich wraps long contract names at the terminal width
        "NO_COLOR": "1",
    }
    return subprocess.run(
        [sys.executable, "-S", "-c", LINT_IMPORTS, "--no-cache", "--no-logo"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def broken_sections(stdout: str) -> dict[str, str]:
    """Contract name -> its part of the "Broken contracts" report (a name, underlined)."""
    _, _, report = stdout.partition("Broken contracts\n----------------\n")
    sections: dict[str, list[str]] = {}
    lines = report.splitlines()
    current: list[str] = []
    for line, underline in zip(lines, [*lines[1:], ""], strict=True):
        if line in CONTRACTS.values() and underline == "-" * len(line):
            current = sections.setdefault(line, [])
        current.append(line)
    return {name: "\n".join(body) for name, body in sections.items()}


def test_every_contract_has_plants() -> None:
    assert {p.contract for p in PLANTS} == set(CONTRACTS)
    assert len({p.id for p in PLANTS}) == len(PLANTS)


def test_an_unmodified_copy_keeps_every_contract(tmp_path: Path) -> None:
    result = lint_imports(copy_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    for name in CONTRACTS.values():
        assert f"{name} KEPT" in result.stdout


@pytest.mark.parametrize("case", PLANTS, ids=lambda p: p.id)
def test_a_planted_import_breaks_its_contract(tmp_path: Path, case: Plant) -> None:
    tree = copy_tree(tmp_path)
    line = plant(tree, case)
    result = lint_imports(tree)
    name = CONTRACTS[case.contract]
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{name} BROKEN" in result.stdout, result.stdout
    section = broken_sections(result.stdout)[name]
    assert f"{case.importer} -> {case.imported} (l.{line})" in section, section


# --- what import-linter cannot see ---------------------------------------------------------------


def module_level_imports_of(source: str, package: str) -> list[int]:
    """Lines of imports of ``package`` (or below it) outside any function."""
    lines: list[int] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and not child.level:
                names = [child.module or ""]
            else:
                visit(child)
                continue
            if any(n == package or n.startswith(package + ".") for n in names):
                lines.append(child.lineno)

    visit(ast.parse(source))
    return lines


def test_the_lazy_import_check_can_fail() -> None:
    source = (
        "import os\n"
        "from session_authority.embedded import x\n"
        "def f():\n"
        "    import session_authority.embedded\n"
    )
    assert module_level_imports_of(source, "session_authority.embedded") == [2]


def test_cli_imports_embedded_lazily() -> None:
    # `session-authority serve` must not load dev tooling (and its atexit hook) that only
    # `session-authority dev` uses; the protected contract allows cli to import it at all.
    source = (SERVER / "cli.py").read_text(encoding="utf-8")
    assert module_level_imports_of(source, "session_authority.embedded") == []
