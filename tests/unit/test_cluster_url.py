"""``redis+cluster://`` URLs and the cluster key layout (adapters/redis_cluster.py):
parsed without I/O, redacted in logs like any other URL."""

from __future__ import annotations

import pytest

from session_authority.adapters.redis_bus import CLUSTER_NAMES
from session_authority.adapters.redis_cluster import (
    TAGS,
    is_cluster_url,
    parse_cluster_url,
    tag_of,
)
from session_authority.adapters.redis_cluster_cache import cluster_key
from session_authority.config import redact_url
from session_authority.core.domain import TokenHash

URL = "rediss+cluster://app:s3cret@10.0.0.1,[::1]:7001,node-c:1?ssl_ca_certs=/etc/ca.pem"


def test_the_parts_of_a_cluster_url() -> None:
    target = parse_cluster_url(URL)
    assert target.nodes == (("10.0.0.1", 6379), ("::1", 7001), ("node-c", 1))
    assert target.tls is True
    assert target.options == {
        "username": "app",
        "password": "s3cret",
        "ssl": True,
        "ssl_ca_certs": "/etc/ca.pem",
    }


def test_defaults() -> None:
    target = parse_cluster_url("redis+cluster://127.0.0.1/0")
    assert (target.nodes, target.tls, target.options) == ((("127.0.0.1", 6379),), False, {})
    assert parse_cluster_url("redis+cluster://h:1,h:2").nodes == (("h", 1), ("h", 2))
    assert is_cluster_url("REDIS+CLUSTER://h")
    assert not is_cluster_url("redis://h:6379/0")
    assert not is_cluster_url("redis+sentinel://h/m")


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster:///0",  # no node
        "redis+cluster://h:6379/1",  # a cluster has database 0 only
        "redis+cluster://h:port",
        "redis://h:6379",
    ],
)
def test_refused_naming_what_is_wrong(url: str) -> None:
    with pytest.raises(ValueError, match="REDIS_URL"):
        parse_cluster_url(url)


def test_the_password_is_redacted() -> None:
    shown = redact_url(URL)
    assert shown is not None
    assert "s3cret" not in shown
    assert shown.startswith("rediss+cluster://app:***@10.0.0.1,[::1]:7001,node-c:1")


def test_a_session_key_carries_its_tag_the_bus_one_tag() -> None:
    token_hash = TokenHash("3f" + "a" * 62)
    assert tag_of(token_hash) == "3f"
    assert cluster_key(token_hash).startswith("session:{3f}")
    assert len(cluster_key(token_hash)) == len("session:{3f}") + 43
    assert len(set(TAGS)) == 256 and all(len(tag) == 2 for tag in TAGS)
    for name in (CLUSTER_NAMES.channel, CLUSTER_NAMES.ack_prefix, CLUSTER_NAMES.registry):
        assert "{revocations}" in name  # one slot for every bus key and channel
