"""The per-caller limits' key: one spelling per address, whatever gRPC's peer string."""

from __future__ import annotations

import pytest

from session_authority.transport.peers import peer_address


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:10.0.0.7:53412", "10.0.0.7"),
        ("ipv6:[::ffff:10.0.0.7]:53412", "10.0.0.7"),  # IPv4 on a dual-stack socket
        ("ipv6:%5B::ffff:10.0.0.7%5D:53412", "10.0.0.7"),
        ("ipv6:%5B::1%5D:5432", "::1"),
        ("ipv6:[2001:DB8:0::1]:443", "2001:db8::1"),
        ("unix:/run/sa.sock", "unix:/run/sa.sock"),
        ("", ""),
    ],
)
def test_one_spelling_per_address(peer: str, address: str) -> None:
    assert peer_address(peer) == address


def test_ports_do_not_matter() -> None:
    assert peer_address("ipv4:10.0.0.7:1") == peer_address("ipv6:[::ffff:10.0.0.7]:2")
