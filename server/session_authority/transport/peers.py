"""A caller's address as the per-caller limits count it, from gRPC's peer string."""

from __future__ import annotations

import ipaddress
from urllib.parse import unquote

__all__ = ["peer_address"]


def peer_address(peer: str | None) -> str:
    """The peer's IP without its port, one spelling per address:
    ``ipv4:10.0.0.7:53412`` and ``ipv6:[::ffff:10.0.0.7]:53412`` (the same
    caller reaching a dual-stack socket) are both ``10.0.0.7``;
    ``ipv6:[2001:db8::1]:443`` (gRPC writes ``ipv6:%5B2001:db8::1%5D:443``)
    is ``2001:db8::1``. Anything else (``unix:``
    paths) is returned as is. Behind a proxy it is the proxy."""
    text = peer or ""
    kind, _, rest = text.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return text
    host, sep, port = unquote(rest).rpartition(":")
    if not sep or not port.isdigit():
        return text
    try:
        address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]").split("%")[0])
    except ValueError:
        return text
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)
