"""Worker threads inside the API process, for the embedded (dev) stack.

They share the API's vector store (an embedded shard folder opens in one process only)
and its loaded models (one copy of the embedding model in memory).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from litestar import Litestar

from app.settings import Settings
from workers.broker import setup_broker, start_worker
from workers.runtime import WorkerRuntime

STOP_TIMEOUT_MS = 10_000


def embedded_workers(settings: Settings) -> Callable[[Litestar], AbstractAsyncContextManager[None]]:
    """A lifespan that runs Dramatiq worker threads for as long as the app runs."""

    @asynccontextmanager
    async def run(app: Litestar) -> AsyncIterator[None]:
        broker = setup_broker(settings)
        # An embedded store is shared (one process per shard folder); a server client is
        # bound to the API's event loop, so the runtime opens its own.
        shared = None if settings.qdrant.url else app.state.vector_store
        runtime = WorkerRuntime(settings, broker, store=shared, models=app.state.models)
        await asyncio.to_thread(runtime.start)
        worker = start_worker(broker, settings.worker.threads)
        app.state.broker = broker
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop, STOP_TIMEOUT_MS)
            await asyncio.to_thread(runtime.stop)
            broker.close()

    return run
