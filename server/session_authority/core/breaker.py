"""Circuit breaker with the runbook's semantics (aiobreaker's model, our own code).

The design card named aiobreaker 1.2.0; its states (closed / open / half-open)
are the model here, but no part of it is used: its policy falls short of the
runbook (see DESIGN-NOTES), and importing it loads redis-py (its package
imports its Redis storage), which the core must not load. Where it falls short:

* it counts *consecutive* failures only; the runbook opens on an error
  percentage over a rolling window (10 s in 10 buckets) with a minimum
  request volume. We do both (see "When it opens" below);
* it has no per-call timeout; here a call slower than ``timeout`` is a failure;
* it lets any number of trial calls through while half-open; here exactly one
  probe runs, every other caller is refused until it settles, and a probe from
  an earlier half-open period (or one overtaken by ``trip()``) cannot close it;
* it mixes ``utcnow()`` and ``now()`` when timing the reset; here all timing
  uses one injected monotonic clock;
* it calls its listeners *before* storing the new state, so a listener that
  reads the state sees the old one; ours are called after, and are told the
  cause.

So the state is a plain ``BreakerState`` here, changed only by ``_transition``.

When it opens: see ``breaker_policy.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from session_authority.core.breaker_policy import BreakerPolicy, BreakerState, OpeningRule
from session_authority.core.errors import (
    CacheBusy,
    CacheUnavailable,
    SessionAuthorityError,
    StoreBusy,
    StoreTimeout,
)

__all__ = ["Breaker", "BreakerPolicy", "BreakerState"]

_log = logging.getLogger("session_authority.breaker")
T = TypeVar("T")


Listener = Callable[[BreakerState, BreakerState, str], None]

#: Errors judged as slow calls, not failures: a wait in this process's own
#: queue for a pooled connection, and a Postgres statement past its timeout
#: (asyncpg's own timer, which fires before the breaker's and may fire late).
_SLOW = (CacheBusy, StoreBusy, StoreTimeout)


class Breaker:
    """Guards calls to one dependency (Redis; Postgres too, with ``error=StoreUnavailable``).

    ``call(op)`` runs ``op`` under the per-call timeout when the breaker is
    closed and raises ``error`` (``CacheUnavailable`` by default) without
    running it when open; ``op`` failing with ``error`` or timing out counts
    as a failure, anything else (a miss, a bad request) as a success. After
    ``reset_timeout`` the next caller triggers the half-open state; if a
    ``probe`` was given it runs once in the background (callers keep being
    refused until it settles), otherwise that caller's own ``op`` is the probe.
    """

    def __init__(
        self,
        policy: BreakerPolicy,
        *,
        name: str = "redis",
        clock: Callable[[], float] = time.monotonic,
        probe: Callable[[], Awaitable[None]] | None = None,
        error: type[SessionAuthorityError] = CacheUnavailable,
    ) -> None:
        self.policy = policy
        self.name = name
        self._clock = clock
        self._probe = probe
        self._error = error
        self._probe_task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Task[None] | None = None
        self._probing = False
        self._opened_at = 0.0
        self._cause = ""
        self.opened_count = 0
        self._listeners: list[Listener] = []
        self._rule = OpeningRule(policy, clock)
        self._generation = 0
        #: Calls running through ``call`` right now.
        self.calls_in_flight = 0
        #: Calls the dependency answered (``op`` returned or raised anything but
        #: ``error``): a slow call is the dependency's fault only if none was
        #: answered while it waited (see ``breaker_policy.py``).
        self.answered = 0
        #: Slow calls not counted as failures because others were answered meanwhile.
        self.slow_excused = 0
        self._state = BreakerState.CLOSED
        #: ``state is CLOSED``, kept by ``_transition`` (the hot path asks it on every call).
        self.closed = True

    # --- state ------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        return self._state

    def seconds_until_half_open(self) -> float:
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.policy.reset_timeout - self._clock())

    def _schedule_wakeup(self, delay: float | None = None) -> None:
        """With a probe, recovery must not wait for traffic: after the reset
        timeout, half-open and probe even if nobody calls."""
        if self._probe is None:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (sync unit test): the next caller triggers it
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.cancel()
        delay = self.policy.reset_timeout if delay is None else delay
        self._wakeup = asyncio.create_task(self._wake_after(delay))

    async def _wake_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        # allows() moves a due breaker to half-open and starts the probe. The
        # injected clock may lag the loop's, so look again shortly if not due.
        while self.state is BreakerState.OPEN and not self.allows():  # noqa: ASYNC110
            await asyncio.sleep(min(0.1, self.policy.reset_timeout))

    def set_probe(self, probe: Callable[[], Awaitable[None]]) -> None:
        """Attach the half-open probe after construction (the probe usually
        belongs to a collaborator built with this breaker: no cycle needed)."""
        self._probe = probe

    def add_listener(self, listener: Listener) -> None:
        """``listener(old, new, cause)`` is called on every transition."""
        self._listeners.append(listener)

    def _notify(self, old: BreakerState, new: BreakerState) -> None:
        _log.warning(
            "Circuit breaker %s (%s): %s", new.name, self.name, self._cause or "no cause given"
        )
        for listener in self._listeners:
            listener(old, new, self._cause)

    def _transition(self, new: BreakerState, cause: str) -> None:
        old = self.state
        self._cause = cause
        self._generation += 1  # a probe of an earlier generation can no longer act
        self._probing = False
        self._state = new
        if new is BreakerState.OPEN:
            self._opened_at = self._clock()
            self.opened_count += 1
            self._schedule_wakeup()
        elif new is BreakerState.CLOSED:
            self._rule.reset()
        self.closed = new is BreakerState.CLOSED
        # Notify after the new state is stored, so listeners see it.
        if old is not new:
            self._notify(old, new)

    def trip(self, cause: str, *, probe_in: float | None = None) -> None:
        """Open now, whatever the window says (e.g. a revocation could not be
        written to the cache, so the cache must not be read until the probe
        has re-applied it). A probe in flight can no longer close the breaker.
        ``probe_in``: seconds until the probe (default: the reset timeout), for
        a dependency known to be up but untrusted (start-up, a replaced Redis)."""
        if self.state is not BreakerState.OPEN:
            self._transition(BreakerState.OPEN, cause)
        if probe_in is not None and probe_in < self.seconds_until_half_open():
            self._opened_at = self._clock() - self.policy.reset_timeout + probe_in
            self._schedule_wakeup(probe_in)

    # --- calls -----------------------------------------------------------------

    def allows(self) -> bool:
        """Whether a call would be attempted now (moves open → half-open when due)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN and self.seconds_until_half_open() <= 0:
            self._transition(BreakerState.HALF_OPEN, "reset timeout elapsed")
            if self._probe is not None:
                self._probing = True
                self._probe_task = asyncio.create_task(
                    self._run_probe(self._probe, self._generation)
                )
                return False
            return not self._probing
        if state is BreakerState.HALF_OPEN:
            return self._probe is None and not self._probing
        return False

    async def call(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op`` through the breaker. Raises ``error`` when refused, when
        ``op`` raises it, or when ``op`` exceeds the timeout."""
        if not self.allows():
            raise self._error(f"{self.name} circuit breaker {self.state.value}")
        # A probe is tied to the half-open generation it started in.
        probe = self._generation if self.state is BreakerState.HALF_OPEN else None
        if probe is not None:
            self._probing = True
        started = self._clock()
        answered = self.answered
        self.calls_in_flight += 1
        stalled = self._stalled_since(started)
        try:
            task = await _bounded(op, self.policy.timeout, stalled)
        except asyncio.CancelledError:
            # Cut short by the caller (its deadline, or it went away): slow
            # enough, and nothing else answered meanwhile, it counts.
            if self._clock() - started >= self.policy.slow_call:
                self._slow("cancelled after a slow call", probe, answered)
            raise
        finally:
            self.calls_in_flight -= 1
            if probe is not None:
                self._probing = False
        if task is None:
            # The timer fires this late only when this process did not run (a
            # stalled machine, a long pause): the wait was not the dependency's.
            self._slow("timeout", probe, answered, late=stalled())
            raise self._timed_out()
        try:
            result = task.result()
        except self._error as exc:
            if isinstance(exc, _SLOW):
                # Our own queue, or one slow statement; its timer too may have
                # fired late (queued behind calls given a stall's grace).
                self._slow(str(exc), probe, answered, late=stalled())
            else:
                self._failure(str(exc), probe)
            raise
        except BaseException:
            self.answered += 1  # e.g. a bad request: the dependency answered
            raise
        self.answered += 1
        self._success(probe)
        return result

    def _slow(
        self, cause: str, probe: int | None, answered_before: int, *, late: bool = False
    ) -> None:
        """A call that timed out, was cut short after ``slow_call``, or waited
        out the pool. If the dependency answered other calls while this one
        waited, or the timeout itself fired late (this process was not
        running), the wait was ours (a starved or stalled process, a queue for
        a pooled connection), not the dependency's: the call still fails for
        its caller, but does not count towards opening. A probe's slowness
        always counts."""
        if probe is None and (late or self.answered != answered_before):
            self.slow_excused += 1
            return
        self._failure(cause, probe)

    async def attempt(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op`` under the per-call timeout whatever the state, without
        counting it either way: for a write that must be tried even while the
        breaker refuses calls (a revocation: this process stops reading the
        dependency, the other replicas do not). Raises ``error`` on timeout."""
        task = await _bounded(op, self.policy.timeout, self._stalled_since(self._clock()))
        if task is None:
            raise self._timed_out()
        return task.result()

    def _stalled_since(self, started: float) -> Callable[[], bool]:
        """Asked when the timeout fires: whether it fired half a timeout late,
        which happens only when this process did not run (a machine stall, a
        long pause)."""
        return lambda: self._clock() - started >= self.policy.timeout * 1.5

    def _timed_out(self) -> SessionAuthorityError:
        """``error`` for a call past the timeout (as ``raise ... from TimeoutError``)."""
        exc = self._error(f"{self.name} call timed out")
        exc.__cause__ = TimeoutError(f"no answer within {self.policy.timeout:g}s")
        return exc

    async def _run_probe(self, probe: Callable[[], Awaitable[None]], generation: int) -> None:
        try:
            async with asyncio.timeout(self.policy.timeout * 10):
                await probe()
        except TimeoutError:
            limit = self.policy.timeout * 10
            self._failure(f"probe failed: TimeoutError: not done within {limit:g}s", generation)
        except self._error as exc:
            self._failure(f"probe failed: {_cause(exc)}", generation)
        except Exception as exc:  # a bug in the probe must not wedge the breaker
            _log.exception("Circuit breaker probe crashed")
            self._failure(f"probe crashed: {type(exc).__name__}", generation)
        else:
            self._success(generation)
        finally:
            if self._generation == generation:
                self._probing = False

    def _is_current_probe(self, probe: int | None) -> bool:
        return (
            probe is not None and probe == self._generation and self.state is BreakerState.HALF_OPEN
        )

    def _success(self, probe: int | None) -> None:
        if self._is_current_probe(probe):
            self._transition(BreakerState.CLOSED, "probe succeeded")
        elif probe is None and self.state is BreakerState.CLOSED:
            self._rule.success()

    def _failure(self, cause: str, probe: int | None) -> None:
        if self._is_current_probe(probe):
            self._transition(BreakerState.OPEN, cause)
            return
        if probe is not None:
            return  # a stale probe: its breaker generation is gone
        state = self.state
        if state is not BreakerState.CLOSED:
            return
        cause_to_open = self._rule.failure(cause)
        if cause_to_open is not None:
            self._transition(BreakerState.OPEN, cause_to_open)

    async def aclose(self) -> None:
        tasks = [t for t in (self._probe_task, self._wakeup) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _cause(exc: BaseException) -> str:
    """``exc`` for a log line: its type and message, and what it was raised
    from (our errors' messages never carry a token)."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) not in text:
        text += f" (from {type(cause).__name__}{': ' if str(cause) else ''}{cause})"
    return text


#: After a timeout that fired late (``_bounded``), how long the call may still
#: finish, as a share of the timeout.
STALL_GRACE = 0.25


async def _bounded(
    op: Callable[[], Awaitable[T]], seconds: float, stalled: Callable[[], bool]
) -> asyncio.Future[T] | None:
    """Run ``op`` as its own task for at most ``seconds``: the finished
    task, or None once the time ran out. Its own task, so that the caller's
    bound holds even when the dependency's client is slow to give up (redis-py
    tidies a cancelled connection up with awaits of its own): on timeout or
    cancellation the task is cancelled and left to finish on its own.

    When the timeout fired late (``stalled()``: the process itself was frozen,
    by a machine stall or a long pause), the answer is most likely sitting in
    a socket this process has not read yet, or on its way from a dependency
    that was frozen too: the call gets ``STALL_GRACE`` of its timeout more
    before it is given up, instead of every call in flight failing at once
    the moment the process wakes up (and falling back to Postgres together)."""
    task = asyncio.ensure_future(op())
    try:
        done, _ = await asyncio.wait((task,), timeout=seconds)
        if not done and stalled():
            done, _ = await asyncio.wait((task,), timeout=seconds * STALL_GRACE)
    except asyncio.CancelledError:
        _abandon(task)
        raise
    if not done:
        _abandon(task)
        return None
    return task


def _abandon(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` without waiting for it; its outcome is retrieved (and
    dropped) when it ends, so nothing logs "exception was never retrieved"."""
    task.cancel()
    task.add_done_callback(_drop_outcome)


def _drop_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
