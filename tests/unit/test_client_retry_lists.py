"""The two clients retry the same RPCs: the TypeScript client's ``IDEMPOTENT`` and
``NOT_RETRIED`` (clients/node/src/client.ts) are the Python client's (``_config``), and together
they name every RPC of the service, so a new RPC must be classified in both.

Two lists kept in step by this test rather than one shared file: each client ships alone (a
pip package, an npm package), and a list read at run time from outside either would be a
file both must carry. The proto cannot say it either without a custom option every generator
would have to learn."""

from __future__ import annotations

import re
from pathlib import Path

from session_authority.client._config import IDEMPOTENT, NOT_RETRIED
from session_authority.v1 import session_authority_pb2 as pb

_CLIENT_TS = Path(__file__).resolve().parents[2] / "clients" / "node" / "src" / "client.ts"


def _ts_set(source: str, name: str) -> set[str]:
    """The string literals of ``export const <name>: ReadonlySet<string> = new Set([...])``."""
    found = re.search(rf"export const {name}\b[^=]*=\s*new Set\(\[(.*?)\]\)", source, re.S)
    assert found is not None, f"{name} not found in {_CLIENT_TS}"
    body = re.sub(r"//[^\n]*", "", found.group(1))  # comments may name RPCs too
    return set(re.findall(r'"([A-Za-z]+)"', body))


def test_typescript_client_retries_what_the_python_client_retries() -> None:
    source = _CLIENT_TS.read_text()
    assert _ts_set(source, "IDEMPOTENT") == set(IDEMPOTENT)
    assert _ts_set(source, "NOT_RETRIED") == set(NOT_RETRIED)


def test_every_rpc_is_classified_once() -> None:
    methods = set(pb.DESCRIPTOR.services_by_name["SessionAuthority"].methods_by_name)
    assert set(IDEMPOTENT) | set(NOT_RETRIED) == methods
    assert not set(IDEMPOTENT) & set(NOT_RETRIED)
