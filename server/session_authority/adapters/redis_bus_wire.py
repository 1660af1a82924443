"""The revocation bus's wire (``redis_bus.py``): its two Redis scripts, its
message format, and the bookkeeping of one publish's acknowledgements.

Message format: ``<sender>|<requests>|<hashes>`` on the revocation channel
(comma-separated request ids; comma-separated 64-hex token hashes, or ``*``),
``<acker>|<requests>`` on a publisher's acknowledgement channel. ASCII only;
anything else is malformed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

__all__ = [
    "ALL",
    "PUBLISH_SCRIPT",
    "REGISTER_SCRIPT",
    "Acks",
    "as_bytes",
    "as_text",
    "batch",
    "parse",
    "valid_hashes",
]

#: "Drop everything" in place of a list of hashes.
ALL = "*"
_HEX = frozenset("0123456789abcdef")

#: Forget expired registrations, publish, return the registered processes: atomic.
#: KEYS[1] the registry hash; ARGV: channel, message, registration key prefix, hash TTL.
PUBLISH_SCRIPT = """
local found = redis.call('HGETALL', KEYS[1])
local live, dead = {}, false
for i = 1, #found, 2 do
  if redis.call('GET', ARGV[3] .. found[i]) then
    live[#live + 1] = found[i]
  else
    dead = true
  end
end
if dead then
  redis.call('DEL', KEYS[1])
  for _, id in ipairs(live) do redis.call('HSET', KEYS[1], id, '1') end
  if #live > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return live
"""
#: Register (or renew) a process; 1 when it was not registered (expired, forgotten
#: by a publisher, flushed). KEYS: the registry hash, the process's key;
#: ARGV: its id, the registration TTL, the hash TTL (all ms).
REGISTER_SCRIPT = """
local known = redis.call('HGET', KEYS[1], ARGV[1]) and redis.call('GET', KEYS[2])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], '1')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if known then return 0 end
return 1
"""


#: Most hashes merged into one message; a bigger batch waits for the next one.
_BATCH_HASHES = 1000


def batch(
    outbox: list[tuple[str, list[str] | None]],
) -> tuple[list[str], list[str] | None]:
    """Take requests off the front of ``outbox`` (in place) for one message:
    their ids and merged hashes (``None``: one of them drops everything)."""
    requests: list[str] = []
    merged: set[str] | None = set()
    taken = 0
    for request, hashes in outbox:
        if (
            requests
            and merged is not None
            and (hashes is None or len(merged) + len(hashes) > _BATCH_HASHES)
        ):
            break
        requests.append(request)
        taken += 1
        if hashes is None or merged is None:
            merged = None
        else:
            merged.update(hashes)
    del outbox[:taken]
    return requests, None if merged is None else sorted(merged)


def as_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def as_text(value: object) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def valid_hashes(hashes: Sequence[str]) -> bool:
    """Every one 64 lowercase hex digits (a ``TokenHash``'s form)."""
    return all(len(h) == 64 and _HEX.issuperset(h) for h in hashes)


def parse(data: object) -> list[str] | None:
    """``a|b|…`` as ASCII fields, each non-empty; None when it is not that."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    if not isinstance(data, bytes):
        return None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    fields = text.split("|")
    if any(not field for field in fields):
        return None
    return fields


class Acks:
    """Acknowledgements of one published request; ``done`` once every
    expected process has acknowledged (those heard before the expectation
    was known count too)."""

    def __init__(self) -> None:
        self.heard: set[str] = set()
        self.expected: set[str] | None = None
        self.error: Exception | None = None
        self.done = asyncio.Event()

    def fail(self, error: Exception) -> None:
        self.error = error
        self.done.set()

    def add(self, acker: str) -> None:
        self.heard.add(acker)
        self._check()

    def expect(self, processes: set[str]) -> None:
        self.expected = processes
        self._check()

    def _check(self) -> None:
        if self.expected is not None and self.expected <= self.heard:
            self.done.set()
