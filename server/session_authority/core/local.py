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

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol

from session_authority.core.domain import Session, Source, TokenHash, Validation
from session_authority.core.ports import CacheEntry

__all__ = ["LocalCache", "LocalCopy", "RevocationFeed"]

#: One L1 copy: the entry, and for a session that was live when stored, the
#: answer it gives (made once, not on every hit) until its ``expires_at``, in
#: seconds since the epoch (a float compares in a fraction of an aware datetime).
#: A verdict's copy is judged on every hit (``-inf``); its answer, if any, only
#: carries the provenance (``cache_age``) the judged answer reports.
LocalCopy = tuple[CacheEntry, Validation | None, float]


class RevocationFeed(Protocol):
    """Revocations pushed to every process sharing the cache (Redis pub/sub)."""

    @property
    def live(self) -> bool:
        """Whether this process is sure to hear, and is waited for by, every
        revocation published from now on (subscribed as Redis confirmed, its
        subscription heard from recently, and registered with publishers)."""

    @property
    def state(self) -> str:
        """``live``, or a word saying why not (shown in Health)."""

    @property
    def restarts(self) -> int:
        """How many times the feed's listener ended and was started again."""

    @property
    def malformed(self) -> int:
        """Messages received that did not parse (ignored; each dropped every copy)."""

    async def publish(self, token_hashes: Iterable[TokenHash] | None) -> bool:
        """Tell every process that may hold copies to drop these hashes
        (``None``: drop everything). True once every process registered as
        possibly answering from its copies at publish time has acknowledged
        (one that is not registered has stopped answering from them), False
        when the bounded wait ran out or publishing failed. Never raises for
        the cache's failures."""


#: The share of a copy's life after which a hit asks for a fresh one (``on_due``).
#: Half: on a saturated worker a Redis read took over a quarter of a 1 s life.
_DUE_AFTER = 0.5


class LocalCache:
    """A bounded LRU of token hash → entry with a short TTL (monotonic clock).
    Keyed by the hash's hex string: the hit path hashes a token once and
    looks it up without building a ``TokenHash``."""

    def __init__(
        self, max_entries: int, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1 or ttl <= 0:
            raise ValueError("the L1 cache needs a positive size and TTL")
        self.max_entries = max_entries
        self.ttl = ttl
        self._clock = clock
        # hex digest -> (expires at, refresh from at, the copy); monotonic seconds.
        self._entries: OrderedDict[str, tuple[float, float, LocalCopy]] = OrderedDict()
        #: Bumped by every drop: a copy read before a drop must not be stored after it.
        self.version = 0
        #: Told, once per copy, of a hit in the second half of the copy's life
        #: (the owner re-reads Redis then, so a hot session's copy is replaced
        #: before it expires, instead of every caller missing at once).
        self.on_due: Callable[[str], None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token_hash: TokenHash) -> CacheEntry | None:
        found = self.lookup(token_hash.hex)
        return None if found is None else found[0]

    def lookup(self, hex_digest: str) -> LocalCopy | None:
        """The copy kept for the token hash ``hex_digest``, if still fresh."""
        found = self._entries.get(hex_digest)
        if found is None:
            return None
        now = self._clock()
        if now >= found[0]:
            del self._entries[hex_digest]
            return None
        if now >= found[1] and self.on_due is not None:
            self._entries[hex_digest] = (found[0], math.inf, found[2])  # told once
            self.on_due(hex_digest)
        return found[2]

    def put(
        self,
        token_hash: TokenHash,
        entry: CacheEntry,
        ttl_left: float,
        version: int,
        age: float | None = None,
    ) -> bool:
        """Keep ``entry`` for ``min(ttl, ttl_left)`` seconds, unless a drop has
        happened since ``version`` was read. False when refused. ``age``: how old
        the Redis entry was when read, which every answer from this copy reports
        (one answer per copy, so its encoded reply is made once: the copy's own
        age would change on every hit; it adds at most ``ttl``)."""
        if version != self.version or ttl_left <= 0:
            return False
        copy: LocalCopy = (entry, None, 0.0)
        if isinstance(entry, Session) and entry.revoked_at is None:
            answer = Validation.live(entry, Source.CACHE, cache_age=age, local=True)
            copy = (entry, answer, entry.expires_at.timestamp())
        elif age is not None:  # judged on every hit (-inf: "expired"); it keeps the age
            copy = (entry, Validation(False, Source.CACHE, cache_age=age, local=True), -math.inf)
        entries, key = self._entries, token_hash.hex
        now, life = self._clock(), min(self.ttl, ttl_left)
        entries[key] = (now + life, now + life * _DUE_AFTER, copy)
        entries.move_to_end(key)
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
            self._entries.pop(token_hash.hex, None)
