"""The two distributions: ``session-authority-client`` (clients/python) installs alone, with
grpcio and protobuf and nothing else of ours; and a wheel of the server plus a wheel of the
client install side by side into one environment, the two portions of the ``session_authority``
namespace, without a file in common.

Wheels are built with ``uv build --offline`` (setuptools comes from uv's cache, which ``make``
filled). The alone install resolves grpcio and protobuf from the package index, as
``pip install ./clients/python`` does; the side-by-side install takes the server's third-party
dependencies from this checkout's venv (``--no-deps``, offline, seconds)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from .e2e_support import BIN, clean_env

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
UV = str(BIN / "uv")


def _run(*argv: str | Path, cwd: Path = ROOT) -> str:
    done = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=clean_env(UV_PYTHON_DOWNLOADS="never", VIRTUAL_ENV=""),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{argv}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("wheels")
    builds = [
        subprocess.Popen(
            [UV, "build", "--offline", "--wheel", "-q", "-o", str(out), str(source)],
            cwd=ROOT,
            env=clean_env(UV_PYTHON_DOWNLOADS="never"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for source in (ROOT / "clients" / "python", ROOT)
    ]
    for build in builds:
        _, err = build.communicate(timeout=300)
        assert build.returncode == 0, err.decode()
    (client,) = out.glob("session_authority_client-*.whl")
    (server,) = out.glob("session_authority-*.whl")
    return server, client


def _venv(path: Path) -> Path:
    _run(UV, "venv", "--offline", "-q", "--python", sys.executable, path)
    return path / "bin" / "python"


def _dependency_closure(names: set[str]) -> set[str]:
    """The packages ``names`` pull in, as uv.lock resolved them for this platform."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    packages = {p["name"]: p for p in lock["package"]}
    found: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        todo += [d["name"] for d in packages[name].get("dependencies", ())]
    return found


def test_the_client_installs_alone_with_grpcio_and_protobuf(
    wheels: tuple[Path, Path], tmp_path: Path
) -> None:
    _, client = wheels
    python = _venv(tmp_path / "alone")
    # The wheel `pip install ./clients/python` builds (the fixture built it from there).
    _run(UV, "pip", "install", "-q", "--python", python, client)
    frozen = _run(UV, "pip", "freeze", "--python", python).splitlines()
    installed = {canonicalize_name(line.split("==")[0].split(" @ ")[0]) for line in frozen}
    expected = {"session-authority-client"} | _dependency_closure({"grpcio", "protobuf"})
    assert installed == expected
    probe = (
        "import session_authority.client as c, session_authority.v1.session_authority_pb2_grpc;"
        "import importlib.util as u; print(c.__file__); print(u.find_spec('session_authority.cli'))"
    )
    where, cli = _run(python, "-c", probe).split()
    assert where.startswith(str(tmp_path / "alone")) and cli == "None"
    with zipfile.ZipFile(client) as wheel:
        names = set(wheel.namelist())
    for shipped in ("session_authority/client/py.typed", "session_authority/v1/py.typed",
                    "session_authority/v1/session_authority_pb2.pyi",
                    "session_authority/v1/session_authority_pb2_grpc.pyi",
                    "session_authority/v1/descriptors.binpb"):  # fmt: skip
        assert shipped in names, shipped
    assert not any(n.startswith("session_authority/__init__") for n in names)  # a namespace


def test_server_and_client_wheels_install_together(
    wheels: tuple[Path, Path], tmp_path: Path
) -> None:
    server, client = wheels
    with zipfile.ZipFile(server) as s, zipfile.ZipFile(client) as c:
        server_files = {n for n in s.namelist() if ".dist-info/" not in n}
        client_files = {n for n in c.namelist() if ".dist-info/" not in n}
        requires = s.read(next(n for n in s.namelist() if n.endswith("METADATA"))).decode()
    assert server_files and client_files and not server_files & client_files
    assert not any(n.startswith("session_authority/v1/") for n in server_files)
    assert "Requires-Dist: session-authority-client" in requires
    venv = tmp_path / "both"
    python = _venv(venv)
    _run(UV, "pip", "install", "--offline", "-q", "--no-deps", "--python", python, server, client)
    # Third-party dependencies from this checkout's venv: a plain path (no .pth of its is run,
    # so its editable finders for session_authority stay out).
    site = next((venv / "lib").glob("python3*/site-packages"))
    deps = next((Path(sys.prefix) / "lib").glob("python3*/site-packages"))
    (site / "zz_dependencies.pth").write_text(f"{deps}\n")
    probe = (
        "import session_authority.cli, session_authority.client, session_authority.v1 as v1;"
        "import session_authority.transport.servicer;"
        "print(session_authority.cli.__file__, session_authority.client.__file__, *v1.__path__)"
    )
    for loaded in _run(python, "-c", probe).split():
        assert loaded.startswith(str(venv)), loaded
    usage = _run(venv / "bin" / "session-authority", "validate", "--help")
    assert "exit codes:" in usage
