"""Readiness, checked at most once a second per process.

``/readyz`` is unauthenticated: without a cache, a flood of probes would take a database
connection (and a Redis and vector-store round trip) each, competing with real traffic
for the pool. One check runs at a time; requests meanwhile share it, and its answer is
reused for :data:`READY_CACHE_S`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

CHECK_TIMEOUT_S = 2.0
READY_CACHE_S = 1.0

Probe = Callable[[], Awaitable[object]]


async def _check(probe: Probe) -> str:
    try:
        await asyncio.wait_for(probe(), CHECK_TIMEOUT_S)
    except TimeoutError:
        return f"timed out after {CHECK_TIMEOUT_S:.0f}s"
    except Exception as exc:
        return f"unreachable: {type(exc).__name__}: {exc}"[:300]
    return "ok"


class Readiness:
    """The backing services' state, refreshed at most every ``max_age_s``."""

    def __init__(self, probes: dict[str, Probe], max_age_s: float = READY_CACHE_S) -> None:
        self.probes = probes
        self.max_age_s = max_age_s
        self._checked_at = float("-inf")
        self._checks: dict[str, str] = {}
        self._running: asyncio.Task[dict[str, str]] | None = None

    async def checks(self) -> dict[str, str]:
        """Each service's state ("ok" or why not), at most ``max_age_s`` old."""
        if time.monotonic() - self._checked_at < self.max_age_s:
            return dict(self._checks)
        if self._running is None:
            self._running = asyncio.create_task(self._run())
        return dict(await asyncio.shield(self._running))

    async def _run(self) -> dict[str, str]:
        try:
            results = await asyncio.gather(*(_check(p) for p in self.probes.values()))
            self._checks = dict(zip(self.probes, results, strict=True))
            self._checked_at = time.monotonic()
            return self._checks
        finally:
            self._running = None

    def body(self, checks: dict[str, str]) -> tuple[dict[str, Any], bool]:
        """The response body, and whether every service is ready."""
        ready = all(r == "ok" for r in checks.values())
        return {"status": "ready" if ready else "not ready", "checks": checks}, ready
