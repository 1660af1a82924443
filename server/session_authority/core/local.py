"""The in-process (L1) cache in front of Redis, and the port that keeps it honest.

An L1 entry is a copy of what Redis answered (or what a confirmed fill wrote),
kept for at most ``ttl`` seconds and never past the Redis entry's own expiry.
It is only as good as the revocations it hears about, so:

* every revocation is pushed to every process (``RevocationFeed.publish``), and
  Invalidate returns once every live subscriber has acknowledged dropping its
  copies (or says it could not: ``Revocation.propagated``);
* a process serves L1 hits only while it is sure it receives revocations
  (``RevocationFeed.live``) and its Redis breaker is closed; whenever it stops
  being sure it forgets everything;
* a copy may only be stored if no revocation arrived since the read it comes
  from began (``version``): a Redis read that raced a revocation cannot put the
  stale answer back after the drop.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol

from session_authority.core.domain import TokenHash
from session_authority.core.ports import CacheEntry

__all__ = ["LocalCache", "RevocationFeed"]


class RevocationFeed(Protocol):
    """Revocations pushed to every process sharing the cache (Redis pub/sub)."""

    @property
    def live(self) -> bool:
        """Whether this process is sure to hear every revocation published from
        now on (subscribed, and its subscription answered recently)."""

    async def publish(self, token_hashes: Iterable[TokenHash] | None) -> bool:
        """Tell every subscribing process to drop these hashes (``None``: drop
        everything). True once every subscriber counted at publish time has
        acknowledged, False when the bounded wait ran out or publishing failed.
        Never raises for the cache's failures."""


class LocalCache:
    """A bounded LRU of token hash → entry with a short TTL (monotonic clock)."""

    def __init__(
        self, max_entries: int, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1 or ttl <= 0:
            raise ValueError("the L1 cache needs a positive size and TTL")
        self.max_entries = max_entries
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[TokenHash, tuple[CacheEntry, float]] = OrderedDict()
        #: Bumped by every drop: a copy read before a drop must not be stored after it.
        self.version = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token_hash: TokenHash) -> CacheEntry | None:
        found = self._entries.get(token_hash)
        if found is None:
            return None
        entry, expires_at = found
        if self._clock() >= expires_at:
            del self._entries[token_hash]
            return None
        return entry

    def put(self, token_hash: TokenHash, entry: CacheEntry, ttl_left: float, version: int) -> bool:
        """Keep ``entry`` for ``min(ttl, ttl_left)`` seconds, unless a drop has
        happened since ``version`` was read. False when refused."""
        if version != self.version or ttl_left <= 0:
            return False
        entries = self._entries
        entries[token_hash] = (entry, self._clock() + min(self.ttl, ttl_left))
        entries.move_to_end(token_hash)
        if len(entries) > self.max_entries:
            entries.popitem(last=False)
        return True

    def drop(self, token_hashes: Iterable[TokenHash] | None) -> None:
        """Forget these hashes (``None``: everything)."""
        self.version += 1
        if token_hashes is None:
            self._entries.clear()
            return
        for token_hash in token_hashes:
            self._entries.pop(token_hash, None)
