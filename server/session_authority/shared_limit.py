"""``SharedMissLimiter``: the unknown-token limit (``core.miss_limit``) shared by
the worker processes of ``serve --workers N``.

Why: the kernel spreads a caller's connections over the workers, so a limit kept
in each worker gives one caller N times UNKNOWN_TOKEN_RATE and UNKNOWN_TOKEN_BURST.
The supervisor makes this table before it forks; every worker inherits the same
anonymous shared memory and the same locks, so all of them draw on one bucket per
caller.

The invariant: the table is a fixed array of token buckets, and a caller always
uses the one bucket at ``hash(caller) % slots``. Each slot holds, as fixed-width
``struct`` fields, the hash of the caller that last took from it, its credit and
the time (``time.monotonic``: one clock for every process on the host) it was
last refilled. A bucket never holds more than the burst and refills at the rate,
whoever uses it, so two callers whose hashes meet share one budget (stricter for
both), and no caller ever gets more than its own bucket would give: a collision
can only make the limit stricter, never looser. The hash is keyed by a random
secret of the replica's, so a caller cannot pick an address that lands on
someone else's bucket on purpose. Memory is fixed (``slots`` x 24 bytes); no
caller is ever forgotten or evicted, a bucket left alone is simply full again.

Each stripe of slots has its own ``multiprocessing`` lock (a semaphore in shared
memory), held only to read, refill and write one slot: no I/O, no await. It is
consulted only when a validation would ask Postgres, never on a cache hit.
"""

from __future__ import annotations

import hashlib
import mmap
import multiprocessing
import os
import struct
import time
from collections.abc import Callable
from typing import Any

__all__ = ["SharedMissLimiter"]

_SLOT = struct.Struct("=Qdd")  # caller hash, credit, refilled at
_LOCK_WAIT = 1.0  # seconds; only a worker that died holding the lock makes it wait


class SharedMissLimiter:
    """A ``core.miss_limit.MissLimit`` over shared memory; make it before the
    fork, use it in any process forked after."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        slots: int = 65_536,
        stripes: int = 16,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        if slots < 1 or stripes < 1:
            raise ValueError("slots and stripes must be at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._slots = slots
        self._table = mmap.mmap(-1, slots * _SLOT.size)  # zeroed, shared across fork
        context = multiprocessing.get_context("fork")
        self._locks: list[Any] = [context.Lock() for _ in range(min(stripes, slots))]
        self._key = os.urandom(16)

    def take(self, caller: str) -> bool:
        """Take a credit for a Postgres lookup by ``caller``; False when it has
        none (or when the table's lock cannot be had: refusing is the safe side)."""
        tag, index = self._where(caller)
        lock = self._locks[index % len(self._locks)]
        if not lock.acquire(timeout=_LOCK_WAIT):
            return False
        try:
            now = self._clock()
            credit = self._refilled(index, now)
            granted = credit >= 1
            _SLOT.pack_into(
                self._table, index * _SLOT.size, tag, credit - 1 if granted else credit, now
            )
            return granted
        finally:
            lock.release()

    def refund(self, caller: str) -> None:
        """Give back a credit: the lookup found the token (or could not be made)."""
        _, index = self._where(caller)
        lock = self._locks[index % len(self._locks)]
        if not lock.acquire(timeout=_LOCK_WAIT):
            return  # keeping the credit is the stricter side
        try:
            offset = index * _SLOT.size
            tag, credit, at = _SLOT.unpack_from(self._table, offset)
            _SLOT.pack_into(self._table, offset, tag, min(self.burst, credit + 1), at)
        finally:
            lock.release()

    def limited(self, caller: str) -> bool:
        """Whether ``caller`` would be refused now (no credit taken; no lock:
        a hint, read from one slot)."""
        _, index = self._where(caller)
        return self._refilled(index, self._clock()) < 1

    def _where(self, caller: str) -> tuple[int, int]:
        digest = hashlib.blake2b(caller.encode(), digest_size=8, key=self._key).digest()
        tag = int.from_bytes(digest, "little") or 1  # 0 marks a slot never written
        return tag, tag % self._slots

    def _refilled(self, index: int, now: float) -> float:
        tag, credit, at = _SLOT.unpack_from(self._table, index * _SLOT.size)
        if tag == 0:  # never written (the mapping starts zeroed): a full bucket
            return float(self.burst)
        return float(min(self.burst, credit + max(0.0, now - at) * self.rate))
