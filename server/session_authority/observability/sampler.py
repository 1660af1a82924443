"""``HealthSampler``: the latest health report, refreshed in the background.

Gauges that need a round trip (``redis_connected``, ``postgres_connected``,
``redis_total_keys``) are read from the latest sample, so a scrape never waits
on Redis or Postgres. ``/health`` asks afresh and keeps that answer too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from session_authority.core.health import HealthReport

__all__ = ["HealthSampler"]

_log = logging.getLogger("session_authority.observability")

DEFAULT_INTERVAL = 5.0


class HealthSampler:
    def __init__(
        self, probe: Callable[[], Awaitable[HealthReport]], interval: float = DEFAULT_INTERVAL
    ) -> None:
        self._probe = probe
        self._interval = interval
        self.latest: HealthReport | None = None

    async def sample(self) -> HealthReport:
        report = await self._probe()
        self.latest = report
        return report

    async def run(self) -> None:
        """Sample every ``interval`` seconds until cancelled. The probe never
        raises by contract; if a bug makes it, the gauges must not freeze."""
        while True:
            try:
                await self.sample()
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("health sample failed")
            await asyncio.sleep(self._interval)
