"""A setting that makes another invalid is refused in the environment's words:
the variables to change, their values and the rule (the core's CorePolicy
checks the same relations in its own, internal, names)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from session_authority.cli_args import settings_error
from session_authority.config import Settings


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        (
            {"cache_ttl_seconds": 600},
            "TOMBSTONE_TTL_SECONDS (600) must exceed CACHE_TTL_SECONDS (600)",
        ),
        ({"tombstone_ttl_seconds": 4}, "TOMBSTONE_TTL_SECONDS (4) must exceed"),
        (
            {"cache_early_refresh_seconds": 300},
            "CACHE_EARLY_REFRESH_SECONDS (300) must be below CACHE_TTL_SECONDS (300)",
        ),
    ],
)
def test_relation_names_the_variables(fields: dict[str, float], said: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(**fields)  # type: ignore[arg-type]
    message = settings_error(caught.value)
    assert said in message
    for internal in ("tombstone_ttl must", "early_refresh must", "max_fill_lag"):
        assert internal not in message


def test_each_error_under_its_variable() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(redis_pool_max=0, log_format="xml")
    lines = settings_error(caught.value).splitlines()
    assert lines[0].startswith("  REDIS_POOL_MAX: Input should be greater than or equal to 1")
    assert lines[1].startswith("  LOG_FORMAT: ")
