"""Worker threads inside the API process, for the embedded (dev) stack."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from litestar import Litestar

from app.settings import Settings
from workers.broker import setup_broker, start_worker

STOP_TIMEOUT_MS = 10_000


def embedded_workers(settings: Settings) -> Callable[[Litestar], AbstractAsyncContextManager[None]]:
    """A lifespan that runs Dramatiq worker threads for as long as the app runs."""

    @asynccontextmanager
    async def run(app: Litestar) -> AsyncIterator[None]:
        broker = setup_broker(settings)
        worker = start_worker(broker, settings.worker.threads)
        app.state.broker = broker
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop, STOP_TIMEOUT_MS)
            broker.close()

    return run
