"""The log filter drops the two "caller went away" ERROR lines and nothing else."""

from __future__ import annotations

import logging

import pytest

from session_authority.logs import quiet_grpc_client_gone


@pytest.mark.parametrize(
    ("logger", "message", "kept"),
    [
        ("grpc._cython.cygrpc", "ExecuteBatchError raised in core by servicer method [/x]", False),
        ("asyncio", "Fatal error: unexpected connection_lost() call", False),
        ("asyncio", "Task exception was never retrieved", True),
        ("grpc._cython.cygrpc", "Unexpected error in RPC handling", True),
    ],
)
def test_only_the_client_gone_lines_are_dropped(
    caplog: pytest.LogCaptureFixture, logger: str, message: str, kept: bool
) -> None:
    quiet_grpc_client_gone()
    quiet_grpc_client_gone()  # idempotent
    assert logging.getLogger(logger).filters.count(logging.getLogger(logger).filters[0]) == 1
    with caplog.at_level(logging.ERROR, logger=logger):
        logging.getLogger(logger).error(message)
    assert (message in caplog.text) is kept
