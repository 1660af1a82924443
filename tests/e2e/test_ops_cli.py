"""The operator verbs (``session-authority create | validate | invalidate | invalidate-user |
list | touch | watch``)
against a real ``serve`` with mTLS and API keys. The exit code is the contract: 0 done/valid,
1 not valid, 2 usage (refused requests and credentials included), 3 no answer. Most cases run
``cli.main`` in this process (each ``session-authority`` process costs a second of CPU on a busy
machine); one shell script runs the real command with tokens piped on stdin."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from session_authority.cli import main
from session_authority.cli_args import parser
from session_authority.embedded import find_free_port
from session_authority.ops_args import VERBS

from .client_support import OPS_KEY, FreezableProxy, Serving, cli_argv
from .e2e_support import clean_env

pytestmark = pytest.mark.e2e

KEY_ENV = "SESSION_AUTHORITY_API_KEY"


class Cli:
    def __init__(
        self,
        server: Serving,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        self.server = server
        self._monkeypatch = monkeypatch
        self._capsys = capsys
        monkeypatch.setenv(KEY_ENV, OPS_KEY)

    def __call__(
        self, *argv: str, stdin: str = "", target: str | None = None
    ) -> tuple[int, str, str]:
        verb, *rest = argv
        self._monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        flags = ["--target", target or self.server.target, *self.server.tls_flags()]
        self._capsys.readouterr()
        code = main([verb, *flags, *rest])
        out, err = self._capsys.readouterr()
        return code, out, err

    def in_background(
        self, *argv: str, target: str | None = None
    ) -> tuple[threading.Thread, list[int]]:
        """Run a verb (watch) on a thread; its exit code lands in the list. Its output is
        captured as the test's, read with ``until_printed``."""
        verb, *rest = argv
        flags = ["--target", target or self.server.target, *self.server.tls_flags()]
        codes: list[int] = []
        thread = threading.Thread(
            target=lambda: codes.append(main([verb, *flags, *rest])), daemon=True
        )
        self._capsys.readouterr()
        thread.start()
        return thread, codes

    def until_printed(self, done: Callable[[str], bool], out: list[str], err: list[str]) -> None:
        """Read the captured output into ``out``/``err`` until ``done(all of out)``."""
        deadline = time.monotonic() + 20
        while True:
            captured = self._capsys.readouterr()
            out.append(captured.out)
            err.append(captured.err)
            if done("".join(out)):
                return
            assert time.monotonic() < deadline, ("".join(out), "".join(err))
            time.sleep(0.02)


@pytest.fixture
def cli(
    client_server: Serving, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Cli:
    return Cli(client_server, monkeypatch, capsys)


def test_a_session_s_life_through_the_verbs(cli: Cli) -> None:
    code, token, err = cli("create", "grace", "--ttl", "600", "--metadata", "ip=10.0.0.1")
    assert code == 0, err
    token = token.strip()
    assert token.startswith("sat_") and "session " in err and "grace" in err

    code, out, _ = cli("validate", stdin=token + "\n")
    assert code == 0 and out.startswith("valid: session ") and token not in out
    code, out, _ = cli("validate", "--json", stdin=token)
    document = json.loads(out)
    assert code == 0 and document["valid"] is True
    assert document["session"]["user_id"] == "grace"
    assert document["session"]["metadata"] == {"ip": "10.0.0.1"}
    session_id = document["session"]["session_id"]

    code, out, _ = cli("invalidate", stdin=token)
    assert (code, out.strip()) == (0, "revoked")
    code, out, _ = cli("invalidate", "--session-id", session_id)
    assert (code, out.strip()) == (0, "not revoked: no live session (already done)")
    code, out, _ = cli("validate", stdin=token)
    assert (code, out.strip()) == (1, "not valid: revoked (source: database)")
    code, out, _ = cli("validate", "-", "--json", stdin=token)
    assert code == 1 and json.loads(out)["reason"] == "revoked"
    code, out, _ = cli("validate", stdin="sat_not-a-real-token")
    assert (code, out.strip()) == (1, "not valid: unknown (source: token_format)")

    code, out, _ = cli("create", "grace", "--json")
    assert code == 0 and json.loads(out)["token"].startswith("sat_")
    code, out, _ = cli("invalidate-user", "grace")
    assert (code, out.strip()) == (0, "revoked 1 session(s) of user grace")
    code, out, _ = cli("invalidate-user", "grace", "--json")
    assert code == 0
    assert json.loads(out) == {"cache_purged": True, "propagated": True, "revoked_count": 0}


def test_list_touch_and_invalidate_user_except(cli: Cli) -> None:
    user = f"olga-{time.monotonic_ns()}"
    with cli.server.client() as client:
        created = [client.create(user, ttl=600) for _ in range(3)]
    ids = [c.session.session_id for c in created]

    code, out, _ = cli("list", user, "--page-size", "2")  # two pages, one line per session
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == ids

    code, out, _ = cli("touch", "--extend-by", "1200", stdin=created[0].token + "\n")
    assert code == 0 and out.startswith(f"touched: session {ids[0]} expires ")
    assert created[0].token not in out
    code, out, _ = cli("touch", "--session-id", ids[1], "--json")
    assert code == 0 and json.loads(out)["session"]["session_id"] == ids[1]

    code, out, _ = cli("invalidate-user", user, "--except-session-id", ids[2])
    assert (code, out.strip()) == (0, f"revoked 2 session(s) of user {user} (kept {ids[2]})")
    code, out, _ = cli("touch", "--session-id", ids[0])
    assert (code, out.strip()) == (1, "not touched: revoked or expired")

    code, out, _ = cli("list", user, "--json")
    assert code == 0 and [s["session_id"] for s in json.loads(out)["sessions"]] == [ids[2]]
    code, out, _ = cli("list", user, "--include-revoked")
    assert code == 0 and out.count(" revoked ") == 2 and len(out.splitlines()) == 3


def test_watch_counts_events_and_exits_3_with_the_cursor_when_cut(cli: Cli) -> None:
    user = f"pia-{time.monotonic_ns()}"
    with cli.server.client() as client:
        first, second = (client.create(user).session.session_id for _ in range(2))
        out: list[str] = []
        err: list[str] = []
        thread, codes = cli.in_background("watch", "--count", "1", "--json")
        cli.until_printed(lambda text: '"kind": "start"' in text, out, err)
        client.invalidate(session_id=first)
        thread.join(20)
        cli.until_printed(lambda _: True, out, err)
        lines = [json.loads(line) for line in "".join(out).splitlines() if line]
        assert codes == [0], err
        assert [(e["kind"], e["session_id"]) for e in lines] == [("start", ""), ("revoked", first)]

        # Resumed after START, through a proxy the test then closes: UNAVAILABLE ends it.
        proxy = FreezableProxy(cli.server.port)
        out, err = [], []
        target = f"127.0.0.1:{proxy.port}"
        try:
            thread, codes = cli.in_background("watch", "--after", lines[0]["cursor"], target=target)
            cli.until_printed(lambda text: f"session {first} " in text, out, err)  # again
            client.invalidate(session_id=second)
            cli.until_printed(lambda text: f"session {second} " in text, out, err)
        finally:
            proxy.close()
        thread.join(20)
    printed = "".join(out).splitlines()
    assert printed[0] == f"start after {lines[0]['cursor']}"
    assert printed[1].startswith(f"revoked session {first} of user {user} (explicit) at ")
    assert printed[2].startswith(f"revoked session {second} ")
    cli.until_printed(lambda _: True, out, err)
    assert codes == [3], err
    last_cursor = printed[2].rpartition(" cursor ")[2]
    assert f"resume with --after {last_cursor}\n" in "".join(err)
    assert "UNAVAILABLE" in "".join(err)


def test_the_api_key_from_a_file_or_the_environment(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(OPS_KEY + "\n")
    monkeypatch.delenv(KEY_ENV)
    code, _, err = cli("create", "heidi")  # the certificate alone may not mutate
    assert code == 2 and "PERMISSION_DENIED" in err
    code, token, err = cli("create", "heidi", "--api-key-file", str(key_file))
    assert code == 0, err
    wrong = "wrong-key-" + "z" * 30
    monkeypatch.setenv(KEY_ENV, wrong)
    code, out, err = cli("validate", stdin=token)
    assert code == 2 and "UNAUTHENTICATED: invalid API key" in err
    assert wrong not in out + err and token.strip() not in out + err


@pytest.mark.parametrize(
    ("argv", "stdin", "says"),
    [
        (["validate"], "", "no token: give it on stdin"),
        (["invalidate"], "\n", "no token: give it on stdin"),
        (["invalidate", "sat_x", "--session-id", "y"], "", "a token or --session-id, not both"),
        (["create", "ivan", "--metadata", "novalue"], "", "--metadata takes KEY=VALUE"),
        (["create", ""], "", "INVALID_ARGUMENT: user_id"),
        (["validate", "--timeout", "0"], "sat_x", "--timeout must be positive"),
        # An empty PEM would abort the process in gRPC's C core: refused first.
        (["validate", "--cert-file", "/dev/null"], "sat_x", "--cert-file: /dev/null is empty"),
    ],
)
def test_usage_exits_2(cli: Cli, argv: list[str], stdin: str, says: str) -> None:
    code, out, err = cli(*argv, stdin=stdin)
    assert code == 2, (out, err)
    assert says in err


def test_no_answer_exits_3(cli: Cli) -> None:
    nobody = f"127.0.0.1:{find_free_port()}"
    code, _, err = cli("validate", stdin="sat_x", target=nobody)
    assert code == 3 and "UNAVAILABLE" in err
    code, _, err = cli("invalidate-user", "judy", target=nobody)
    assert code == 3
    cli.server.freeze()
    try:
        code, _, err = cli("validate", "--timeout", "0.5", stdin="sat_x")
    finally:
        cli.server.thaw()
    assert code == 3 and "DEADLINE_EXCEEDED" in err


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_documents_its_exit_codes(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        parser().parse_args([verb, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--target",
        "--json",
        "--ca-file",
        "--api-key-file",
        "exit codes:",
        "3  no answer",
    ):
        assert flag in text, flag


def test_tokens_piped_on_stdin_to_the_real_command(client_server: Serving) -> None:
    """As an operator types it: nothing secret on any command line. (Two real processes: each
    costs a second of CPU; the other verbs' stdin is tested in process above.)"""
    flags = " ".join(["--target", client_server.target, *client_server.tls_flags()])
    cmd = " ".join(cli_argv())
    with client_server.client() as client:
        live = client.create("kim").token
        revoked = client.create("kim").token
        client.invalidate(token=revoked)
    script = f"""
        echo "$LIVE" | {cmd} validate {flags}; echo "validate=$?"
        echo "$REVOKED" | {cmd} validate {flags} --json; echo "again=$?"
    """
    done = subprocess.run(
        ["sh", "-c", script],
        env=clean_env(SESSION_AUTHORITY_API_KEY=OPS_KEY, LIVE=live, REVOKED=revoked),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stderr
    assert lines[0].startswith("valid: session ") and lines[1] == "validate=0"
    assert json.loads(lines[2])["reason"] == "revoked" and lines[3] == "again=1"
    assert live not in done.stdout + done.stderr
