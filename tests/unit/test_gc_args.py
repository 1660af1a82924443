"""``session-authority gc`` refuses bad arguments (exit 2, a message naming them) before it
connects anywhere: DATABASE_URL names a port nothing listens on."""

from __future__ import annotations

import pytest

from session_authority.adapters.retention import check_retention, parse_duration
from session_authority.cli import main
from session_authority.core.policy import CorePolicy

NOWHERE = "postgresql://postgres@127.0.0.1:1/nowhere"


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--retention", "5m"], "shorter than the revocation replay window (365s"),
        (["--retention", "soon"], "not a duration: 'soon'"),
        (["--retention=-1d"], "not a duration"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_gc_refuses(
    args: list[str], said: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", NOWHERE)
    assert main(["gc", *args]) == 2
    assert said in capsys.readouterr().err


def test_gc_needs_database_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["gc"]) == 2
    assert "DATABASE_URL is required" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 2_592_000), ("12h", 43_200), ("90m", 5_400), ("3600s", 3_600), ("7200", 7_200)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_the_floor_follows_the_replay_window() -> None:
    policy = CorePolicy(cache_ttl=600, tombstone_ttl=1200, revocation_skew=0)
    check_retention(605, policy)
    with pytest.raises(ValueError, match="replay window"):
        check_retention(604, policy)
