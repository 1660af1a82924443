"""``redact_url``: what the start-up line, Health and errors may show of a URL."""

from __future__ import annotations

import pytest

from session_authority.config import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (None, None),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://u:pw@h:6379/0", "redis://u:***@h:6379/0"),
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("postgresql://u:p%40ss@h/db", "postgresql://u:***@h/db"),
        (
            "rediss://u:pw@h/0?ssl_ca_certs=/etc/ca.pem&ssl_password=key-pw",
            "rediss://u:***@h/0?ssl_ca_certs=/etc/ca.pem&ssl_password=***",
        ),
        (
            "postgresql://h/db?sslmode=verify-full&sslpassword=x&password=y",
            "postgresql://h/db?sslmode=verify-full&sslpassword=***&password=***",
        ),
    ],
)
def test_passwords_are_redacted_and_paths_kept(url: str | None, shown: str | None) -> None:
    assert redact_url(url) == shown


def test_an_unparseable_url_is_not_echoed() -> None:
    assert redact_url("redis://u:pw@[::1/0") == "<unparseable url>"
