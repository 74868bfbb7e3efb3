"""The writes a chat request leaves behind its answer (its settlement, usage event,
content-rule hit) run as tasks of their own, so the client gets its answer and its slots
back first and a client that leaves cannot cancel them: one :class:`BackgroundWrites`
per app, made and closed by the app's lifespan (app/server/factory.py), which the chat
service starts its writes on, the limiter's budget rebuild waits on (their tokens are
not in PostgreSQL yet), tests wait on, and shutdown waits for before the usage writer
and the database pool close, so no usage event is lost to a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)
CLOSE_TIMEOUT_S = 30.0  # how long shutdown waits for the writes under way


class BackgroundWrites:
    """The tasks writing what chat requests leave behind, kept alive until done."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        """Writes started and not finished yet (tests wait for 0)."""
        return len(self._tasks)

    def start(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` as its own task, kept alive until done (cancelling the caller
        does not cancel it)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def done(self, timeout_s: float) -> None:
        """Until the writes under way now have finished (at most ``timeout_s``)."""
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """At shutdown: wait for every write, including those the writes start (a
        settlement starts its usage event); after ``timeout_s``, cancel what is left.
        Only this event loop's writes (a test client may run the lifespan on a loop of
        its own, apart from its requests': those are left to their loop)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (ours := self._on(loop)) and loop.time() < deadline:
            await asyncio.wait(ours, timeout=deadline - loop.time())
        left = self._on(loop)
        if left:
            log.error("shutdown: %d background writes did not finish in %.0f s; cancelled",
                      len(left), timeout_s)
            for task in left:
                task.cancel()
            await asyncio.wait(left, timeout=1.0)

    def _on(self, loop: asyncio.AbstractEventLoop) -> list[asyncio.Task[None]]:
        return [task for task in self._tasks if task.get_loop() is loop]
