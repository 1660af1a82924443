"""``redis+sentinel://`` URLs (adapters/redis_sentinel.py): parsed without I/O, and
redacted in logs like any other URL."""

from __future__ import annotations

import pytest

from session_authority.adapters.redis_sentinel import is_sentinel_url, parse_sentinel_url
from session_authority.config import redact_url

URL = (
    "rediss+sentinel://app:s3cret@10.0.0.1,[::1]:26380,sentinel-c:1/cache/2"
    "?sentinel_username=watch&sentinel_password=p%40ss&ssl_ca_certs=/etc/ca.pem"
)


def test_the_parts_of_a_sentinel_url() -> None:
    target = parse_sentinel_url(URL)
    assert target.sentinels == (("10.0.0.1", 26379), ("::1", 26380), ("sentinel-c", 1))
    assert (target.service, target.tls) == ("cache", True)
    # The user and password are the master's; the sentinels' come from the query.
    assert target.master == {
        "username": "app",
        "password": "s3cret",
        "db": 2,
        "ssl_ca_certs": "/etc/ca.pem",
    }
    assert target.sentinel == {
        "username": "watch",
        "password": "p@ss",
        "ssl": True,
        "ssl_ca_certs": "/etc/ca.pem",
    }


def test_defaults() -> None:
    target = parse_sentinel_url("redis+sentinel://127.0.0.1/mymaster")
    assert (target.sentinels, target.service, target.tls) == (
        (("127.0.0.1", 26379),),
        "mymaster",
        False,
    )
    assert (target.master, target.sentinel) == ({"db": 0}, {})
    assert is_sentinel_url("REDIS+SENTINEL://h/m")
    assert not is_sentinel_url("redis://h:6379/0")


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel:///mymaster",  # no sentinel
        "redis+sentinel://h:26379",  # no master name
        "redis+sentinel://h:26379/m/0/x",
        "redis+sentinel://h:26379/m/zero",
        "redis+sentinel://h:port/m",
    ],
)
def test_refused_naming_what_is_wrong(url: str) -> None:
    with pytest.raises(ValueError, match="REDIS_URL"):
        parse_sentinel_url(url)


def test_both_passwords_are_redacted() -> None:
    shown = redact_url(URL)
    assert shown is not None
    assert "s3cret" not in shown and "p%40ss" not in shown and "p@ss" not in shown
    assert shown.startswith("rediss+sentinel://app:***@10.0.0.1,[::1]:26380,sentinel-c:1/cache/2")
